//! What a consumer may ask for, and what the gateway answers by itself:
//! - `consumers.list[].models`: the models and aliases a consumer may name in `model`, each exactly or
//!   by a prefix ending in `*` (`claude-*`);
//! - `passthrough_paths`: paths outside the APIs tollgate counts that the operator lets through to
//!   providers (`/v1/audio/*`), each request counted as one request;
//! - the gateway's own model list (`GET /v1/models`), built once here from the names the
//!   configuration gives.

use super::aliases::{self, Aliases, MODEL_NAME_RULE};
use super::{at, err, Consumer, Consumers, Provider, Res};
use crate::limit::quota::Price;
use crate::maps::{HashMap, HashSet};

/// Names, each exact or a prefix (given with a trailing `*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    exact: HashSet<String>,
    prefixes: Vec<String>,
    /// As the configuration gives them, for messages: `gpt-4o-mini, claude-*`.
    shown: String,
}

impl Patterns {
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// One hash lookup, then the prefixes this list gives (a handful: the list's own size, not the
    /// configuration's).
    pub fn matches(&self, name: &str) -> bool {
        self.exact.contains(name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn exact(&self) -> impl Iterator<Item = &str> {
        self.exact.iter().map(String::as_str)
    }

    /// `items` at `path`, each checked by `check` (which names what is wrong with it, or None).
    fn parse(path: &str, items: Vec<String>, check: impl Fn(&str) -> Option<String>) -> Res<Self> {
        let mut out = Patterns {
            shown: items.join(", "),
            ..Patterns::default()
        };
        for (i, item) in items.into_iter().enumerate() {
            let field = format!("{path}[{i}]");
            let (stem, prefix) = match item.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (item.as_str(), false),
            };
            if let Some(why) = check(stem) {
                return Err(err(field, why));
            }
            if prefix {
                out.prefixes.push(stem.to_string());
            } else {
                out.exact.insert(item);
            }
        }
        Ok(out)
    }
}

/// A consumer's `models` (syntax only: whether each name is served is checked once aliases are
/// known, by [`validate`]).
pub(super) fn model_list(path: &str, raw: Option<Vec<String>>) -> Res<Option<Patterns>> {
    let Some(items) = raw else { return Ok(None) };
    if items.is_empty() {
        return Err(err(
            path,
            "is empty: list the models this consumer may use, or remove `models` to allow every model",
        ));
    }
    Patterns::parse(path, items, |stem| {
        if stem.is_empty() {
            Some("'*' alone allows every model: remove `models` instead".into())
        } else if !aliases::valid_model_name(stem) {
            Some(format!(
                "{MODEL_NAME_RULE}, or a prefix of one followed by '*'"
            ))
        } else {
            None
        }
    })
    .map(Some)
}

/// A model the gateway lists (`GET /v1/models`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    /// The first provider, in failover order, that serves it.
    pub owned_by: String,
    pub alias: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Access {
    pub passthrough: Patterns,
    /// Some consumer has a `models` list: only then does admission look for one.
    pub restricted: bool,
    /// Models the configuration names (sorted), then aliases (sorted): what the gateway lists,
    /// before a consumer's own `models` narrows it.
    pub listed: Vec<Listed>,
    /// Every model name the configuration gives, the providers' own included: a served model by
    /// one of these names keeps it in metric names, any other is `other`.
    named: HashSet<String>,
}

impl Access {
    /// What the gateway lists to a consumer whose `models` is `allowed` (None: every model).
    pub fn listed_for<'a>(
        &'a self,
        allowed: Option<&'a Patterns>,
    ) -> impl Iterator<Item = &'a Listed> + 'a {
        self.listed
            .iter()
            .filter(move |l| allowed.is_none_or(|a| a.matches(&l.id)))
    }

    /// Whether the configuration gives this model name anywhere (a provider's own model included).
    pub fn names_model(&self, model: &str) -> bool {
        self.named.contains(model)
    }
}

pub(super) fn validate(
    passthrough: Option<Vec<String>>,
    consumers: &Consumers,
    providers: &[Provider],
    aliases: &Aliases,
    prices: &HashMap<String, Price>,
) -> Res<Access> {
    let passthrough = Patterns::parse(
        "passthrough_paths",
        passthrough.unwrap_or_default(),
        |stem| {
            let ok = stem.starts_with('/')
                && !stem.contains(['?', '#', '*'])
                && stem.bytes().all(|b| b.is_ascii_graphic());
            (!ok).then(|| {
                "must be a path starting with '/' (no query), or a prefix of one followed by '*'"
                    .to_string()
            })
        },
    )?;
    let list: &[Consumer] = match consumers {
        Consumers::Anonymous => &[],
        Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => l,
    };
    for (i, c) in list.iter().enumerate() {
        let Some(models) = &c.models else { continue };
        let mut unserved: Vec<&str> = models
            .exact()
            .filter(|m| !aliases.contains(m) && !aliases::served(providers, m))
            .collect();
        unserved.sort_unstable();
        if let Some(m) = unserved.first() {
            return Err(err(
                at(&format!("consumers.list[{i}]"), "models"),
                format!("'{m}' is neither an alias nor a model any provider serves"),
            ));
        }
    }
    let restricted = list.iter().any(|c| c.models.is_some());

    // The names a client may write: the providers' `models` names, priced models, models with
    // limits of their own, and models a consumer is allowed by name. Not a provider's own model
    // names (the right side of a `models` map), which a client does not name.
    let mut candidates: HashSet<&str> = HashSet::default();
    for p in providers {
        candidates.extend(p.models.keys().map(String::as_str));
    }
    candidates.extend(prices.keys().map(String::as_str));
    for c in list {
        candidates.extend(c.model_limits.keys().map(String::as_str));
        candidates.extend(c.models.iter().flat_map(Patterns::exact));
    }
    let mut models: Vec<&str> = candidates
        .into_iter()
        .filter(|m| *m != "*" && !aliases.contains(m) && aliases::served(providers, m))
        .collect();
    models.sort_unstable();
    let mut named: HashSet<String> = models.iter().map(|m| m.to_string()).collect();
    for p in providers {
        named.extend(p.models.values().cloned());
    }
    let first_serving = |m: &str| {
        providers
            .iter()
            .find(|p| p.map_model(m).is_some())
            .map(|p| p.name.clone())
            .unwrap_or_default()
    };
    let mut listed: Vec<Listed> = models
        .into_iter()
        .map(|m| Listed {
            id: m.to_string(),
            owned_by: first_serving(m),
            alias: false,
        })
        .collect();
    for (name, alias) in aliases.iter() {
        let owner = alias
            .targets
            .iter()
            .zip(providers)
            .find(|(t, _)| t.is_some())
            .map(|(_, p)| p.name.clone())
            .unwrap_or_default();
        listed.push(Listed {
            id: name.to_string(),
            owned_by: owner,
            alias: true,
        });
        for t in alias.targets.iter().flatten() {
            named.insert(t.model.clone());
            named.insert(t.priced_as.clone());
        }
        named.insert(name.to_string());
    }
    Ok(Access {
        passthrough,
        restricted,
        listed,
        named,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Config, Consumers};

    fn parsed(top: &str, consumer_models: &str) -> Result<Config, String> {
        let json = format!(
            r#"{{{top}"consumers":{{"list":[{{"name":"a","key_env":"K"{consumer_models}}},{{"name":"b","key_env":"K2"}}]}},
                "prices":{{"gpt-4o":{{"input":2.5,"output":10}}}},
                "providers":[
                  {{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}],"models":{{"gpt-4o":"gpt-4o","gpt-4o-mini":"gpt-4o-mini"}}}},
                  {{"name":"an","type":"anthropic","keys":[{{"id":"k","env":"K"}}],
                   "models":{{"gpt-4o-mini":"claude-haiku-4-5","claude-haiku-4-5":"claude-haiku-4-5","*":"claude-haiku-4-5"}}}}]}}"#
        );
        let env = |v: &str| Some(format!("secret-{v}"));
        parse(json.as_bytes(), &env).map_err(|e| e.to_string())
    }

    fn models_of(c: &Config, i: usize) -> Option<&super::Patterns> {
        match &c.consumers {
            Consumers::Keys(l) => l.get(i)?.models.as_ref(),
            _ => None,
        }
    }

    #[test]
    fn exact_names_and_prefixes() {
        let c = parsed(
            r#""aliases":{"fast":"gpt-4o-mini"},"#,
            r#","models":["gpt-4o-mini","claude-*","fast"]"#,
        )
        .unwrap();
        let m = models_of(&c, 0).unwrap();
        for ok in ["gpt-4o-mini", "claude-haiku-4-5", "claude-", "fast"] {
            assert!(m.matches(ok), "{ok}");
        }
        for no in ["gpt-4o", "gpt-4o-mini-2024", "fas", "Claude-x", ""] {
            assert!(!m.matches(no), "{no}");
        }
        assert_eq!(m.shown(), "gpt-4o-mini, claude-*, fast");
        assert!(c.access.restricted);
        assert!(models_of(&c, 1).is_none());
        assert!(!parsed("", "").unwrap().access.restricted);
    }

    #[test]
    fn the_list_is_the_named_models_then_the_aliases_narrowed_by_the_consumer() {
        let c = parsed(
            r#""aliases":{"fast":"gpt-4o-mini","smart":{"an":"claude-haiku-4-5"}},"#,
            r#","models":["gpt-4o-mini","claude-*","smart"]"#,
        )
        .unwrap();
        let all: Vec<(&str, &str, bool)> = c
            .access
            .listed_for(None)
            .map(|l| (l.id.as_str(), l.owned_by.as_str(), l.alias))
            .collect();
        assert_eq!(
            all,
            vec![
                ("claude-haiku-4-5", "an", false),
                ("gpt-4o", "oa", false),
                ("gpt-4o-mini", "oa", false),
                ("fast", "oa", true),
                ("smart", "an", true),
            ],
            "`*` is no model, and a provider's own name is listed only where a client may name it"
        );
        let mine: Vec<&str> = c
            .access
            .listed_for(models_of(&c, 0))
            .map(|l| l.id.as_str())
            .collect();
        assert_eq!(mine, vec!["claude-haiku-4-5", "gpt-4o-mini", "smart"]);
        assert!(c.access.names_model("claude-haiku-4-5") && c.access.names_model("fast"));
        assert!(!c.access.names_model("gpt-9"));
    }

    #[test]
    fn bad_lists_are_refused_with_the_field_named() {
        let cases = [
            (
                r#","models":[]"#,
                "consumers.list[0].models: is empty: list the models this consumer may use, or remove `models` to allow every model",
            ),
            (
                r#","models":["gpt-4o","*"]"#,
                "consumers.list[0].models[1]: '*' alone allows every model: remove `models` instead",
            ),
            (
                r#","models":["gp*t"]"#,
                "consumers.list[0].models[0]: must be a model name: 1-256 characters, no spaces, control characters or '*', or a prefix of one followed by '*'",
            ),
            (
                r#","models":["gpt 4o"]"#,
                "consumers.list[0].models[0]: must be a model name: 1-256 characters, no spaces, control characters or '*', or a prefix of one followed by '*'",
            ),
            (
                r#","models":"gpt-4o""#,
                "consumers.list[0].models: expected an array",
            ),
            (
                r#","models":["gpt-4o",3]"#,
                "consumers.list[0].models[1]: expected a string",
            ),
        ];
        for (models, want) in cases {
            assert_eq!(parsed("", models).err().as_deref(), Some(want), "{models}");
        }
        // Above, the anthropic provider maps any model (`*`): every name is served. Without `*`, a
        // name no provider serves is refused.
        let strict = r#"{"consumers":{"list":[{"name":"a","key_env":"K","models":["gpt-4o","gpt-9"]}]},
            "providers":[{"name":"an","type":"anthropic","keys":[{"id":"k","env":"K"}],"models":{"gpt-4o":"claude-sonnet-4-5"}}]}"#;
        assert_eq!(
            parse(strict.as_bytes(), &|v| Some(format!("s-{v}")))
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("consumers.list[0].models: 'gpt-9' is neither an alias nor a model any provider serves")
        );
    }

    #[test]
    fn passthrough_paths() {
        let c = parsed(
            r#""passthrough_paths":["/v1/messages/count_tokens","/v1/audio/*"],"#,
            "",
        )
        .unwrap();
        let p = &c.access.passthrough;
        assert!(p.matches("/v1/messages/count_tokens") && p.matches("/v1/audio/speech"));
        assert!(!p.matches("/v1/messages/count_tokensx") && !p.matches("/v1/files"));
        assert!(parsed("", "").unwrap().access.passthrough.is_empty());
        for (paths, want) in [
            (
                r#"["v1/files"]"#,
                "passthrough_paths[0]: must be a path starting with '/' (no query), or a prefix of one followed by '*'",
            ),
            (
                r#"["/v1/files","/v1/x?y=1"]"#,
                "passthrough_paths[1]: must be a path starting with '/' (no query), or a prefix of one followed by '*'",
            ),
            (
                r#"["/v1/*/x"]"#,
                "passthrough_paths[0]: must be a path starting with '/' (no query), or a prefix of one followed by '*'",
            ),
            (r#""/v1/files""#, "passthrough_paths: expected an array"),
        ] {
            assert_eq!(
                parsed(&format!(r#""passthrough_paths":{paths},"#), "")
                    .err()
                    .as_deref(),
                Some(want),
                "{paths}"
            );
        }
    }
}
