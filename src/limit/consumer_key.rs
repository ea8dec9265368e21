//! Consumer and admin keys as SHA-256 digests: the config holds digests, never the keys themselves
//! (RustCrypto's `sha2`). A presented consumer key is looked up by its digest in a map (see
//! `config/lookup.rs` for why that tells a caller nothing); the admin key is compared in constant
//! time (`subtle`).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub type KeyDigest = [u8; 32];

pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// Constant-time equality of two digests.
pub fn same(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.ct_eq(b).into()
}

/// A digest written as 64 hex digits (either case), as `sha256sum` prints it.
pub fn from_hex(s: &str) -> Option<KeyDigest> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_sha256sum() {
        // printf 'team-a-secret' | sha256sum
        let d = digest(b"abc");
        assert_eq!(
            Some(d),
            from_hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(
            Some(d),
            from_hex("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD")
        );
        assert!(same(&d, &digest(b"abc")));
        assert!(!same(&d, &digest(b"abd")));
        assert_eq!(from_hex("ba78"), None);
        assert_eq!(from_hex(&"zz".repeat(32)), None);
    }
}
