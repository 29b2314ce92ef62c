//! Rejected records too large to keep whole. Whatever a producer sends is
//! kept where rejects go (the lake's `events_rejected`, the DLQ), but a
//! record of a megabyte or more cannot be: a DLQ record must stay below the
//! broker's message limit, and a flush of such records must not grow
//! without bound. Past [`KEPT_BYTES`] a reject keeps its first bytes, its
//! size and the SHA-256 of the whole, enough to find and prove the original.

use sha2::{Digest, Sha256};

/// The most bytes of a rejected record kept verbatim.
pub const KEPT_BYTES: usize = 64 * 1024;

/// What is kept of a rejected record's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept<'a> {
    /// The whole payload, or its first [`KEPT_BYTES`].
    pub bytes: &'a [u8],
    pub original_size: usize,
    /// Hex SHA-256 of the whole payload, when `bytes` is only its prefix.
    pub sha256: Option<String>,
}

impl Kept<'_> {
    pub fn truncated(&self) -> bool {
        self.sha256.is_some()
    }

    /// "kept the first N of M bytes, SHA-256 …", for a detail text.
    pub fn describe(&self) -> Option<String> {
        self.sha256
            .as_ref()
            .map(|sha| format!("kept the first {} of {} bytes, SHA-256 {sha}", self.bytes.len(), self.original_size))
    }
}

/// What to keep of `payload`.
pub fn keep(payload: &[u8]) -> Kept<'_> {
    if payload.len() <= KEPT_BYTES {
        return Kept { bytes: payload, original_size: payload.len(), sha256: None };
    }
    Kept { bytes: &payload[..KEPT_BYTES], original_size: payload.len(), sha256: Some(sha256_hex(payload)) }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_are_kept_whole() {
        let kept = keep(b"{oops");
        assert_eq!((kept.bytes, kept.original_size, kept.truncated()), (&b"{oops"[..], 5, false));
        assert_eq!(keep(&vec![b'x'; KEPT_BYTES]).bytes.len(), KEPT_BYTES);
    }

    #[test]
    fn large_payloads_keep_a_prefix_their_size_and_digest() {
        let big = vec![b'a'; 1_000_001];
        let kept = keep(&big);
        assert_eq!(kept.bytes, &big[..KEPT_BYTES]);
        assert_eq!(kept.original_size, 1_000_001);
        assert_eq!(kept.sha256.as_deref(), Some(sha256_hex(&big).as_str()));
        assert!(kept.describe().unwrap().starts_with("kept the first 65536 of 1000001 bytes, SHA-256 "));
        // The digest of the empty string, as a check of the encoding.
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
