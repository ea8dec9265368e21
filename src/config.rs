//! Plugin configuration: one walk over the parsed JSON that reads typed fields (unknown ones
//! refused) and validates them into `Config`; every error names the field path and the reason.
//! No serde derive: each derived deserializer costs tens of KB of the Wasm module.
//!
//! Secrets are resolved here, once, at configure time: key values from environment variables that
//! Envoy passes in `vm_config.environment_variables.host_env_keys`, consumer keys as SHA-256 digests.

use crate::json::{Map, Value};
use crate::limit::consumer_key;
use crate::limit::quota::{Limit, Metric, Price};
use core::fmt;
use hashbrown::HashMap;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rotation {
    #[default]
    RoundRobin,
    Weighted,
    Sticky,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// When tollgate cannot do its job (shared data failing), let the request through unmetered.
    #[default]
    Open,
    /// ... or refuse it with 503.
    Closed,
}

// ---------------------------------------------------------------- JSON walker

const PROVIDER_TYPES: &[(&str, ProviderType)] = &[
    ("openai", ProviderType::Openai),
    ("azure_openai", ProviderType::AzureOpenai),
    ("anthropic", ProviderType::Anthropic),
    ("openai_compatible", ProviderType::OpenaiCompatible),
];
const ROTATIONS: &[(&str, Rotation)] = &[
    ("round_robin", Rotation::RoundRobin),
    ("weighted", Rotation::Weighted),
    ("sticky", Rotation::Sticky),
];
const FAILURE_MODES: &[(&str, FailureMode)] =
    &[("open", FailureMode::Open), ("closed", FailureMode::Closed)];

type Res<T> = Result<T, ConfigError>;

/// `value` converted by `f`: None when absent or null (null is absent, as serde's `Option` had
/// it), else an error naming `path` and `what` was expected.
fn typed<'a, T>(
    path: &str,
    value: Option<&'a Value>,
    what: &str,
    f: impl FnOnce(&'a Value) -> Option<T>,
) -> Res<Option<T>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => f(v)
            .map(Some)
            .ok_or_else(|| err(path, format!("expected {what}"))),
    }
}

/// The elements of the array at `path` (none when absent), each with its own path.
fn items<'a>(path: &str, value: Option<&'a Value>) -> Res<Vec<(String, &'a Value)>> {
    let list = typed(path, value, "an array", Value::as_array)?;
    Ok(list
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, v)| (format!("{path}[{i}]"), v))
        .collect())
}

/// An object of the configuration at `path` (`map` None: absent, every field absent). Its keys
/// are checked against the declared fields up front, so a misspelt optional field is an error
/// rather than a silent default.
struct Obj<'a> {
    map: Option<&'a Map<String, Value>>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, path: String, fields: &[&str]) -> Res<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| err(&path, "expected an object"))?;
        let o = Obj {
            map: Some(map),
            path,
        };
        match map.keys().find(|k| !fields.contains(&k.as_str())) {
            Some(k) => Err(o.err(
                k,
                format!("unknown field, expected one of: {}", fields.join(", ")),
            )),
            None => Ok(o),
        }
    }
    fn at(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }
    fn err(&self, name: &str, reason: impl Into<String>) -> ConfigError {
        err(self.at(name), reason)
    }
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(name))
    }
    fn opt<T>(
        &self,
        name: &str,
        what: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Res<Option<T>> {
        typed(&self.at(name), self.get(name), what, f)
    }
    /// A required field's value, read by one of the accessors below.
    fn need<T>(&self, name: &str, value: Option<T>) -> Res<T> {
        value.ok_or_else(|| self.err(name, "missing"))
    }
    fn str(&self, name: &str) -> Res<Option<&'a str>> {
        self.opt(name, "a string", Value::as_str)
    }
    fn flag(&self, name: &str) -> Res<bool> {
        Ok(self
            .opt(name, "a boolean", Value::as_bool)?
            .unwrap_or(false))
    }
    fn uint<T: TryFrom<u64>>(&self, name: &str) -> Res<Option<T>> {
        self.opt(name, "a non-negative integer", Value::as_u64)?
            .map(|n| T::try_from(n).map_err(|_| self.err(name, "is too large")))
            .transpose()
    }
    fn choice<T: Copy>(&self, name: &str, table: &[(&str, T)]) -> Res<Option<T>> {
        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        let what = format!("one of: {}", names.join(", "));
        self.opt(name, &what, |v| {
            let s = v.as_str()?;
            table.iter().find(|(n, _)| *n == s).map(|(_, t)| *t)
        })
    }
    fn obj(&self, name: &str, fields: &[&str]) -> Res<Obj<'a>> {
        match self.opt(name, "", Some)? {
            Some(v) => Obj::new(v, self.at(name), fields),
            None => Ok(Obj {
                map: None,
                path: self.at(name),
            }),
        }
    }
    fn list(&self, name: &str, required: bool) -> Res<Vec<(String, &'a Value)>> {
        if required {
            self.need(name, self.opt(name, "", Some)?)?;
        }
        items(&self.at(name), self.get(name))
    }
    /// An object with free keys (model names): (path, key, value) for each entry.
    fn entries(&self, name: &str) -> Res<Vec<(String, &'a str, &'a Value)>> {
        let map = self.opt(name, "an object", Value::as_object)?;
        Ok(map
            .into_iter()
            .flat_map(|m| m.iter())
            .map(|(k, v)| (format!("{}.{k}", self.at(name)), k.as_str(), v))
            .collect())
    }
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
    pub status: Option<StatusConfig>,
    pub default_price: Option<Price>,
    /// Warnings for the log (inline secrets and the like): never containing a secret.
    pub warnings: Vec<String>,
}

pub const ANONYMOUS: &str = "anonymous";

/// The status endpoint: its path, and the digest of the key that sees everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusConfig {
    pub path: String,
    pub admin_key_digest: Option<[u8; 32]>,
}

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

    /// The model's price, else the configured default price.
    pub fn price_for(&self, model: &str) -> Option<&Price> {
        self.prices.get(model).or(self.default_price.as_ref())
    }

    /// Whether a cost limit applies to `consumer` asking for `model`.
    pub fn has_cost_limit(&self, consumer: &str, model: &str) -> bool {
        self.limits_for(consumer, model)
            .iter()
            .any(|(_, l)| l.metric == Metric::CostMicroUsd)
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
    let value = crate::json::from_slice(json).map_err(|e| err("", format!("invalid JSON: {e}")))?;
    validate(&value, env)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const NAME_RULE: &str = "must be 1-64 characters of letters, digits, '-' or '_'";

fn validate(value: &Value, env: &dyn Fn(&str) -> Option<String>) -> Res<Config> {
    let root = Obj::new(
        value,
        String::new(),
        &[
            "consumers",
            "providers",
            "health",
            "default_limits",
            "prices",
            "default_max_tokens",
            "lower_max_tokens",
            "max_request_bytes",
            "max_sse_event_bytes",
            "failure_mode",
            "sticky_header",
            "status_path",
        ],
    )?;
    let mut warnings = Vec::new();

    let raw_providers = root.list("providers", true)?;
    if raw_providers.is_empty() {
        return Err(err("providers", "at least one provider is required"));
    }
    let mut providers = Vec::with_capacity(raw_providers.len());
    for (path, v) in raw_providers {
        let rp = Obj::new(
            v,
            path,
            &[
                "name",
                "type",
                "host",
                "base_path",
                "api_version",
                "anthropic_version",
                "rotation",
                "keys",
                "models",
            ],
        )?;
        let name = rp.need("name", rp.str("name")?)?;
        let kind = rp.need("type", rp.choice("type", PROVIDER_TYPES)?)?;
        let host = rp.str("host")?;
        let base_path = rp.str("base_path")?;
        let api_version = rp.str("api_version")?;
        let anthropic_version = rp.str("anthropic_version")?;
        let rotation = rp.choice("rotation", ROTATIONS)?.unwrap_or_default();
        let raw_keys = rp.list("keys", true)?;
        let raw_models = rp.entries("models")?;

        if !valid_name(name) {
            return Err(rp.err("name", NAME_RULE));
        }
        if providers.iter().any(|q: &Provider| q.name == name) {
            return Err(rp.err("name", format!("duplicate provider name '{name}'")));
        }
        if raw_keys.is_empty() {
            return Err(rp.err("keys", "at least one key is required"));
        }
        if kind == ProviderType::AzureOpenai && api_version.is_none() {
            return Err(rp.err(
                "api_version",
                "required for azure_openai (e.g. \"2024-10-21\")",
            ));
        }
        if kind != ProviderType::AzureOpenai && api_version.is_some() {
            return Err(rp.err(
                "api_version",
                "only azure_openai providers take an api_version",
            ));
        }
        if anthropic_version.is_some() && kind != ProviderType::Anthropic {
            return Err(rp.err(
                "anthropic_version",
                "only anthropic providers take an anthropic_version",
            ));
        }
        let base_path = match base_path {
            Some(b) if !b.starts_with('/') || b.contains('?') => {
                return Err(rp.err("base_path", "must start with '/' and carry no query"))
            }
            Some(b) => b.trim_end_matches('/').to_string(),
            None => String::new(),
        };
        if let Some(h) = host {
            if h.is_empty() || h.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
                return Err(rp.err(
                    "host",
                    "must be a host name (optionally :port), no scheme or path",
                ));
            }
        }
        let mut keys: Vec<Key> = Vec::with_capacity(raw_keys.len());
        for (path, v) in raw_keys {
            let rk = Obj::new(v, path, &["id", "env", "value", "inline", "weight"])?;
            let id = rk.need("id", rk.str("id")?)?;
            let (var, value, inline) = (rk.str("env")?, rk.str("value")?, rk.flag("inline")?);
            let weight = rk.uint("weight")?.unwrap_or(1u32);
            let k = &rk.path;
            if !valid_name(id) {
                return Err(rk.err("id", NAME_RULE));
            }
            if keys.iter().any(|q| q.id == id) {
                return Err(rk.err("id", format!("duplicate key id '{id}'")));
            }
            let (secret, source) = match (var, value) {
                (Some(_), Some(_)) => return Err(err(k, "give either `env` or `value`, not both")),
                (None, None) => return Err(err(k, "`env` (the environment variable holding the key) is required")),
                (Some(var), None) => match env(var) {
                    Some(v) if !v.trim().is_empty() => (v.trim().to_string(), KeySecret::Env(var.to_string())),
                    Some(_) => return Err(rk.err("env", format!("{var} is empty"))),
                    None => {
                        return Err(rk.err(
                            "env",
                            format!("{var} is not set (list it in vm_config.environment_variables.host_env_keys)"),
                        ))
                    }
                },
                (None, Some(v)) => {
                    if !inline {
                        return Err(rk.err(
                            "value",
                            "inline secrets must be marked `\"inline\": true`; prefer `env`",
                        ));
                    }
                    if v.trim().is_empty() {
                        return Err(rk.err("value", "is empty"));
                    }
                    warnings.push(format!(
                        "{k}: key '{id}' is inline in the configuration; it will show in /config_dump. Use `env` instead",
                    ));
                    (v.trim().to_string(), KeySecret::Inline)
                }
            };
            if secret.bytes().any(|b| b < 0x21 || b == 0x7f) {
                return Err(err(k, "the key contains whitespace or control characters"));
            }
            if weight == 0 || weight > 1000 {
                return Err(rk.err("weight", "must be between 1 and 1000"));
            }
            keys.push(Key {
                id: id.to_string(),
                secret,
                source,
                weight,
            });
        }
        let mut models = HashMap::with_capacity(raw_models.len());
        for (path, client, v) in raw_models {
            let upstream = v.as_str().ok_or_else(|| err(path, "expected a string"))?;
            if client.is_empty() || upstream.is_empty() {
                return Err(rp.err("models", "model names must not be empty"));
            }
            models.insert(client.to_string(), upstream.to_string());
        }
        let schedule = smooth_weighted_schedule(&keys);
        providers.push(Provider {
            name: name.to_string(),
            kind,
            host: host.map(str::to_string),
            base_path,
            api_version: api_version.map(str::to_string),
            anthropic_version: anthropic_version.unwrap_or("2023-06-01").to_string(),
            rotation,
            keys,
            models,
            schedule,
        });
    }

    let default_limits = limits(root.list("default_limits", false)?)?;

    let rc = root.obj("consumers", &["trusted_header", "list"])?;
    let consumers = if rc.map.is_none() {
        Consumers::Anonymous
    } else {
        let trusted_header = rc.str("trusted_header")?;
        let raw_list = rc.list("list", false)?;
        let mut list: Vec<Consumer> = Vec::with_capacity(raw_list.len());
        for (path, v) in raw_list {
            let c = Obj::new(
                v,
                path,
                &["name", "key_sha256", "key_env", "limits", "model_limits"],
            )?;
            let name = c.need("name", c.str("name")?)?;
            let (key_sha256, key_env) = (c.str("key_sha256")?, c.str("key_env")?);
            let raw_limits = c.list("limits", false)?;
            let raw_model_limits = c.entries("model_limits")?;
            if !valid_name(name) || name == ANONYMOUS {
                return Err(c.err("name", format!("{NAME_RULE}, and not '{ANONYMOUS}'")));
            }
            if list.iter().any(|q| q.name == name) {
                return Err(c.err("name", format!("duplicate consumer '{name}'")));
            }
            let key_digest =
                match (key_sha256, key_env, trusted_header.is_some()) {
                    (Some(_), Some(_), _) => {
                        return Err(err(
                            &c.path,
                            "give either `key_sha256` or `key_env`, not both",
                        ))
                    }
                    (Some(h), None, _) => Some(consumer_key::from_hex(h).ok_or_else(|| {
                        c.err(
                            "key_sha256",
                            "must be 64 hex characters (sha256 of the consumer's key)",
                        )
                    })?),
                    (None, Some(var), _) => match env(var) {
                        Some(v) if !v.trim().is_empty() => {
                            Some(consumer_key::digest(v.trim().as_bytes()))
                        }
                        _ => return Err(c.err("key_env", format!("{var} is not set or empty"))),
                    },
                    (None, None, true) => None,
                    (None, None, false) => return Err(err(
                        &c.path,
                        "`key_sha256` or `key_env` is required (or set consumers.trusted_header)",
                    )),
                };
            let own = limits(raw_limits)?;
            let mut model_limits = HashMap::with_capacity(raw_model_limits.len());
            for (path, m, v) in raw_model_limits {
                model_limits.insert(m.to_string(), limits(items(&path, Some(v))?)?);
            }
            list.push(Consumer {
                name: name.to_string(),
                key_digest,
                limits: own,
                model_limits,
            });
        }
        match trusted_header {
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if h.is_empty() || h.starts_with(':') {
                    return Err(rc.err("trusted_header", "must be a header name"));
                }
                Consumers::TrustedHeader { header: h, list }
            }
            None if list.is_empty() => {
                return Err(rc.err(
                    "list",
                    "is empty: remove `consumers` to admit everyone anonymously",
                ))
            }
            None => Consumers::Keys(list),
        }
    };

    let mut prices = HashMap::new();
    for (path, m, v) in root.entries("prices")? {
        let rp = Obj::new(v, path, &["input", "output", "cached_input"])?;
        let usd = |name| rp.opt(name, "a number", Value::as_f64);
        let input = rp.need("input", usd("input")?)?;
        let output = rp.need("output", usd("output")?)?;
        let cached_input = usd("cached_input")?;
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !ok(input) || !ok(output) || !cached_input.map(ok).unwrap_or(true) {
            return Err(err(
                rp.path,
                "prices must be finite, non-negative USD per million tokens",
            ));
        }
        prices.insert(
            m.to_string(),
            Price {
                input_per_mtok: input,
                output_per_mtok: output,
                cached_input_per_mtok: cached_input.unwrap_or(input),
            },
        );
    }

    let h = root.obj(
        "health",
        &[
            "default_cooldown_s",
            "auth_failure_cooldown_s",
            "circuit_failures",
            "circuit_open_s",
            "half_open_probes",
        ],
    )?;
    let ms = |name: &str, default_s: u64| -> Res<u64> {
        Ok(h.uint(name)?.unwrap_or(default_s).saturating_mul(1000))
    };
    let health = Health {
        default_cooldown_ms: ms("default_cooldown_s", 30)?,
        auth_failure_cooldown_ms: ms("auth_failure_cooldown_s", 3600)?,
        circuit_failures: h.uint("circuit_failures")?.unwrap_or(5),
        circuit_open_ms: ms("circuit_open_s", 30)?,
        half_open_probes: h.uint("half_open_probes")?.unwrap_or(1),
    };
    if health.circuit_failures == 0 {
        return Err(h.err("circuit_failures", "must be at least 1"));
    }
    if health.half_open_probes == 0 {
        return Err(h.err("half_open_probes", "must be at least 1"));
    }

    let max_request_bytes: u64 = root.uint("max_request_bytes")?.unwrap_or(4 << 20);
    if max_request_bytes == 0 {
        return Err(err("max_request_bytes", "must be positive"));
    }
    let max_sse_event_bytes: u64 = root.uint("max_sse_event_bytes")?.unwrap_or(1 << 20);
    if max_sse_event_bytes < 1024 {
        return Err(err("max_sse_event_bytes", "must be at least 1024"));
    }
    let default_max_tokens: u64 = root.uint("default_max_tokens")?.unwrap_or(4096);
    if default_max_tokens == 0 {
        return Err(err("default_max_tokens", "must be positive"));
    }
    let status_path = root.str("status_path")?;
    if status_path.is_some_and(|p| !p.starts_with('/')) {
        return Err(err("status_path", "must start with '/'"));
    }

    Ok(Config {
        consumers,
        providers,
        health,
        default_limits,
        prices,
        default_max_tokens,
        lower_max_tokens: root.flag("lower_max_tokens")?,
        max_request_bytes,
        max_sse_event_bytes: usize::try_from(max_sse_event_bytes).unwrap_or(usize::MAX),
        failure_mode: root
            .choice("failure_mode", FAILURE_MODES)?
            .unwrap_or_default(),
        sticky_header: root.str("sticky_header")?.map(str::to_ascii_lowercase),
        status: status_path.map(|p| StatusConfig {
            path: p.to_string(),
            admin_key_digest: None,
        }),
        default_price: None,
        warnings,
    })
}

fn limits(raw: Vec<(String, &Value)>) -> Res<Vec<Limit>> {
    raw.into_iter()
        .map(|(path, v)| {
            let l = Obj::new(v, path, &["metric", "amount", "window"])?;
            let metric = l.need("metric", l.str("metric")?)?;
            let amount = l.opt("amount", "a number", |v| match v {
                Value::Number(n) => Some(n),
                _ => None,
            })?;
            let amount = l.need("amount", amount)?;
            let window = l.need("window", l.str("window")?)?;
            let metric = match metric {
                "requests" => Metric::Requests,
                "input_tokens" => Metric::InputTokens,
                "output_tokens" => Metric::OutputTokens,
                "total_tokens" => Metric::TotalTokens,
                "cost_usd" => Metric::CostMicroUsd,
                other => {
                    return Err(l.err(
                        "metric",
                        format!("unknown metric '{other}' (requests, input_tokens, output_tokens, total_tokens, cost_usd)"),
                    ))
                }
            };
            let amount = match metric {
                // Cost budgets are written in USD and kept in micro-USD.
                Metric::CostMicroUsd => micro_usd(&amount.to_string())
                    .ok_or_else(|| l.err("amount", "must be a number of USD from 0.000001"))?,
                _ => amount
                    .as_u64()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| l.err("amount", "must be a positive whole number"))?,
            };
            let window_ms = parse_window(window)
                .ok_or_else(|| l.err("window", "must be a number and a unit: \"30s\", \"1m\", \"1h\", \"1d\""))?;
            Ok(Limit { metric, amount, window_ms })
        })
        .collect()
}

/// A USD amount written as a JSON number (`1.5`, `0.10`, `15e-7`, `2E+3`) in micro-USD, rounded
/// half up from the exact decimal (f64 would make 0.0000015 USD 1.4999999999999998 micro-USD).
/// None unless the amount is from 0.000001 (a budget that rounds to 0 would refuse everything)
/// to below 10^12 USD, or when the text is not a JSON number.
fn micro_usd(text: &str) -> Option<u64> {
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (text, 0),
    };
    // No fraction reads as ".0", which changes nothing.
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, "0"));
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !all_digits(frac) || (int.len() > 1 && int.starts_with('0')) {
        return None;
    }
    // The amount in micro-USD is digits × 10^shift, digits without leading zeros.
    let digits: Vec<u8> = int
        .bytes()
        .chain(frac.bytes())
        .skip_while(|&b| b == b'0')
        .map(|b| b - b'0')
        .collect();
    let shift = exp
        .checked_add(6)?
        .checked_sub(i64::try_from(frac.len()).ok()?)?;
    // How many digits the whole micro-USD part has: at most 18 keeps it below 10^12 USD.
    let whole = i64::try_from(digits.len()).ok()?.checked_add(shift)?;
    if digits.is_empty() || !(1..=18).contains(&whole) {
        return None;
    }
    let whole = usize::try_from(whole).ok()?;
    let n = digits
        .iter()
        .chain(std::iter::repeat(&0))
        .take(whole)
        .fold(0u64, |n, &d| n * 10 + u64::from(d));
    Some(n + u64::from(digits.get(whole).is_some_and(|&d| d >= 5)))
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

    /// `{"providers":[P]}` with P the minimal provider merged with `extra` (a JSON fragment that
    /// may override its fields), and `top` more top-level fields.
    fn cfg(top: &str, extra: &str) -> String {
        format!(
            r#"{{{top}"providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k1","env":"K1"}}]{extra}}}]}}"#
        )
    }

    fn refused(top: &str, extra: &str) -> String {
        parse_str(&cfg(top, extra)).unwrap_err()
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path_and_the_accepted_names() {
        const LIMIT: &str = "expected one of: metric, amount, window";
        let cases: &[(&str, &str, String)] = &[
            (r#""rotaton":"x","#, "", "rotaton: unknown field, expected one of: consumers, providers, health, default_limits, prices, default_max_tokens, lower_max_tokens, max_request_bytes, max_sse_event_bytes, failure_mode, sticky_header, status_path".into()),
            ("", r#","kyes":[]"#, "providers[0].kyes: unknown field, expected one of: name, type, host, base_path, api_version, anthropic_version, rotation, keys, models".into()),
            ("", r#","keys":[{"id":"k1","env":"K1"},{"id":"k2","tokn":"K2"}]"#, "providers[0].keys[1].tokn: unknown field, expected one of: id, env, value, inline, weight".into()),
            (r#""health":{"cooldown_s":5},"#, "", "health.cooldown_s: unknown field, expected one of: default_cooldown_s, auth_failure_cooldown_s, circuit_failures, circuit_open_s, half_open_probes".into()),
            (r#""prices":{"gpt-4o":{"input":1,"output":2,"cache":1}},"#, "", "prices.gpt-4o.cache: unknown field, expected one of: input, output, cached_input".into()),
            (r#""default_limits":[{"metric":"requests","amount":1,"window":"1m","burst":2}],"#, "", format!("default_limits[0].burst: unknown field, {LIMIT}")),
            (r#""consumers":{"header":"x"},"#, "", "consumers.header: unknown field, expected one of: trusted_header, list".into()),
            (r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A","key":"x"}]},"#, "", "consumers.list[0].key: unknown field, expected one of: name, key_sha256, key_env, limits, model_limits".into()),
            (r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A","limits":[{"metrc":"requests"}]}]},"#, "", format!("consumers.list[0].limits[0].metrc: unknown field, {LIMIT}")),
            (r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A","model_limits":{"gpt-4o":[{"metric":"requests","amount":1,"window":"1m"},{"windw":"1m"}]}}]},"#, "", format!("consumers.list[0].model_limits.gpt-4o[1].windw: unknown field, {LIMIT}")),
        ];
        for (top, extra, want) in cases {
            assert_eq!(refused(top, extra), *want, "for {top} {extra}");
        }
    }

    #[test]
    fn wrong_types_name_the_path_and_what_was_expected() {
        let cases: &[(&str, &str, &str)] = &[
            ("", r#","keys":[{"id":"k1","env":"K1","weight":"3"}]"#, "providers[0].keys[0].weight: expected a non-negative integer"),
            ("", r#","keys":[{"id":"k1","env":"K1","weight":-1}]"#, "providers[0].keys[0].weight: expected a non-negative integer"),
            ("", r#","keys":[{"id":"k1","env":"K1","weight":2.5}]"#, "providers[0].keys[0].weight: expected a non-negative integer"),
            ("", r#","keys":[{"id":"k1","env":"K1","weight":4294967296}]"#, "providers[0].keys[0].weight: is too large"),
            ("", r#","keys":[{"id":"k1","env":"K1","inline":"yes"}]"#, "providers[0].keys[0].inline: expected a boolean"),
            ("", r#","keys":{"id":"k1"}"#, "providers[0].keys: expected an array"),
            ("", r#","keys":["k1"]"#, "providers[0].keys[0]: expected an object"),
            ("", r#","name":5"#, "providers[0].name: expected a string"),
            ("", r#","type":"gemini""#, "providers[0].type: expected one of: openai, azure_openai, anthropic, openai_compatible"),
            ("", r#","rotation":"random""#, "providers[0].rotation: expected one of: round_robin, weighted, sticky"),
            ("", r#","models":{"a":1}"#, "providers[0].models.a: expected a string"),
            ("", r#","models":["a"]"#, "providers[0].models: expected an object"),
            (r#""failure_mode":true,"#, "", "failure_mode: expected one of: open, closed"),
            (r#""health":[],"#, "", "health: expected an object"),
            (r#""health":{"circuit_failures":4294967296},"#, "", "health.circuit_failures: is too large"),
            (r#""max_request_bytes":1e6,"#, "", "max_request_bytes: expected a non-negative integer"),
            (r#""prices":{"m":{"input":"1","output":2}},"#, "", "prices.m.input: expected a number"),
            (r#""default_limits":[{"metric":"requests","amount":"5","window":"1m"}],"#, "", "default_limits[0].amount: expected a number"),
            (r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A","model_limits":{"m":{}}}]},"#, "", "consumers.list[0].model_limits.m: expected an array"),
        ];
        for (top, extra, want) in cases {
            assert_eq!(refused(top, extra), *want, "for {top} {extra}");
        }
        assert_eq!(
            parse_str(r#"{"providers":{}}"#).unwrap_err(),
            "providers: expected an array"
        );
        assert_eq!(parse_str("[1]").unwrap_err(), "expected an object");
    }

    #[test]
    fn missing_required_fields_are_named() {
        let cases: &[(&str, &str)] = &[
            (r#"{"health":{}}"#, "providers: missing"),
            (r#"{"providers":null}"#, "providers: missing"),
            (
                r#"{"providers":[{"type":"openai","keys":[]}]}"#,
                "providers[0].name: missing",
            ),
            (
                r#"{"providers":[{"name":"oa","keys":[]}]}"#,
                "providers[0].type: missing",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai"}]}"#,
                "providers[0].keys: missing",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"env":"K1"}]}]}"#,
                "providers[0].keys[0].id: missing",
            ),
            (
                &cfg(
                    r#""default_limits":[{"metric":"requests","window":"1m"}],"#,
                    "",
                ),
                "default_limits[0].amount: missing",
            ),
            (
                &cfg(r#""prices":{"m":{"input":1}},"#, ""),
                "prices.m.output: missing",
            ),
            (
                &cfg(r#""consumers":{"list":[{"key_env":"TEAM_A"}]},"#, ""),
                "consumers.list[0].name: missing",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_str(input).unwrap_err(), *want, "for {input}");
        }
    }

    #[test]
    fn null_is_absent() {
        let c = parse_str(&cfg(
            r#""consumers":null,"health":null,"default_limits":null,"prices":null,"max_request_bytes":null,"lower_max_tokens":null,"failure_mode":null,"sticky_header":null,"status_path":null,"#,
            r#","host":null,"base_path":null,"rotation":null,"models":null,"keys":[{"id":"k1","env":"K1","value":null,"inline":null,"weight":null}]"#,
        ))
        .unwrap();
        assert!(matches!(c.consumers, Consumers::Anonymous));
        assert_eq!(
            (c.health.circuit_failures, c.health.default_cooldown_ms),
            (5, 30_000)
        );
        assert_eq!(
            (c.max_request_bytes, c.lower_max_tokens, c.failure_mode),
            (4 << 20, false, FailureMode::Open)
        );
        assert_eq!((c.sticky_header, c.status), (None, None));
        let p = &c.providers[0];
        assert_eq!(
            (p.host.as_deref(), p.base_path.as_str(), p.rotation),
            (None, "", Rotation::RoundRobin)
        );
        assert_eq!(
            (p.keys[0].weight, &p.keys[0].source),
            (1, &KeySecret::Env("K1".into()))
        );
        assert!(p.models.is_empty() && c.default_limits.is_empty() && c.prices.is_empty());
    }

    #[test]
    fn every_field_is_read() {
        let c = parse_str(
            r#"{"consumers":{"trusted_header":"X-Team","list":[{"name":"a","limits":[{"metric":"requests","amount":3,"window":"1m"}],"model_limits":{"m":[{"metric":"output_tokens","amount":7,"window":"1h"}]}}]},
                "providers":[{"name":"az","type":"azure_openai","host":"h:8443","base_path":"/x/","api_version":"v1","rotation":"weighted","keys":[{"id":"k1","env":"K1","weight":3},{"id":"k2","value":" sk-in ","inline":true}],"models":{"m":"deploy"}}],
                "health":{"default_cooldown_s":1,"auth_failure_cooldown_s":2,"circuit_failures":3,"circuit_open_s":4,"half_open_probes":5},
                "default_limits":[{"metric":"total_tokens","amount":9,"window":"day"}],"prices":{"m":{"input":1,"output":2.5}},
                "default_max_tokens":10,"lower_max_tokens":true,"max_request_bytes":11,"max_sse_event_bytes":2048,"failure_mode":"closed","sticky_header":"X-S","status_path":"/st"}"#,
        )
        .unwrap();
        let Consumers::TrustedHeader { header, list } = &c.consumers else {
            unreachable!()
        };
        assert_eq!((header.as_str(), list[0].key_digest), ("x-team", None));
        assert_eq!(
            list[0].limits,
            [Limit {
                metric: Metric::Requests,
                amount: 3,
                window_ms: 60_000
            }]
        );
        assert_eq!(
            list[0].model_limits["m"],
            [Limit {
                metric: Metric::OutputTokens,
                amount: 7,
                window_ms: 3_600_000
            }]
        );
        let p = &c.providers[0];
        assert_eq!(
            (
                p.kind,
                p.host.as_deref(),
                p.base_path.as_str(),
                p.api_version.as_deref()
            ),
            (ProviderType::AzureOpenai, Some("h:8443"), "/x", Some("v1"))
        );
        assert_eq!(
            (
                p.rotation,
                p.keys[0].weight,
                p.keys[1].secret.as_str(),
                p.schedule.len()
            ),
            (Rotation::Weighted, 3, "sk-in", 4)
        );
        assert_eq!(
            (p.map_model("m"), p.anthropic_version.as_str()),
            (Some("deploy"), "2023-06-01")
        );
        let h = c.health;
        assert_eq!(
            (
                h.default_cooldown_ms,
                h.auth_failure_cooldown_ms,
                h.circuit_failures,
                h.circuit_open_ms,
                h.half_open_probes
            ),
            (1000, 2000, 3, 4000, 5)
        );
        assert_eq!(
            c.default_limits,
            [Limit {
                metric: Metric::TotalTokens,
                amount: 9,
                window_ms: 86_400_000
            }]
        );
        let price = c.prices["m"];
        assert_eq!(
            (
                price.input_per_mtok,
                price.output_per_mtok,
                price.cached_input_per_mtok
            ),
            (1.0, 2.5, 1.0)
        );
        assert_eq!(
            (
                c.default_max_tokens,
                c.lower_max_tokens,
                c.max_request_bytes,
                c.max_sse_event_bytes
            ),
            (10, true, 11, 2048)
        );
        assert_eq!(
            (
                c.failure_mode,
                c.sticky_header.as_deref(),
                c.status.as_ref().map(|s| s.path.as_str())
            ),
            (FailureMode::Closed, Some("x-s"), Some("/st"))
        );
    }

    #[test]
    fn invalid_json_gives_the_parser_message_and_position() {
        assert_eq!(
            parse_str("{\"providers\":\n[}").unwrap_err(),
            "invalid JSON: expected value at line 2 column 2"
        );
    }

    #[test]
    fn cost_amounts_are_exact_in_any_json_number_syntax() {
        let budget = |amount: &str| {
            parse_str(&cfg(
                &format!(
                    r#""default_limits":[{{"metric":"cost_usd","amount":{amount},"window":"1d"}}],"#
                ),
                "",
            ))
            .map(|c| c.default_limits[0].amount)
        };
        assert_eq!(budget("1.5e-6"), Ok(2));
        assert_eq!(budget("2E+1"), Ok(20_000_000));
        assert_eq!(budget("0.10"), Ok(100_000));
        assert_eq!(budget("25"), Ok(25_000_000));
        assert_eq!(
            budget("1e12").unwrap_err(),
            "default_limits[0].amount: must be a number of USD from 0.000001"
        );
        assert_eq!(
            budget("-1").unwrap_err(),
            "default_limits[0].amount: must be a number of USD from 0.000001"
        );
    }

    #[test]
    fn micro_usd_reads_json_number_text_exactly() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1", Some(1_000_000)),
            ("1.5", Some(1_500_000)),
            ("0.10", Some(100_000)),
            ("0.000001", Some(1)),
            ("1e-6", Some(1)),
            ("1.0E-6", Some(1)),
            ("15e-7", Some(2)),
            ("0.0000015", Some(2)),
            ("0.00000149999", Some(1)),
            ("0.0000025", Some(3)),
            ("1.5e-6", Some(2)),
            ("2e+3", Some(2_000_000_000)),
            ("2E3", Some(2_000_000_000)),
            ("0.001e3", Some(1_000_000)),
            ("1234.5678e-2", Some(12_345_678)),
            ("999999999999.9999994", Some(999_999_999_999_999_999)),
            ("999999999999.9999995", Some(1_000_000_000_000_000_000)),
            ("1e0000000000000000000000000001", Some(10_000_000)),
            ("100000000000000000000e-9", Some(100_000_000_000_000_000)),
            // Below 0.000001 or from 10^12 USD.
            ("0", None),
            ("0.0", None),
            ("0e5", None),
            ("0.0000009", None),
            ("1e-7", None),
            ("1e12", None),
            ("1000000000000", None),
            ("1e99999999999999999999", None),
            ("1e-99999999999999999999", None),
            ("1e9223372036854775807", None),
            ("1e-9223372036854775808", None),
            // Not JSON numbers.
            ("-1", None),
            ("01", None),
            ("1.", None),
            (".5", None),
            ("1e", None),
            ("1e+", None),
            ("1.5.2", None),
            ("1_000", None),
            ("", None),
            ("NaN", None),
        ];
        for (text, want) in cases {
            assert_eq!(micro_usd(text), *want, "for {text}");
        }
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
        assert_eq!(
            list[0].key_digest,
            Some(consumer_key::digest(b"team-a-secret"))
        );
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
