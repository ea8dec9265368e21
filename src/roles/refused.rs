//! Writes the request must not go on without. When Envoy refuses one, the request stops with
//! tollgate's own answer in the client's error shape (fail closed), and the refusal is logged and
//! counted as `tollgate.write.<place>.refused`.
//!
//! Envoy 1.40 refuses a header write once the map went on, or in a callback of the other direction
//! (`BadArgument`), and a body write where the callback has no body buffer (`BadArgument`); its
//! source refuses a filter-state write where the stream has no stream info (`NotFound`). Most of
//! tollgate's writes only shape what the client sees, and a refused one leaves the answer as it
//! was; these carry a secret's protection or the accounting, and going on without one of them would
//! fail open.

use super::Flow;
use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::host::Host;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The attempt's headers: its credential, path and authority (cluster-level role). Without
    /// them the attempt would leave with no key, and the provider's 401 would take a healthy key
    /// out of rotation.
    Credential,
    /// The request body rewritten for the provider Envoy picked (its model name, its API): without
    /// it the provider would serve (and bill) a model the operator did not map, or refuse a body
    /// in another API's shape.
    AttemptBody,
    /// The key taken out of a provider's error body that quotes it, or the header change that lets
    /// the scrubbed body have another length.
    Scrub,
    /// The client's own credential and tollgate's internal headers taken out of the request
    /// (listener role): the provider would see the client's key.
    ClientCredential,
    /// The plan handed to the attempts: without it an attempt runs as a direct caller of the
    /// cluster, outside the consumer's rotation and steering.
    Plan,
    /// The consumer named for Envoy's rate limit filter: without it the request escapes the
    /// fleet-wide budget.
    Consumer,
    /// `max_tokens` lowered to what the consumer's budget admits.
    Budget,
    /// Counted only (the answer already went on): the provider and key id the cluster-level role
    /// names on the answer, which the listener role charges the key's usage to.
    AnswerHeaders,
    /// Counted only (the stream has ended): the tokens Envoy's rate limit filter adds to the
    /// fleet-wide budget.
    TotalTokens,
}

impl Refused {
    pub const ALL: [Refused; 9] = [
        Refused::Credential,
        Refused::AttemptBody,
        Refused::Scrub,
        Refused::ClientCredential,
        Refused::Plan,
        Refused::Consumer,
        Refused::Budget,
        Refused::AnswerHeaders,
        Refused::TotalTokens,
    ];

    /// The counter: `tollgate.write.<place>.refused` (Envoy's stats tag `write` names the place).
    pub fn metric(self) -> String {
        format!("tollgate.write.{}.refused", self.place())
    }

    /// The metric segment (`tollgate.write.<place>.refused`).
    pub fn place(self) -> &'static str {
        match self {
            Refused::Credential => "credential",
            Refused::AttemptBody => "attempt_body",
            Refused::Scrub => "scrub",
            Refused::ClientCredential => "client_credential",
            Refused::Plan => "plan",
            Refused::Consumer => "consumer",
            Refused::Budget => "budget",
            Refused::AnswerHeaders => "answer_headers",
            Refused::TotalTokens => "total_tokens",
        }
    }

    /// What the client is told: what failed, never a value.
    fn message(self) -> &'static str {
        match self {
            Refused::Credential => {
                "The gateway could not attach the provider's credential to this request."
            }
            Refused::AttemptBody => "The gateway could not rewrite this request for the provider.",
            Refused::Scrub => "The provider's error could not be passed on safely.",
            Refused::ClientCredential => {
                "The gateway could not remove the client's credential from this request."
            }
            Refused::Plan
            | Refused::Consumer
            | Refused::Budget
            | Refused::AnswerHeaders
            | Refused::TotalTokens => {
                "The gateway could not prepare this request for the provider."
            }
        }
    }

    fn kind(self) -> ErrorKind {
        match self {
            // The provider answered; what it said could not be passed on.
            Refused::Scrub => ErrorKind::BadGateway,
            _ => ErrorKind::Internal,
        }
    }
}

/// Logs and counts a refused write whose request can no longer be stopped.
pub fn record<H: Host + ?Sized>(host: &mut H, what: Refused) {
    log::error!(
        "Envoy refused tollgate's {} write; the request had already gone on",
        what.place()
    );
    count(host, what);
}

fn count<H: Host + ?Sized>(host: &mut H, what: Refused) {
    host.count(&what.metric(), 1);
}

/// Stops the request: the refusal logged and counted, the client answered 500 (502 for a scrub)
/// in its API's shape. Once the response headers went to the client, Envoy cannot answer anew: it
/// resets the stream instead (the client has the status line and none of the body), and the
/// caller's [`Flow::Stop`] keeps the buffered body from going on. A local answer from the
/// cluster-level role is final: Envoy neither retries it nor hands it to that role's response
/// callbacks.
pub fn fail_closed<H: Host + ?Sized>(host: &mut H, client: ClientApi, what: Refused) -> Flow {
    let kind = what.kind();
    log::error!(
        "Envoy refused tollgate's {} write: the request is stopped with {}",
        what.place(),
        kind.status()
    );
    count(host, what);
    let body = error_body(client, kind, what.message(), None, None);
    host.respond(
        kind.status(),
        &[("content-type", "application/json")],
        &body,
    );
    Flow::Stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_place_is_its_own_metric_segment() {
        let mut places: Vec<&str> = Refused::ALL.iter().map(|r| r.place()).collect();
        assert!(places
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        places.sort_unstable();
        places.dedup();
        assert_eq!(places.len(), Refused::ALL.len());
        assert_eq!(
            Refused::Credential.metric(),
            "tollgate.write.credential.refused"
        );
    }
}
