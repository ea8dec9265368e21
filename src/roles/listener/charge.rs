//! The charge: a request's usage settled against the consumer's budgets exactly once, at the end of
//! the answer or at teardown, and written to the metrics, the usage totals and the access-log
//! record. The provider's own usage when it gave one; otherwise an estimate, flagged as such.

use super::{admission, Listener};
use crate::count::usage::{usage_from_json, Usage};
use crate::count::{estimate, metric_segment};
use crate::host::prof::span;
use crate::host::tally::Charge;
use crate::host::Host;
use crate::limit::quota::{self, Demand};
use crate::roles::refused::{self, Refused};

impl Listener {
    /// Charges the request exactly once: at the end of the response, or at teardown. The request
    /// is over then, however it ended: its place among its consumer's requests in flight is given
    /// back first (once, whether or not it is metered).
    pub(super) fn charge<H: Host>(&mut self, host: &mut H, torn_down: bool) {
        admission::concurrency::give_back(host, &mut self.adm, !self.ans.response_complete);
        if self.charged || !self.adm.metered {
            return;
        }
        let _p = span("listener charge");
        self.charged = true;
        let ok = (200..300).contains(&self.ans.status);
        let reading = span("listener usage read");
        let (usage, estimated) = self.final_usage(ok, torn_down);
        drop(reading);
        if !torn_down {
            self.store_answer(host, usage);
        }
        let row = [
            1,
            usage.input,
            usage.output,
            usage.cache_read,
            usage.cache_write,
            u64::from(estimated),
        ];
        let settling = span("listener settle");
        let answered_by = self.answered_by();
        if !self.adm.reservations.is_empty() {
            let priced_as = self
                .cfg
                .priced_as(answered_by.unwrap_or(self.adm.start), &self.adm.model);
            let cost = self
                .cfg
                .price_for(priced_as)
                .map(|p| quota::cost_micro_usd(p, usage.input, usage.cache_read, usage.output))
                .unwrap_or(0);
            let actual = Demand {
                requests: 1,
                input: usage.input,
                output: usage.output,
                cost_micro_usd: cost,
            };
            if let Err(e) = quota::settle(
                host.store(),
                &self.adm.reservations,
                &actual,
                self.started_ms,
            ) {
                log::warn!("quota settlement failed: {e:?}");
            }
        }
        drop(settling);
        let _metrics = span("listener metrics and record");
        let outcome = match (ok, torn_down) {
            (_, true) => "incomplete",
            (true, _) => "ok",
            (false, _) if self.ans.status == 429 => "upstream_429",
            (false, _) if self.ans.status >= 500 => "upstream_5xx",
            (false, _) => "upstream_4xx",
        };
        // Per consumer x model, per provider key, by outcome, the model that served it, and the
        // usage totals.
        let served = self.served_model(answered_by);
        let served_label = if served.is_empty() {
            String::new()
        } else if self.cfg.access.names_model(served) || self.cfg.is_known_model(served) {
            metric_segment(served)
        } else {
            "other".to_string()
        };
        host.charge(
            &Charge {
                consumer: &self.adm.consumer,
                model: &self.adm.model_label,
                served: &served_label,
                provider: &self.ans.provider,
                key_id: &self.ans.key_id,
                outcome,
            },
            row,
        );
        self.write_record(host, Some((usage, estimated)));
        // For Envoy's global rate limit filter: `hits_addend` on stream done charges these.
        let mut digits = itoa::Buffer::new();
        let total = digits.format(usage.input.saturating_add(usage.output));
        if !host.set_filter_state("tollgate_total_tokens", total.as_bytes()) {
            refused::record(host, Refused::TotalTokens);
        }
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "tollgate: charged consumer={} model={} provider={} key={} in={} out={} estimated={} ms={}",
                self.adm.consumer,
                self.adm.model.as_str(),
                self.ans.provider,
                self.ans.key_id,
                usage.input,
                usage.output,
                estimated,
                host.now_ms().saturating_sub(self.started_ms)
            );
        }
    }

    /// The provider that answered (configuration order), as the attempt named it.
    fn answered_by(&self) -> Option<usize> {
        if self.ans.provider.is_empty() {
            return None;
        }
        self.cfg.provider(&self.ans.provider).map(|(i, _)| i)
    }

    /// The model the provider that answered was called with: for an alias, or a model its `models`
    /// map renames, not the one the client named. Empty when no provider answered.
    fn served_model(&self, answered_by: Option<usize>) -> &str {
        match answered_by {
            Some(_) if self.adm.passthrough => &self.adm.model,
            Some(i) => self.cfg.map_model(i, &self.adm.model).unwrap_or_default(),
            None => "",
        }
    }

    /// The access-log record, one filter-state value (`%FILTER_STATE(wasm.tollgate:PLAIN)%`), in
    /// logfmt: `consumer=team-a model=fast served=gpt-4o-mini provider=openai key=oa-1 in=24 out=8
    /// usage=exact` (`model` as the client named it, `served` as the provider was called).
    /// Fields not known (a refused request was never charged) read `-`.
    pub(super) fn write_record<H: Host>(&self, host: &mut H, charged: Option<(Usage, bool)>) {
        let mut record = String::with_capacity(128);
        let model = self.adm.model.as_str();
        let served = self.served_model(self.answered_by());
        for (key, value) in [
            ("consumer=", self.adm.consumer.as_str()),
            (" model=", model),
            (" served=", served),
            (" provider=", &self.ans.provider),
            (" key=", &self.ans.key_id),
        ] {
            record.push_str(key);
            push_logfmt(&mut record, value);
        }
        match charged {
            Some((u, estimated)) => {
                let usage = if estimated { "estimated" } else { "exact" };
                let mut digits = itoa::Buffer::new();
                record.push_str(" in=");
                record.push_str(digits.format(u.input));
                record.push_str(" out=");
                record.push_str(digits.format(u.output));
                record.push_str(" usage=");
                record.push_str(usage);
            }
            None => record.push_str(" in=- out=- usage=-"),
        }
        self.adm.cache.note(self.started_ms, &mut record);
        if let Some(ms) = self.waiting.waited_ms {
            record.push_str(" waited_ms=");
            record.push_str(itoa::Buffer::new().format(ms));
        }
        host.set_filter_state(RECORD, record.as_bytes());
    }

    /// The provider's usage when it gave one, read from its own answer (before any translation);
    /// otherwise an estimate from the request and whatever text was received. Errors from the
    /// provider are not billed: they charge the request only.
    fn final_usage(&mut self, ok: bool, torn_down: bool) -> (Usage, bool) {
        if self.adm.passthrough {
            // Counted as one request: tokens only where the provider's own answer reports them.
            let reported = match self.ans.sse.as_ref() {
                Some(_) => self.ans.stream_usage.usage(),
                None if ok && !self.ans.json_overflow => usage_from_json(&self.ans.json),
                None => None,
            };
            return (reported.unwrap_or_default(), false);
        }
        if let Some(sse) = self.ans.sse.as_mut() {
            if !self.ans.response_complete {
                let su = &mut self.ans.stream_usage;
                sse.finish(|ev| su.on_event(&ev));
            }
            if let Some(u) = self.ans.stream_usage.usage() {
                if self.ans.stream_usage.output_reported() {
                    return (u, false);
                }
            }
        } else if ok && !self.ans.json_overflow {
            if let Some(u) = usage_from_json(&self.ans.json) {
                return (u, false);
            }
        }
        if !ok && !torn_down {
            return (Usage::default(), false);
        }
        let input = self.adm.info.prompt_tokens_estimate;
        let output = if self.ans.sse.is_some() {
            self.ans.stream_usage.estimated_output_tokens()
        } else {
            estimate::chars_to_tokens(estimate::response_text_chars(&self.ans.json))
        };
        // An Anthropic stream cut before message_delta still told us its input exactly.
        let mut u = self.ans.stream_usage.usage().unwrap_or_default();
        if u.input == 0 {
            u.input = input;
        }
        u.output = u.output.max(output);
        (u, true)
    }
}

/// Filter-state name of the access-log record (`wasm.tollgate`).
pub const RECORD: &str = "tollgate";

/// A logfmt value: `-` when empty, as is when it has no space, quote, `=` or control character,
/// else quoted.
fn push_logfmt(out: &mut String, s: &str) {
    if s.is_empty() {
        return out.push('-');
    }
    // Ids are printable ASCII: no need to look at them char by char.
    let plain = |b: u8| b.is_ascii_graphic() && b != b'"' && b != b'=';
    if s.bytes().all(plain)
        || s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=')
    {
        return out.push_str(s);
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
}
