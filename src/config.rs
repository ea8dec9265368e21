//! Plugin configuration, in two phases: serde (unknown fields refused) into `Raw*` structs, then a
//! validating conversion into `Config`, whose errors name the field path and the reason.
//!
//! Secrets are resolved here, once, at configure time: key values from environment variables that
//! Envoy passes in `vm_config.environment_variables.host_env_keys`, consumer keys as SHA-256 digests.

use crate::quota::{Limit, Metric, Price};
use crate::sha256;
use core::fmt;
use hashbrown::HashMap;
use serde::Deserialize;
use std::collections::BTreeMap;

/// A configuration error: `path: reason`, e.g. `providers[0].keys[2].env: OPENAI_KEY_3 is not set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    Openai,
    AzureOpenai,
    Anthropic,
    OpenaiCompatible,
}

impl ProviderType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Openai => "openai",
            ProviderType::AzureOpenai => "azure_openai",
            ProviderType::Anthropic => "anthropic",
            ProviderType::OpenaiCompatible => "openai_compatible",
        }
    }
    pub fn speaks_anthropic(self) -> bool {
        self == ProviderType::Anthropic
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Rotation {
    #[default]
    RoundRobin,
    Weighted,
    Sticky,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// When tollgate cannot do its job (shared data failing), let the request through unmetered.
    #[default]
    Open,
    /// ... or refuse it with 503.
    Closed,
}

// ---------------------------------------------------------------- raw (serde) layer

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    consumers: Option<RawConsumers>,
    providers: Vec<RawProvider>,
    #[serde(default)]
    health: Option<RawHealth>,
    #[serde(default)]
    default_limits: Vec<RawLimit>,
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
    #[serde(default)]
    default_max_tokens: Option<u64>,
    #[serde(default)]
    lower_max_tokens: bool,
    #[serde(default)]
    max_request_bytes: Option<u64>,
    #[serde(default)]
    max_sse_event_bytes: Option<u64>,
    #[serde(default)]
    failure_mode: FailureMode,
    #[serde(default)]
    sticky_header: Option<String>,
    #[serde(default)]
    status_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumers {
    #[serde(default)]
    trusted_header: Option<String>,
    #[serde(default)]
    list: Vec<RawConsumer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    name: String,
    #[serde(default)]
    key_sha256: Option<String>,
    #[serde(default)]
    key_env: Option<String>,
    #[serde(default)]
    limits: Vec<RawLimit>,
    #[serde(default)]
    model_limits: BTreeMap<String, Vec<RawLimit>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    #[serde(rename = "type")]
    kind: ProviderType,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    base_path: Option<String>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    anthropic_version: Option<String>,
    #[serde(default)]
    rotation: Rotation,
    keys: Vec<RawKey>,
    #[serde(default)]
    models: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    inline: bool,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    default_cooldown_s: Option<u64>,
    #[serde(default)]
    auth_failure_cooldown_s: Option<u64>,
    #[serde(default)]
    circuit_failures: Option<u32>,
    #[serde(default)]
    circuit_open_s: Option<u64>,
    #[serde(default)]
    half_open_probes: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    metric: String,
    amount: crate::json::Number,
    window: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    #[serde(default)]
    cached_input: Option<f64>,
}

// ---------------------------------------------------------------- validated layer

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySecret {
    Env(String),
    Inline,
}

#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub secret: String,
    pub source: KeySecret,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderType,
    pub host: Option<String>,
    pub base_path: String,
    pub api_version: Option<String>,
    pub anthropic_version: String,
    pub rotation: Rotation,
    pub keys: Vec<Key>,
    /// Client model name -> provider model name. Empty: every model passes through unchanged.
    pub models: HashMap<String, String>,
    /// The weighted-rotation schedule: key indices, interleaved (smooth weighted round robin).
    pub schedule: Vec<usize>,
}

impl Provider {
    /// The provider's model for a client's model, or None when this provider cannot serve it.
    pub fn map_model<'a>(&'a self, client_model: &'a str) -> Option<&'a str> {
        if self.models.is_empty() {
            return Some(client_model);
        }
        self.models
            .get(client_model)
            .or_else(|| self.models.get("*"))
            .map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Consumer {
    pub name: String,
    /// SHA-256 of the consumer's key; None when consumers come from a trusted header.
    pub key_digest: Option<[u8; 32]>,
    pub limits: Vec<Limit>,
    pub model_limits: HashMap<String, Vec<Limit>>,
}

#[derive(Debug, Clone)]
pub enum Consumers {
    /// No `consumers` section: everyone is the one anonymous consumer.
    Anonymous,
    Keys(Vec<Consumer>),
    TrustedHeader {
        header: String,
        list: Vec<Consumer>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub default_cooldown_ms: u64,
    pub auth_failure_cooldown_ms: u64,
    pub circuit_failures: u32,
    pub circuit_open_ms: u64,
    pub half_open_probes: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub consumers: Consumers,
    pub providers: Vec<Provider>,
    pub health: Health,
    pub default_limits: Vec<Limit>,
    pub prices: HashMap<String, Price>,
    pub default_max_tokens: u64,
    pub lower_max_tokens: bool,
    pub max_request_bytes: u64,
    pub max_sse_event_bytes: usize,
    pub failure_mode: FailureMode,
    pub sticky_header: Option<String>,
    pub status_path: Option<String>,
    /// Warnings for the log (inline secrets and the like): never containing a secret.
    pub warnings: Vec<String>,
}

pub const ANONYMOUS: &str = "anonymous";

impl Config {
    pub fn provider(&self, name: &str) -> Option<(usize, &Provider)> {
        self.providers
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name)
    }

    pub fn consumer(&self, name: &str) -> Option<&Consumer> {
        match &self.consumers {
            Consumers::Anonymous => None,
            Consumers::Keys(list) | Consumers::TrustedHeader { list, .. } => {
                list.iter().find(|c| c.name == name)
            }
        }
    }

    /// The limits that apply to `consumer` asking for `model`: (model scope, limit).
    pub fn limits_for<'a>(&'a self, consumer: &str, model: &str) -> Vec<(Option<&'a str>, Limit)> {
        let mut out = Vec::new();
        match self.consumer(consumer) {
            Some(c) => {
                let own = if c.limits.is_empty() {
                    &self.default_limits
                } else {
                    &c.limits
                };
                out.extend(own.iter().map(|l| (None, *l)));
                if let Some((m, ls)) = c.model_limits.get_key_value(model) {
                    out.extend(ls.iter().map(|l| (Some(m.as_str()), *l)));
                }
            }
            None => out.extend(self.default_limits.iter().map(|l| (None, *l))),
        }
        out
    }

    /// Models named anywhere in the config: the only model names used in shared-data keys and
    /// metric names, so that clients cannot grow either without bound.
    pub fn is_known_model(&self, model: &str) -> bool {
        self.prices.contains_key(model)
            || self.providers.iter().any(|p| p.models.contains_key(model))
            || match &self.consumers {
                Consumers::Anonymous => false,
                Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => {
                    l.iter().any(|c| c.model_limits.contains_key(model))
                }
            }
    }
}

/// Parses and validates. `env` resolves environment variables (std::env::var in the module).
pub fn parse(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    if json.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(err(
            "",
            "configuration is empty: tollgate needs at least `providers`",
        ));
    }
    let raw: RawConfig = crate::json::from_slice(json).map_err(|e| err("", serde_message(&e)))?;
    validate(raw, env)
}

fn serde_message(e: &crate::json::Error) -> String {
    // serde names the offending field for unknown/missing fields; keep its words, add the position.
    format!(
        "{} (line {}, column {})",
        strip_position(&e.to_string()),
        e.line(),
        e.column()
    )
}

fn strip_position(s: &str) -> &str {
    match s.find(" at line ") {
        Some(i) => &s[..i],
        None => s,
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const NAME_RULE: &str = "must be 1-64 characters of letters, digits, '-' or '_'";

fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();

    if raw.providers.is_empty() {
        return Err(err("providers", "at least one provider is required"));
    }
    let mut providers = Vec::with_capacity(raw.providers.len());
    for (pi, rp) in raw.providers.into_iter().enumerate() {
        let p = format!("providers[{pi}]");
        if !valid_name(&rp.name) {
            return Err(err(format!("{p}.name"), NAME_RULE));
        }
        if providers.iter().any(|q: &Provider| q.name == rp.name) {
            return Err(err(
                format!("{p}.name"),
                format!("duplicate provider name '{}'", rp.name),
            ));
        }
        if rp.keys.is_empty() {
            return Err(err(format!("{p}.keys"), "at least one key is required"));
        }
        if rp.kind == ProviderType::AzureOpenai && rp.api_version.is_none() {
            return Err(err(
                format!("{p}.api_version"),
                "required for azure_openai (e.g. \"2024-10-21\")",
            ));
        }
        if rp.kind != ProviderType::AzureOpenai && rp.api_version.is_some() {
            return Err(err(
                format!("{p}.api_version"),
                "only azure_openai providers take an api_version",
            ));
        }
        if rp.anthropic_version.is_some() && rp.kind != ProviderType::Anthropic {
            return Err(err(
                format!("{p}.anthropic_version"),
                "only anthropic providers take an anthropic_version",
            ));
        }
        let base_path = match rp.base_path {
            Some(b) if !b.starts_with('/') || b.contains('?') => {
                return Err(err(
                    format!("{p}.base_path"),
                    "must start with '/' and carry no query",
                ))
            }
            Some(b) => b.trim_end_matches('/').to_string(),
            None => String::new(),
        };
        if let Some(h) = &rp.host {
            if h.is_empty() || h.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
                return Err(err(
                    format!("{p}.host"),
                    "must be a host name (optionally :port), no scheme or path",
                ));
            }
        }
        let mut keys: Vec<Key> = Vec::with_capacity(rp.keys.len());
        for (ki, rk) in rp.keys.into_iter().enumerate() {
            let k = format!("{p}.keys[{ki}]");
            if !valid_name(&rk.id) {
                return Err(err(format!("{k}.id"), NAME_RULE));
            }
            if keys.iter().any(|q| q.id == rk.id) {
                return Err(err(
                    format!("{k}.id"),
                    format!("duplicate key id '{}'", rk.id),
                ));
            }
            let (secret, source) = match (rk.env, rk.value) {
                (Some(_), Some(_)) => return Err(err(k, "give either `env` or `value`, not both")),
                (None, None) => return Err(err(k, "`env` (the environment variable holding the key) is required")),
                (Some(var), None) => match env(&var) {
                    Some(v) if !v.trim().is_empty() => (v.trim().to_string(), KeySecret::Env(var)),
                    Some(_) => return Err(err(format!("{k}.env"), format!("{var} is empty"))),
                    None => {
                        return Err(err(
                            format!("{k}.env"),
                            format!("{var} is not set (list it in vm_config.environment_variables.host_env_keys)"),
                        ))
                    }
                },
                (None, Some(v)) => {
                    if !rk.inline {
                        return Err(err(
                            format!("{k}.value"),
                            "inline secrets must be marked `\"inline\": true`; prefer `env`",
                        ));
                    }
                    if v.trim().is_empty() {
                        return Err(err(format!("{k}.value"), "is empty"));
                    }
                    warnings.push(format!(
                        "{k}: key '{}' is inline in the configuration; it will show in /config_dump. Use `env` instead",
                        rk.id
                    ));
                    (v.trim().to_string(), KeySecret::Inline)
                }
            };
            if secret.bytes().any(|b| b < 0x21 || b == 0x7f) {
                return Err(err(k, "the key contains whitespace or control characters"));
            }
            let weight = rk.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                return Err(err(format!("{k}.weight"), "must be between 1 and 1000"));
            }
            keys.push(Key {
                id: rk.id,
                secret,
                source,
                weight,
            });
        }
        for (client, upstream) in &rp.models {
            if client.is_empty() || upstream.is_empty() {
                return Err(err(format!("{p}.models"), "model names must not be empty"));
            }
        }
        let schedule = smooth_weighted_schedule(&keys);
        providers.push(Provider {
            name: rp.name,
            kind: rp.kind,
            host: rp.host,
            base_path,
            api_version: rp.api_version,
            anthropic_version: rp
                .anthropic_version
                .unwrap_or_else(|| "2023-06-01".to_string()),
            rotation: rp.rotation,
            keys,
            models: rp.models.into_iter().collect(),
            schedule,
        });
    }

    let default_limits = limits("default_limits", &raw.default_limits)?;

    let consumers = match raw.consumers {
        None => Consumers::Anonymous,
        Some(rc) => {
            let mut list: Vec<Consumer> = Vec::with_capacity(rc.list.len());
            for (ci, c) in rc.list.into_iter().enumerate() {
                let p = format!("consumers.list[{ci}]");
                if !valid_name(&c.name) || c.name == ANONYMOUS {
                    return Err(err(
                        format!("{p}.name"),
                        format!("{NAME_RULE}, and not '{ANONYMOUS}'"),
                    ));
                }
                if list.iter().any(|q| q.name == c.name) {
                    return Err(err(
                        format!("{p}.name"),
                        format!("duplicate consumer '{}'", c.name),
                    ));
                }
                let key_digest = match (c.key_sha256, c.key_env, rc.trusted_header.is_some()) {
                    (Some(_), Some(_), _) => {
                        return Err(err(p, "give either `key_sha256` or `key_env`, not both"))
                    }
                    (Some(h), None, _) => Some(sha256::from_hex(&h).ok_or_else(|| {
                        err(
                            format!("{p}.key_sha256"),
                            "must be 64 hex characters (sha256 of the consumer's key)",
                        )
                    })?),
                    (None, Some(var), _) => match env(&var) {
                        Some(v) if !v.trim().is_empty() => {
                            Some(sha256::sha256(v.trim().as_bytes()))
                        }
                        _ => {
                            return Err(err(
                                format!("{p}.key_env"),
                                format!("{var} is not set or empty"),
                            ))
                        }
                    },
                    (None, None, true) => None,
                    (None, None, false) => return Err(err(
                        p,
                        "`key_sha256` or `key_env` is required (or set consumers.trusted_header)",
                    )),
                };
                let own = limits(&format!("{p}.limits"), &c.limits)?;
                let mut model_limits = HashMap::new();
                for (m, ls) in &c.model_limits {
                    model_limits.insert(m.clone(), limits(&format!("{p}.model_limits.{m}"), ls)?);
                }
                list.push(Consumer {
                    name: c.name,
                    key_digest,
                    limits: own,
                    model_limits,
                });
            }
            match rc.trusted_header {
                Some(h) => {
                    let h = h.to_ascii_lowercase();
                    if h.is_empty() || h.starts_with(':') {
                        return Err(err("consumers.trusted_header", "must be a header name"));
                    }
                    Consumers::TrustedHeader { header: h, list }
                }
                None if list.is_empty() => {
                    return Err(err(
                        "consumers.list",
                        "is empty: remove `consumers` to admit everyone anonymously",
                    ))
                }
                None => Consumers::Keys(list),
            }
        }
    };

    let mut prices = HashMap::new();
    for (m, rp) in raw.prices {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !ok(rp.input) || !ok(rp.output) || !rp.cached_input.map(ok).unwrap_or(true) {
            return Err(err(
                format!("prices.{m}"),
                "prices must be finite, non-negative USD per million tokens",
            ));
        }
        prices.insert(
            m,
            Price {
                input_per_mtok: rp.input,
                output_per_mtok: rp.output,
                cached_input_per_mtok: rp.cached_input.unwrap_or(rp.input),
            },
        );
    }

    let health = {
        let h = raw.health.unwrap_or(RawHealth {
            default_cooldown_s: None,
            auth_failure_cooldown_s: None,
            circuit_failures: None,
            circuit_open_s: None,
            half_open_probes: None,
        });
        let health = Health {
            default_cooldown_ms: h.default_cooldown_s.unwrap_or(30).saturating_mul(1000),
            auth_failure_cooldown_ms: h
                .auth_failure_cooldown_s
                .unwrap_or(3600)
                .saturating_mul(1000),
            circuit_failures: h.circuit_failures.unwrap_or(5),
            circuit_open_ms: h.circuit_open_s.unwrap_or(30).saturating_mul(1000),
            half_open_probes: h.half_open_probes.unwrap_or(1),
        };
        if health.circuit_failures == 0 {
            return Err(err("health.circuit_failures", "must be at least 1"));
        }
        if health.half_open_probes == 0 {
            return Err(err("health.half_open_probes", "must be at least 1"));
        }
        health
    };

    let max_request_bytes = raw.max_request_bytes.unwrap_or(4 << 20);
    if max_request_bytes == 0 {
        return Err(err("max_request_bytes", "must be positive"));
    }
    let max_sse_event_bytes = raw.max_sse_event_bytes.unwrap_or(1 << 20);
    if max_sse_event_bytes < 1024 {
        return Err(err("max_sse_event_bytes", "must be at least 1024"));
    }
    let default_max_tokens = raw.default_max_tokens.unwrap_or(4096);
    if default_max_tokens == 0 {
        return Err(err("default_max_tokens", "must be positive"));
    }
    if let Some(p) = &raw.status_path {
        if !p.starts_with('/') {
            return Err(err("status_path", "must start with '/'"));
        }
    }

    Ok(Config {
        consumers,
        providers,
        health,
        default_limits,
        prices,
        default_max_tokens,
        lower_max_tokens: raw.lower_max_tokens,
        max_request_bytes,
        max_sse_event_bytes: usize::try_from(max_sse_event_bytes).unwrap_or(usize::MAX),
        failure_mode: raw.failure_mode,
        sticky_header: raw.sticky_header.map(|h| h.to_ascii_lowercase()),
        status_path: raw.status_path,
        warnings,
    })
}

fn limits(path: &str, raw: &[RawLimit]) -> Result<Vec<Limit>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, l)| {
            let p = format!("{path}[{i}]");
            let metric = match l.metric.as_str() {
                "requests" => Metric::Requests,
                "input_tokens" => Metric::InputTokens,
                "output_tokens" => Metric::OutputTokens,
                "total_tokens" => Metric::TotalTokens,
                "cost_usd" => Metric::CostMicroUsd,
                other => {
                    return Err(err(
                        format!("{p}.metric"),
                        format!("unknown metric '{other}' (requests, input_tokens, output_tokens, total_tokens, cost_usd)"),
                    ))
                }
            };
            let amount = match metric {
                // Cost budgets are written in USD and kept in micro-USD.
                Metric::CostMicroUsd => match l.amount.as_f64() {
                    // Kept in micro-USD: a budget that rounds to 0 would refuse everything.
                    Some(x) if (0.000_001..1e12).contains(&x) => (x * 1e6).round() as u64,
                    _ => return Err(err(format!("{p}.amount"), "must be a number of USD from 0.000001")),
                },
                _ => match l.amount.as_u64() {
                    Some(n) if n > 0 => n,
                    _ => return Err(err(format!("{p}.amount"), "must be a positive whole number")),
                },
            };
            let window_ms = parse_window(&l.window)
                .ok_or_else(|| err(format!("{p}.window"), "must be a number and a unit: \"30s\", \"1m\", \"1h\", \"1d\""))?;
            Ok(Limit { metric, amount, window_ms })
        })
        .collect()
}

/// "30s", "1m", "12h", "1d" (also "second", "minute", "hour", "day" alone meaning 1 of them).
pub fn parse_window(s: &str) -> Option<u64> {
    let s = s.trim();
    let named = match s {
        "second" => Some(1_000),
        "minute" => Some(60_000),
        "hour" => Some(3_600_000),
        "day" => Some(86_400_000),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    let ms = n.checked_mul(unit_ms)?;
    // A window over a year is almost certainly a mistake, and keeps the arithmetic far from overflow.
    (ms > 0 && ms <= 366 * 86_400_000).then_some(ms)
}

#[cfg(test)]
impl Provider {
    /// A provider named "p" with keys `k0..`, weighted as given, as the config would build it.
    pub fn for_test(weights: &[u32], rotation: Rotation) -> Provider {
        let keys: Vec<Key> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Key {
                id: format!("k{i}"),
                secret: "s".into(),
                source: KeySecret::Inline,
                weight: *w,
            })
            .collect();
        Provider {
            name: "p".into(),
            kind: ProviderType::Openai,
            host: None,
            base_path: String::new(),
            api_version: None,
            anthropic_version: String::new(),
            rotation,
            schedule: smooth_weighted_schedule(&keys),
            keys,
            models: HashMap::new(),
        }
    }
}

/// Smooth weighted round robin (as nginx does): weights 5,1,1 give a,a,b,a,c,a,a rather than
/// a,a,a,a,a,b,c, so a heavy key's traffic is spread out over the cycle.
fn smooth_weighted_schedule(keys: &[Key]) -> Vec<usize> {
    let total: i64 = keys.iter().map(|k| i64::from(k.weight)).sum();
    let mut current = vec![0i64; keys.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, k) in keys.iter().enumerate() {
            current[i] += i64::from(k.weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "K1" => Some("sk-one".into()),
            "K2" => Some("sk-two".into()),
            "TEAM_A" => Some("team-a-secret".into()),
            "EMPTY" => Some("  ".into()),
            _ => None,
        }
    }

    fn parse_str(s: &str) -> Result<Config, String> {
        parse(s.as_bytes(), &env).map_err(|e| e.to_string())
    }

    const MIN: &str =
        r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#;

    #[test]
    fn minimal_config_admits_everyone_anonymously() {
        let c = parse_str(MIN).unwrap();
        assert!(matches!(c.consumers, Consumers::Anonymous));
        assert_eq!(c.providers[0].keys[0].secret, "sk-one");
        assert_eq!(c.providers[0].keys[0].source, KeySecret::Env("K1".into()));
        assert_eq!(c.failure_mode, FailureMode::Open);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("", "configuration is empty: tollgate needs at least `providers`"),
            (r#"{"providers":[]}"#, "providers: at least one provider is required"),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"},{"id":"k2","env":"K3"}]}]}"#,
                "providers[0].keys[1].env: K3 is not set (list it in vm_config.environment_variables.host_env_keys)",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"EMPTY"}]}]}"#,
                "providers[0].keys[0].env: EMPTY is empty",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","value":"sk-x"}]}]}"#,
                "providers[0].keys[0].value: inline secrets must be marked `\"inline\": true`; prefer `env`",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"azure_openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
                "providers[0].api_version: required for azure_openai (e.g. \"2024-10-21\")",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"},{"id":"k1","env":"K2"}]}]}"#,
                "providers[0].keys[1].id: duplicate key id 'k1'",
            ),
            (
                r#"{"providers":[{"name":"o a","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
                "providers[0].name: must be 1-64 characters of letters, digits, '-' or '_'",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1","weight":0}]}]}"#,
                "providers[0].keys[0].weight: must be between 1 and 1000",
            ),
            (
                r#"{"consumers":{"list":[{"name":"a","key_sha256":"zz"}]},"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
                "consumers.list[0].key_sha256: must be 64 hex characters (sha256 of the consumer's key)",
            ),
            (
                r#"{"default_limits":[{"metric":"tokens","amount":5,"window":"1m"}],"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
                "default_limits[0].metric: unknown metric 'tokens' (requests, input_tokens, output_tokens, total_tokens, cost_usd)",
            ),
            (
                r#"{"default_limits":[{"metric":"requests","amount":5,"window":"1w"}],"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
                "default_limits[0].window: must be a number and a unit: \"30s\", \"1m\", \"1h\", \"1d\"",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_str(input).err().as_deref(),
                Some(*want),
                "for {input}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e =
            parse_str(r#"{"providers":[{"name":"oa","type":"openai","kyes":[]}]}"#).unwrap_err();
        assert!(e.starts_with("unknown field `kyes`"), "{e}");
        let e =
            parse_str(r#"{"providers":[{"name":"oa","type":"gemini","keys":[]}]}"#).unwrap_err();
        assert!(e.contains("unknown variant `gemini`"), "{e}");
    }

    #[test]
    fn inline_keys_are_allowed_when_marked_and_warned_about() {
        let c = parse_str(r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","value":"sk-inline","inline":true}]}]}"#)
            .unwrap();
        assert_eq!(c.providers[0].keys[0].source, KeySecret::Inline);
        assert_eq!(c.warnings.len(), 1);
        assert!(!c.warnings[0].contains("sk-inline"));
    }

    #[test]
    fn consumer_keys_are_digested() {
        let c = parse_str(
            r#"{"consumers":{"list":[{"name":"team-a","key_env":"TEAM_A","limits":[{"metric":"cost_usd","amount":1.5,"window":"1d"}]}]},
                "providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
        )
        .unwrap();
        let Consumers::Keys(list) = &c.consumers else {
            unreachable!()
        };
        assert_eq!(list[0].key_digest, Some(sha256::sha256(b"team-a-secret")));
        assert_eq!(
            list[0].limits[0],
            Limit {
                metric: Metric::CostMicroUsd,
                amount: 1_500_000,
                window_ms: 86_400_000
            }
        );
    }

    #[test]
    fn weighted_schedule_is_interleaved_and_proportional() {
        let keys: Vec<Key> = [5, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, w)| Key {
                id: format!("k{i}"),
                secret: String::new(),
                source: KeySecret::Inline,
                weight: *w,
            })
            .collect();
        let s = smooth_weighted_schedule(&keys);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn model_mapping() {
        let c = parse_str(r#"{"providers":[{"name":"an","type":"anthropic","keys":[{"id":"k1","env":"K1"}],"models":{"gpt-4o-mini":"claude-haiku-4-5"}}]}"#).unwrap();
        assert_eq!(
            c.providers[0].map_model("gpt-4o-mini"),
            Some("claude-haiku-4-5")
        );
        assert_eq!(c.providers[0].map_model("gpt-4o"), None);
        assert!(c.is_known_model("gpt-4o-mini"));
        assert!(!c.is_known_model("whatever"));
    }

    #[test]
    fn a_cost_budget_that_rounds_to_zero_is_refused() {
        let e = parse_str(
            r#"{"default_limits":[{"metric":"cost_usd","amount":1e-7,"window":"1d"}],"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1"}]}]}"#,
        );
        assert_eq!(
            e.err().as_deref(),
            Some("default_limits[0].amount: must be a number of USD from 0.000001")
        );
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window("30s"), Some(30_000));
        assert_eq!(parse_window("1m"), Some(60_000));
        assert_eq!(parse_window("day"), Some(86_400_000));
        assert_eq!(parse_window("0s"), None);
        assert_eq!(parse_window("99999999999999999d"), None);
        assert_eq!(parse_window("m"), None);
    }
}
