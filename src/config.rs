//! Plugin configuration, in two phases: serde reads the JSON into the `Raw*` structs below (unknown
//! fields refused), then `validate` turns them into `Config`. Every error names the field path and
//! the reason, e.g. `providers[0].keys[2].env: OPENAI_KEY_3 is not set (...)`.
//!
//! Every raw field is an `Option`: `null` means absent, and a missing required field is reported by
//! the validation as `path: missing`, in the same words as every other error.
//!
//! Hand-written on purpose, around serde:
//! - `reword` turns serde's messages (`unknown field \`x\`, expected one of \`a\`, \`b\``,
//!   `invalid type: string "3", expected u32`) into the config's wording, which operators and
//!   tests read (`unknown field, expected one of: a, b`, `expected a non-negative integer`);
//! - `Object` reads a derived struct from a JSON object only: serde's derived structs also accept a
//!   JSON array, filled field by field in declaration order, which no one means in a config;
//! - `Choice` reads the string choices: serde_json reports a derived enum given a non-string
//!   (`"failure_mode": true`) as a JSON syntax error, with no word of what was expected;
//! - `micro_usd` reads a `cost_usd` amount from the number's text (kept by `RawValue`): through f64,
//!   0.0000015 USD would be 1.4999999999999998 micro-USD.
//!
//! Secrets are resolved here, once, at configure time: key values from environment variables that
//! Envoy passes in `vm_config.environment_variables.host_env_keys`, consumer and admin keys as
//! SHA-256 digests. An `sds` key is only the name of a secret that Envoy keeps and injects itself:
//! its value never enters the VM.

mod concurrency;
mod models;
pub mod pacing;
pub mod waiting;

pub use concurrency::InFlightLimits;
pub use models::{Models, Window};
pub mod cache;

use crate::limit::consumer_key::{self, KeyDigest};
use crate::limit::quota::{Limit, Metric, Price};
use crate::maps::HashMap;
use core::fmt;
use core::marker::PhantomData;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, MapAccess, Unexpected, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

mod access;
mod aliases;
mod header_consumers;
mod lookup;
pub use access::{Listed, Patterns};
pub use header_consumers::DEFAULT_MAX_FROM_HEADER;

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
    /// Requests that share their leading prompt go to the same healthy key (weighted rendezvous
    /// hashing with a bounded load: `pool::keypool`), so a provider's prompt cache keeps working.
    PromptAffinity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// When tollgate cannot do its job (shared data failing), let the request through unmetered.
    #[default]
    Open,
    /// ... or refuse it with 503.
    Closed,
}

// ---------------------------------------------------------------- validated layer

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySecret {
    Env(String),
    Inline,
    /// The SDS secret Envoy keeps for this key (its name): Envoy writes the credential itself
    /// (`credential_injector`, selected by the `x-tollgate-credential` header), so the secret never
    /// enters the VM and rotates with Envoy's own secret machinery.
    Sds(String),
}

#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    /// The key itself; empty for an `sds` key, whose secret only Envoy holds.
    pub secret: String,
    pub source: KeySecret,
    pub weight: u32,
    /// Out of the rotation, but kept in the configuration: its cooldowns and counters stay, and
    /// enabling it again needs no other change.
    pub disabled: bool,
    /// The most requests in flight on this key at once (`None`: no limit).
    pub max_in_flight: Option<u32>,
    /// The key's published limits (its tier's), paced by tollgate itself ([`pacing`]).
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

/// A key that enters a provider's pool (a new id, or back from `disabled`) is on probation: it takes
/// `share_percent` % of a full key's share until it has answered `requests` requests without
/// 401/403/429. `requests: 0` turns probation off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probation {
    pub requests: u32,
    pub share_percent: u32,
}

impl Default for Probation {
    fn default() -> Self {
        Probation {
            requests: 20,
            share_percent: 10,
        }
    }
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
    /// `probation` (the provider's own, field by field over the top level's).
    pub probation: Probation,
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
    /// The models and aliases this consumer may name (`models`); None: every one.
    pub models: Option<Patterns>,
    /// Trim this consumer's conversations that outgrow a model's window ([`models`]).
    pub trim_oldest: bool,
    /// The most requests in flight at once (`None`: `default_max_in_flight`, or no limit).
    pub max_in_flight: Option<u32>,
    /// Its own `waiting` (`Some(None)`: it does not wait); None: `waiting.default`.
    pub waiting: Option<Option<waiting::Wait>>,
}

#[derive(Debug, Clone)]
pub enum Consumers {
    /// No `consumers` section: everyone is the one anonymous consumer.
    Anonymous,
    Keys(Vec<Consumer>),
    TrustedHeader {
        header: String,
        list: Vec<Consumer>,
        /// With an empty `list`: how many distinct names become consumers of their own
        /// (`consumers.max_from_header`); later ones are counted as one overflow consumer.
        max_from_header: usize,
        /// This worker's view of the names seen so far (the set itself is in shared data).
        seen: crate::limit::header_names::Seen,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub default_cooldown_ms: u64,
    pub auth_failure_cooldown_ms: u64,
    /// How long one key rests after a 5xx (or an attempt that got no answer) that names no
    /// Retry-After; 0: it does not.
    pub server_error_cooldown_ms: u64,
    pub circuit_failures: u32,
    pub circuit_open_ms: u64,
    pub half_open_probes: u32,
}

/// The status endpoint: who may read everything (the admin key), else each consumer its own standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusConfig {
    pub path: String,
    pub admin_key_digest: Option<KeyDigest>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub consumers: Consumers,
    pub providers: Vec<Provider>,
    pub health: Health,
    pub default_limits: Vec<Limit>,
    pub prices: HashMap<String, Price>,
    /// The price of a model missing from `prices`: without one, such a model has no cost, and a
    /// cost budget cannot be kept for it.
    pub default_price: Option<Price>,
    pub default_max_tokens: u64,
    pub lower_max_tokens: bool,
    pub max_request_bytes: u64,
    pub max_sse_event_bytes: usize,
    pub failure_mode: FailureMode,
    pub sticky_header: Option<String>,
    pub status: Option<StatusConfig>,
    pub aliases: aliases::Aliases,
    /// Model allow-lists, the gateway's model list, the paths passed through.
    pub access: access::Access,
    /// Context windows by model ([`models`]).
    pub models: Models,
    /// Limits on requests in flight, by consumer and by provider key.
    pub in_flight: InFlightLimits,
    /// Keys' configured limits and the spread of `Retry-After` ([`pacing`]).
    pub pacing: pacing::Pacing,
    /// The response cache; None: off.
    pub cache: Option<cache::CacheConfig>,
    /// Holding requests for capacity instead of a 429; None: off.
    pub waiting: Option<waiting::Waiting>,
    /// Warnings for the log (inline secrets and the like): never containing a secret.
    pub warnings: Vec<String>,
    /// Derived from `providers` once, at parse: both are asked on every request.
    sds_keys: bool,
    prompt_affinity: bool,
    /// Consumers, keys, models and providers by name, built once at parse.
    lookup: lookup::Lookup,
    /// Presented consumer keys this worker has matched (their digest taken once).
    presented: consumer_key::PresentedKeys,
}

pub const ANONYMOUS: &str = "anonymous";

impl Config {
    pub fn provider(&self, name: &str) -> Option<(usize, &Provider)> {
        let i = *self.lookup.providers.get(name)?;
        Some((i, self.providers.get(i)?))
    }

    /// The configured consumers, in the configuration's order.
    pub fn consumer_list(&self) -> &[Consumer] {
        match &self.consumers {
            Consumers::Anonymous => &[],
            Consumers::Keys(list) | Consumers::TrustedHeader { list, .. } => list,
        }
    }

    pub fn consumer(&self, name: &str) -> Option<&Consumer> {
        self.consumer_list().get(*self.lookup.consumers.get(name)?)
    }

    /// The consumer whose key has this SHA-256 digest.
    pub fn consumer_by_key(&self, digest: &KeyDigest) -> Option<&Consumer> {
        self.consumer_list().get(*self.lookup.keys.get(digest)?)
    }

    /// The consumer whose key this is: [`Self::consumer_by_key`] of its digest, taken once per
    /// key and worker ([`consumer_key::PresentedKeys`]).
    pub fn consumer_by_presented_key(&self, key: &[u8]) -> Option<&Consumer> {
        let i = self
            .presented
            .get_or_find(key, |d| self.lookup.keys.get(d).copied())?;
        self.consumer_list().get(i)
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

    /// Whether any key's secret is one Envoy keeps (`sds`).
    pub fn has_sds_keys(&self) -> bool {
        self.sds_keys
    }

    /// Models named anywhere in the config: the only model names used in shared-data keys and
    /// metric names, so that clients cannot grow either without bound.
    pub fn is_known_model(&self, model: &str) -> bool {
        self.lookup.models.contains(model) || self.models.contains(model)
    }

    /// Whether a provider rotates by prompt affinity (the listener then hashes leading prompts).
    pub fn prompt_affinity(&self) -> bool {
        self.prompt_affinity
    }

    /// The model's price, else `default_price`.
    pub fn price_for(&self, model: &str) -> Option<&Price> {
        self.prices.get(model).or(self.default_price.as_ref())
    }

    /// Whether a `cost_usd` budget applies to `consumer` asking for `model`.
    pub fn has_cost_limit(&self, consumer: &str, model: &str) -> bool {
        let cost = |ls: &[Limit]| ls.iter().any(|l| l.metric == Metric::CostMicroUsd);
        match self.consumer(consumer) {
            Some(c) => {
                cost(if c.limits.is_empty() {
                    &self.default_limits
                } else {
                    &c.limits
                }) || c.model_limits.get(model).is_some_and(|ls| cost(ls))
            }
            None => cost(&self.default_limits),
        }
    }
}

// ---------------------------------------------------------------- raw layer (serde)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    consumers: Option<Object<RawConsumers>>,
    providers: Option<Vec<Object<RawProvider>>>,
    health: Option<Object<RawHealth>>,
    default_limits: Option<Vec<Object<RawLimit>>>,
    prices: Option<BTreeMap<String, Object<RawPrice>>>,
    default_price: Option<Object<RawPrice>>,
    default_max_tokens: Option<u64>,
    lower_max_tokens: Option<bool>,
    max_request_bytes: Option<u64>,
    max_sse_event_bytes: Option<u64>,
    failure_mode: Option<Choice<FailureMode>>,
    sticky_header: Option<String>,
    status: Option<Object<RawStatus>>,
    probation: Option<Object<RawProbation>>,
    aliases: Option<BTreeMap<String, serde_json::Value>>,
    passthrough_paths: Option<Vec<String>>,
    models: Option<models::RawModels>,
    default_max_in_flight: Option<u32>,
    cache: Option<Object<cache::RawCache>>,
    retry_after_spread: Option<f64>,
    waiting: Option<Object<waiting::RawWaiting>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<Choice<ProviderType>>,
    host: Option<String>,
    base_path: Option<String>,
    api_version: Option<String>,
    anthropic_version: Option<String>,
    rotation: Option<Choice<Rotation>>,
    keys: Option<Vec<Object<RawKey>>>,
    models: Option<BTreeMap<String, String>>,
    probation: Option<Object<RawProbation>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProbation {
    requests: Option<u32>,
    share_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: Option<String>,
    env: Option<String>,
    value: Option<String>,
    inline: Option<bool>,
    sds: Option<String>,
    weight: Option<u32>,
    disabled: Option<bool>,
    max_in_flight: Option<u32>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumers {
    trusted_header: Option<String>,
    list: Option<Vec<Object<RawConsumer>>>,
    max_from_header: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    name: Option<String>,
    key_sha256: Option<String>,
    key_env: Option<String>,
    limits: Option<Vec<Object<RawLimit>>>,
    model_limits: Option<BTreeMap<String, Option<Vec<Object<RawLimit>>>>>,
    models: Option<Vec<String>>,
    trim_oldest: Option<bool>,
    max_in_flight: Option<u32>,
    waiting: Option<Object<waiting::RawWait>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    metric: Option<String>,
    /// The number's text: a `cost_usd` amount is read from it exactly.
    amount: Option<Box<RawValue>>,
    window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: Option<f64>,
    output: Option<f64>,
    cached_input: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    default_cooldown_s: Option<u64>,
    auth_failure_cooldown_s: Option<u64>,
    server_error_cooldown_s: Option<u64>,
    circuit_failures: Option<u32>,
    circuit_open_s: Option<u64>,
    half_open_probes: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    path: Option<String>,
    admin_key_sha256: Option<String>,
    admin_key_env: Option<String>,
}

/// `T` read from a JSON object only (see the module's doc comment).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// A value named by one of a fixed set of strings.
trait Named: Copy + 'static {
    const NAMES: &'static [(&'static str, Self)];
}

impl Named for ProviderType {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("openai", ProviderType::Openai),
        ("azure_openai", ProviderType::AzureOpenai),
        ("anthropic", ProviderType::Anthropic),
        ("openai_compatible", ProviderType::OpenaiCompatible),
    ];
}

impl Named for Rotation {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("round_robin", Rotation::RoundRobin),
        ("weighted", Rotation::Weighted),
        ("sticky", Rotation::Sticky),
        ("prompt_affinity", Rotation::PromptAffinity),
    ];
}

impl Named for FailureMode {
    const NAMES: &'static [(&'static str, Self)] =
        &[("open", FailureMode::Open), ("closed", FailureMode::Closed)];
}

/// A `Named` value (see the module's doc comment).
struct Choice<T>(T);

impl<'de, T: Named> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor<T>(PhantomData<T>);
        impl<T: Named> Visitor<'_> for ChoiceVisitor<T> {
            type Value = Choice<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let names: Vec<&str> = T::NAMES.iter().map(|(n, _)| *n).collect();
                write!(f, "one of: {}", names.join(", "))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Choice<T>, E> {
                T::NAMES
                    .iter()
                    .find(|(n, _)| *n == s)
                    .map(|(_, t)| Choice(*t))
                    .ok_or_else(|| E::invalid_value(Unexpected::Str(s), &self))
            }
        }
        d.deserialize_str(ChoiceVisitor(PhantomData))
    }
}

/// Fields that were replaced: naming one gets this reason rather than "unknown field".
const REPLACED: &[(&str, &str)] = &[(
    "status_path",
    r#"replaced by "status": {"path": ..., "admin_key_sha256" or "admin_key_env"}"#,
)];

/// serde_path_to_error's (path, serde_json error) as our `path: reason`.
fn from_serde(e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = match e.path().to_string() {
        root if root == "." => String::new(),
        path => path,
    };
    let field = match e.path().iter().next_back() {
        Some(serde_path_to_error::Segment::Map { key }) => key.clone(),
        _ => String::new(),
    };
    let inner = e.into_inner();
    if !inner.is_data() {
        return err("", format!("invalid JSON: {inner}"));
    }
    let text = inner.to_string();
    let position = format!(" at line {} column {}", inner.line(), inner.column());
    let msg = text.strip_suffix(&position).unwrap_or(&text);
    if let Some(name) = msg
        .strip_prefix("duplicate field `")
        .and_then(|m| m.strip_suffix('`'))
    {
        // Raised once the object is read, so the path is the object's.
        return err(at(&path, name), "given twice");
    }
    let reason = match REPLACED.iter().find(|(p, _)| *p == path) {
        Some((_, why)) if msg.starts_with("unknown field") => why.to_string(),
        _ => reword(msg, &field),
    };
    err(path, reason)
}

/// serde's data error `msg` about `field` in the config's wording (see the module's doc comment);
/// any other message as it is.
fn reword(msg: &str, field: &str) -> String {
    if let Some(expected) = msg.strip_prefix(&format!("unknown field `{field}`, ")) {
        // "expected one of `a`, `b`", "expected `a` or `b`", "expected `a`": the names in backticks.
        let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        return format!("unknown field, expected one of: {}", names.join(", "));
    }
    // The expectation is ours or serde's (never containing ", expected "); what was found may
    // quote the config's own strings, which may, so split at the last one.
    let Some((found, expected)) = msg.rsplit_once(", expected ") else {
        return msg.to_string();
    };
    let unsigned = matches!(expected, "u8" | "u16" | "u32" | "u64" | "usize");
    if unsigned && found.starts_with("invalid value: integer `") && !found.contains('-') {
        return "is too large".to_string();
    }
    if !found.starts_with("invalid type: ") && !found.starts_with("invalid value: ") {
        return msg.to_string();
    }
    let expected = match expected {
        _ if unsigned => "a non-negative integer",
        "f64" => "a number",
        "a sequence" => "an array",
        "a map" => "an object",
        other => other,
    };
    format!("expected {expected}")
}

/// Parses and validates. `env` resolves environment variables (std::env::var in the module).
pub fn parse(json: &[u8], env: &Env) -> Result<Config, ConfigError> {
    if json.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(err(
            "",
            "configuration is empty: tollgate needs at least `providers`",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let Object(raw) = serde_path_to_error::deserialize(&mut de).map_err(from_serde)?;
    de.end()
        .map_err(|e| err("", format!("invalid JSON: {e}")))?;
    validate(raw, env)
}

// ---------------------------------------------------------------- validation

type Res<T> = Result<T, ConfigError>;

/// Environment variables by name (std::env::var in the module, a table in tests).
pub type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

fn at(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// A required field's value.
fn need<T>(path: &str, field: &str, value: Option<T>) -> Res<T> {
    value.ok_or_else(|| err(at(path, field), "missing"))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const NAME_RULE: &str = "must be 1-64 characters of letters, digits, '-' or '_'";

/// An SDS secret's name travels in a request header that Envoy's matcher compares exactly, and
/// names from Kubernetes or Istio look like `kubernetes://ns/name`: any visible ASCII.
fn valid_secret_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_graphic())
}

const SECRET_NAME_RULE: &str =
    "must be the name of an Envoy secret: 1-253 visible ASCII characters, no spaces";

/// The value of the environment variable `var` named by the field at `path`, trimmed.
fn env_secret(path: &str, var: &str, env: &Env) -> Res<String> {
    match env(var) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        Some(_) => Err(err(path, format!("{var} is empty"))),
        None => Err(err(
            path,
            format!("{var} is not set (list it in vm_config.environment_variables.host_env_keys)"),
        )),
    }
}

/// A key (`whose`: "the admin key") given either as its SHA-256 in hex (the field `fields.0` of
/// `path`) or through an environment variable (`fields.1`), as a digest; None when neither is.
fn key_digest(
    path: &str,
    fields: (&str, &str),
    sha: Option<String>,
    var: Option<String>,
    whose: &str,
    env: &Env,
) -> Res<Option<KeyDigest>> {
    let (sha_field, env_field) = fields;
    match (sha, var) {
        (Some(_), Some(_)) => Err(err(
            at(path, env_field),
            format!("give either `{sha_field}` or `{env_field}`, not both"),
        )),
        (Some(h), None) => consumer_key::from_hex(&h).map(Some).ok_or_else(|| {
            err(
                at(path, sha_field),
                format!("must be 64 hex characters (sha256 of {whose})"),
            )
        }),
        (None, Some(var)) => {
            let key = env_secret(&at(path, env_field), &var, env)?;
            Ok(Some(consumer_key::digest(key.as_bytes())))
        }
        (None, None) => Ok(None),
    }
}

fn validate(raw: RawConfig, env: &Env) -> Res<Config> {
    let mut warnings = Vec::new();

    let raw_providers = need("", "providers", raw.providers)?;
    if raw_providers.is_empty() {
        return Err(err("providers", "at least one provider is required"));
    }
    let top_probation = probation("probation", raw.probation, Probation::default())?;
    let mut providers: Vec<Provider> = Vec::with_capacity(raw_providers.len());
    for (i, Object(mut rp)) in raw_providers.into_iter().enumerate() {
        let path = format!("providers[{i}]");
        let own_probation = rp.probation.take();
        let mut p = provider(&path, rp, &providers, env, &mut warnings)?;
        p.probation = probation(&at(&path, "probation"), own_probation, top_probation)?;
        providers.push(p);
    }

    let default_limits = limits("default_limits", raw.default_limits)?;

    let raw_waiting = raw.waiting.map(|Object(w)| w);
    let max_held = waiting::max_held(raw_waiting.as_ref())?;
    let consumers = match raw.consumers {
        None => Consumers::Anonymous,
        Some(Object(rc)) => consumers(rc, env, max_held)?,
    };

    let mut prices = HashMap::default();
    for (model, Object(rp)) in raw.prices.unwrap_or_default() {
        let p = price(&format!("prices.{model}"), rp)?;
        prices.insert(model, p);
    }
    let default_price = raw
        .default_price
        .map(|Object(rp)| price("default_price", rp))
        .transpose()?;

    let health = health(raw.health.map(|Object(h)| h).unwrap_or_default())?;

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
    let status = raw.status.map(|Object(s)| status(s, env)).transpose()?;
    let lower_max_tokens = raw.lower_max_tokens.unwrap_or(false);
    let models = models::models(
        raw.models,
        &consumers,
        default_max_tokens,
        lower_max_tokens,
        &mut warnings,
    )?;
    let default_max_in_flight =
        concurrency::max_in_flight("default_max_in_flight", raw.default_max_in_flight)?;
    let in_flight = concurrency::limits(default_max_in_flight, &consumers, &providers);
    let pacing = pacing::pacing(&providers, raw.retry_after_spread)?;
    let cache = raw
        .cache
        .map(|Object(c)| cache::validate(c, &consumers))
        .transpose()?;
    let waiting = waiting::validate(raw_waiting, max_held, &consumers)?;

    let sds_keys = providers
        .iter()
        .flat_map(|p| &p.keys)
        .any(|k| matches!(k.source, KeySecret::Sds(_)));
    let prompt_affinity = providers
        .iter()
        .any(|p| p.rotation == Rotation::PromptAffinity);
    let aliases = aliases::validate(raw.aliases, &providers, &prices)?;
    let access = access::validate(
        raw.passthrough_paths,
        &consumers,
        &providers,
        &aliases,
        &prices,
    )?;
    let lookup = match &consumers {
        Consumers::Anonymous => lookup::Lookup::build(&[], &providers, &prices, &mut warnings),
        Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => {
            lookup::Lookup::build(l, &providers, &prices, &mut warnings)
        }
    };
    Ok(Config {
        sds_keys,
        prompt_affinity,
        lookup,
        presented: Default::default(),
        consumers,
        providers,
        health,
        default_limits,
        prices,
        default_price,
        default_max_tokens,
        lower_max_tokens,
        max_request_bytes,
        max_sse_event_bytes: usize::try_from(max_sse_event_bytes).unwrap_or(usize::MAX),
        failure_mode: raw.failure_mode.map(|Choice(m)| m).unwrap_or_default(),
        sticky_header: raw.sticky_header.map(|h| h.to_ascii_lowercase()),
        status,
        aliases,
        access,
        models,
        in_flight,
        pacing,
        cache,
        waiting,
        warnings,
    })
}

fn provider(
    path: &str,
    rp: RawProvider,
    before: &[Provider],
    env: &Env,
    warnings: &mut Vec<String>,
) -> Res<Provider> {
    let name = need(path, "name", rp.name)?;
    let Choice(kind) = need(path, "type", rp.kind)?;
    let raw_keys = need(path, "keys", rp.keys)?;
    let field = |f| at(path, f);

    if !valid_name(&name) {
        return Err(err(field("name"), NAME_RULE));
    }
    if before.iter().any(|q| q.name == name) {
        return Err(err(
            field("name"),
            format!("duplicate provider name '{name}'"),
        ));
    }
    if raw_keys.is_empty() {
        return Err(err(field("keys"), "at least one key is required"));
    }
    let api_version = rp.api_version;
    if kind == ProviderType::AzureOpenai && api_version.is_none() {
        return Err(err(
            field("api_version"),
            "required for azure_openai (e.g. \"2024-10-21\")",
        ));
    }
    if kind != ProviderType::AzureOpenai && api_version.is_some() {
        return Err(err(
            field("api_version"),
            "only azure_openai providers take an api_version",
        ));
    }
    if rp.anthropic_version.is_some() && kind != ProviderType::Anthropic {
        return Err(err(
            field("anthropic_version"),
            "only anthropic providers take an anthropic_version",
        ));
    }
    let base_path = match rp.base_path {
        Some(b) if !b.starts_with('/') || b.contains('?') => {
            return Err(err(
                field("base_path"),
                "must start with '/' and carry no query",
            ))
        }
        Some(b) => b.trim_end_matches('/').to_string(),
        None => String::new(),
    };
    if let Some(h) = &rp.host {
        if h.is_empty() || h.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
            return Err(err(
                field("host"),
                "must be a host name (optionally :port), no scheme or path",
            ));
        }
    }
    let mut keys: Vec<Key> = Vec::with_capacity(raw_keys.len());
    for (i, Object(rk)) in raw_keys.into_iter().enumerate() {
        let k = key(&format!("{path}.keys[{i}]"), rk, &keys, env, warnings)?;
        keys.push(k);
    }
    let models: HashMap<String, String> = rp.models.unwrap_or_default().into_iter().collect();
    if models.iter().any(|(c, u)| c.is_empty() || u.is_empty()) {
        return Err(err(field("models"), "model names must not be empty"));
    }
    let schedule = smooth_weighted_schedule(&keys);
    Ok(Provider {
        name,
        kind,
        host: rp.host,
        base_path,
        api_version,
        anthropic_version: rp
            .anthropic_version
            .unwrap_or_else(|| "2023-06-01".to_string()),
        rotation: rp.rotation.map(|Choice(r)| r).unwrap_or_default(),
        keys,
        models,
        schedule,
        probation: Probation::default(),
    })
}

/// A `probation` section at `path`, its missing fields taken from `base`.
fn probation(path: &str, raw: Option<Object<RawProbation>>, base: Probation) -> Res<Probation> {
    let raw = raw.map(|Object(r)| r).unwrap_or_default();
    let out = Probation {
        requests: raw.requests.unwrap_or(base.requests),
        share_percent: raw.share_percent.unwrap_or(base.share_percent),
    };
    if out.requests > 1_000_000 {
        return Err(err(at(path, "requests"), "must be at most 1000000"));
    }
    if !(1..=100).contains(&out.share_percent) {
        return Err(err(at(path, "share_percent"), "must be between 1 and 100"));
    }
    Ok(out)
}

fn key(path: &str, rk: RawKey, before: &[Key], env: &Env, warnings: &mut Vec<String>) -> Res<Key> {
    let id = need(path, "id", rk.id)?;
    let weight = rk.weight.unwrap_or(1);
    if !valid_name(&id) {
        return Err(err(at(path, "id"), NAME_RULE));
    }
    if before.iter().any(|q| q.id == id) {
        return Err(err(at(path, "id"), format!("duplicate key id '{id}'")));
    }
    let given: Vec<&str> = [
        ("env", rk.env.is_some()),
        ("value", rk.value.is_some()),
        ("sds", rk.sds.is_some()),
    ]
    .iter()
    .filter(|(_, some)| *some)
    .map(|(f, _)| *f)
    .collect();
    if given.len() > 1 {
        return Err(err(
            path,
            format!(
                "give one of `env`, `value` or `sds`, not {}",
                given
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        ));
    }
    let (secret, source) = if let Some(var) = rk.env {
        (
            env_secret(&at(path, "env"), &var, env)?,
            KeySecret::Env(var),
        )
    } else if let Some(v) = rk.value {
        if !rk.inline.unwrap_or(false) {
            return Err(err(
                at(path, "value"),
                "inline secrets must be marked `\"inline\": true`; prefer `env` or `sds`",
            ));
        }
        if v.trim().is_empty() {
            return Err(err(at(path, "value"), "is empty"));
        }
        warnings.push(format!(
            "{path}: key '{id}' is inline in the configuration; it will show in /config_dump. Use `env` or `sds` instead",
        ));
        (v.trim().to_string(), KeySecret::Inline)
    } else if let Some(name) = rk.sds {
        if !valid_secret_name(&name) {
            return Err(err(at(path, "sds"), SECRET_NAME_RULE));
        }
        (String::new(), KeySecret::Sds(name))
    } else {
        return Err(err(
            path,
            "the key's secret is required: `env` (an environment variable), `sds` (a secret Envoy keeps) or an inline `value`",
        ));
    };
    if secret.bytes().any(|b| b < 0x21 || b == 0x7f) {
        return Err(err(
            path,
            "the key contains whitespace or control characters",
        ));
    }
    if weight == 0 || weight > 1000 {
        return Err(err(at(path, "weight"), "must be between 1 and 1000"));
    }
    Ok(Key {
        id,
        secret,
        source,
        weight,
        disabled: rk.disabled.unwrap_or(false),
        max_in_flight: concurrency::max_in_flight(&at(path, "max_in_flight"), rk.max_in_flight)?,
        requests_per_minute: pacing::per_minute(
            &at(path, "requests_per_minute"),
            rk.requests_per_minute,
        )?,
        tokens_per_minute: pacing::per_minute(
            &at(path, "tokens_per_minute"),
            rk.tokens_per_minute,
        )?,
    })
}

fn consumers(rc: RawConsumers, env: &Env, max_held: u32) -> Res<Consumers> {
    let raw_list = rc.list.unwrap_or_default();
    let max_from_header = header_consumers::max_from_header(
        rc.max_from_header,
        rc.trusted_header.is_some(),
        !raw_list.is_empty(),
    )?;
    let mut list: Vec<Consumer> = Vec::with_capacity(raw_list.len());
    let mut names: crate::maps::HashSet<String> =
        crate::maps::HashSet::with_capacity_and_hasher(raw_list.len(), Default::default());
    for (i, Object(c)) in raw_list.into_iter().enumerate() {
        let path = format!("consumers.list[{i}]");
        let name = need(&path, "name", c.name)?;
        if !valid_name(&name) || name == ANONYMOUS {
            return Err(err(
                at(&path, "name"),
                format!("{NAME_RULE}, and not '{ANONYMOUS}'"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                at(&path, "name"),
                format!("duplicate consumer '{name}'"),
            ));
        }
        let key_digest = key_digest(
            &path,
            ("key_sha256", "key_env"),
            c.key_sha256,
            c.key_env,
            "the consumer's key",
            env,
        )?;
        if key_digest.is_none() && rc.trusted_header.is_none() {
            return Err(err(
                &path,
                "`key_sha256` or `key_env` is required (or set consumers.trusted_header)",
            ));
        }
        let own = limits(&at(&path, "limits"), c.limits)?;
        let models = access::model_list(&at(&path, "models"), c.models)?;
        let mut model_limits = HashMap::default();
        for (model, ls) in c.model_limits.unwrap_or_default() {
            let ls = limits(&format!("{path}.model_limits.{model}"), ls)?;
            model_limits.insert(model, ls);
        }
        list.push(Consumer {
            name,
            key_digest,
            limits: own,
            model_limits,
            models,
            trim_oldest: c.trim_oldest.unwrap_or(false),
            max_in_flight: concurrency::max_in_flight(
                &at(&path, "max_in_flight"),
                c.max_in_flight,
            )?,
            waiting: c
                .waiting
                .map(|Object(w)| waiting::wait(&at(&path, "waiting"), w, max_held))
                .transpose()?,
        });
    }
    match rc.trusted_header {
        Some(h) => {
            let h = h.to_ascii_lowercase();
            if h.is_empty() || h.starts_with(':') {
                return Err(err("consumers.trusted_header", "must be a header name"));
            }
            Ok(Consumers::TrustedHeader {
                header: h,
                list,
                max_from_header,
                seen: Default::default(),
            })
        }
        None if list.is_empty() => Err(err(
            "consumers.list",
            "is empty: remove `consumers` to admit everyone anonymously",
        )),
        None => Ok(Consumers::Keys(list)),
    }
}

fn price(path: &str, rp: RawPrice) -> Res<Price> {
    let input = need(path, "input", rp.input)?;
    let output = need(path, "output", rp.output)?;
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    if !ok(input) || !ok(output) || !rp.cached_input.map(ok).unwrap_or(true) {
        return Err(err(
            path,
            "prices must be finite, non-negative USD per million tokens",
        ));
    }
    Ok(Price {
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: rp.cached_input.unwrap_or(input),
    })
}

fn health(h: RawHealth) -> Res<Health> {
    let ms = |s: Option<u64>, default_s: u64| s.unwrap_or(default_s).saturating_mul(1000);
    let health = Health {
        default_cooldown_ms: ms(h.default_cooldown_s, 30),
        auth_failure_cooldown_ms: ms(h.auth_failure_cooldown_s, 3600),
        server_error_cooldown_ms: ms(h.server_error_cooldown_s, 1),
        circuit_failures: h.circuit_failures.unwrap_or(5),
        circuit_open_ms: ms(h.circuit_open_s, 30),
        half_open_probes: h.half_open_probes.unwrap_or(1),
    };
    if health.circuit_failures == 0 {
        return Err(err("health.circuit_failures", "must be at least 1"));
    }
    if health.half_open_probes == 0 {
        return Err(err("health.half_open_probes", "must be at least 1"));
    }
    Ok(health)
}

fn status(s: RawStatus, env: &Env) -> Res<StatusConfig> {
    let path = need("status", "path", s.path)?;
    if !path.starts_with('/') {
        return Err(err("status.path", "must start with '/'"));
    }
    let admin_key_digest = key_digest(
        "status",
        ("admin_key_sha256", "admin_key_env"),
        s.admin_key_sha256,
        s.admin_key_env,
        "the admin key",
        env,
    )?;
    Ok(StatusConfig {
        path,
        admin_key_digest,
    })
}

fn limits(path: &str, raw: Option<Vec<Object<RawLimit>>>) -> Res<Vec<Limit>> {
    raw.unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, Object(l))| limit(&format!("{path}[{i}]"), l))
        .collect()
}

fn limit(path: &str, l: RawLimit) -> Res<Limit> {
    let metric = need(path, "metric", l.metric)?;
    // A valid JSON value starting like a number is one.
    let amount = need(path, "amount", l.amount)?;
    let amount = amount.get();
    if !amount.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(err(at(path, "amount"), "expected a number"));
    }
    let window = need(path, "window", l.window)?;
    let metric = match metric.as_str() {
        "requests" => Metric::Requests,
        "input_tokens" => Metric::InputTokens,
        "output_tokens" => Metric::OutputTokens,
        "total_tokens" => Metric::TotalTokens,
        "cost_usd" => Metric::CostMicroUsd,
        other => {
            return Err(err(
                at(path, "metric"),
                format!("unknown metric '{other}' (requests, input_tokens, output_tokens, total_tokens, cost_usd)"),
            ))
        }
    };
    let amount = match metric {
        // Cost budgets are written in USD and kept in micro-USD.
        Metric::CostMicroUsd => micro_usd(amount)
            .ok_or_else(|| err(at(path, "amount"), "must be a number of USD from 0.000001"))?,
        // serde_json's u64: the text of a whole number without exponent or fraction.
        _ => amount
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| err(at(path, "amount"), "must be a positive whole number"))?,
    };
    let window_ms = parse_window(&window).ok_or_else(|| {
        err(
            at(path, "window"),
            "must be a number and a unit: \"30s\", \"1m\", \"1h\", \"1d\"",
        )
    })?;
    Ok(Limit {
        metric,
        amount,
        window_ms,
    })
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
                disabled: false,
                max_in_flight: None,
                requests_per_minute: None,
                tokens_per_minute: None,
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
            models: HashMap::default(),
            probation: Probation::default(),
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
                "providers[0].keys[0].value: inline secrets must be marked `\"inline\": true`; prefer `env` or `sds`",
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
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1","sds":"oa-k1"}]}]}"#,
                "providers[0].keys[0]: give one of `env`, `value` or `sds`, not `env` and `sds`",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K1","value":"v","sds":"s"}]}]}"#,
                "providers[0].keys[0]: give one of `env`, `value` or `sds`, not `env` and `value` and `sds`",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","weight":2}]}]}"#,
                "providers[0].keys[0]: the key's secret is required: `env` (an environment variable), `sds` (a secret Envoy keeps) or an inline `value`",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","sds":"oa key"}]}]}"#,
                "providers[0].keys[0].sds: must be the name of an Envoy secret: 1-253 visible ASCII characters, no spaces",
            ),
            (
                r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","sds":""}]}]}"#,
                "providers[0].keys[0].sds: must be the name of an Envoy secret: 1-253 visible ASCII characters, no spaces",
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

    /// `{"providers":[P]}` with P the minimal provider and `extra` (a JSON fragment, which may
    /// give other keys), and `top` more top-level fields.
    fn cfg(top: &str, extra: &str) -> String {
        // A field given twice is refused: `extra`'s fields replace the minimal ones.
        let minimal = [
            r#""name":"oa","#,
            r#""type":"openai","#,
            r#""keys":[{"id":"k1","env":"K1"}],"#,
        ];
        let fields: String = minimal
            .iter()
            .filter(|f| f.split(':').next().is_some_and(|k| !extra.contains(k)))
            .copied()
            .collect();
        let provider = format!("{fields}{}", extra.trim_start_matches(','));
        format!(
            r#"{{{top}"providers":[{{{}}}]}}"#,
            provider.trim_end_matches(',')
        )
    }

    fn refused(top: &str, extra: &str) -> String {
        parse_str(&cfg(top, extra)).unwrap_err()
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path_and_the_accepted_names() {
        const LIMIT: &str = "expected one of: metric, amount, window";
        let cases: &[(&str, &str, String)] = &[
            (r#""rotaton":"x","#, "", "rotaton: unknown field, expected one of: consumers, providers, health, default_limits, prices, default_price, default_max_tokens, lower_max_tokens, max_request_bytes, max_sse_event_bytes, failure_mode, sticky_header, status, probation, aliases, passthrough_paths, models, default_max_in_flight, cache, retry_after_spread, waiting".into()),
            ("", r#","kyes":[]"#, "providers[0].kyes: unknown field, expected one of: name, type, host, base_path, api_version, anthropic_version, rotation, keys, models, probation".into()),
            ("", r#","keys":[{"id":"k1","env":"K1"},{"id":"k2","tokn":"K2"}]"#, "providers[0].keys[1].tokn: unknown field, expected one of: id, env, value, inline, sds, weight, disabled, max_in_flight, requests_per_minute, tokens_per_minute".into()),
            (r#""health":{"cooldown_s":5},"#, "", "health.cooldown_s: unknown field, expected one of: default_cooldown_s, auth_failure_cooldown_s, server_error_cooldown_s, circuit_failures, circuit_open_s, half_open_probes".into()),
            (r#""prices":{"gpt-4o":{"input":1,"output":2,"cache":1}},"#, "", "prices.gpt-4o.cache: unknown field, expected one of: input, output, cached_input".into()),
            (r#""default_limits":[{"metric":"requests","amount":1,"window":"1m","burst":2}],"#, "", format!("default_limits[0].burst: unknown field, {LIMIT}")),
            (r#""consumers":{"header":"x"},"#, "", "consumers.header: unknown field, expected one of: trusted_header, list, max_from_header".into()),
            (r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A","key":"x"}]},"#, "", "consumers.list[0].key: unknown field, expected one of: name, key_sha256, key_env, limits, model_limits, models, trim_oldest, max_in_flight, waiting".into()),
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
            ("", r#","rotation":"random""#, "providers[0].rotation: expected one of: round_robin, weighted, sticky, prompt_affinity"),
            ("", r#","models":{"a":1}"#, "providers[0].models.a: expected a string"),
            ("", r#","models":["a"]"#, "providers[0].models: expected an object"),
            (r#""failure_mode":true,"#, "", "failure_mode: expected one of: open, closed"),
            (r#""health":[],"#, "", "health: expected an object"),
            (r#""health":{"circuit_failures":4294967296},"#, "", "health.circuit_failures: is too large"),
            (r#""health":{"server_error_cooldown_s":-1},"#, "", "health.server_error_cooldown_s: expected a non-negative integer"),
            (r#""health":{"server_error_cooldown_s":0.5},"#, "", "health.server_error_cooldown_s: expected a non-negative integer"),
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
            r#""consumers":null,"health":null,"default_limits":null,"prices":null,"max_request_bytes":null,"lower_max_tokens":null,"failure_mode":null,"sticky_header":null,"status":null,"default_price":null,"#,
            r#","host":null,"base_path":null,"rotation":null,"models":null,"keys":[{"id":"k1","env":"K1","value":null,"inline":null,"weight":null}]"#,
        ))
        .unwrap();
        assert!(matches!(c.consumers, Consumers::Anonymous));
        assert_eq!(
            (
                c.health.circuit_failures,
                c.health.default_cooldown_ms,
                c.health.server_error_cooldown_ms
            ),
            (5, 30_000, 1_000)
        );
        assert_eq!(
            (c.max_request_bytes, c.lower_max_tokens, c.failure_mode),
            (4 << 20, false, FailureMode::Open)
        );
        assert_eq!(
            (c.sticky_header, c.status, c.default_price),
            (None, None, None)
        );
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
                "health":{"default_cooldown_s":1,"auth_failure_cooldown_s":2,"server_error_cooldown_s":6,"circuit_failures":3,"circuit_open_s":4,"half_open_probes":5},
                "default_limits":[{"metric":"total_tokens","amount":9,"window":"day"}],"prices":{"m":{"input":1,"output":2.5}},
                "default_max_tokens":10,"lower_max_tokens":true,"max_request_bytes":11,"max_sse_event_bytes":2048,"failure_mode":"closed","sticky_header":"X-S","status":{"path":"/st","admin_key_env":"TEAM_A"},
                "default_price":{"input":3,"output":4,"cached_input":0.5}}"#,
        )
        .unwrap();
        let Consumers::TrustedHeader { header, list, .. } = &c.consumers else {
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
                h.server_error_cooldown_ms,
                h.circuit_failures,
                h.circuit_open_ms,
                h.half_open_probes
            ),
            (1000, 2000, 6000, 3, 4000, 5)
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
            c.default_price,
            Some(Price {
                input_per_mtok: 3.0,
                output_per_mtok: 4.0,
                cached_input_per_mtok: 0.5
            })
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
            (c.failure_mode, c.sticky_header.as_deref(), c.status),
            (
                FailureMode::Closed,
                Some("x-s"),
                Some(StatusConfig {
                    path: "/st".into(),
                    admin_key_digest: Some(consumer_key::digest(b"team-a-secret"))
                })
            )
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
    fn sds_keys_name_a_secret_and_hold_none() {
        let c = parse_str(r#"{"providers":[{"name":"an","type":"anthropic","keys":[{"id":"k1","sds":"kubernetes://llm/anthropic-1"},{"id":"k2","env":"K1","disabled":true}]}]}"#)
            .unwrap();
        let k = &c.providers[0].keys;
        assert_eq!(
            k[0].source,
            KeySecret::Sds("kubernetes://llm/anthropic-1".into())
        );
        assert_eq!(k[0].secret, "");
        assert_eq!((k[1].secret.as_str(), k[1].disabled), ("sk-one", true));
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn max_from_header_bounds_header_named_consumers_only() {
        let consumers = |section: &str| {
            parse_str(&cfg(&format!(r#""consumers":{section},"#), "")).map(|c| match c.consumers {
                Consumers::TrustedHeader {
                    max_from_header, ..
                } => max_from_header,
                _ => 0,
            })
        };
        assert_eq!(
            consumers(r#"{"trusted_header":"x-team"}"#),
            Ok(DEFAULT_MAX_FROM_HEADER)
        );
        assert_eq!(DEFAULT_MAX_FROM_HEADER, 1000);
        assert_eq!(
            consumers(r#"{"trusted_header":"x-team","max_from_header":5}"#),
            Ok(5)
        );
        let cases: &[(&str, &str)] = &[
            (
                r#"{"trusted_header":"x-team","max_from_header":0}"#,
                "consumers.max_from_header: must be between 1 and 100000",
            ),
            (
                r#"{"trusted_header":"x-team","max_from_header":100001}"#,
                "consumers.max_from_header: must be between 1 and 100000",
            ),
            (
                r#"{"trusted_header":"x-team","max_from_header":-1}"#,
                "consumers.max_from_header: expected a non-negative integer",
            ),
            (
                r#"{"trusted_header":"x-team","max_from_header":"5"}"#,
                "consumers.max_from_header: expected a non-negative integer",
            ),
            (
                r#"{"list":[{"name":"a","key_env":"TEAM_A"}],"max_from_header":5}"#,
                "consumers.max_from_header: applies only with consumers.trusted_header",
            ),
            (
                r#"{"trusted_header":"x-team","list":[{"name":"a"}],"max_from_header":5}"#,
                "consumers.max_from_header: applies only when consumers.list is empty (the list names every consumer already)",
            ),
        ];
        for (section, want) in cases {
            assert_eq!(consumers(section).unwrap_err(), *want, "for {section}");
        }
    }

    #[test]
    fn lookups_by_name_key_model_and_provider() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let c = parse_str(&format!(
            r#"{{"consumers":{{"list":[{{"name":"a","key_env":"TEAM_A","model_limits":{{"only-limited":[{{"metric":"requests","amount":1,"window":"1m"}}]}}}},
                {{"name":"b","key_sha256":"{abc}"}}]}},
                "prices":{{"priced":{{"input":1,"output":1}}}},
                "providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k1","env":"K1"}}]}},
                             {{"name":"an","type":"anthropic","keys":[{{"id":"k1","env":"K2"}}],"models":{{"mapped":"claude"}}}}]}}"#
        ))
        .unwrap();
        assert_eq!(c.consumer("b").map(|c| c.name.as_str()), Some("b"));
        assert!(c.consumer("z").is_none());
        let by_key = |k: &[u8]| {
            c.consumer_by_key(&consumer_key::digest(k))
                .map(|c| c.name.clone())
        };
        assert_eq!(by_key(b"team-a-secret").as_deref(), Some("a"));
        assert_eq!(by_key(b"abc").as_deref(), Some("b"));
        assert_eq!(by_key(b"abd"), None);
        for m in ["only-limited", "priced", "mapped"] {
            assert!(c.is_known_model(m), "{m}");
        }
        assert!(
            !c.is_known_model("claude"),
            "a provider's own name for it is not the client's"
        );
        assert_eq!(
            c.provider("an").map(|(i, p)| (i, p.name.as_str())),
            Some((1, "an"))
        );
        assert!(c.provider("zz").is_none());
        assert_eq!(c.consumer_list().len(), 2);
    }

    #[test]
    fn of_two_consumers_with_one_key_the_later_has_it_with_a_warning() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let c = parse_str(&cfg(
            &format!(
                r#""consumers":{{"list":[{{"name":"a","key_sha256":"{abc}"}},{{"name":"b","key_env":"TEAM_A"}},{{"name":"c","key_sha256":"{}"}}]}},"#,
                abc.to_uppercase()
            ),
            "",
        ))
        .unwrap();
        let by_key = |k: &[u8]| {
            c.consumer_by_key(&consumer_key::digest(k))
                .map(|c| c.name.clone())
        };
        assert_eq!(by_key(b"abc").as_deref(), Some("c"));
        assert_eq!(by_key(b"team-a-secret").as_deref(), Some("b"));
        assert_eq!(
            c.warnings,
            ["consumers.list[2]: the same key as consumers.list[0] ('a'): requests with it are consumer 'c'"]
        );
        assert_eq!(
            refused(
                r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A"},{"name":"a","key_env":"K1"}]},"#,
                ""
            ),
            "consumers.list[1].name: duplicate consumer 'a'"
        );
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
                disabled: false,
                max_in_flight: None,
                requests_per_minute: None,
                tokens_per_minute: None,
            })
            .collect();
        let s = smooth_weighted_schedule(&keys);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn probation_defaults_top_level_and_per_provider_override_field_by_field() {
        let parsed =
            |top: &str, extra: &str| parse_str(&cfg(top, extra)).map(|c| c.providers[0].probation);
        assert_eq!(parsed("", ""), Ok(Probation::default()));
        assert_eq!(
            (
                Probation::default().requests,
                Probation::default().share_percent
            ),
            (20, 10)
        );
        let top = r#""probation":{"requests":5,"share_percent":25},"#;
        assert_eq!(
            parsed(top, ""),
            Ok(Probation {
                requests: 5,
                share_percent: 25
            })
        );
        assert_eq!(
            parsed(top, r#","probation":{"requests":0}"#),
            Ok(Probation {
                requests: 0,
                share_percent: 25
            }),
            "the provider's own field wins, the other comes from the top level"
        );
        let cases = [
            (
                r#""probation":{"share_percent":0},"#,
                "",
                "probation.share_percent: must be between 1 and 100",
            ),
            (
                "",
                r#","probation":{"share_percent":101}"#,
                "providers[0].probation.share_percent: must be between 1 and 100",
            ),
            (
                "",
                r#","probation":{"requests":1000001}"#,
                "providers[0].probation.requests: must be at most 1000000",
            ),
            (
                "",
                r#","probation":{"requests":-1}"#,
                "providers[0].probation.requests: expected a non-negative integer",
            ),
            (
                r#""probation":{"request":3},"#,
                "",
                "probation.request: unknown field, expected one of: requests, share_percent",
            ),
        ];
        for (top, extra, want) in cases {
            assert_eq!(refused(top, extra), want, "{top} {extra}");
        }
        assert_eq!(
            parse_str(&cfg("", r#","rotation":"prompt_affinity""#))
                .unwrap()
                .providers[0]
                .rotation,
            Rotation::PromptAffinity
        );
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
    fn status_section() {
        let status = |section: &str| {
            parse_str(&cfg(&format!(r#""status":{section},"#), "")).map(|c| c.status)
        };
        assert_eq!(
            status(r#"{"path":"/tollgate/status"}"#),
            Ok(Some(StatusConfig {
                path: "/tollgate/status".into(),
                admin_key_digest: None
            }))
        );
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(
            status(&format!(r#"{{"path":"/s","admin_key_sha256":"{abc}"}}"#))
                .map(|s| s.and_then(|s| s.admin_key_digest)),
            Ok(Some(consumer_key::digest(b"abc")))
        );
        assert_eq!(
            status(r#"{"path":"/s","admin_key_env":"TEAM_A"}"#)
                .map(|s| s.and_then(|s| s.admin_key_digest)),
            Ok(Some(consumer_key::digest(b"team-a-secret")))
        );
        let cases: &[(&str, &str)] = &[
            (r#"{}"#, "status.path: missing"),
            (r#"{"path":null}"#, "status.path: missing"),
            (r#"{"path":"s"}"#, "status.path: must start with '/'"),
            (
                &format!(r#"{{"path":"/s","admin_key_sha256":"{abc}","admin_key_env":"TEAM_A"}}"#),
                "status.admin_key_env: give either `admin_key_sha256` or `admin_key_env`, not both",
            ),
            (
                r#"{"path":"/s","admin_key_sha256":"abc"}"#,
                "status.admin_key_sha256: must be 64 hex characters (sha256 of the admin key)",
            ),
            (
                r#"{"path":"/s","admin_key_env":"NOPE"}"#,
                "status.admin_key_env: NOPE is not set (list it in vm_config.environment_variables.host_env_keys)",
            ),
            (r#"{"path":"/s","admin_key_env":"EMPTY"}"#, "status.admin_key_env: EMPTY is empty"),
            (
                r#"{"path":"/s","admin_key":"x"}"#,
                "status.admin_key: unknown field, expected one of: path, admin_key_sha256, admin_key_env",
            ),
            (r#""/s""#, "status: expected an object"),
        ];
        for (section, want) in cases {
            assert_eq!(status(section).unwrap_err(), *want, "for {section}");
        }
    }

    #[test]
    fn status_path_is_refused_with_its_replacement() {
        let want = r#"status_path: replaced by "status": {"path": ..., "admin_key_sha256" or "admin_key_env"}"#;
        assert_eq!(refused(r#""status_path":"/st","#, ""), want);
        assert_eq!(refused(r#""status_path":null,"#, ""), want);
    }

    #[test]
    fn unpriced_models_take_the_default_price_and_cost_limits_are_found() {
        let c = parse_str(&cfg(
            r#""consumers":{"list":[{"name":"a","key_env":"TEAM_A","model_limits":{"m2":[{"metric":"cost_usd","amount":1,"window":"1d"}]}},{"name":"b","key_env":"K1","limits":[{"metric":"requests","amount":1,"window":"1d"}]}]},
                "default_limits":[{"metric":"cost_usd","amount":5,"window":"1d"}],
                "prices":{"m":{"input":1,"output":2}},"default_price":{"input":10,"output":20},"#,
            "",
        ))
        .unwrap();
        assert_eq!(c.price_for("m").map(|p| p.input_per_mtok), Some(1.0));
        assert_eq!(c.price_for("other").map(|p| p.input_per_mtok), Some(10.0));
        assert_eq!(
            c.price_for("other").map(|p| p.cached_input_per_mtok),
            Some(10.0)
        );
        assert!(
            c.has_cost_limit("a", "m"),
            "a has no own limits: the defaults"
        );
        assert!(c.has_cost_limit("a", "m2"));
        assert!(
            !c.has_cost_limit("b", "m2"),
            "b's own limits replace the defaults"
        );
        assert!(c.has_cost_limit("anonymous", "x"));
        let bare = parse_str(MIN).unwrap();
        assert_eq!(bare.price_for("m"), None);
        assert!(!bare.has_cost_limit("anonymous", "m"));
        assert_eq!(
            refused(r#""default_price":{"input":1},"#, ""),
            "default_price.output: missing"
        );
        assert_eq!(
            refused(r#""default_price":{"input":-1,"output":1},"#, ""),
            "default_price: prices must be finite, non-negative USD per million tokens"
        );
        assert_eq!(
            refused(r#""default_price":{"input":1,"output":1,"cache":1},"#, ""),
            "default_price.cache: unknown field, expected one of: input, output, cached_input"
        );
    }

    #[test]
    fn only_objects_are_read_as_objects_and_no_field_twice() {
        assert_eq!(
            parse_str(r#"{"providers":[["oa","openai",null,null,null,null,null,[]]]}"#)
                .unwrap_err(),
            "providers[0]: expected an object"
        );
        assert_eq!(
            refused("", r#","keys":[["k1","K1"]]"#),
            "providers[0].keys[0]: expected an object"
        );
        assert_eq!(
            parse_str(r#"{"providers":[{"name":"oa","name":"ob","type":"openai"}]}"#).unwrap_err(),
            "providers[0].name: given twice"
        );
        assert_eq!(
            refused(r#""max_request_bytes":1,"max_request_bytes":2,"#, ""),
            "max_request_bytes: given twice"
        );
        assert_eq!(
            parse_str(&format!("{MIN} {{}}")).unwrap_err(),
            "invalid JSON: trailing characters at line 1 column 79"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(200_000);
        for input in [
            deep.clone(),
            cfg(
                &format!(r#""default_limits":[{{"metric":"requests","amount":{deep}"#),
                "",
            ),
            cfg(&format!(r#""rotaton":{deep}"#), ""),
        ] {
            assert!(parse_str(&input).is_err());
        }
    }

    #[test]
    fn serde_messages_in_the_configs_words() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "unknown field `x`, expected one of `a`, `b`, `c`",
                "x",
                "unknown field, expected one of: a, b, c",
            ),
            (
                "unknown field `x`, expected `a` or `b`",
                "x",
                "unknown field, expected one of: a, b",
            ),
            (
                "unknown field `x`, expected `a`",
                "x",
                "unknown field, expected one of: a",
            ),
            // The client's text may say anything, backticks and ", expected " included.
            (
                "unknown field `x`, y`, expected `a`",
                "x`, y",
                "unknown field, expected one of: a",
            ),
            (
                "invalid type: string \"a, expected b\", expected u32",
                "f",
                "expected a non-negative integer",
            ),
            (
                "invalid value: integer `-1`, expected u64",
                "f",
                "expected a non-negative integer",
            ),
            (
                "invalid value: integer `4294967296`, expected u32",
                "f",
                "is too large",
            ),
            (
                "invalid type: floating point `2.5`, expected u32",
                "f",
                "expected a non-negative integer",
            ),
            (
                "invalid type: string \"1\", expected f64",
                "f",
                "expected a number",
            ),
            (
                "invalid type: map, expected a sequence",
                "f",
                "expected an array",
            ),
            (
                "invalid type: sequence, expected a map",
                "f",
                "expected an object",
            ),
            (
                "invalid value: string \"x\", expected one of: a, b",
                "f",
                "expected one of: a, b",
            ),
            (
                "something else, expected anything",
                "f",
                "something else, expected anything",
            ),
            ("number out of range", "f", "number out of range"),
        ];
        for (msg, field, want) in cases {
            assert_eq!(reword(msg, field), *want, "for {msg}");
        }
    }

    #[test]
    fn fuzz_regressions_and_the_demo_corpus_entry() {
        let any = |_: &str| Some("sk-x".to_string());
        let cost = include_bytes!("../fuzz/regressions/config/cost_usd_rounds_to_zero.json");
        assert_eq!(
            parse(cost, &any)
                .map_err(|e| e.to_string())
                .err()
                .as_deref(),
            Some("default_limits[0].amount: must be a number of USD from 0.000001")
        );
        let demo = parse(include_bytes!("../fuzz/corpus/config/demo.json"), &any);
        assert_eq!(
            demo.map(|c| c.status.map(|s| s.path)),
            Ok(Some("/tollgate/status".to_string()))
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
