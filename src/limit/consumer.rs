//! Who is calling: a consumer key (compared as a SHA-256 digest, in constant time), a header set by
//! an authenticating layer in front, or nobody (anonymous).

use crate::config::{Config, Consumers, ANONYMOUS};
use crate::limit::consumer_key;

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

/// Who is calling. Key comparison is against SHA-256 digests, in constant time, over every consumer
/// (no early exit), so neither the digest nor the list's order leaks through timing.
pub fn identify<'a>(
    cfg: &Config,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, AuthError> {
    match &cfg.consumers {
        Consumers::Anonymous => Ok(ANONYMOUS.to_string()),
        Consumers::TrustedHeader { header: h, list } => {
            let name = header(h)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or(AuthError::Missing)?;
            if list.is_empty() || list.iter().any(|c| c.name == name) {
                if name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(AuthError::Unknown);
                }
                Ok(name.to_string())
            } else {
                Err(AuthError::Unknown)
            }
        }
        Consumers::Keys(list) => {
            let key = presented_key(header)?.ok_or(AuthError::Missing)?;
            let digest = consumer_key::digest(key.as_bytes());
            let mut found: Option<&str> = None;
            for c in list {
                if let Some(d) = &c.key_digest {
                    if consumer_key::same(d, &digest) {
                        found = Some(&c.name);
                    }
                }
            }
            found.map(str::to_string).ok_or(AuthError::Unknown)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

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
            identify(&c, h(Some("Bearer sk-secret"))),
            Ok("team-b".to_string())
        );
        assert_eq!(
            identify(&c, h(Some("bearer   sk-secret "))),
            Ok("team-b".to_string())
        );
        assert_eq!(
            identify(&c, h(Some("Bearer nope"))),
            Err(AuthError::Unknown)
        );
        assert_eq!(identify(&c, h(None)), Err(AuthError::Missing));
        assert!(matches!(
            identify(&c, h(Some("Basic abc"))),
            Err(AuthError::Malformed(_))
        ));
        let x = |n: &str| {
            if n == "x-api-key" {
                Some("sk-secret")
            } else {
                None
            }
        };
        assert_eq!(identify(&c, x), Ok("team-b".to_string()));
    }

    #[test]
    fn anonymous_and_trusted_header() {
        let c =
            cfg(r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#);
        assert_eq!(identify(&c, |_| None), Ok("anonymous".to_string()));
        let c = cfg(
            r#"{"consumers":{"trusted_header":"x-consumer","list":[{"name":"team-a"}]},
            "providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#,
        );
        assert_eq!(
            identify(&c, |n| (n == "x-consumer").then_some("team-a")),
            Ok("team-a".to_string())
        );
        assert_eq!(
            identify(&c, |n| (n == "x-consumer").then_some("team-z")),
            Err(AuthError::Unknown)
        );
        assert_eq!(identify(&c, |_| None), Err(AuthError::Missing));
    }
}
