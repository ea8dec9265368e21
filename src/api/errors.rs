//! Error bodies the gateway itself answers with, shaped like the API the client called, so the
//! client's own SDK parses them (openai-python / anthropic-sdk read `error.type` and `error.message`).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientApi {
    OpenAi,
    Anthropic,
}

impl ClientApi {
    /// `/v1/messages` and everything under it (`count_tokens`, `batches`) is Anthropic's Messages API;
    /// every other path speaks OpenAI's shape.
    pub fn from_path(path: &str) -> ClientApi {
        let path = super::path_only(path);
        match path.strip_prefix("/v1/messages") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => ClientApi::Anthropic,
            _ => ClientApi::OpenAi,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    PermissionDenied,
    NotFound,
    RequestTooLarge,
    RateLimit,
    Overloaded,
    Internal,
    BadGateway,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::RateLimit => 429,
            ErrorKind::Overloaded => 503,
            ErrorKind::Internal => 500,
            ErrorKind::BadGateway => 502,
        }
    }

    /// `error.type` as OpenAI really sends it: every 4xx but 429 is "invalid_request_error" (bad
    /// keys come as that type with code "invalid_api_key", missing scopes and unknown models too),
    /// 429s carry the exhausted limit ("requests" or "tokens"), 5xx are "server_error".
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::Authentication
            | ErrorKind::PermissionDenied
            | ErrorKind::NotFound
            | ErrorKind::RequestTooLarge => "invalid_request_error",
            ErrorKind::RateLimit => "requests",
            ErrorKind::Overloaded | ErrorKind::Internal | ErrorKind::BadGateway => "server_error",
        }
    }

    pub fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::PermissionDenied => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Internal | ErrorKind::BadGateway => "api_error",
        }
    }
}

/// JSON error body. `code` and `param` only exist in OpenAI's shape; a 429 without a code gets
/// OpenAI's "rate_limit_exceeded".
pub fn error_body(
    api: ClientApi,
    kind: ErrorKind,
    message: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> Vec<u8> {
    error_body_typed(api, kind, message, code, param, None)
}

/// As [`error_body`], with OpenAI's `error.type` overridden, e.g. `Some("tokens")` for a 429 caused by
/// a token limit rather than a request limit. Ignored for Anthropic.
pub fn error_body_typed(
    api: ClientApi,
    kind: ErrorKind,
    message: &str,
    code: Option<&str>,
    param: Option<&str>,
    openai_type: Option<&str>,
) -> Vec<u8> {
    match api {
        ClientApi::OpenAi => {
            let code = code.or((kind == ErrorKind::RateLimit).then_some("rate_limit_exceeded"));
            to_vec(&OpenAiErrorBody {
                error: OpenAiError {
                    message,
                    kind: openai_type.unwrap_or(kind.openai_type()),
                    param,
                    code,
                },
            })
        }
        ClientApi::Anthropic => anthropic_error_body(kind.anthropic_type(), message),
    }
}

/// Anthropic's error shape with any `error.type`, including ones the gateway never produces
/// itself (`billing_error`, when translating a provider's error).
pub(crate) fn anthropic_error_body(kind: &str, message: &str) -> Vec<u8> {
    to_vec(&AnthropicErrorBody {
        kind: "error",
        error: AnthropicError { kind, message },
    })
}

fn to_vec<T: Serialize>(body: &T) -> Vec<u8> {
    // Cannot fail: plain structs of strings.
    serde_json::to_vec(body).unwrap_or_default()
}

#[derive(Serialize)]
struct OpenAiErrorBody<'a> {
    error: OpenAiError<'a>,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicError<'a>,
}

#[derive(Serialize)]
struct AnthropicError<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const ALL: [ErrorKind; 9] = [
        ErrorKind::InvalidRequest,
        ErrorKind::Authentication,
        ErrorKind::PermissionDenied,
        ErrorKind::NotFound,
        ErrorKind::RequestTooLarge,
        ErrorKind::RateLimit,
        ErrorKind::Overloaded,
        ErrorKind::Internal,
        ErrorKind::BadGateway,
    ];

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap_or(Value::Null)
    }

    #[test]
    fn client_api_from_path() {
        for p in [
            "/v1/messages",
            "/v1/messages?beta=true",
            "/v1/messages/count_tokens",
            "/v1/messages/count_tokens?x=1",
            "/v1/messages/batches",
        ] {
            assert_eq!(ClientApi::from_path(p), ClientApi::Anthropic, "{p}");
        }
        for p in [
            "/v1/chat/completions",
            "/v1/messagesx",
            "/v1/threads/t1/messages",
            "/",
            "",
            "/v1/responses?a=/v1/messages",
        ] {
            assert_eq!(ClientApi::from_path(p), ClientApi::OpenAi, "{p}");
        }
    }

    #[test]
    fn statuses() {
        let got: Vec<u16> = ALL.iter().map(|k| k.status()).collect();
        assert_eq!(got, [400, 401, 403, 404, 413, 429, 503, 500, 502]);
    }

    #[test]
    fn openai_shape_every_kind() {
        let want = [
            "invalid_request_error",
            "invalid_request_error",
            "invalid_request_error",
            "invalid_request_error",
            "invalid_request_error",
            "requests",
            "server_error",
            "server_error",
            "server_error",
        ];
        for (k, t) in ALL.iter().zip(want) {
            let v = parse(&error_body(
                ClientApi::OpenAi,
                *k,
                "boom",
                Some("c1"),
                Some("model"),
            ));
            assert_eq!(
                v,
                json!({"error": {"message": "boom", "type": t, "param": "model", "code": "c1"}}),
                "{k:?}"
            );
        }
    }

    #[test]
    fn openai_nulls_and_rate_limit_defaults() {
        let v = parse(&error_body(
            ClientApi::OpenAi,
            ErrorKind::Authentication,
            "bad key",
            Some("invalid_api_key"),
            None,
        ));
        assert_eq!(
            v,
            json!({"error": {"message": "bad key", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
        );
        let v = parse(&error_body(
            ClientApi::OpenAi,
            ErrorKind::Internal,
            "x",
            None,
            None,
        ));
        assert_eq!(v["error"]["code"], Value::Null);
        assert_eq!(v["error"]["param"], Value::Null);
        let v = parse(&error_body(
            ClientApi::OpenAi,
            ErrorKind::RateLimit,
            "slow down",
            None,
            None,
        ));
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        let v = parse(&error_body_typed(
            ClientApi::OpenAi,
            ErrorKind::RateLimit,
            "tpm",
            Some("rate_limit_exceeded"),
            None,
            Some("tokens"),
        ));
        assert_eq!(
            v,
            json!({"error": {"message": "tpm", "type": "tokens", "param": null, "code": "rate_limit_exceeded"}})
        );
    }

    #[test]
    fn anthropic_shape_every_kind() {
        let want = [
            "invalid_request_error",
            "authentication_error",
            "permission_error",
            "not_found_error",
            "request_too_large",
            "rate_limit_error",
            "overloaded_error",
            "api_error",
            "api_error",
        ];
        for (k, t) in ALL.iter().zip(want) {
            // code, param and an OpenAI type override have no place in Anthropic's shape.
            let v = parse(&error_body_typed(
                ClientApi::Anthropic,
                *k,
                "boom",
                Some("c1"),
                Some("p"),
                Some("tokens"),
            ));
            assert_eq!(
                v,
                json!({"type": "error", "error": {"type": t, "message": "boom"}}),
                "{k:?}"
            );
        }
    }

    #[test]
    fn message_escaping_round_trips() {
        let msg = "say \"hi\"\n\tback\\slash </script> é 日本 🚀 \u{0}\u{1f}";
        for api in [ClientApi::OpenAi, ClientApi::Anthropic] {
            let body = error_body(api, ErrorKind::InvalidRequest, msg, None, None);
            assert!(!body.contains(&b'\n'), "raw newline in {api:?} body");
            assert_eq!(parse(&body)["error"]["message"], msg);
        }
    }
}
