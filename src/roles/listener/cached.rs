//! The listener role's side of the response cache ([`crate::cache`]): an answer served from it (a
//! hit, or an expired entry when no provider can answer), charged as one request and no tokens;
//! and a complete answer stored when it is charged.

use super::admission::cache::{stale_answer, Outcome};
use super::admission::LocalAnswer;
use super::{Flow, Listener};
use crate::api::errors::ClientApi;
use crate::cache::entry::Entry;
use crate::cache::{policy, slots};
use crate::count::usage::Usage;
use crate::failover::rewrite::{self, Translation};
use crate::failover::translate;
use crate::host::tally::{Charge, ROW};
use crate::host::{Host, Map};
use crate::limit::quota::{self, Demand};
use crate::roles::refused::{self, Refused};

/// The usage row of what answers from the cache saved a consumer: answers, input, output and
/// cached input tokens, micro-USD, and how many of the answers were stale.
pub fn saved_row(consumer: &str) -> String {
    format!("tollgate:cache:saved:{consumer}")
}

impl Listener {
    /// Answers from the cache: the walk ended with [`super::admission::Stop::Serve`].
    pub(super) fn serve<H: Host>(&mut self, host: &mut H, answer: LocalAnswer) -> Flow {
        self.decided = true;
        // Not even an answer's access-log line shows the client's credential.
        self.request_headers.apply(host, Map::RequestHeaders);
        self.answer_from_cache(host, &answer);
        Flow::Stop
    }

    /// The answer is one no retry could turn into an answer (a 5xx; a provider's 429 after every
    /// retry, or the attempt's own when every key cooled meanwhile, `pool_exhausted`): the
    /// request's expired entry, within the stale window, answers instead. True when it did. (A 429
    /// of Envoy's global rate limit is the consumer's own budget: it stands.)
    pub(super) fn stale_instead_of_error<H: Host>(
        &mut self,
        host: &mut H,
        pool_exhausted: bool,
    ) -> bool {
        let status = self.ans.status;
        let failed =
            status >= 500 || (status == 429 && (pool_exhausted || !self.ans.provider.is_empty()));
        if !failed || self.adm.cache.stale_way.is_none() || self.charged {
            return false;
        }
        let now = host.now_ms();
        if !stale_answer(host, &self.cfg, self.client, now, &mut self.adm) {
            return false;
        }
        let Some(mut answer) = self.adm.cache.take_answer() else {
            return false;
        };
        answer.headers.extend(self.adm.rate_limits.iter().cloned());
        if !self.answer_from_cache(host, &answer) {
            self.adm.cache.outcome = Outcome::Miss;
            self.adm.cache.served = None;
            return false;
        }
        self.ans.replaced = true;
        // The request went on, past Envoy's rate limit filter: its charge on stream done is none.
        if !host.set_filter_state("tollgate_total_tokens", b"0") {
            refused::record(host, Refused::TotalTokens);
        }
        true
    }

    /// Sends `answer` and charges it: one request against the consumer's request limits, no
    /// tokens, and what it saved.
    fn answer_from_cache<H: Host>(&mut self, host: &mut H, answer: &LocalAnswer) -> bool {
        let headers: Vec<(&str, &str)> = answer
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        if !host.respond(answer.status, &headers, &answer.body) {
            log::warn!("tollgate: Envoy refused the answer from the cache");
            return false;
        }
        self.ans.response_complete = true;
        self.charged = true;
        if !self.adm.reservations.is_empty() {
            let one = Demand {
                requests: 1,
                ..Demand::default()
            };
            if let Err(e) =
                quota::settle(host.store(), &self.adm.reservations, &one, self.started_ms)
            {
                log::warn!("quota settlement failed: {e:?}");
            }
        }
        let stale = self.adm.cache.outcome == Outcome::Stale;
        host.charge(
            &Charge {
                consumer: &self.adm.consumer,
                model: &self.adm.model_label,
                provider: "",
                served: "",
                key_id: "",
                outcome: if stale { "cache_stale" } else { "cache_hit" },
            },
            [1, 0, 0, 0, 0, 0],
        );
        if let Some(served) = &self.adm.cache.served {
            let u = served.usage;
            let usd = self
                .cfg
                .price_for(&self.adm.model)
                .map(|p| quota::cost_micro_usd(p, u.input, u.cache_read, u.output))
                .unwrap_or(0);
            let row: [u64; ROW] = [1, u.input, u.output, u.cache_read, usd, u64::from(stale)];
            host.add_to_row(&saved_row(&self.adm.consumer), row);
            host.count("tollgate.cache.saved_tokens_in", u.input);
            host.count("tollgate.cache.saved_tokens_out", u.output);
            host.count("tollgate.cache.saved_micro_usd", usd);
        }
        self.write_record(host, Some((Usage::default(), false)));
        true
    }

    /// At the charge of a complete answer: stores it when the request asked for it and it may be
    /// reused, in the client's dialect, with the provider's usage.
    pub(super) fn store_answer<H: Host>(&mut self, host: &mut H, usage: Usage) {
        let (Some(cc), Some(digest)) = (self.cfg.cache.as_ref(), self.adm.cache.digest) else {
            return;
        };
        if !self.adm.cache.store || self.ans.status != 200 || !self.ans.response_complete {
            return;
        }
        let provider_json = match self.ans.assembler.take() {
            Some(a) => a.finish(),
            None if self.ans.sse.is_none() && !self.ans.json_overflow => {
                Some(core::mem::take(&mut self.ans.json))
            }
            None => None,
        };
        let Some(json) = provider_json.and_then(|j| self.in_client_dialect(j)) else {
            host.count("tollgate.cache.not_stored", 1);
            return;
        };
        if let Err(why) = policy::storable(self.client, &json, cc.store_length_truncated) {
            log::debug!("tollgate: answer not stored in the cache: {}", why.as_str());
            host.count("tollgate.cache.not_stored", 1);
            return;
        }
        if Entry::encoded_len(json.len()) as u64 > cc.max_entry_bytes {
            host.count("tollgate.cache.too_large", 1);
            return;
        }
        let now = host.now_ms();
        let entry = Entry {
            digest,
            stored_at_ms: now,
            ttl_ms: cc.ttl_ms,
            usage,
            client: self.client,
            body: json,
        };
        match slots::put(host.store(), cc, &entry, now) {
            Ok(stored) => {
                host.count("tollgate.cache.stores", 1);
                if stored.evicted {
                    host.count("tollgate.cache.evictions", 1);
                }
            }
            Err(e) => log::warn!("cache store failed: {e:?}"),
        }
    }

    /// A provider's complete answer (JSON, or a stream assembled) as the client's API shapes it.
    fn in_client_dialect(&self, json: Vec<u8>) -> Option<Vec<u8>> {
        let translation = self
            .cfg
            .provider(&self.ans.provider)
            .and_then(|(_, p)| rewrite::translation(self.api, p.kind).ok())
            .unwrap_or(Translation::None);
        let model = self.adm.model.as_str();
        match (translation, self.client) {
            (Translation::None, _) => Some(json),
            (Translation::ChatToMessages, ClientApi::OpenAi) => {
                translate::messages_response_to_chat_at(&json, model, self.started_ms / 1000).ok()
            }
            (Translation::MessagesToChat, ClientApi::Anthropic) => {
                translate::chat_response_to_messages(&json, model).ok()
            }
            _ => None,
        }
    }
}
