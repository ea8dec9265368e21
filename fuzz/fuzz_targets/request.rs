//! request::inspect for every ApiKind, and the three body rewrites, whose results are read back
//! with inspect(Other) to check that the rewrite did what it says.
#![no_main]

mod common;

use common::Params;
use libfuzzer_sys::fuzz_target;
use tollgate::api::request::{inspect, with_include_usage, with_max_tokens, with_model};
use tollgate::count::usage::ApiKind;

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
        }
    }

    if let Some(out) = with_include_usage(data) {
        let info = inspect(ApiKind::Other, &out);
        assert!(info.as_ref().is_ok_and(|i| i.include_usage), "with_include_usage: {info:?}");
    }
    let model = p.pick(&["gpt-4o-mini", "", "deployment/with spaces \"quoted\" \u{1F600}", "\0\n"]);
    if let Some(out) = with_model(data, model) {
        let info = inspect(ApiKind::Other, &out);
        assert!(info.as_ref().is_ok_and(|i| i.model.as_deref() == Some(model)), "with_model: {info:?}");
    }
    let n = p.number();
    if let Some(out) = with_max_tokens(data, n) {
        let info = inspect(ApiKind::Other, &out);
        assert!(info.as_ref().is_ok_and(|i| i.max_tokens == Some(n)), "with_max_tokens({n}): {info:?}");
    }
});
