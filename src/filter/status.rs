//! `status_path`: the shared-data totals, key health and quota standings as JSON, for operators
//! and tests. Ids and counts only, never a secret.

use super::dispatch::Action;
use super::host::{self, HostStore};
use crate::config::{Config, Consumers, ANONYMOUS};
use crate::failover::health;
use crate::json::{json, Map, Value};
use crate::limit::quota;
use crate::store::{decode_u64s, SharedStore};

fn usage(key: &str) -> Value {
    let v = HostStore.get(key).ok().and_then(|(b, _)| b);
    let [requests, input, output, cache_read, cache_write, estimated] =
        decode_u64s::<6>(v.as_deref());
    json!({"requests": requests, "input_tokens": input, "output_tokens": output,
           "cache_read_tokens": cache_read, "cache_write_tokens": cache_write, "estimated_requests": estimated})
}

pub fn serve(cfg: &Config) -> Action {
    let now = host::now_ms();
    let names: Vec<String> = match &cfg.consumers {
        Consumers::Anonymous => vec![ANONYMOUS.to_string()],
        Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => {
            l.iter().map(|c| c.name.clone()).collect()
        }
    };
    let mut consumers = Map::new();
    for c in &names {
        let limits: Vec<Value> = cfg
            .limits_for(c, "")
            .into_iter()
            .map(|(scope, l)| {
                let key = quota::key(c, scope, &l);
                let st = quota::standings(&HostStore, &[(key, l)], now).ok().and_then(|v| v.into_iter().next());
                json!({"metric": l.metric.as_str(), "amount": l.amount, "window_s": l.window_ms / 1000,
                       "remaining": st.map(|s| s.remaining), "reset_ms": st.map(|s| s.reset_ms)})
            })
            .collect();
        consumers.insert(
            c.clone(),
            json!({"usage": usage(&format!("tollgate:u:c:{c}")), "limits": limits}),
        );
    }
    let mut models = Map::new();
    // Sorted and unique by insertion: a few dozen names, and no sort code in the module for them.
    let mut model_names: Vec<&str> = Vec::new();
    let named = cfg.providers.iter().flat_map(|p| p.models.keys());
    for m in cfg
        .prices
        .keys()
        .chain(named)
        .map(String::as_str)
        .chain(["other", "none"])
    {
        if let Err(at) = model_names.binary_search(&m) {
            model_names.insert(at, m);
        }
    }
    for m in model_names {
        let m = m.to_string();
        let label = crate::gateway::metric_segment(&m);
        models.insert(m, usage(&format!("tollgate:u:m:{label}")));
    }
    let mut providers = Map::new();
    for p in &cfg.providers {
        let h =
            health::read(&HostStore, p).unwrap_or_else(|_| health::ProviderHealth::decode(None, p));
        let keys: Vec<Value> = p
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let (reason, until) = h.key_state(i, now);
                json!({"id": k.id, "state": reason.as_str(), "cooldown_until_ms": until,
                       "usage": usage(&format!("tollgate:u:k:{}:{}", p.name, k.id))})
            })
            .collect();
        let circuit = match h.circuit(&cfg.health, now) {
            health::Circuit::Closed => "closed",
            health::Circuit::Open { .. } => "open",
            health::Circuit::HalfOpen => "half_open",
        };
        providers.insert(
            p.name.clone(),
            json!({"type": p.kind.as_str(), "circuit": circuit, "consecutive_failures": h.failures, "keys": keys}),
        );
    }
    let body =
        json!({"now_ms": now, "consumers": consumers, "models": models, "providers": providers});
    let bytes = crate::json::to_vec_pretty(&body).unwrap_or_default();
    host::respond(
        200,
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        &bytes,
    );
    Action::Pause
}
