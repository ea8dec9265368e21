//! Model aliases (`aliases`): a client-facing name (`fast`, `smart`) that each provider serves with a
//! model of its own, so that teams change models in one place.
//!
//! ```json
//! "aliases": {"fast": "gpt-4o-mini",
//!             "smart": {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5"}}
//! ```
//!
//! - A string names a model the gateway serves: each provider serves the alias exactly as it would
//!   serve that model (through its own `models` map), and prices it as that model.
//! - An object names, per provider (by provider name), the model that provider is called with, as it
//!   is. A provider it does not name does not serve the alias.
//!
//! Everything is resolved here, at parse, into one table per alias indexed by provider: a request
//! resolves an alias with one map lookup, however many aliases, models or providers there are.

use super::{at, err, Config, Provider, Res};
use crate::limit::quota::Price;
use crate::maps::HashMap;
use serde_json::Value;
use std::collections::BTreeMap;

/// What one provider is sent for an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The model the provider is called with.
    pub model: String,
    /// The name `prices` prices the request by: the model the alias names (string form), or the
    /// provider's own model (object form).
    pub priced_as: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alias {
    /// Per provider, in configuration order: None where that provider does not serve the alias.
    pub targets: Vec<Option<Target>>,
}

#[derive(Debug, Clone, Default)]
pub struct Aliases {
    by_name: HashMap<String, Alias>,
    /// The aliases' names, sorted (the order the gateway lists them in).
    names: Vec<String>,
}

impl Aliases {
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Alias> {
        if self.by_name.is_empty() {
            return None;
        }
        self.by_name.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every alias's name, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Every alias with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Alias)> {
        self.names
            .iter()
            .filter_map(|n| Some((n.as_str(), self.by_name.get(n.as_str())?)))
    }
}

impl Config {
    /// The model provider `provider` (configuration order) is called with for the client's `model`:
    /// an alias resolved for that provider, else the provider's own `models` map. None when that
    /// provider does not serve it.
    pub fn map_model<'a>(&'a self, provider: usize, model: &'a str) -> Option<&'a str> {
        match self.aliases.get(model) {
            Some(a) => a.targets.get(provider)?.as_ref().map(|t| t.model.as_str()),
            None => self.providers.get(provider)?.map_model(model),
        }
    }

    /// The name a request for `model` served by `provider` is priced by (`prices`): the model
    /// itself, or for an alias the model it stands for on that provider.
    pub fn priced_as<'a>(&'a self, provider: usize, model: &'a str) -> &'a str {
        self.aliases
            .get(model)
            .and_then(|a| a.targets.get(provider))
            .and_then(Option::as_ref)
            .map_or(model, |t| t.priced_as.as_str())
    }
}

/// A model or alias name as the configuration may give it: what clients write in `model`. `*` is
/// kept for the prefix patterns of allow-lists.
pub(super) fn valid_model_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.contains('*')
        && s.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

pub(super) const MODEL_NAME_RULE: &str =
    "must be a model name: 1-256 characters, no spaces, control characters or '*'";

/// Whether some provider serves the model a client names `model` (not an alias).
pub(super) fn served(providers: &[Provider], model: &str) -> bool {
    providers.iter().any(|p| p.map_model(model).is_some())
}

pub(super) fn validate(
    raw: Option<BTreeMap<String, Value>>,
    providers: &[Provider],
    prices: &HashMap<String, Price>,
) -> Res<Aliases> {
    let raw = raw.unwrap_or_default();
    let mut by_name = HashMap::with_capacity_and_hasher(raw.len(), Default::default());
    for (name, value) in &raw {
        let path = at("aliases", name);
        if !valid_model_name(name) {
            return Err(err(path, MODEL_NAME_RULE));
        }
        if let Some((i, _)) = providers.iter().enumerate().find(|(_, p)| {
            p.models.contains_key(name.as_str()) || p.models.values().any(|m| m == name)
        }) {
            return Err(err(
                path,
                format!("shadows the model '{name}' that providers[{i}].models names: an alias needs a name of its own"),
            ));
        }
        if prices.contains_key(name.as_str()) {
            return Err(err(
                path,
                format!("shadows the model '{name}' that prices names: an alias is priced as the model it stands for, so give it a name of its own"),
            ));
        }
        let targets = match value {
            Value::String(model) => one_model(&path, model, providers, &raw)?,
            Value::Object(per) => per_provider(&path, per, providers)?,
            _ => {
                return Err(err(
                    path,
                    "expected a model name, or an object naming a model per provider",
                ))
            }
        };
        by_name.insert(name.clone(), Alias { targets });
    }
    Ok(Aliases {
        by_name,
        names: raw.into_keys().collect(),
    })
}

/// The string form: every provider that serves `model` serves the alias, as that model.
fn one_model(
    path: &str,
    model: &str,
    providers: &[Provider],
    aliases: &BTreeMap<String, Value>,
) -> Res<Vec<Option<Target>>> {
    if aliases.contains_key(model) {
        return Err(err(
            path,
            format!("'{model}' is an alias: an alias names a model, not another alias"),
        ));
    }
    if !valid_model_name(model) {
        return Err(err(path, MODEL_NAME_RULE));
    }
    let targets: Vec<Option<Target>> = providers
        .iter()
        .map(|p| {
            p.map_model(model).map(|m| Target {
                model: m.to_string(),
                priced_as: model.to_string(),
            })
        })
        .collect();
    if targets.iter().all(Option::is_none) {
        return Err(err(
            path,
            format!("no provider serves '{model}' (every provider's `models` map leaves it out)"),
        ));
    }
    Ok(targets)
}

/// The object form: the providers it names, each called with the model given for it.
fn per_provider(
    path: &str,
    per: &serde_json::Map<String, Value>,
    providers: &[Provider],
) -> Res<Vec<Option<Target>>> {
    if per.is_empty() {
        return Err(err(
            path,
            "names no provider: give a model per provider name, or one model name",
        ));
    }
    let mut targets: Vec<Option<Target>> = vec![None; providers.len()];
    for (provider, model) in per {
        let field = at(path, provider);
        let Some(i) = providers.iter().position(|p| &p.name == provider) else {
            let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
            return Err(err(
                field,
                format!(
                    "no provider is named '{provider}' (providers: {})",
                    names.join(", ")
                ),
            ));
        };
        let Some(model) = model.as_str().filter(|m| valid_model_name(m)) else {
            return Err(err(field, MODEL_NAME_RULE));
        };
        let p = &providers[i];
        if !p.models.is_empty() && !p.models.values().any(|m| m == model) {
            let mut sent: Vec<&str> = p.models.values().map(String::as_str).collect();
            sent.sort_unstable();
            sent.dedup();
            return Err(err(
                field,
                format!(
                    "providers[{i}].models never sends '{model}' to this provider (it sends: {})",
                    sent.join(", ")
                ),
            ));
        }
        targets[i] = Some(Target {
            model: model.to_string(),
            priced_as: model.to_string(),
        });
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Config};

    const PROVIDERS: &str = r#""providers":[
        {"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]},
        {"name":"an","type":"anthropic","keys":[{"id":"k","env":"K"}],
         "models":{"gpt-4o-mini":"claude-haiku-4-5","gpt-4o":"claude-sonnet-4-5"}}]"#;

    fn parsed(aliases: &str) -> Result<Config, String> {
        let json = format!(
            r#"{{"aliases":{aliases},"prices":{{"gpt-4o":{{"input":2.5,"output":10}}}},{PROVIDERS}}}"#
        );
        parse(json.as_bytes(), &|_| Some("sk".to_string())).map_err(|e| e.to_string())
    }

    #[test]
    fn a_string_alias_is_served_as_the_model_it_names_by_every_provider_that_serves_it() {
        let c = parsed(r#"{"fast":"gpt-4o-mini","smart":{"oa":"gpt-4o","an":"claude-sonnet-4-5"},"oa-only":{"oa":"o3"}}"#)
            .unwrap();
        assert_eq!(c.map_model(0, "fast"), Some("gpt-4o-mini"));
        assert_eq!(c.map_model(1, "fast"), Some("claude-haiku-4-5"));
        assert_eq!(c.priced_as(1, "fast"), "gpt-4o-mini");
        assert_eq!(c.map_model(0, "smart"), Some("gpt-4o"));
        assert_eq!(c.map_model(1, "smart"), Some("claude-sonnet-4-5"));
        assert_eq!(c.priced_as(1, "smart"), "claude-sonnet-4-5");
        assert_eq!(c.map_model(0, "oa-only"), Some("o3"));
        assert_eq!(c.map_model(1, "oa-only"), None, "a provider not named");
        // Models that are not aliases go through the provider's own map, as before.
        assert_eq!(c.map_model(1, "gpt-4o"), Some("claude-sonnet-4-5"));
        assert_eq!(c.map_model(1, "o3"), None);
        assert_eq!(c.map_model(0, "o3"), Some("o3"));
        assert_eq!(c.priced_as(0, "gpt-4o"), "gpt-4o");
        assert_eq!(c.map_model(7, "fast"), None);
        assert_eq!(c.aliases.names(), ["fast", "oa-only", "smart"]);
    }

    #[test]
    fn bad_aliases_are_refused_with_the_field_named() {
        let cases = [
            (
                r#"{"gpt-4o":"gpt-4o-mini"}"#,
                "aliases.gpt-4o: shadows the model 'gpt-4o' that providers[1].models names: an alias needs a name of its own",
            ),
            (
                r#"{"claude-haiku-4-5":"gpt-4o-mini"}"#,
                "aliases.claude-haiku-4-5: shadows the model 'claude-haiku-4-5' that providers[1].models names: an alias needs a name of its own",
            ),
            (
                r#"{"fast":{"azure":"gpt-4o"}}"#,
                "aliases.fast.azure: no provider is named 'azure' (providers: oa, an)",
            ),
            (
                r#"{"fast":{"an":"claude-x"}}"#,
                "aliases.fast.an: providers[1].models never sends 'claude-x' to this provider (it sends: claude-haiku-4-5, claude-sonnet-4-5)",
            ),
            (
                r#"{"fast":"smart","smart":"gpt-4o"}"#,
                "aliases.fast: 'smart' is an alias: an alias names a model, not another alias",
            ),
            (
                r#"{"fast":{}}"#,
                "aliases.fast: names no provider: give a model per provider name, or one model name",
            ),
            (
                r#"{"fast":3}"#,
                "aliases.fast: expected a model name, or an object naming a model per provider",
            ),
            (
                r#"{"fast":""}"#,
                "aliases.fast: must be a model name: 1-256 characters, no spaces, control characters or '*'",
            ),
            (
                r#"{"fa st":"gpt-4o"}"#,
                "aliases.fa st: must be a model name: 1-256 characters, no spaces, control characters or '*'",
            ),
            (
                r#"{"fast*":"gpt-4o"}"#,
                "aliases.fast*: must be a model name: 1-256 characters, no spaces, control characters or '*'",
            ),
            (
                r#"{"fast":{"oa":7}}"#,
                "aliases.fast.oa: must be a model name: 1-256 characters, no spaces, control characters or '*'",
            ),
            ("[]", "aliases: expected an object"),
        ];
        for (aliases, want) in cases {
            assert_eq!(parsed(aliases).err().as_deref(), Some(want), "{aliases}");
        }
    }

    #[test]
    fn an_alias_no_provider_serves_and_one_that_shadows_a_price_are_refused() {
        let only_mapped = r#"{"aliases":{"fast":"gpt-5"},"prices":{"cheap":{"input":1,"output":1}},"providers":[
            {"name":"an","type":"anthropic","keys":[{"id":"k","env":"K"}],"models":{"gpt-4o":"claude-sonnet-4-5"}}]}"#;
        assert_eq!(
            parse(only_mapped.as_bytes(), &|_| Some("sk".into()))
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("aliases.fast: no provider serves 'gpt-5' (every provider's `models` map leaves it out)")
        );
        assert_eq!(
            parsed(r#"{"gpt-4o":"x"}"#).err().as_deref(),
            Some("aliases.gpt-4o: shadows the model 'gpt-4o' that providers[1].models names: an alias needs a name of its own")
        );
        let priced = parse(
            r#"{"aliases":{"cheap":"m"},"prices":{"cheap":{"input":1,"output":1}},"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#.as_bytes(),
            &|_| Some("sk".into()),
        );
        assert_eq!(
            priced.err().map(|e| e.to_string()).as_deref(),
            Some("aliases.cheap: shadows the model 'cheap' that prices names: an alias is priced as the model it stands for, so give it a name of its own")
        );
    }

    #[test]
    fn without_aliases_nothing_is_looked_up() {
        let c = parsed("{}").unwrap();
        assert!(c.aliases.is_empty());
        assert_eq!(c.map_model(0, "anything"), Some("anything"));
        assert_eq!(c.priced_as(0, "anything"), "anything");
    }
}
