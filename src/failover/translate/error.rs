//! Error bodies: Anthropic `{"type":"error","error":{"type","message"}}` <->
//! OpenAI `{"error":{"message","type","param","code"}}`. Shapes and type names come from
//! [`crate::api::errors`], so translated errors look like the gateway's own.
//!
//! Error bodies come from anywhere (providers, OpenAI-compatible servers, proxies in between), so
//! they are read leniently: a member of an unexpected type counts as absent, and a body that is not
//! JSON at all still gets a well-formed error with a generic message.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::shapes::{Lenient, StrOr};
use crate::api::errors::{
    anthropic_error_body, error_body, error_body_typed, ClientApi, ErrorKind,
};

fn kind_from_status(status: u16) -> ErrorKind {
    match status {
        401 => ErrorKind::Authentication,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        413 => ErrorKind::RequestTooLarge,
        429 => ErrorKind::RateLimit,
        503 | 529 => ErrorKind::Overloaded,
        400..=499 => ErrorKind::InvalidRequest,
        _ => ErrorKind::Internal,
    }
}

fn generic_message(status: u16) -> String {
    format!("The provider returned an error (HTTP {status}).")
}

/// An error object of either API (Anthropic has no `code`), or a whole error body, strict or loose
/// (`{"error": {..}}`, `{"error": "text"}`, `{"message": ..}`, `{"detail": ..}`).
#[derive(Debug, Default, Deserialize)]
struct ErrorIn<'a> {
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    message: Lenient<String>,
    #[serde(rename = "type", default)]
    kind: Lenient<String>,
    #[serde(default)]
    code: Lenient<String>,
    #[serde(default)]
    detail: Lenient<String>,
}

fn read(raw: &RawValue) -> Option<StrOr<'_, ErrorIn<'_>>> {
    serde_json::from_str(raw.get()).ok()
}

/// Anthropic error -> OpenAI error. The Anthropic `error.type` decides the OpenAI type and code
/// (the status only when the type is missing or unknown). Never fails.
pub fn messages_error_to_chat(body: &[u8], status: u16) -> Vec<u8> {
    let e = serde_json::from_slice::<ErrorIn>(body)
        .ok()
        .and_then(|v| v.error)
        .and_then(|raw| serde_json::from_str::<ErrorIn>(raw.get()).ok())
        .unwrap_or_default();
    let message = e.message.0.unwrap_or_else(|| generic_message(status));
    let (kind, code) = match e.kind.0.as_deref().unwrap_or_default() {
        "invalid_request_error" => (ErrorKind::InvalidRequest, None),
        "authentication_error" => (ErrorKind::Authentication, Some("invalid_api_key")),
        "permission_error" => (ErrorKind::PermissionDenied, None),
        "not_found_error" => (ErrorKind::NotFound, None),
        "request_too_large" => (ErrorKind::RequestTooLarge, None),
        "rate_limit_error" => (ErrorKind::RateLimit, None),
        "overloaded_error" => (ErrorKind::Overloaded, None),
        "api_error" => (ErrorKind::Internal, None),
        "timeout_error" => (ErrorKind::Internal, Some("timeout")),
        // OpenAI reports an exhausted balance as type and code "insufficient_quota".
        "billing_error" => {
            let kind = kind_from_status(status);
            return error_body_typed(
                ClientApi::OpenAi,
                kind,
                &message,
                Some("insufficient_quota"),
                None,
                Some("insufficient_quota"),
            );
        }
        _ => (kind_from_status(status), None),
    };
    error_body(ClientApi::OpenAi, kind, &message, code, None)
}

/// A loose OpenAI-style error body: the first element of a list, `error` as an object or a string,
/// or the body's own `message`/`detail`. Returns (message, type, code).
fn openai_error(body: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let top: Option<&RawValue> = serde_json::from_slice(body).ok();
    let first = top.map(|t| {
        serde_json::from_str::<Vec<&RawValue>>(t.get())
            .ok()
            .and_then(|l| l.first().copied())
            .unwrap_or(t)
    });
    let v = first.and_then(read);
    let (v_message, v_detail, error) = match &v {
        Some(StrOr::Other(o)) => (o.message.0.clone(), o.detail.0.clone(), o.error),
        _ => (None, None, None),
    };
    // Without an `error` member, the body itself is the error object.
    let e = match error {
        Some(raw) => read(raw),
        None => v,
    };
    let (e_message, e_text, kind, code) = match e {
        Some(StrOr::Str(s)) => (None, Some(s.into_owned()), None, None),
        Some(StrOr::Other(o)) => (o.message.0, None, o.kind.0, o.code.0),
        None => (None, None, None, None),
    };
    (e_message.or(e_text).or(v_message).or(v_detail), kind, code)
}

/// OpenAI (or OpenAI-compatible) error -> Anthropic error. The status decides the type; inside a
/// stream (status 2xx or 0) OpenAI's type/code do. Accepts the loose shapes compatible servers
/// send: `{"error": "text"}`, `{"message": ..}`, `{"detail": ..}`. Never fails.
pub fn chat_error_to_messages(body: &[u8], status: u16) -> Vec<u8> {
    let (message, typ, code) = openai_error(body);
    let message = message.unwrap_or_else(|| generic_message(status));
    let typ = typ.unwrap_or_default();
    let code = code.unwrap_or_default();
    if status == 402 || code == "insufficient_quota" || typ == "insufficient_quota" {
        return anthropic_error_body("billing_error", &message);
    }
    let kind = if (400..600).contains(&status) {
        kind_from_status(status)
    } else {
        match (typ.as_str(), code.as_str()) {
            (_, "rate_limit_exceeded") | ("requests" | "tokens", _) => ErrorKind::RateLimit,
            (_, "invalid_api_key") => ErrorKind::Authentication,
            (_, "context_length_exceeded") | ("invalid_request_error", _) => {
                ErrorKind::InvalidRequest
            }
            _ => ErrorKind::Internal,
        }
    };
    error_body(ClientApi::Anthropic, kind, &message, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap_or_default()
    }

    #[test]
    fn anthropic_errors_to_openai() {
        let cases = [
            (
                "invalid_request_error",
                400,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "authentication_error",
                401,
                "invalid_request_error",
                json!("invalid_api_key"),
            ),
            (
                "permission_error",
                403,
                "invalid_request_error",
                Value::Null,
            ),
            ("not_found_error", 404, "invalid_request_error", Value::Null),
            (
                "request_too_large",
                413,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "rate_limit_error",
                429,
                "requests",
                json!("rate_limit_exceeded"),
            ),
            ("api_error", 500, "server_error", Value::Null),
            ("overloaded_error", 529, "server_error", Value::Null),
            ("timeout_error", 504, "server_error", json!("timeout")),
            (
                "billing_error",
                402,
                "insufficient_quota",
                json!("insufficient_quota"),
            ),
            (
                "brand_new_error",
                429,
                "requests",
                json!("rate_limit_exceeded"),
            ),
        ];
        for (typ, status, want_type, want_code) in cases {
            let body = json!({"type": "error", "error": {"type": typ, "message": "msg here"}, "request_id": "req_011"});
            let got = parse(&messages_error_to_chat(body.to_string().as_bytes(), status));
            assert_eq!(
                got,
                json!({"error": {"message": "msg here", "type": want_type, "param": null, "code": want_code}}),
                "{typ}"
            );
        }
        let got = parse(&messages_error_to_chat(
            b"<html>502 Bad Gateway</html>",
            502,
        ));
        assert_eq!(
            got,
            json!({"error": {"message": "The provider returned an error (HTTP 502).", "type": "server_error", "param": null, "code": null}})
        );
        let got = parse(&messages_error_to_chat(b"", 401));
        assert_eq!(got["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn openai_errors_to_anthropic() {
        let cases = [
            (
                json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
                401,
                "authentication_error",
                "Incorrect API key provided",
            ),
            (
                json!({"error": {"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
                429,
                "rate_limit_error",
                "Rate limit reached",
            ),
            (
                json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
                429,
                "billing_error",
                "You exceeded your current quota",
            ),
            (
                json!({"error": {"message": "The model `x` does not exist", "type": "invalid_request_error", "code": "model_not_found"}}),
                404,
                "not_found_error",
                "The model `x` does not exist",
            ),
            (
                json!({"error": {"code": "429", "message": "Azure rate limit"}}),
                429,
                "rate_limit_error",
                "Azure rate limit",
            ),
            (
                json!({"error": {"message": "too big"}}),
                413,
                "request_too_large",
                "too big",
            ),
            (
                json!({"error": {"message": "no access"}}),
                403,
                "permission_error",
                "no access",
            ),
            (
                json!({"error": {"message": "bad"}}),
                422,
                "invalid_request_error",
                "bad",
            ),
            (
                json!({"error": {"message": "busy"}}),
                503,
                "overloaded_error",
                "busy",
            ),
            (
                json!({"error": "model is loading"}),
                500,
                "api_error",
                "model is loading",
            ),
            (
                json!({"message": "plain message"}),
                400,
                "invalid_request_error",
                "plain message",
            ),
            (
                json!({"detail": "Not Found"}),
                404,
                "not_found_error",
                "Not Found",
            ),
            (
                json!([{"error": {"message": "in a list", "code": 400}}]),
                400,
                "invalid_request_error",
                "in a list",
            ),
            // Inside a stream there is no error status: OpenAI's type and code decide.
            (
                json!({"error": {"message": "slow down", "type": "tokens", "code": "rate_limit_exceeded"}}),
                200,
                "rate_limit_error",
                "slow down",
            ),
            (
                json!({"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}),
                0,
                "invalid_request_error",
                "too long",
            ),
            (
                json!({"error": {"message": "oops", "type": "server_error"}}),
                0,
                "api_error",
                "oops",
            ),
        ];
        for (body, status, typ, message) in cases {
            let got = parse(&chat_error_to_messages(body.to_string().as_bytes(), status));
            assert_eq!(
                got,
                json!({"type": "error", "error": {"type": typ, "message": message}}),
                "{body}"
            );
        }
        let got = parse(&chat_error_to_messages(b"upstream connect error", 503));
        assert_eq!(
            got,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "The provider returned an error (HTTP 503)."}})
        );
    }
}
