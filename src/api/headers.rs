//! The names of the headers tollgate reads and writes between the client, its two roles and the
//! provider.

/// Request headers that carry a client's credential: removed before any attempt leaves Envoy, so a
/// client can never choose, nor learn, a pool key.
pub const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// Whether a header name, as bytes, is one of [`CREDENTIAL_HEADERS`].
pub fn is_credential(name: &[u8]) -> bool {
    CREDENTIAL_HEADERS.iter().any(|h| h.as_bytes() == name)
}

/// Response headers telling the client which provider and key id served it (ids, never secrets).
pub const HDR_PROVIDER: &str = "x-tollgate-provider";
pub const HDR_KEY_ID: &str = "x-tollgate-key-id";
/// Response header: how many of the oldest messages the gateway dropped to fit the model's context
/// window (`trim_oldest`); absent when none.
pub const HDR_TRIMMED: &str = "x-tollgate-trimmed-messages";
/// Request header: the longest the client will wait for capacity, in seconds ("2", "0.5"); shortens
/// its consumer's `max_wait`, never lengthens it. Removed before the provider sees the request.
pub const HDR_MAX_WAIT: &str = "x-tollgate-max-wait";
/// Response header: how long the request was held for capacity, in milliseconds; absent when it
/// was not held.
pub const HDR_WAITED: &str = "x-tollgate-waited-ms";
/// Set by the listener role when a request must start on a provider other than the first: the
/// Envoy routes match on it to pick a cluster whose priorities start at that provider.
pub const HDR_ROUTE: &str = "x-tollgate-route";
/// Internal headers: a client's copies are removed before anything reads them, and none reaches
/// a provider.
pub const INTERNAL_PREFIX: &str = "x-tollgate-";
/// Set by the upstream role for a key whose secret Envoy keeps (`sds`): the secret's name, which
/// the cluster's `composite` filter matches to run the `credential_injector` holding that secret.
/// Envoy's `header_mutation` removes it before the attempt leaves.
pub const HDR_CREDENTIAL: &str = "x-tollgate-credential";
