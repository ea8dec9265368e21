//! What a client is told when no provider can take its request now: the status, OpenAI `error.type`
//! and code its SDK acts on, a message naming what blocks the request, and `Retry-After` set to when
//! it can be served again. A rate limit is a 429 ("requests"); a provider that fails or refuses the
//! gateway's keys is the gateway's trouble, not the client's budget: a 5xx ("server_error").

use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::failover::health::Blocker;

/// Why a request cannot be served now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    RateLimited,
    /// Keys rest after 5xx or attempts that got no answer (503, 504, 529, timeouts, resets).
    ServerErrors,
    CircuitOpen,
    KeysRefused,
    KeysDisabled,
    /// The provider answered the last attempt with an error of its own (500, 502, ...).
    ProviderError,
}

impl From<Blocker> for Why {
    fn from(b: Blocker) -> Why {
        match b {
            Blocker::RateLimited => Why::RateLimited,
            Blocker::ServerErrors => Why::ServerErrors,
            Blocker::CircuitOpen => Why::CircuitOpen,
            Blocker::KeysRefused => Why::KeysRefused,
            Blocker::KeysDisabled => Why::KeysDisabled,
        }
    }
}

impl Why {
    /// What an attempt's answer means for its request (0: no answer came: a timeout or a reset).
    pub fn of_status(status: u16) -> Why {
        match status {
            429 => Why::RateLimited,
            401..=403 => Why::KeysRefused,
            0 | 503 | 504 | 529 => Why::ServerErrors,
            _ => Why::ProviderError,
        }
    }

    /// The answer's status and `error.type`: a 429 for a rate limit, a 5xx otherwise.
    pub fn kind(self) -> ErrorKind {
        match self {
            Why::RateLimited => ErrorKind::RateLimit,
            Why::ProviderError => ErrorKind::BadGateway,
            _ => ErrorKind::Overloaded,
        }
    }

    /// `error.code` (OpenAI's shape only).
    pub fn code(self) -> &'static str {
        match self {
            Why::RateLimited => "provider_keys_exhausted",
            Why::ServerErrors => "provider_unavailable",
            Why::CircuitOpen => "provider_circuit_open",
            Why::KeysRefused => "provider_keys_refused",
            Why::KeysDisabled => "provider_keys_disabled",
            Why::ProviderError => "provider_error",
        }
    }
}

/// Whose keys are blocked: every provider that can serve the request (the listener's refusal), or
/// one provider (an attempt on it).
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Request,
    Provider(&'a str),
}

/// A sentence naming what blocks the request.
pub fn blocked_message(why: Why, scope: Scope<'_>) -> String {
    let keys = match scope {
        Scope::Request => "Every provider key that can serve this request".to_string(),
        Scope::Provider(p) => format!("Every key of provider '{p}'"),
    };
    let provider = match scope {
        Scope::Request => "Every provider that can serve this request".to_string(),
        Scope::Provider(p) => format!("Provider '{p}'"),
    };
    match why {
        Why::RateLimited => {
            format!("{keys} is cooling down after the provider's rate limits (429).")
        }
        Why::ServerErrors => {
            format!("{keys} is resting after provider errors (5xx) or attempts that got no answer.")
        }
        Why::CircuitOpen => {
            format!("{provider} is failing: its circuit is open after consecutive errors.")
        }
        Why::KeysRefused => format!("{keys} was refused by the provider (401/402/403)."),
        Why::KeysDisabled => format!("{keys} is disabled in the gateway's configuration."),
        Why::ProviderError => format!("{provider} answered with an error (5xx)."),
    }
}

/// A local answer: status, body in the client's shape, and the `Retry-After` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: String,
}

/// `message` (which should name what blocks the request), then when to try again.
pub fn with_retry(message: &str, retry_after_secs: u64) -> String {
    format!("{message} Please try again in {retry_after_secs}s.")
}

/// The answer for `why`, with `message` (which should name what blocks the request) and a retry in
/// `retry_after_secs`.
pub fn answer(client: ClientApi, why: Why, message: &str, retry_after_secs: u64) -> Answer {
    let kind = why.kind();
    let message = with_retry(message, retry_after_secs);
    Answer {
        status: kind.status(),
        body: error_body(client, kind, &message, Some(why.code()), None),
        retry_after: retry_after_secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parsed(a: &Answer) -> Value {
        serde_json::from_slice(&a.body).unwrap()
    }

    #[test]
    fn a_rate_limit_is_a_429_and_a_failing_provider_a_5xx_in_each_dialect() {
        let cases = [
            (Why::RateLimited, 429, "requests", "rate_limit_error"),
            (Why::ServerErrors, 503, "server_error", "overloaded_error"),
            (Why::CircuitOpen, 503, "server_error", "overloaded_error"),
            (Why::KeysRefused, 503, "server_error", "overloaded_error"),
            (Why::KeysDisabled, 503, "server_error", "overloaded_error"),
            (Why::ProviderError, 502, "server_error", "api_error"),
        ];
        for (why, status, openai_type, anthropic_type) in cases {
            let msg = blocked_message(why, Scope::Request);
            let a = answer(ClientApi::OpenAi, why, &msg, 7);
            let e = &parsed(&a)["error"];
            assert_eq!((a.status, a.retry_after.as_str()), (status, "7"), "{why:?}");
            assert_eq!(
                (e["type"].as_str(), e["code"].as_str()),
                (Some(openai_type), Some(why.code()))
            );
            assert!(e["message"]
                .as_str()
                .unwrap()
                .ends_with("Please try again in 7s."));
            let a = answer(ClientApi::Anthropic, why, &msg, 7);
            assert_eq!(parsed(&a)["error"]["type"], anthropic_type, "{why:?}");
        }
    }

    #[test]
    fn the_message_names_what_blocks_and_whose_keys() {
        assert_eq!(
            blocked_message(Why::CircuitOpen, Scope::Request),
            "Every provider that can serve this request is failing: its circuit is open after consecutive errors."
        );
        assert_eq!(
            blocked_message(Why::RateLimited, Scope::Provider("openai")),
            "Every key of provider 'openai' is cooling down after the provider's rate limits (429)."
        );
    }

    #[test]
    fn an_attempts_answer_names_the_class_of_its_failure() {
        for (status, why) in [
            (429, Why::RateLimited),
            (401, Why::KeysRefused),
            (403, Why::KeysRefused),
            (0, Why::ServerErrors),
            (503, Why::ServerErrors),
            (529, Why::ServerErrors),
            (504, Why::ServerErrors),
            (500, Why::ProviderError),
            (502, Why::ProviderError),
        ] {
            assert_eq!(Why::of_status(status), why, "{status}");
        }
    }
}
