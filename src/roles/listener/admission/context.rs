//! The model's context window (`models.<m>.context_window`): a request whose prompt and output
//! reservation (`max_tokens`, else `default_max_tokens`) cannot fit is refused in the client API's
//! shape before any attempt (OpenAI's `context_length_exceeded`, Anthropic's "prompt is too long"),
//! or, where the configuration allows, changed to fit: `max_tokens` lowered (`lower_max_tokens`)
//! when only the output reservation overflows, the oldest turns dropped ([`crate::api::trim`],
//! `trim_oldest` per model or per consumer) when the prompt does.
//!
//! The prompt's size is an estimate, and [`ERROR_PERCENT`] says how far the real count may lie from
//! it either way. Each decision takes the bound on the side where a mistake is cheap:
//! - a refusal only comes when the request is over even if the estimate overcounts by the whole
//!   bound. A borderline request goes on, and the provider, which counts exactly, decides: refusing
//!   a request the provider would take would refuse it every time it is sent, while admitting one
//!   it will not take costs one provider call answered with the provider's own context error.
//! - a change (lowering, trimming) makes the request fit even if the estimate undercounts by the
//!   whole bound: a request changed in order to fit, that still does not fit, is the worst of both.
//!
//! A request for a model without a window costs one check of an empty map (or one lookup when
//! some model has a window); the estimate is the one admission already made.

use super::{Admission, Incoming, Refusal, Stop};
use crate::api::errors::{ClientApi, ErrorKind};
use crate::api::request;
use crate::api::trim::{self, Dialect};
use crate::count::estimate::ERROR_PERCENT;
use crate::count::usage::ApiKind;
use crate::host::Host;

pub fn check<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
) -> Result<(), Stop> {
    let cfg = incoming.cfg;
    // An alias's own entry, else the window of the model it stands for where the request starts.
    let window = cfg
        .models
        .window(&adm.model)
        .or_else(|| cfg.models.window(cfg.priced_as(adm.start, &adm.model)));
    let Some(&window) = window else {
        return Ok(());
    };
    let (dialect, param) = match incoming.api {
        ApiKind::ChatCompletions => (Some(Dialect::Chat), Some("messages")),
        ApiKind::Messages => (Some(Dialect::Messages), None),
        ApiKind::Responses => (None, Some("input")),
        ApiKind::Completions => (None, Some("prompt")),
        ApiKind::Embeddings | ApiKind::Other => return Ok(()),
    };
    let limit = window.tokens;
    let output = adm.info.max_tokens.unwrap_or(cfg.default_max_tokens);
    let sent = adm.info.prompt_tokens_estimate;
    if fits(sent, output, limit) {
        return Ok(());
    }
    if cfg.lower_max_tokens {
        if let Some(max) = output_room(sent, limit) {
            lower(host, incoming, adm, max);
            return Ok(());
        }
    }
    let trimming = dialect.filter(|_| window.trim_oldest || cfg.models.trims_for(&adm.consumer));
    let fits_without = |dropped: u64| fits(sent.saturating_sub(dropped), output, limit);
    let trimmed = match (trimming, adm.body(incoming)) {
        (Some(dialect), Some(body)) => {
            trim::trim_oldest(dialect, body, request::message_tokens, fits_without)
        }
        _ => None,
    };
    let prompt = sent.saturating_sub(trimmed.as_ref().map_or(0, |t| t.tokens));
    let lower_to = match &trimmed {
        Some(t) if t.enough => None,
        _ => cfg
            .lower_max_tokens
            .then(|| output_room(prompt, limit))
            .flatten(),
    };
    if lower_to.is_none() && surely_over(prompt, output, limit) {
        let over = Over {
            limit,
            prompt: sent,
            output,
            output_given: adm.info.max_tokens.is_some(),
            kept: trimmed.as_ref().map(|_| prompt),
        };
        return Err(refusal(incoming.client, param, &over).into());
    }
    if let Some(t) = trimmed {
        host.count("tollgate.context.trimmed_requests", 1);
        host.count("tollgate.context.trimmed_messages", t.messages as u64);
        adm.info.prompt_tokens_estimate = prompt;
        adm.trimmed_messages = t.messages;
        adm.rewritten = Some(t.body);
    }
    if let Some(max) = lower_to {
        lower(host, incoming, adm, max);
    }
    Ok(())
}

/// The most the real prompt may be: the estimate plus the estimator's error bound.
fn at_most(estimate: u64) -> u64 {
    estimate.saturating_add(estimate.saturating_mul(ERROR_PERCENT) / 100)
}

/// The least the real prompt may be: the estimate minus the estimator's error bound.
fn at_least(estimate: u64) -> u64 {
    estimate.saturating_sub(estimate.saturating_mul(ERROR_PERCENT) / 100)
}

/// Fits even if the estimate undercounts by the whole bound.
fn fits(prompt: u64, output: u64, limit: u64) -> bool {
    at_most(prompt).saturating_add(output) <= limit
}

/// Over even if the estimate overcounts by the whole bound.
fn surely_over(prompt: u64, output: u64, limit: u64) -> bool {
    at_least(prompt).saturating_add(output) > limit
}

/// The output the window has room for beside the prompt at its largest; None when none.
fn output_room(prompt: u64, limit: u64) -> Option<u64> {
    limit.checked_sub(at_most(prompt)).filter(|&room| room >= 1)
}

/// `max_tokens` set to `max` in the body as the steps left it; the quota step reads both after.
fn lower<H: Host>(host: &mut H, incoming: &Incoming<'_>, adm: &mut Admission, max: u64) {
    if let Some(b) = adm
        .body(incoming)
        .and_then(|b| request::with_max_tokens(b, max))
    {
        adm.rewritten = Some(b);
        adm.info.max_tokens = Some(max);
        host.count("tollgate.context.max_tokens_lowered", 1);
    }
}

/// A request that does not fit, in the numbers its refusal gives.
struct Over {
    limit: u64,
    /// The prompt as sent.
    prompt: u64,
    output: u64,
    /// `max_tokens` came with the request (else `output` is the gateway's default).
    output_given: bool,
    /// The prompt left by dropping every turn that may go, when trimming was on.
    kept: Option<u64>,
}

fn refusal(client: ClientApi, param: Option<&'static str>, o: &Over) -> Refusal {
    let total = o.prompt.saturating_add(o.output);
    let over = total.saturating_sub(o.limit);
    let default_note = if o.output_given {
        ""
    } else {
        ", the gateway's default when max_tokens is not set"
    };
    let kept_note = o.kept.map_or(String::new(), |kept| {
        format!(
            " Without the oldest turns it may drop, the conversation still needs {kept} tokens."
        )
    });
    let message = match client {
        // OpenAI's own words for it, with the overshoot said outright.
        ClientApi::OpenAi => format!(
            "This model's maximum context length is {limit} tokens. However, you requested {total} tokens ({prompt} in the messages, {output} in the completion{default_note}), {over} tokens over the limit. Please reduce the length of the messages or completion.{kept_note} (Token counts are the gateway's estimate.)",
            limit = o.limit,
            prompt = o.prompt,
            output = o.output,
        ),
        // Anthropic's, for the prompt alone and for the prompt with max_tokens.
        ClientApi::Anthropic if o.prompt > o.limit => format!(
            "prompt is too long: {prompt} tokens > {limit} maximum; with max_tokens {output}{default_note} the request is {over} tokens over.{kept_note} (Token counts are the gateway's estimate.)",
            prompt = o.prompt,
            limit = o.limit,
            output = o.output,
        ),
        ClientApi::Anthropic => format!(
            "input length and `max_tokens` exceed context limit: {prompt} + {output} > {limit}, decrease input length or `max_tokens` and try again ({over} tokens over{default_note}).{kept_note} (Token counts are the gateway's estimate.)",
            prompt = o.prompt,
            output = o.output,
            limit = o.limit,
        ),
    };
    let refusal = Refusal::new(ErrorKind::InvalidRequest, message)
        .code("context_length_exceeded")
        .outcome("rejected_context");
    match param {
        Some(p) => refusal.param(p),
        None => refusal,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;
    use crate::api::request::inspect;
    use crate::host::fake::FakeHost;
    use crate::store::FakeStore;
    use serde_json::{json, Value};
    use std::rc::Rc;

    fn cfg(extra: &str) -> crate::config::Config {
        config(&format!(
            r#"{{"consumers":{{"list":[{{"name":"c","key_env":"K"}},{{"name":"trims","key_env":"K","trim_oldest":true}}]}},
                "providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}]}}],
                "models":{{"small":{{"context_window":1000}},"trimmed":{{"context_window":1000,"trim_oldest":true}}}},
                "default_max_tokens":100{extra}}}"#
        ))
    }

    /// A chat body for `model` whose prompt estimate is about `tokens` (one message of prose).
    fn body(model: &str, tokens: u64, max_tokens: Option<u64>) -> Vec<u8> {
        let mut b = json!({"model": model, "messages": [{"role": "user", "content": "word ".repeat(tokens as usize - 4)}]});
        if let Some(m) = max_tokens {
            b["max_tokens"] = json!(m);
        }
        b.to_string().into_bytes()
    }

    fn run(
        cfg: &crate::config::Config,
        consumer: &str,
        api: ApiKind,
        body: &[u8],
    ) -> (Result<(), Stop>, Admission, FakeHost) {
        let mut h = FakeHost::new(Rc::new(FakeStore::new()));
        let mut inc = incoming(cfg, body);
        inc.api = api;
        inc.client = match api {
            ApiKind::Messages => ClientApi::Anthropic,
            _ => ClientApi::OpenAi,
        };
        let mut adm = admission(consumer, body);
        adm.info = inspect(api, body).unwrap();
        adm.model = adm.info.model.clone().unwrap_or_default();
        let r = check(&mut h, &inc, &mut adm);
        (r, adm, h)
    }

    fn refused(r: Result<(), Stop>) -> Refusal {
        match r {
            Err(Stop::Refuse(r)) => r,
            Ok(()) | Err(Stop::Serve(_)) => panic!("admitted"),
        }
    }

    #[test]
    fn a_model_without_a_window_costs_no_host_call_and_changes_nothing() {
        for cfg in [
            cfg(""),
            config(
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
            ),
        ] {
            let b = body("other", 5000, None);
            let (r, adm, h) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
            assert!(r.is_ok());
            assert_eq!(h.calls.get(), 0);
            assert!(adm.rewritten.is_none());
        }
    }

    #[test]
    fn an_alias_takes_its_own_window_else_the_window_of_the_model_it_stands_for() {
        let cfg = config(
            r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}],
                "aliases":{"tiny":"small","own":"small"},
                "models":{"small":{"context_window":1000},"own":{"context_window":5000}}}"#,
        );
        let b = body("tiny", 1200, Some(100));
        assert_eq!(
            refused(run(&cfg, "c", ApiKind::ChatCompletions, &b).0).code,
            Some("context_length_exceeded"),
            "tiny stands for small (1000)"
        );
        let b = body("own", 1200, Some(100));
        assert!(
            run(&cfg, "c", ApiKind::ChatCompletions, &b).0.is_ok(),
            "own has 5000"
        );
    }

    #[test]
    fn the_error_bound_decides_each_side_of_the_window() {
        // Window 1000, output 100: room for 900 prompt tokens.
        assert!(fits(750, 100, 1000), "750 is at most 900");
        assert!(!fits(751, 100, 1000), "751 may be 901");
        assert!(!surely_over(1125, 100, 1000), "1125 may be 900");
        assert!(surely_over(1128, 100, 1000), "1128 is at least 903");
        let cfg = cfg("");
        for (tokens, admitted) in [(700, true), (800, true), (1100, true), (1200, false)] {
            let b = body("small", tokens, Some(100));
            let (r, adm, h) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
            assert_eq!(r.is_ok(), admitted, "{tokens}");
            assert!(adm.rewritten.is_none(), "borderline requests go as sent");
            assert!(h.counters.is_empty());
        }
    }

    #[test]
    fn refusals_say_the_window_the_request_and_the_overshoot_in_each_dialect() {
        let cfg = cfg("");
        let b = body("small", 1500, Some(100));
        let (r, ..) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
        let r = refused(r);
        assert_eq!(
            (r.kind, r.code, r.param, r.outcome),
            (
                ErrorKind::InvalidRequest,
                Some("context_length_exceeded"),
                Some("messages"),
                "rejected_context"
            )
        );
        assert_eq!(
            r.message,
            "This model's maximum context length is 1000 tokens. However, you requested 1600 tokens (1500 in the messages, 100 in the completion), 600 tokens over the limit. Please reduce the length of the messages or completion. (Token counts are the gateway's estimate.)"
        );

        let anthropic = |tokens: u64, max: u64| {
            json!({"model": "small", "max_tokens": max, "messages": [{"role": "user", "content": "word ".repeat(tokens as usize - 4)}]})
                .to_string()
        };
        let (r, ..) = run(
            &cfg,
            "c",
            ApiKind::Messages,
            anthropic(1500, 100).as_bytes(),
        );
        let r = refused(r);
        assert_eq!((r.code, r.param), (Some("context_length_exceeded"), None));
        assert_eq!(
            r.message,
            "prompt is too long: 1500 tokens > 1000 maximum; with max_tokens 100 the request is 600 tokens over. (Token counts are the gateway's estimate.)"
        );
        let (r, ..) = run(&cfg, "c", ApiKind::Messages, anthropic(900, 800).as_bytes());
        assert_eq!(
            refused(r).message,
            "input length and `max_tokens` exceed context limit: 900 + 800 > 1000, decrease input length or `max_tokens` and try again (700 tokens over). (Token counts are the gateway's estimate.)"
        );

        // The default output reservation is named as such.
        let b = body("small", 1500, None);
        let (r, ..) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
        assert!(refused(r).message.contains(
            "(1500 in the messages, 100 in the completion, the gateway's default when max_tokens is not set)"
        ));
        let responses = br#"{"model":"small","input":"x","max_output_tokens":5000}"#;
        let (r, ..) = run(&cfg, "c", ApiKind::Responses, responses);
        assert_eq!(refused(r).param, Some("input"));
    }

    #[test]
    fn lower_max_tokens_lowers_only_an_output_that_overflows() {
        let cfg = cfg(r#","lower_max_tokens":true"#);
        let b = body("small", 500, Some(800));
        let (r, adm, h) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
        assert!(r.is_ok());
        // 500 may be 600: 400 left for the answer.
        assert_eq!(adm.info.max_tokens, Some(400));
        let sent: Value = serde_json::from_slice(adm.rewritten.as_deref().unwrap()).unwrap();
        assert_eq!(sent["max_tokens"], 400);
        assert_eq!(h.counter("tollgate.context.max_tokens_lowered"), 1);
        // Without max_tokens, it is added.
        let b = body("small", 800, None);
        let (r, adm, _) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
        assert!(r.is_ok());
        assert_eq!(adm.info.max_tokens, Some(40));
        let sent: Value = serde_json::from_slice(adm.rewritten.as_deref().unwrap()).unwrap();
        assert_eq!(sent["max_tokens"], 40);
        // A prompt that may fill the window alone is not helped by lowering.
        let b = body("small", 1300, Some(10));
        let (r, ..) = run(&cfg, "c", ApiKind::ChatCompletions, &b);
        assert_eq!(refused(r).code, Some("context_length_exceeded"));
    }

    fn conversation(turns: usize) -> Value {
        let mut messages = vec![json!({"role": "system", "content": "You are terse."})];
        for i in 0..turns {
            messages.push(
                json!({"role": "user", "content": format!("question {i} {}", "word ".repeat(40))}),
            );
            messages.push(json!({"role": "assistant", "content": format!("answer {i} {}", "word ".repeat(40))}));
        }
        messages.push(json!({"role": "user", "content": "the last question"}));
        json!({"model": "trimmed", "max_tokens": 100, "messages": messages})
    }

    #[test]
    fn trimming_drops_the_fewest_oldest_turns_that_make_it_fit() {
        let cfg = cfg("");
        let b = conversation(30).to_string();
        let (r, adm, h) = run(&cfg, "c", ApiKind::ChatCompletions, b.as_bytes());
        assert!(r.is_ok());
        let sent: Value = serde_json::from_slice(adm.rewritten.as_deref().unwrap()).unwrap();
        let kept = sent["messages"].as_array().unwrap();
        assert_eq!(kept[0]["role"], "system");
        assert_eq!(kept[1]["role"], "user");
        assert_eq!(kept.last().unwrap()["content"], "the last question");
        assert_eq!(adm.trimmed_messages, 62 - kept.len());
        let estimate = inspect(ApiKind::ChatCompletions, adm.rewritten.as_deref().unwrap())
            .unwrap()
            .prompt_tokens_estimate;
        assert_eq!(
            adm.info.prompt_tokens_estimate, estimate,
            "the estimate is the trimmed body's"
        );
        assert!(fits(estimate, 100, 1000));
        // Keeping one more turn would not have fitted.
        let original = conversation(30);
        let tokens = |i: usize| {
            request::message_tokens(
                &serde_json::value::to_raw_value(&original["messages"][i]).unwrap(),
            )
        };
        let dropped = adm.trimmed_messages;
        let one_more = estimate + tokens(dropped - 1) + tokens(dropped);
        assert!(!fits(one_more, 100, 1000), "{estimate} {one_more}");
        assert_eq!(h.counter("tollgate.context.trimmed_requests"), 1);
        assert_eq!(
            h.counter("tollgate.context.trimmed_messages"),
            adm.trimmed_messages as u64
        );
    }

    #[test]
    fn trimming_is_per_model_or_per_consumer_and_never_otherwise() {
        let cfg = cfg("");
        let mut b = conversation(30);
        b["model"] = json!("small");
        let b = b.to_string();
        let (r, adm, _) = run(&cfg, "c", ApiKind::ChatCompletions, b.as_bytes());
        assert!(
            r.is_err() && adm.rewritten.is_none(),
            "not on for this model or consumer"
        );
        let (r, adm, _) = run(&cfg, "trims", ApiKind::ChatCompletions, b.as_bytes());
        assert!(
            r.is_ok() && adm.trimmed_messages > 0,
            "on for this consumer"
        );
    }

    #[test]
    fn when_the_kept_turns_alone_do_not_fit_the_request_is_refused() {
        let cfg = cfg("");
        let mut b = conversation(3);
        b["messages"][0]["content"] = json!("rule ".repeat(1400));
        let b = b.to_string();
        let (r, ..) = run(&cfg, "c", ApiKind::ChatCompletions, b.as_bytes());
        let r = refused(r);
        assert!(
            r.message
                .contains("Without the oldest turns it may drop, the conversation still needs"),
            "{}",
            r.message
        );
    }

    #[test]
    fn trimming_and_lowering_compose() {
        // Trimmed as far as it may go, then the output lowered to what is left.
        let cfg = cfg(r#","lower_max_tokens":true"#);
        let mut b = conversation(3);
        b["messages"][0]["content"] = json!("rule ".repeat(600));
        b["max_tokens"] = json!(800);
        let b = b.to_string();
        let (r, adm, _) = run(&cfg, "c", ApiKind::ChatCompletions, b.as_bytes());
        assert!(r.is_ok());
        let sent: Value = serde_json::from_slice(adm.rewritten.as_deref().unwrap()).unwrap();
        assert_eq!(sent["messages"].as_array().unwrap().len(), 2);
        let left = 1000 - at_most(adm.info.prompt_tokens_estimate);
        assert_eq!(
            (adm.info.max_tokens, sent["max_tokens"].clone()),
            (Some(left), json!(left))
        );
    }

    #[test]
    fn anthropic_conversations_are_trimmed_in_their_own_dialect() {
        let cfg = cfg("");
        let mut messages = Vec::new();
        for i in 0..30 {
            messages
                .push(json!({"role": "user", "content": format!("q{i} {}", "word ".repeat(40))}));
            messages.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": format!("t{i}"), "name": "f", "input": {}}]}));
            messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": format!("t{i}"), "content": "ok"}]}));
            messages.push(json!({"role": "assistant", "content": "done"}));
        }
        messages.push(json!({"role": "user", "content": "last"}));
        let b = json!({"model": "trimmed", "max_tokens": 100, "system": "be brief", "messages": messages}).to_string();
        let (r, adm, _) = run(&cfg, "c", ApiKind::Messages, b.as_bytes());
        assert!(r.is_ok());
        let sent: Value = serde_json::from_slice(adm.rewritten.as_deref().unwrap()).unwrap();
        let kept = sent["messages"].as_array().unwrap();
        assert_eq!(sent["system"], "be brief");
        assert_eq!(kept[0]["role"], "user");
        assert!(
            kept[0]["content"].is_string(),
            "starts at a user's own turn"
        );
        assert!((kept.len() - 1).is_multiple_of(4));
    }

    /// The whole walk: the context step, then the quota step on the body and estimate it left.
    fn walked(budget: u64, body: &[u8]) -> (Result<(), Stop>, Admission) {
        let cfg = config(&format!(
            r#"{{"consumers":{{"list":[{{"name":"c","key_env":"K","limits":[{{"metric":"total_tokens","amount":{budget},"window":"1m"}}]}}]}},
                "providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}]}}],
                "models":{{"small":{{"context_window":1000,"trim_oldest":true}}}},"lower_max_tokens":true}}"#
        ));
        let mut h = FakeHost::new(Rc::new(FakeStore::new()));
        let mut adm = admission("c", body);
        let r = super::super::walk(&mut h, &incoming(&cfg, body), &mut adm);
        (r, adm)
    }

    fn max_tokens_sent(adm: &Admission) -> Value {
        serde_json::from_slice::<Value>(adm.rewritten.as_deref().unwrap()).unwrap()["max_tokens"]
            .clone()
    }

    #[test]
    fn the_quota_step_lowers_further_from_what_this_step_left_and_the_smaller_wins() {
        let b = body("small", 500, Some(800));
        // The window leaves 400 for the answer; a budget of 10,000 would allow more: 400 stays.
        let (r, adm) = walked(10_000, &b);
        assert!(r.is_ok());
        assert_eq!(
            (adm.info.max_tokens, max_tokens_sent(&adm)),
            (Some(400), json!(400))
        );
        assert_eq!(adm.reservations[0].reserved, 500 + 400);
        // A budget of 700 allows 200: the quota step lowers the body the context step wrote.
        let (r, adm) = walked(700, &b);
        assert!(r.is_ok());
        assert_eq!(max_tokens_sent(&adm), json!(200));
        assert_eq!(adm.reservations[0].reserved, 700);
    }

    #[test]
    fn the_quota_step_reserves_the_trimmed_prompt() {
        let mut b = conversation(30);
        b["model"] = json!("small");
        let b = b.to_string();
        let sent = inspect(ApiKind::ChatCompletions, b.as_bytes())
            .unwrap()
            .prompt_tokens_estimate;
        let (r, adm) = walked(1_000, b.as_bytes());
        assert!(
            r.is_ok(),
            "the whole conversation ({sent}) is over the budget, the trimmed one is not"
        );
        assert!(adm.info.prompt_tokens_estimate + 100 < 1_000 && sent > 1_000);
        assert_eq!(
            adm.reservations[0].reserved,
            adm.info.prompt_tokens_estimate + 100
        );
        let kept = serde_json::from_slice::<Value>(adm.rewritten.as_deref().unwrap()).unwrap();
        assert_eq!(kept["max_tokens"], 100);
        assert_eq!(
            kept["messages"].as_array().unwrap().len(),
            62 - adm.trimmed_messages
        );
    }

    /// What the step costs, natively: `cargo test --release --lib context_step_timing -- --ignored
    /// --nocapture`. A model without a window, a window the request fits, and a 100-message
    /// conversation trimmed (with the request's inspection beside it for scale).
    #[test]
    #[ignore]
    fn context_step_timing() {
        use std::time::Instant;
        let cfg = cfg("");
        let mut b = conversation(50);
        b["messages"][0]["content"] = json!(words_text(100));
        let body = b.to_string();
        let time = |label: &str, model: &str, api_body: &str| {
            let mut body: Value = serde_json::from_str(api_body).unwrap();
            body["model"] = json!(model);
            let body = body.to_string();
            let info = inspect(ApiKind::ChatCompletions, body.as_bytes()).unwrap();
            let mut h = FakeHost::new(Rc::new(FakeStore::new()));
            let inc = incoming(&cfg, body.as_bytes());
            let runs = 2_000u32;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let start = Instant::now();
                for _ in 0..runs {
                    let mut adm = Admission {
                        consumer: "c".into(),
                        model: model.into(),
                        info: info.clone(),
                        ..Admission::default()
                    };
                    let _ = std::hint::black_box(check(&mut h, &inc, &mut adm));
                }
                best = best.min(start.elapsed().as_secs_f64() * 1e6 / f64::from(runs));
            }
            let start = Instant::now();
            for _ in 0..runs {
                std::hint::black_box(inspect(ApiKind::ChatCompletions, body.as_bytes()).unwrap());
            }
            let inspecting = start.elapsed().as_secs_f64() * 1e6 / f64::from(runs);
            println!(
                "{label}: {best:.2} µs per request (body {} bytes, estimate {}; inspecting it: {inspecting:.2} µs)",
                body.len(),
                info.prompt_tokens_estimate
            );
        };
        time("no window", "other", &body);
        let short =
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}).to_string();
        time("fits", "small", &short);
        time("trimmed, 102 messages", "trimmed", &body);
    }

    /// Trimmed requests (`CHECKS`, default 1) and inspections of the same 102-message body
    /// (`INSPECTIONS`, default 0), for instruction counts that do not depend on the machine's load:
    /// run the test binary under `valgrind --tool=callgrind` with two values of one and take the
    /// difference.
    #[test]
    #[ignore]
    fn trimmed_requests_for_counting() {
        let runs = |var: &str, default: usize| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let cfg = cfg("");
        let mut b = conversation(50);
        b["messages"][0]["content"] = json!(words_text(100));
        let body = b.to_string();
        let info = inspect(ApiKind::ChatCompletions, body.as_bytes()).unwrap();
        for _ in 0..runs("INSPECTIONS", 0) {
            std::hint::black_box(inspect(ApiKind::ChatCompletions, body.as_bytes()).unwrap());
        }
        let mut h = FakeHost::new(Rc::new(FakeStore::new()));
        for _ in 0..runs("CHECKS", 1) {
            let mut adm = Admission {
                consumer: "c".into(),
                model: "trimmed".into(),
                info: info.clone(),
                ..Admission::default()
            };
            assert!(check(&mut h, &incoming(&cfg, body.as_bytes()), &mut adm).is_ok());
            assert!(adm.trimmed_messages > 0);
        }
    }

    fn words_text(n: usize) -> String {
        "word ".repeat(n)
    }

    #[test]
    fn big_numbers_do_not_overflow() {
        assert!(!fits(u64::MAX, u64::MAX, 1000));
        assert!(surely_over(u64::MAX, u64::MAX, u64::MAX - 1));
        assert_eq!(output_room(u64::MAX, 1000), None);
        let cfg = cfg("");
        let b = br#"{"model":"small","max_tokens":18446744073709551615,"messages":[{"role":"user","content":"x"}]}"#;
        let (r, ..) = run(&cfg, "c", ApiKind::ChatCompletions, b);
        assert!(refused(r)
            .message
            .contains("18446744073709551615 in the completion"));
    }
}
