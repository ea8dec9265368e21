//! Envoy's own answers in the client's shape. Envoy answers some requests itself, in plain text: a
//! request body over its buffer limit (413, sent while tollgate still holds the body, before tollgate
//! has seen it whole), a route timeout (504), no reachable upstream (503), a reset. Such an answer
//! passes through the listener role's response callbacks like a provider's, so the role swaps its body
//! for the JSON error the client's SDK parses (`error.type`, `error.message`), keeping the status.
//! Envoy's `local_reply_config` could do the same, but only per status and path prefix, in every
//! configuration an operator writes; here it holds wherever tollgate runs.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::api::errors::{error_body, ClientApi, ErrorKind};

/// Whether an answer with this status that no provider gave (no provider header) and whose body is
/// plain text is one of Envoy's own that gets the client's shape.
pub fn reshapes(status: u16) -> bool {
    status == 413 || status >= 500
}

/// The body that replaces Envoy's plain-text answer `detail` with status `status`, in `api`'s shape.
pub fn client_body(api: ClientApi, status: u16, detail: &str) -> Vec<u8> {
    if status == 413 {
        warn_buffer_limit_once();
        return error_body(
            api,
            ErrorKind::RequestTooLarge,
            "Request body is larger than the gateway's buffer limit.",
            Some("request_too_large"),
            None,
        );
    }
    let kind = if status == 503 {
        ErrorKind::Overloaded
    } else {
        ErrorKind::BadGateway
    };
    error_body(
        api,
        kind,
        &format!("The gateway could not get an answer from the provider: {detail}."),
        None,
        None,
    )
}

/// Envoy refusing a body means its buffer limits are below `max_request_bytes`: the operator's to fix,
/// so it is said in Envoy's log, once per VM (a client sending large bodies cannot flood the log).
fn warn_buffer_limit_once() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "Envoy refused a request body over its buffer limit before tollgate read it whole: set the \
             listener's per_connection_buffer_limit_bytes and the route's request_body_buffer_limit \
             above tollgate's max_request_bytes, so that tollgate judges a body's size"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn which_statuses_are_reshaped() {
        assert!(reshapes(413) && reshapes(500) && reshapes(503) && reshapes(504));
        assert!(!reshapes(200) && !reshapes(400) && !reshapes(404) && !reshapes(429));
    }

    #[test]
    fn envoys_413_in_both_shapes() {
        let v = parse(&client_body(ClientApi::OpenAi, 413, "Payload Too Large"));
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(
            v["error"]["message"],
            "Request body is larger than the gateway's buffer limit."
        );
        let v = parse(&client_body(ClientApi::Anthropic, 413, "Payload Too Large"));
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
        assert_eq!(
            v["error"]["message"],
            "Request body is larger than the gateway's buffer limit."
        );
    }

    #[test]
    fn envoys_5xx_name_what_envoy_said() {
        let v = parse(&client_body(
            ClientApi::OpenAi,
            504,
            "upstream request timeout",
        ));
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(
            v["error"]["message"],
            "The gateway could not get an answer from the provider: upstream request timeout."
        );
        let v = parse(&client_body(
            ClientApi::Anthropic,
            503,
            "no healthy upstream",
        ));
        assert_eq!(v["error"]["type"], "overloaded_error");
        let v = parse(&client_body(ClientApi::Anthropic, 502, "reset"));
        assert_eq!(v["error"]["type"], "api_error");
    }
}
