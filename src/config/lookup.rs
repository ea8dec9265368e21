//! Maps built once at parse, so that what a request asks of the configuration (who holds this key,
//! which consumer has this name, is this model named anywhere, which provider is this) is one
//! lookup whatever the size of the configuration. A list scanned per request made every request
//! pay about 75 µs per thousand consumers.
//!
//! Consumer keys are looked up by their SHA-256 digest in a map. Its timing can tell a caller how
//! a digest of their choice compares with the stored ones, which says nothing of the stored keys:
//! a key cannot be recovered from its digest, nor a key found whose digest lands near another's.

use super::{Consumer, Provider};
use crate::limit::consumer_key::KeyDigest;
use crate::limit::quota::Price;
use crate::maps::{HashMap, HashSet};

#[derive(Debug, Clone, Default)]
pub(super) struct Lookup {
    /// Consumer name -> its place in the list.
    pub consumers: HashMap<String, usize>,
    /// Digest of a consumer's key -> its place in the list.
    pub keys: HashMap<KeyDigest, usize>,
    /// Every model named in `prices`, a provider's `models` or a consumer's `model_limits`.
    pub models: HashSet<String>,
    /// Provider name -> its place in `providers`.
    pub providers: HashMap<String, usize>,
}

impl Lookup {
    /// The maps of a validated configuration. Of two consumers holding the same key, the later one
    /// is the key's (as when the list was scanned), with a warning naming both.
    pub fn build(
        consumers: &[Consumer],
        providers: &[Provider],
        prices: &HashMap<String, Price>,
        warnings: &mut Vec<String>,
    ) -> Lookup {
        let mut out = Lookup::default();
        for (i, c) in consumers.iter().enumerate() {
            out.consumers.insert(c.name.clone(), i);
            out.models.extend(c.model_limits.keys().cloned());
            let Some(d) = c.key_digest else { continue };
            if let Some(before) = out.keys.insert(d, i) {
                let name = |j: usize| consumers.get(j).map_or("", |c| c.name.as_str());
                warnings.push(format!(
                    "consumers.list[{i}]: the same key as consumers.list[{before}] ('{}'): requests with it are consumer '{}'",
                    name(before),
                    name(i)
                ));
            }
        }
        out.models.extend(prices.keys().cloned());
        for (i, p) in providers.iter().enumerate() {
            out.providers.insert(p.name.clone(), i);
            out.models.extend(p.models.keys().cloned());
        }
        out
    }
}
