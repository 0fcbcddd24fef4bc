//! The user's secret (`ISOCACHE_KEY`): checked once, turned into the key that
//! signs artifact images, and named in public by a one-way fingerprint.

use crate::error::{Error, Result};

/// Shortest secret accepted, in bytes (after any decoding the caller does).
pub const MIN_KEY_LEN: usize = 16;

const SIGNING_CONTEXT: &str = "isocache 2026 artifact signing key v1";
const FINGERPRINT_CONTEXT: &str = "isocache 2026 key fingerprint v1";

/// Checks the secret's length and derives the 32-byte signing key from it.
pub fn signing_key(secret: &[u8]) -> Result<[u8; 32]> {
    if secret.len() < MIN_KEY_LEN {
        return Err(Error::InvalidKey { len: secret.len() });
    }
    Ok(blake3::derive_key(SIGNING_CONTEXT, secret))
}

/// 16 hex characters naming the secret in public (Redis key prefixes, logs).
/// A separate BLAKE3 derivation: it reveals nothing about the signing key or
/// the secret, and two different secrets get different names.
pub fn fingerprint(secret: &[u8]) -> String {
    let k = blake3::derive_key(FINGERPRINT_CONTEXT, secret);
    crate::canon::to_hex(&k[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secrets_are_refused() {
        for bad in [&b""[..], b"secret", b"fifteen bytes!!"] {
            let err = signing_key(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidKey { .. }));
            let msg = err.to_string();
            assert!(msg.contains("at least 16 bytes"), "{msg}");
            assert!(msg.contains("python -m isocache keygen"), "{msg}");
        }
        assert!(signing_key(b"sixteen bytes!!!").is_ok());
    }

    #[test]
    fn signing_key_is_stable_and_distinct() {
        let a = signing_key(b"0123456789abcdef").unwrap();
        assert_eq!(a, signing_key(b"0123456789abcdef").unwrap());
        assert_ne!(a, signing_key(b"0123456789abcdeF").unwrap());
        // The historic derivation: existing signed stores keep verifying.
        assert_eq!(a, blake3::derive_key(SIGNING_CONTEXT, b"0123456789abcdef"));
    }

    #[test]
    fn fingerprint_is_short_stable_and_not_the_key() {
        let f = fingerprint(b"0123456789abcdef");
        assert_eq!(f.len(), 16);
        assert!(f
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(f, fingerprint(b"0123456789abcdef"));
        assert_ne!(f, fingerprint(b"0123456789abcdeg"));
        let signing = crate::canon::to_hex(&signing_key(b"0123456789abcdef").unwrap());
        assert!(!signing.contains(&f));
        assert_eq!(
            f,
            crate::canon::to_hex(
                &blake3::derive_key(FINGERPRINT_CONTEXT, b"0123456789abcdef")[..8]
            )
        );
    }
}
