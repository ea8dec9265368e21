//! What a request's path is for, from the request headers alone.
//!
//! tollgate counts five APIs: chat completions, completions, embeddings, responses and messages
//! ([`ApiKind`]). `GET /v1/models` (and `/v1/models/{id}`) it answers itself, from its configuration,
//! so that SDK-based tools that list models first keep working and no provider is called. Every other
//! path (images, audio, files, batches, moderations, Anthropic's `count_tokens`, a stored response)
//! would go out with a pool key and never be counted by tokens: it is refused with a 404 in the
//! client's shape, unless the operator lists it in `passthrough_paths`; then it is passed through as
//! it is, to a provider that speaks the client's API, and counted as one request.

use super::Refusal;
use crate::api::errors::ErrorKind;
use crate::api::models::percent_decoded;
use crate::config::Config;
use crate::count::usage::ApiKind;
use crate::host::Headers;

#[derive(Debug, Clone, PartialEq)]
pub enum PathUse {
    /// One of the APIs tollgate reads and counts.
    Counted,
    /// The gateway's model list (None) or one model of it (its id, percent-decoded).
    Models(Option<String>),
    /// A path the operator lets through (`passthrough_paths`).
    Passthrough,
    /// Any other path: a 404.
    Refused(Refusal),
}

const MODELS: &str = "/v1/models";

/// `hdrs` are the request headers (only read for a path tollgate does not count).
pub fn classify(cfg: &Config, hdrs: &Headers, path: &str, api: ApiKind) -> PathUse {
    if api != ApiKind::Other {
        return PathUse::Counted;
    }
    let method = hdrs.get_str(":method").unwrap_or_default();
    let bare = crate::api::path_only(path);
    if method == "GET" {
        if let Some(rest) = bare.strip_prefix(MODELS) {
            let rest = rest.trim_end_matches('/');
            if rest.is_empty() {
                return PathUse::Models(None);
            }
            if let Some(id) = rest.strip_prefix('/') {
                return PathUse::Models(Some(percent_decoded(id)));
            }
        }
    }
    if cfg.access.passthrough.matches(bare) {
        return PathUse::Passthrough;
    }
    // OpenAI answers an unknown path with "Invalid URL (METHOD /path)". The query is left out of
    // the message: it may carry anything.
    let msg = format!(
        "Invalid URL ({method} {bare}): this gateway passes chat completions, completions, embeddings, responses and messages to providers and answers the model list itself; its operator can let other paths through with `passthrough_paths`."
    );
    PathUse::Refused(Refusal::new(ErrorKind::NotFound, msg).outcome("rejected_path"))
}

#[cfg(test)]
mod tests {
    use super::super::testing::config;
    use super::*;

    #[test]
    fn counted_apis_the_model_list_passthrough_and_the_rest() {
        let cfg = config(
            r#"{"passthrough_paths":["/v1/messages/count_tokens","/v1/audio/*"],
                "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
        );
        let use_of =
            |method: &str, path: &str| classify(&cfg, &get(method), path, ApiKind::from_path(path));
        for p in [
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/completions",
        ] {
            assert_eq!(use_of("POST", p), PathUse::Counted, "{p}");
        }
        assert_eq!(use_of("GET", "/v1/models"), PathUse::Models(None));
        assert_eq!(use_of("GET", "/v1/models/?x=1"), PathUse::Models(None));
        assert_eq!(
            use_of("GET", "/v1/models/gpt-4o"),
            PathUse::Models(Some("gpt-4o".into()))
        );
        assert_eq!(
            use_of("GET", "/v1/models/meta%2Fllama-3%3A8b"),
            PathUse::Models(Some("meta/llama-3:8b".into()))
        );
        assert!(refused(use_of("DELETE", "/v1/models/ft:x")));
        assert!(refused(use_of("GET", "/v1/modelsx")));
        assert_eq!(
            use_of("POST", "/v1/messages/count_tokens"),
            PathUse::Passthrough
        );
        assert_eq!(
            use_of("POST", "/v1/audio/transcriptions?x=1"),
            PathUse::Passthrough
        );
        for p in [
            "/v1/images/generations",
            "/v1/files",
            "/v1/batches",
            "/v1/moderations",
            "/v1/responses/resp_1",
            "/v1/messages/batches",
            "/",
        ] {
            assert!(refused(use_of("POST", p)), "{p}");
        }
    }

    fn get(method: &str) -> Headers {
        Headers::of([(&b":method"[..], method.as_bytes())].into_iter())
    }

    fn refused(u: PathUse) -> bool {
        matches!(u, PathUse::Refused(_))
    }

    #[test]
    fn a_refused_path_is_a_404_that_names_it_without_its_query() {
        let cfg = config(
            r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
        );
        let path = "/v1/images/generations?api_key=sk-x";
        let PathUse::Refused(r) = classify(&cfg, &get("POST"), path, ApiKind::from_path(path))
        else {
            panic!("not refused")
        };
        assert_eq!(
            (r.kind, r.kind.status(), r.outcome),
            (ErrorKind::NotFound, 404, "rejected_path")
        );
        assert!(r
            .message
            .starts_with("Invalid URL (POST /v1/images/generations): "));
        assert!(!r.message.contains("sk-x"));
    }
}
