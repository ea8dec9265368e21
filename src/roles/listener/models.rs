//! The gateway's own model list (`GET /v1/models`, `GET /v1/models/{id}`), answered from the
//! configuration in the dialect of the client that asked: Anthropic's SDK sends `anthropic-version`,
//! OpenAI's does not. No provider is called.
//!
//! A consumer sees the models and aliases it may use ([`crate::config::Access::listed_for`]): with a
//! `models` list, only those. A provider without a `models` map serves any model, and "any" cannot
//! be listed: the list names the models the configuration gives (the providers' `models`,
//! `prices`, `model_limits`, consumers' `models`) and the aliases.

use super::admission::Refusal;
use super::{Flow, Listener};
use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::api::models::{self, Entry};
use crate::host::{Host, Map};

impl Listener {
    /// The list (`id` None) or one model of it, for the consumer admission identified.
    pub(super) fn list_models<H: Host>(&mut self, host: &mut H, id: Option<&str>) -> Flow {
        let cfg = self.cfg.clone();
        let allowed = cfg
            .consumer(&self.adm.consumer)
            .and_then(|c| c.models.as_ref());
        let entries: Vec<Entry<'_>> = cfg
            .access
            .listed_for(allowed)
            .map(|l| Entry {
                id: &l.id,
                owned_by: &l.owned_by,
            })
            .collect();
        let anthropic = self.client == ClientApi::Anthropic;
        let body = match id {
            None if anthropic => {
                let query = self.path.split_once('?').map_or("", |(_, q)| q);
                match models::anthropic_page(&entries, query) {
                    Ok(b) => b,
                    Err(msg) => {
                        let r = Refusal::new(ErrorKind::InvalidRequest, msg);
                        return self.reject(host, &r);
                    }
                }
            }
            None => models::openai_list(&entries),
            Some(id) => match entries.iter().find(|e| e.id == id) {
                Some(e) if anthropic => models::anthropic_model(e),
                Some(e) => models::openai_model(e),
                None => {
                    // As OpenAI words it: a model not listed may exist and be someone else's.
                    let msg =
                        format!("The model '{id}' does not exist or you do not have access to it.");
                    let body = error_body(
                        self.client,
                        ErrorKind::NotFound,
                        &msg,
                        Some("model_not_found"),
                        Some("model"),
                    );
                    return self.answer_locally(host, 404, &body);
                }
            },
        };
        self.answer_locally(host, 200, &body)
    }

    fn answer_locally<H: Host>(&mut self, host: &mut H, status: u16, body: &[u8]) -> Flow {
        self.decided = true;
        // The access-log line of a local answer does not show the client's credential either.
        self.request_headers.apply(host, Map::RequestHeaders);
        self.write_record(host, None);
        host.respond(status, &[("content-type", "application/json")], body);
        host.count("tollgate.outcome.model_list.requests", 1);
        Flow::Stop
    }
}
