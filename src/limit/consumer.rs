//! Who is calling: a consumer key (looked up by its SHA-256 digest), a header set by an
//! authenticating layer in front, or nobody (anonymous).

use crate::config::{Config, Consumers, ANONYMOUS};
use crate::limit::header_names;
use crate::store::SharedStore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Unknown,
    Malformed(&'static str),
}

impl AuthError {
    pub fn message(&self) -> &'static str {
        match self {
            AuthError::Missing => "Missing gateway API key. Send your tollgate consumer key as 'Authorization: Bearer <key>' (or 'x-api-key').",
            AuthError::Unknown => "Incorrect API key provided. Check the tollgate consumer key you were given.",
            AuthError::Malformed(m) => m,
        }
    }
}

/// The credential a client presented: `Authorization: Bearer`, else `x-api-key`, else `api-key`.
pub fn presented_key<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<&'a str>, AuthError> {
    if let Some(v) = header("authorization") {
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed("The Authorization header must use the Bearer scheme: 'Authorization: Bearer <key>'."));
        }
        let token = rest.trim();
        return Ok((!token.is_empty()).then_some(token));
    }
    Ok(header("x-api-key")
        .or_else(|| header("api-key"))
        .map(str::trim)
        .filter(|s| !s.is_empty()))
}

/// Who is calling. A presented key is found by its SHA-256 digest in a map built at parse (see
/// `config/lookup.rs` for why its timing tells nothing of the stored keys); a trusted header's name
/// is looked up in the list, or, with no list, counted among the names seen so far in `store`
/// (`limit::header_names`: past `consumers.max_from_header`, as the overflow consumer).
pub fn identify<'a>(
    cfg: &Config,
    store: &dyn SharedStore,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, AuthError> {
    match &cfg.consumers {
        Consumers::Anonymous => Ok(ANONYMOUS.to_string()),
        Consumers::TrustedHeader {
            header: h,
            list,
            max_from_header,
            seen,
        } => {
            let name = header(h)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or(AuthError::Missing)?;
            if !list.is_empty() {
                // Listed names were validated at parse.
                return cfg
                    .consumer(name)
                    .map(|c| c.name.clone())
                    .ok_or(AuthError::Unknown);
            }
            if name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(AuthError::Unknown);
            }
            Ok(header_names::consumer_name(seen, store, *max_from_header, name).to_string())
        }
        Consumers::Keys(_) => {
            let key = presented_key(header)?.ok_or(AuthError::Missing)?;
            cfg.consumer_by_presented_key(key.as_bytes())
                .map(|c| c.name.clone())
                .ok_or(AuthError::Unknown)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::store::FakeStore;

    fn cfg(json: &str) -> Config {
        parse(json.as_bytes(), &|v| {
            (v == "K").then(|| "sk-secret".to_string())
        })
        .unwrap()
    }

    const KEYS: &str = r#"{"consumers":{"list":[
        {"name":"team-a","key_sha256":"1a2f57a5d2f7e0a1ff0aa0e5c0d2ee2b2c29d3cf0d1e2c43a1e57ec3e4a0a6f1"},
        {"name":"team-b","key_env":"K"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#;

    #[test]
    fn consumers_by_key_digest() {
        let c = cfg(KEYS);
        let h = |auth: Option<&'static str>| {
            move |n: &str| if n == "authorization" { auth } else { None }
        };
        assert_eq!(
            identify(&c, &FakeStore::new(), h(Some("Bearer sk-secret"))),
            Ok("team-b".to_string())
        );
        assert_eq!(
            identify(&c, &FakeStore::new(), h(Some("bearer   sk-secret "))),
            Ok("team-b".to_string())
        );
        assert_eq!(
            identify(&c, &FakeStore::new(), h(Some("Bearer nope"))),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            identify(&c, &FakeStore::new(), h(None)),
            Err(AuthError::Missing)
        );
        assert!(matches!(
            identify(&c, &FakeStore::new(), h(Some("Basic abc"))),
            Err(AuthError::Malformed(_))
        ));
        let x = |n: &str| {
            if n == "x-api-key" {
                Some("sk-secret")
            } else {
                None
            }
        };
        assert_eq!(identify(&c, &FakeStore::new(), x), Ok("team-b".to_string()));
    }

    #[test]
    fn anonymous_and_trusted_header() {
        let c =
            cfg(r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#);
        assert_eq!(
            identify(&c, &FakeStore::new(), |_| None),
            Ok("anonymous".to_string())
        );
        let c = cfg(
            r#"{"consumers":{"trusted_header":"x-consumer","list":[{"name":"team-a"}]},
            "providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#,
        );
        assert_eq!(
            identify(&c, &FakeStore::new(), |n| (n == "x-consumer")
                .then_some("team-a")),
            Ok("team-a".to_string())
        );
        assert_eq!(
            identify(&c, &FakeStore::new(), |n| (n == "x-consumer")
                .then_some("team-z")),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            identify(&c, &FakeStore::new(), |_| None),
            Err(AuthError::Missing)
        );
    }
}
