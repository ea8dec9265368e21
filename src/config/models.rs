//! `models`: what the gateway knows of a model itself, keyed by the name clients send. Today that is
//! its context window, and whether a conversation too long for it loses its oldest turns
//! (`trim_oldest`) instead of being refused. `consumers.list[].trim_oldest` turns trimming on for
//! one consumer's requests to every model with a window.
//!
//! Both are read once per request from maps built here, so the lookup costs the same however many
//! models and consumers the configuration names, and nothing at all when `models` is absent.

use super::{err, Consumers, Object, Res};
use crate::maps::{HashMap, HashSet};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    context_window: Option<u64>,
    trim_oldest: Option<bool>,
}

pub(super) type RawModels = BTreeMap<String, Object<RawModel>>;

/// A model's context window: prompt and output together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub tokens: u64,
    /// Drop the oldest turns of a conversation that does not fit, rather than refuse it.
    pub trim_oldest: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Models {
    windows: HashMap<String, Window>,
    /// Consumers whose conversations are trimmed for every model with a window.
    trim_consumers: HashSet<String>,
}

impl Models {
    /// The model's window; None at once (no hashing) when no model has one.
    pub fn window(&self, model: &str) -> Option<&Window> {
        if self.windows.is_empty() {
            return None;
        }
        self.windows.get(model)
    }

    /// Whether `consumer` asked for its conversations to be trimmed.
    pub fn trims_for(&self, consumer: &str) -> bool {
        !self.trim_consumers.is_empty() && self.trim_consumers.contains(consumer)
    }

    pub fn contains(&self, model: &str) -> bool {
        self.windows.contains_key(model)
    }
}

/// Validates `models` (and collects the consumers that trim): every error names its field.
pub(super) fn models(
    raw: Option<RawModels>,
    consumers: &Consumers,
    default_max_tokens: u64,
    lower_max_tokens: bool,
    warnings: &mut Vec<String>,
) -> Res<Models> {
    let mut windows = HashMap::default();
    for (name, Object(m)) in raw.unwrap_or_default() {
        let path = format!("models.{name}");
        if name.is_empty() {
            return Err(err("models", "a model name must not be empty"));
        }
        let tokens = m
            .context_window
            .ok_or_else(|| err(format!("{path}.context_window"), "missing"))?;
        if tokens == 0 {
            return Err(err(format!("{path}.context_window"), "must be positive"));
        }
        if tokens <= default_max_tokens && !lower_max_tokens {
            warnings.push(format!(
                "{path}.context_window: {tokens} leaves no room for default_max_tokens ({default_max_tokens}): requests to it without max_tokens will be refused (set lower_max_tokens, or a smaller default_max_tokens)"
            ));
        }
        let window = Window {
            tokens,
            trim_oldest: m.trim_oldest.unwrap_or(false),
        };
        windows.insert(name, window);
    }
    let list = match consumers {
        Consumers::Anonymous => &[][..],
        Consumers::Keys(list) | Consumers::TrustedHeader { list, .. } => &list[..],
    };
    let mut trim_consumers = HashSet::default();
    for (i, c) in list.iter().enumerate() {
        if !c.trim_oldest {
            continue;
        }
        if windows.is_empty() {
            warnings.push(format!(
                "consumers.list[{i}].trim_oldest: no model in `models` has a context_window, so there is nothing to trim against"
            ));
        }
        trim_consumers.insert(c.name.clone());
    }
    Ok(Models {
        windows,
        trim_consumers,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Config};

    fn env(name: &str) -> Option<String> {
        match name {
            "K" => Some("sk-x".to_string()),
            "K2" => Some("sk-y".to_string()),
            _ => None,
        }
    }

    fn parse_with(top: &str) -> Result<Config, String> {
        let json = format!(
            r#"{{{top}"providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}]}}]}}"#
        );
        parse(json.as_bytes(), &env).map_err(|e| e.to_string())
    }

    #[test]
    fn windows_and_trimming_are_read_per_model_and_per_consumer() {
        let c = parse_with(
            r#""models":{"gpt-4o":{"context_window":128000},"claude-sonnet-4-5":{"context_window":200000,"trim_oldest":true}},
               "consumers":{"list":[{"name":"a","key_env":"K","trim_oldest":true},{"name":"b","key_env":"K2","trim_oldest":false}]},"#,
        )
        .unwrap();
        let w = |m: &str| c.models.window(m).map(|w| (w.tokens, w.trim_oldest));
        assert_eq!(w("gpt-4o"), Some((128_000, false)));
        assert_eq!(w("claude-sonnet-4-5"), Some((200_000, true)));
        assert_eq!(w("GPT-4o"), None, "names are matched as clients send them");
        assert!(c.models.trims_for("a") && !c.models.trims_for("b"));
        assert!(c.is_known_model("gpt-4o"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let none = parse_with("").unwrap();
        assert_eq!(none.models.window("gpt-4o"), None);
        assert!(!none.models.trims_for("anonymous"));
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let cases: &[(&str, &str)] = &[
            (r#""models":{"m":{}},"#, "models.m.context_window: missing"),
            (
                r#""models":{"m":{"trim_oldest":true}},"#,
                "models.m.context_window: missing",
            ),
            (
                r#""models":{"m":{"context_window":0}},"#,
                "models.m.context_window: must be positive",
            ),
            (
                r#""models":{"m":{"context_window":-5}},"#,
                "models.m.context_window: expected a non-negative integer",
            ),
            (
                r#""models":{"m":{"context_window":"128k"}},"#,
                "models.m.context_window: expected a non-negative integer",
            ),
            (
                r#""models":{"m":{"context_window":1.5}},"#,
                "models.m.context_window: expected a non-negative integer",
            ),
            (
                r#""models":{"m":{"context_window":100,"trim_oldest":"yes"}},"#,
                "models.m.trim_oldest: expected a boolean",
            ),
            (
                r#""models":{"m":{"context_window":100,"trim":true}},"#,
                "models.m.trim: unknown field, expected one of: context_window, trim_oldest",
            ),
            (r#""models":{"m":100},"#, "models.m: expected an object"),
            (r#""models":[],"#, "models: expected an object"),
            (
                r#""models":{"":{"context_window":100}},"#,
                "models: a model name must not be empty",
            ),
            (
                r#""consumers":{"list":[{"name":"a","key_env":"K","trim_oldest":1}]},"#,
                "consumers.list[0].trim_oldest: expected a boolean",
            ),
        ];
        for (top, want) in cases {
            assert_eq!(parse_with(top).err().as_deref(), Some(*want), "for {top}");
        }
    }

    #[test]
    fn settings_that_cannot_work_as_meant_are_warned_about() {
        let c = parse_with(
            r#""models":{"small":{"context_window":4096}},
               "consumers":{"list":[{"name":"a","key_env":"K"}]},"#,
        )
        .unwrap();
        assert_eq!(
            c.warnings,
            ["models.small.context_window: 4096 leaves no room for default_max_tokens (4096): requests to it without max_tokens will be refused (set lower_max_tokens, or a smaller default_max_tokens)"]
        );
        let lowered =
            parse_with(r#""models":{"small":{"context_window":4096}},"lower_max_tokens":true,"#)
                .unwrap();
        assert!(lowered.warnings.is_empty());
        let c =
            parse_with(r#""consumers":{"list":[{"name":"a","key_env":"K","trim_oldest":true}]},"#)
                .unwrap();
        assert_eq!(
            c.warnings,
            ["consumers.list[0].trim_oldest: no model in `models` has a context_window, so there is nothing to trim against"]
        );
    }
}
