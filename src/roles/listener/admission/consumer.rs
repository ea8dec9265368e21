//! Who is calling ([`crate::limit::consumer`]): from the request headers alone, before the body is
//! read, so that a caller without a valid credential costs no more than its headers.

use super::Refusal;
use crate::api::errors::ErrorKind;
use crate::api::headers;
use crate::config::Config;
use crate::host::Headers;
use crate::limit::consumer;
use crate::store::SharedStore;

/// Header-named consumers are counted in `store` (`limit::header_names`).
pub fn identify(cfg: &Config, store: &dyn SharedStore, hdrs: &Headers) -> Result<String, Refusal> {
    consumer::identify(cfg, store, |name| credential(hdrs, name))
        .map_err(|e| Refusal::new(ErrorKind::Authentication, e.message()).code("invalid_api_key"))
}

/// A credential header's value for identification. Several values of one credential header are
/// ambiguous, and one that is not UTF-8 is no credential: neither is given.
fn credential<'a>(hdrs: &'a Headers, name: &str) -> Option<&'a str> {
    let mut values = hdrs.raw().filter(|(k, _)| *k == name.as_bytes());
    let (_, first) = values.next()?;
    if values.next().is_some() && headers::CREDENTIAL_HEADERS.contains(&name) {
        return Some("\u{0}repeated");
    }
    core::str::from_utf8(first).ok()
}

#[cfg(test)]
mod tests {
    use super::super::testing::config;
    use super::*;
    use crate::store::FakeStore;

    fn hdrs(pairs: &[(&str, &[u8])]) -> Headers {
        Headers::of(pairs.iter().map(|(k, v)| (k.as_bytes(), *v)))
    }

    const CFG: &str = r#"{"consumers":{"list":[{"name":"team-a","key_env":"K"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#;

    #[test]
    fn a_known_key_names_its_consumer_and_anything_else_is_refused_as_authentication() {
        let cfg = config(CFG);
        assert_eq!(
            identify(
                &cfg,
                &FakeStore::new(),
                &hdrs(&[("authorization", b"Bearer sk-secret")])
            )
            .as_deref(),
            Ok("team-a")
        );
        for bad in [
            hdrs(&[]),
            hdrs(&[("authorization", b"Bearer nope")]),
            hdrs(&[("authorization", b"Bearer \xff")]),
            hdrs(&[
                ("authorization", b"Bearer sk-secret"),
                ("authorization", b"Bearer sk-secret"),
            ]),
        ] {
            let r = identify(&cfg, &FakeStore::new(), &bad).unwrap_err();
            assert_eq!(
                (r.kind, r.code),
                (ErrorKind::Authentication, Some("invalid_api_key"))
            );
        }
    }
}
