//! The gateway's model list (`GET /v1/models`, `GET /v1/models/{id}`) in each client API's shape:
//! OpenAI's `{"object":"list","data":[{"id","object":"model","created","owned_by"}]}`, and
//! Anthropic's page `{"data":[{"type":"model","id","display_name","created_at"}],"has_more",
//! "first_id","last_id"}` with its `limit`, `after_id` and `before_id` parameters.
//!
//! The configuration does not say when a model was created: OpenAI's `created` is 0 and Anthropic's
//! `created_at` the Unix epoch, which both SDKs read as a date like any other.

use serde::Serialize;

/// One model or alias as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub id: &'a str,
    /// The first provider, in failover order, that serves it.
    pub owned_by: &'a str,
}

#[derive(Serialize)]
struct OpenAiModel<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

#[derive(Serialize)]
struct OpenAiList<'a> {
    object: &'static str,
    data: Vec<OpenAiModel<'a>>,
}

#[derive(Serialize)]
struct AnthropicModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    display_name: &'a str,
    created_at: &'static str,
}

#[derive(Serialize)]
struct AnthropicPage<'a> {
    data: Vec<AnthropicModel<'a>>,
    has_more: bool,
    first_id: Option<&'a str>,
    last_id: Option<&'a str>,
}

fn openai<'a>(e: &Entry<'a>) -> OpenAiModel<'a> {
    OpenAiModel {
        id: e.id,
        object: "model",
        created: 0,
        owned_by: e.owned_by,
    }
}

fn anthropic<'a>(e: &Entry<'a>) -> AnthropicModel<'a> {
    AnthropicModel {
        kind: "model",
        id: e.id,
        display_name: e.id,
        created_at: "1970-01-01T00:00:00Z",
    }
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    // Cannot fail: plain structs of strings and numbers.
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn openai_list(entries: &[Entry<'_>]) -> Vec<u8> {
    to_vec(&OpenAiList {
        object: "list",
        data: entries.iter().map(openai).collect(),
    })
}

pub fn openai_model(e: &Entry<'_>) -> Vec<u8> {
    to_vec(&openai(e))
}

pub fn anthropic_model(e: &Entry<'_>) -> Vec<u8> {
    to_vec(&anthropic(e))
}

/// One page of the list as Anthropic's API pages it, by `query` (the request's query string):
/// `limit` (1-1000, default 20), then the models after `after_id` or before `before_id`. Err names
/// the parameter that is wrong.
pub fn anthropic_page(entries: &[Entry<'_>], query: &str) -> Result<Vec<u8>, String> {
    let mut limit = 20usize;
    let (mut after, mut before) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decoded(value);
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or("limit: must be an integer from 1 to 1000")?;
            }
            "after_id" => after = Some(value),
            "before_id" => before = Some(value),
            _ => {}
        }
    }
    let position = |id: &str, param: &str| {
        entries
            .iter()
            .position(|e| e.id == id)
            .ok_or_else(|| format!("{param}: no model '{id}' in this list"))
    };
    let (page, has_more) = match (after, before) {
        (Some(_), Some(_)) => return Err("after_id: give either after_id or before_id".into()),
        (Some(id), None) => {
            let rest = entries.get(position(&id, "after_id")? + 1..).unwrap_or(&[]);
            let n = rest.len().min(limit);
            (rest.get(..n).unwrap_or(&[]), rest.len() > n)
        }
        (None, Some(id)) => {
            let head = entries.get(..position(&id, "before_id")?).unwrap_or(&[]);
            let from = head.len().saturating_sub(limit);
            (head.get(from..).unwrap_or(&[]), from > 0)
        }
        (None, None) => {
            let n = entries.len().min(limit);
            (entries.get(..n).unwrap_or(&[]), entries.len() > n)
        }
    };
    Ok(to_vec(&AnthropicPage {
        data: page.iter().map(anthropic).collect(),
        has_more,
        first_id: page.first().map(|e| e.id),
        last_id: page.last().map(|e| e.id),
    }))
}

/// `%XX` escapes decoded (SDKs escape a model id in a path or query: `a/b` comes as `a%2Fb`).
/// Malformed escapes, and bytes that do not decode to UTF-8, are kept as they came: an id so
/// mangled names no configured model.
pub fn percent_decoded(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    while let Some(&b) = bytes.get(i) {
        match (b, hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const ENTRIES: [Entry<'static>; 3] = [
        Entry {
            id: "gpt-4o",
            owned_by: "openai",
        },
        Entry {
            id: "gpt-4o-mini",
            owned_by: "openai",
        },
        Entry {
            id: "fast",
            owned_by: "anthropic",
        },
    ];

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap_or(Value::Null)
    }

    #[test]
    fn openai_shapes() {
        assert_eq!(
            parse(&openai_list(&ENTRIES[..1])),
            json!({"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "openai"}]})
        );
        assert_eq!(
            parse(&openai_model(&ENTRIES[2])),
            json!({"id": "fast", "object": "model", "created": 0, "owned_by": "anthropic"})
        );
    }

    #[test]
    fn anthropic_pages() {
        let ids = |q: &str| -> (Vec<String>, bool, Value, Value) {
            let v = parse(&anthropic_page(&ENTRIES, q).unwrap());
            let ids = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            (
                ids,
                v["has_more"].as_bool().unwrap(),
                v["first_id"].clone(),
                v["last_id"].clone(),
            )
        };
        assert_eq!(
            ids(""),
            (
                vec!["gpt-4o".into(), "gpt-4o-mini".into(), "fast".into()],
                false,
                json!("gpt-4o"),
                json!("fast")
            )
        );
        assert_eq!(
            ids("limit=2"),
            (
                vec!["gpt-4o".into(), "gpt-4o-mini".into()],
                true,
                json!("gpt-4o"),
                json!("gpt-4o-mini")
            )
        );
        assert_eq!(
            ids("limit=2&after_id=gpt-4o-mini"),
            (vec!["fast".into()], false, json!("fast"), json!("fast"))
        );
        assert_eq!(
            ids("after_id=fast"),
            (vec![], false, Value::Null, Value::Null)
        );
        assert_eq!(
            ids("limit=1&before_id=fast"),
            (
                vec!["gpt-4o-mini".into()],
                true,
                json!("gpt-4o-mini"),
                json!("gpt-4o-mini")
            )
        );
        let model = parse(&anthropic_model(&ENTRIES[0]));
        assert_eq!(
            model,
            json!({"type": "model", "id": "gpt-4o", "display_name": "gpt-4o", "created_at": "1970-01-01T00:00:00Z"})
        );
        for (q, want) in [
            ("limit=0", "limit: must be an integer from 1 to 1000"),
            ("limit=1001", "limit: must be an integer from 1 to 1000"),
            ("limit=x", "limit: must be an integer from 1 to 1000"),
            ("after_id=nope", "after_id: no model 'nope' in this list"),
            (
                "after_id=fast&before_id=fast",
                "after_id: give either after_id or before_id",
            ),
        ] {
            assert_eq!(anthropic_page(&ENTRIES, q).unwrap_err(), want, "{q}");
        }
    }

    #[test]
    fn percent_escapes() {
        assert_eq!(percent_decoded("meta%2Fllama-3%3A8b"), "meta/llama-3:8b");
        assert_eq!(percent_decoded("plain"), "plain");
        assert_eq!(percent_decoded("bad%zz%"), "bad%zz%");
        assert_eq!(percent_decoded("%4"), "%4");
        assert_eq!(percent_decoded("%ff"), "%ff", "not UTF-8: kept as it came");
        assert_eq!(percent_decoded("caf%C3%A9"), "café");
    }
}
