//! The key pool: which provider key an attempt carries.
pub mod keypool;
