//! The status endpoint (`status.path`): usage totals, key health and quota standings as JSON.
//!
//! Who sees what: the admin key (`status.admin_key_sha256` / `admin_key_env`) sees everything; a
//! consumer sees its own usage and budgets only; anyone else gets 401. Ids and counts only, never a
//! secret. Money is shown in USD.

use super::Flow;
use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::config::{Config, Consumers, KeySecret, ANONYMOUS};
use crate::failover::{health, pace};
use crate::host::{Headers, Host};
use crate::limit::consumer;
use crate::limit::consumer_key;
use crate::limit::header_names;
use crate::limit::in_flight::{self, key_lane, Subject};
use crate::limit::quota::{self, Limit, Metric};
use crate::store::{decode_u64s, SharedStore};
use serde_json::{json, Map, Value};

fn usage(store: &dyn SharedStore, key: &str) -> Value {
    let v = store.get(key).ok().and_then(|(b, _)| b);
    let [requests, input, output, cache_read, cache_write, estimated] =
        decode_u64s::<6>(v.as_deref());
    json!({"requests": requests, "input_tokens": input, "output_tokens": output,
           "cache_read_tokens": cache_read, "cache_write_tokens": cache_write,
           "estimated_requests": estimated})
}

/// An amount of a limit's metric as shown: USD for money, a count otherwise.
fn amount(limit: &Limit, value: u64) -> Value {
    if limit.metric == Metric::CostMicroUsd {
        json!(value as f64 / 1_000_000.0)
    } else {
        json!(value)
    }
}

fn consumer_view(store: &dyn SharedStore, cfg: &Config, name: &str, now: u64) -> Value {
    let applied = quota::Limits::new(name, cfg.limits_for(name, ""));
    let standings = quota::standings(store, &applied, now).unwrap_or_default();
    let limits: Vec<Value> = applied
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let st = standings.get(i);
            json!({"metric": metric_name(&l), "amount": amount(&l, l.amount),
                   "window_s": l.window_ms / 1000,
                   "remaining": st.map(|s| amount(&l, s.remaining)),
                   "reset_ms": st.map(|s| s.reset_ms)})
        })
        .collect();
    let mut view =
        json!({"usage": usage(store, &format!("tollgate:u:c:{name}")), "limits": limits});
    if let Some(max) = cfg.in_flight.consumer(name) {
        let now_in_flight = in_flight::read(store, &Subject::Consumer(name.to_string()), now)
            .map(|(t, _)| t.sum())
            .ok();
        view["in_flight"] = json!(now_in_flight);
        view["max_in_flight"] = json!(max);
    }
    if cfg.cache.is_some() {
        view["cache_saved"] = cache_saved(store, name);
    }
    view
}

/// What answers from the response cache saved the consumer: tokens not spent, and their price.
fn cache_saved(store: &dyn SharedStore, consumer: &str) -> Value {
    let key = super::listener::saved_row(consumer);
    let v = store.get(&key).ok().and_then(|(b, _)| b);
    let [answers, input, output, cache_read, micro_usd, stale] = decode_u64s::<6>(v.as_deref());
    json!({"answers": answers, "stale_answers": stale, "input_tokens": input,
           "output_tokens": output, "cache_read_tokens": cache_read,
           "cost_usd": micro_usd as f64 / 1_000_000.0})
}

/// `cost_usd` for money limits (the config's name), the metric's own name otherwise.
fn metric_name(l: &Limit) -> &'static str {
    if l.metric == Metric::CostMicroUsd {
        "cost_usd"
    } else {
        l.metric.as_str()
    }
}

fn everything(store: &dyn SharedStore, cfg: &Config, now: u64) -> Value {
    let names: Vec<String> = match &cfg.consumers {
        Consumers::Anonymous => vec![ANONYMOUS.to_string()],
        // Named by the header as they came: the set in shared data, and the overflow.
        Consumers::TrustedHeader {
            list,
            max_from_header,
            ..
        } if list.is_empty() => {
            let mut names = header_names::names(store, *max_from_header);
            names.push(header_names::OVERFLOW.to_string());
            names
        }
        Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => {
            l.iter().map(|c| c.name.clone()).collect()
        }
    };
    let mut consumers = Map::new();
    for c in &names {
        consumers.insert(c.clone(), consumer_view(store, cfg, c, now));
    }
    let mut model_names: Vec<&str> = cfg
        .prices
        .keys()
        .chain(cfg.providers.iter().flat_map(|p| p.models.keys()))
        .chain(cfg.aliases.names())
        .map(String::as_str)
        .chain(["other", "none"])
        .collect();
    model_names.sort_unstable();
    model_names.dedup();
    let mut models = Map::new();
    for m in model_names {
        let label = crate::count::metric_segment(m);
        models.insert(
            m.to_string(),
            usage(store, &format!("tollgate:u:m:{label}")),
        );
    }
    let mut providers = Map::new();
    for (pi, p) in cfg.providers.iter().enumerate() {
        let h = health::read(store, p).unwrap_or_else(|_| health::ProviderHealth::decode(None, p));
        let in_flight = cfg
            .in_flight
            .provider(pi)
            .then(|| in_flight::read(store, &Subject::Provider(p.name.clone()), now).ok())
            .flatten()
            .map(|(t, _)| t);
        // Paced keys: whether one more request could go now, as an attempt would be told.
        let paced = (cfg.pacing.configured(pi) || h.announces())
            .then(|| pace::read(store, p).ok())
            .flatten();
        let keys: Vec<Value> = p
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let (reason, until) = h.key_state(i, now);
                // A key disabled in the configuration still shows the cooldown it keeps.
                let state = if k.disabled {
                    "disabled_in_config"
                } else if h.key_revoked(i) {
                    "disabled_in_probation"
                } else {
                    reason.as_str()
                };
                // Where the secret comes from, by name only (the variable, or Envoy's secret).
                let (source, name) = match &k.source {
                    KeySecret::Env(var) => ("env", Some(var.as_str())),
                    KeySecret::Inline => ("inline", None),
                    KeySecret::Sds(secret) => ("sds", Some(secret.as_str())),
                };
                let mut view = json!({"id": k.id, "state": state, "cooldown_until_ms": until,
                       "source": source, "secret_name": name,
                       "probation_requests_left": h.probation_left(i),
                       "usage": usage(store, &format!("tollgate:u:k:{}:{}", p.name, k.id))});
                if let Some(max) = k.max_in_flight {
                    view["in_flight"] = json!(in_flight.as_ref().map(|t| t.of(key_lane(&k.id))));
                    view["max_in_flight"] = json!(max);
                }
                if let Some(entry) = &paced {
                    let out = entry.can_take(i, k, 1, now).err();
                    view["paced_by"] = json!(out.map(|pc| pc.by.as_str()));
                    view["paced_until_ms"] = json!(out.map_or(0, |pc| pc.until_ms));
                }
                view
            })
            .collect();
        let circuit = match h.circuit(&cfg.health, now) {
            health::Circuit::Closed => "closed",
            health::Circuit::Open { .. } => "open",
            health::Circuit::HalfOpen => "half_open",
        };
        // What a request for this provider would be told now: the same reading admission makes.
        let blocked = h.blocked(&cfg.health, now);
        providers.insert(
            p.name.clone(),
            json!({"type": p.kind.as_str(), "circuit": circuit,
                   "consecutive_failures": h.failures,
                   "blocked_by": blocked.map(|b| b.by.as_str()),
                   "blocked_until_ms": blocked.map_or(0, |b| b.until_ms),
                   "keys": keys}),
        );
    }
    json!({"now_ms": now, "consumers": consumers, "models": models, "providers": providers})
}

pub fn serve<H: Host>(host: &mut H, cfg: &Config, hdrs: &Headers) -> Flow {
    let now = host.now_ms();
    let lookup = |name: &str| hdrs.get_str(name);
    let admin = cfg
        .status
        .as_ref()
        .and_then(|s| s.admin_key_digest)
        .zip(consumer::presented_key(lookup).ok().flatten())
        .is_some_and(|(want, key)| {
            consumer_key::same(&want, &consumer_key::digest(key.as_bytes()))
        });
    let body = if admin {
        everything(host.store(), cfg, now)
    } else {
        let consumer = match &cfg.consumers {
            Consumers::Anonymous => None,
            _ => consumer::identify(cfg, host.store(), lookup).ok(),
        };
        match consumer {
            Some(name) => json!({"now_ms": now, "consumer": name,
                                 "standing": consumer_view(host.store(), cfg, &name, now)}),
            None => {
                let body = error_body(
                    ClientApi::OpenAi,
                    ErrorKind::Authentication,
                    "The status endpoint needs the gateway's admin key, or a consumer key to see that consumer's own standing.",
                    Some("invalid_api_key"),
                    None,
                );
                host.respond(401, &[("content-type", "application/json")], &body);
                return Flow::Stop;
            }
        }
    };
    let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    host.respond(
        200,
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        &bytes,
    );
    Flow::Stop
}
