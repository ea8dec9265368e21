//! request::inspect for every ApiKind, and the body rewrites (the three one-member ones and
//! dropping the oldest turns), whose results are read back with inspect(Other) to check that the
//! rewrite did what it says, and with serde_json to check that nothing else changed.
#![no_main]

mod common;

use common::Params;
use libfuzzer_sys::fuzz_target;
use tollgate::api::request::{inspect, inspect_with, message_tokens, with_include_usage, with_max_tokens, with_model};
use tollgate::api::trim::{trim_oldest, Dialect};
use tollgate::count::usage::ApiKind;

use serde_json::{Map, Value};

/// The body's members as serde_json reads them (the last of repeated keys), but `changed`; None
/// when serde_json cannot read it into a `Value` (members the rewrites skip may hold a lone
/// surrogate or a number beyond f64, which inspect refuses only where it reads).
fn rest(body: &[u8], changed: &[&str]) -> Option<Map<String, Value>> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice(body) else {
        return None;
    };
    for key in changed {
        obj.remove(*key);
    }
    Some(obj)
}

/// What a rewrite kept: the other members are equal wherever the input reads as a `Value`.
fn same_rest(out: &[u8], data: &[u8], changed: &[&str]) {
    if let Some(before) = rest(data, changed) {
        assert_eq!(rest(out, changed), Some(before), "more than {changed:?} changed");
    }
}

const KINDS: [ApiKind; 6] = [
    ApiKind::ChatCompletions,
    ApiKind::Completions,
    ApiKind::Embeddings,
    ApiKind::Responses,
    ApiKind::Messages,
    ApiKind::Other,
];

fuzz_target!(|data: &[u8]| {
    let mut p = Params::new(data);
    for kind in KINDS {
        if let Ok(mut info) = inspect(kind, data) {
            // A strict kind accepts a subset of what Other accepts, with the same reading (only
            // Responses adds per-item overhead to the estimate).
            let Ok(loose) = inspect(ApiKind::Other, data) else {
                panic!("{kind:?} accepted a body that Other refused");
            };
            if kind == ApiKind::Responses {
                assert!(info.prompt_tokens_estimate >= loose.prompt_tokens_estimate);
                info.prompt_tokens_estimate = loose.prompt_tokens_estimate;
            }
            assert_eq!(info, loose, "{kind:?} and Other read the body differently");
            // The leading-prompt hash (prompt affinity) changes nothing else of the reading.
            let Ok(mut hashed) = inspect_with(kind, data, true) else {
                panic!("{kind:?}: asking for the prefix hash refused the body");
            };
            hashed.prefix = None;
            hashed.prompt_tokens_estimate = info.prompt_tokens_estimate;
            assert_eq!(hashed, info);
        }
    }

    // The gateway rewrites only bodies that inspect accepted.
    let readable = inspect(ApiKind::Other, data).is_ok();
    if let Some(out) = with_include_usage(data) {
        let info = inspect(ApiKind::Other, &out);
        assert!(!readable || info.as_ref().is_ok_and(|i| i.include_usage), "with_include_usage: {info:?}");
        same_rest(&out, data, &["stream_options"]);
        // Inside an object, only its include_usage changed.
        let options = |body: &[u8]| match rest(body, &[])?.remove("stream_options") {
            Some(Value::Object(mut o)) => {
                o.remove("include_usage");
                Some(o)
            }
            _ => None,
        };
        if let Some(before) = options(data) {
            assert_eq!(options(&out), Some(before));
        }
    }
    let model = p.pick(&["gpt-4o-mini", "", "deployment/with spaces \"quoted\" \u{1F600}", "\0\n"]);
    if let Some(out) = with_model(data, model) {
        let info = inspect(ApiKind::Other, &out);
        assert!(!readable || info.as_ref().is_ok_and(|i| i.model.as_deref() == Some(model)), "with_model: {info:?}");
        same_rest(&out, data, &["model"]);
    }
    let n = p.number();
    if let Some(out) = with_max_tokens(data, n) {
        let info = inspect(ApiKind::Other, &out);
        assert!(!readable || info.as_ref().is_ok_and(|i| i.max_tokens == Some(n)), "with_max_tokens({n}): {info:?}");
        same_rest(&out, data, &["max_tokens", "max_completion_tokens", "max_output_tokens"]);
    }
    // Dropping the oldest turns: a JSON object again, as many messages fewer as it says, the
    // estimate lower by what it says, nothing else changed.
    let need = p.number();
    for dialect in [Dialect::Chat, Dialect::Messages] {
        let Some(t) = trim_oldest(dialect, data, message_tokens, |d| d >= need) else { continue };
        let count = |body: &[u8]| rest(body, &[]).and_then(|o| o.get("messages").and_then(Value::as_array).map(Vec::len));
        if let (Some(before), Some(after)) = (count(data), count(&t.body)) {
            assert_eq!(after + t.messages, before, "{dialect:?}: dropped {} of {before}", t.messages);
        }
        assert!(t.messages > 0);
        if let (Ok(before), Ok(after)) = (inspect(ApiKind::Other, data), inspect(ApiKind::Other, &t.body)) {
            assert_eq!(after.prompt_tokens_estimate + t.tokens, before.prompt_tokens_estimate, "{dialect:?}");
        }
        same_rest(&t.body, data, &["messages"]);
    }
});
