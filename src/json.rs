//! JSON values for everything the module parses and writes: config, request and response bodies,
//! translation. For now the names re-export serde_json; the module's own implementation replaces
//! them without changing the callers, so code outside this file uses only `crate::json`.
pub use serde_json::{
    from_slice, from_str, json, to_string, to_vec, to_vec_pretty, Error, Map, Number, Value,
};
