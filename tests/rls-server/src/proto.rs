//! The few messages of Envoy's RLS API (`envoy.service.ratelimit.v3`) this server reads and writes,
//! written by hand so no protoc is needed. Field numbers follow `rls.proto` and
//! `envoy/extensions/common/ratelimit/v3/ratelimit.proto`; fields not listed here (descriptor
//! `limit` overrides, quotas, dynamic metadata) are skipped when decoding.

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// 0 means "not set", i.e. 1 (the proto's own rule).
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    /// Per-descriptor addend (Envoy 1.33+): a wrapper, so an explicit 0 is told apart from unset.
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `google.protobuf.UInt64Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

pub const CODE_OK: i32 = 1;
pub const CODE_OVER_LIMIT: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

/// `RateLimitResponse.RateLimit`; `unit` is its `Unit` enum (SECOND = 1 ... DAY = 4).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn explicit_zero_addend_is_not_unset() {
        // descriptors[0] = {entries: [{consumer: team-a}], hits_addend: UInt64Value{}} as Envoy
        // encodes `hits_addend: {number: 0}`: the wrapper is present and empty.
        let entry = [0x0a, 0x08, b'c', b'o', b'n', b's', b'u', b'm', b'e', b'r', 0x12, 0x06, b't', b'e', b'a', b'm', b'-', b'a'];
        let mut desc = vec![0x0a, entry.len() as u8];
        desc.extend_from_slice(&entry);
        desc.extend_from_slice(&[0x1a, 0x00]);
        let mut req = vec![0x0a, 0x08];
        req.extend_from_slice(b"tollgate");
        req.extend_from_slice(&[0x12, desc.len() as u8]);
        req.extend_from_slice(&desc);
        let got = RateLimitRequest::decode(req.as_slice()).unwrap();
        assert_eq!(got.domain, "tollgate");
        assert_eq!(got.hits_addend, 0);
        assert_eq!(got.descriptors.len(), 1);
        assert_eq!(got.descriptors[0].entries, vec![Entry { key: "consumer".into(), value: "team-a".into() }]);
        assert_eq!(got.descriptors[0].hits_addend, Some(UInt64Value { value: 0 }));
    }

    #[test]
    fn unknown_descriptor_fields_are_skipped() {
        // field 2 (limit override {requests_per_unit: 5, unit: MINUTE}) and field 3 = 1234.
        let desc = [0x12, 0x04, 0x08, 0x05, 0x10, 0x02, 0x1a, 0x03, 0x08, 0xd2, 0x09];
        let got = RateLimitDescriptor::decode(&desc[..]).unwrap();
        assert!(got.entries.is_empty());
        assert_eq!(got.hits_addend, Some(UInt64Value { value: 1234 }));
    }

    #[test]
    fn response_wire_format() {
        let resp = RateLimitResponse {
            overall_code: CODE_OVER_LIMIT,
            statuses: vec![DescriptorStatus {
                code: CODE_OVER_LIMIT,
                current_limit: Some(RateLimit { requests_per_unit: 300, unit: 2, name: String::new() }),
                limit_remaining: 0,
                duration_until_reset: Some(Duration { seconds: 42, nanos: 0 }),
            }],
        };
        let bytes = resp.encode_to_vec();
        // overall_code=2, statuses{code=2, current_limit{rpu=300, unit=2}, reset{seconds=42}}
        let want = [0x08, 0x02, 0x12, 0x0d, 0x08, 0x02, 0x12, 0x05, 0x08, 0xac, 0x02, 0x10, 0x02, 0x22, 0x02, 0x08, 0x2a];
        assert_eq!(bytes, want);
        assert_eq!(RateLimitResponse::decode(&bytes[..]).unwrap(), resp);
    }
}
