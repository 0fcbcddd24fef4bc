//! The user's secret (`ISOCACHE_KEY`): checked once, stretched once per
//! process, turned into the key that signs artifact images, and named in
//! public by a fingerprint.
//!
//! Why the fingerprint (and the signature) cannot be used to test guesses
//! cheaply: any deterministic function of the secret alone can be checked
//! against a guess offline, so what matters is the cost of one guess. A key
//! from `python -m isocache keygen` has 256 random bits: no guess ever hits.
//! A passphrase (`ISOCACHE_KEY` as text) may be guessable, so the secret is
//! first stretched with Argon2id at fixed parameters ([`STRETCH_MEMORY_KIB`]
//! of memory, [`STRETCH_PASSES`] passes: about 20 MiB and tens of
//! milliseconds of work per guess on any machine, most of it memory, which
//! GPUs do not make cheap), and both the public fingerprint and the signing
//! key are derived from that. The salt is a fixed context, not a random one:
//! every machine of a fleet must find the same fingerprint (Redis key
//! prefixes) and the same signing key from the same secret. The price is
//! that one precomputed table of stretched guesses serves against every
//! isocache user, which is why the README tells people to use `keygen`.
//! The stretch is computed once per distinct secret per process and cached.
//!
//! [`legacy_signing_key`] is the fast derivation older versions signed with:
//! it is used only to recognise (and re-sign) artifacts of the user's own
//! private store that this very secret signed (`store/sign.rs`).

use std::sync::Mutex;

use crate::error::{Error, Result};

/// Shortest secret accepted, in bytes (after any decoding the caller does).
pub const MIN_KEY_LEN: usize = 16;

/// Argon2id memory cost of the stretch, in KiB (OWASP's minimum for Argon2id).
pub const STRETCH_MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes of the stretch.
pub const STRETCH_PASSES: u32 = 2;

const STRETCH_SALT: &[u8] = b"isocache 2026 key stretch v2";
const SIGNING_CONTEXT: &str = "isocache 2026 artifact signing key v2";
const FINGERPRINT_CONTEXT: &str = "isocache 2026 key fingerprint v2";
const LEGACY_SIGNING_CONTEXT: &str = "isocache 2026 artifact signing key v1";

/// Stretched secrets of this process: (BLAKE3 of the secret, Argon2id output).
static STRETCHED: Mutex<Vec<([u8; 32], [u8; 32])>> = Mutex::new(Vec::new());

fn check(secret: &[u8]) -> Result<()> {
    if secret.len() < MIN_KEY_LEN {
        return Err(Error::InvalidKey { len: secret.len() });
    }
    Ok(())
}

/// Argon2id of the secret at fixed parameters (computed once per process).
pub fn stretch(secret: &[u8]) -> [u8; 32] {
    let id = *blake3::hash(secret).as_bytes();
    if let Some((_, s)) = STRETCHED.lock().unwrap().iter().find(|(k, _)| *k == id) {
        return *s;
    }
    let params = argon2::Params::new(STRETCH_MEMORY_KIB, STRETCH_PASSES, 1, Some(32))
        .expect("fixed Argon2 parameters are valid");
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(secret, STRETCH_SALT, &mut out)
        .expect("Argon2 accepts any secret of 16+ bytes with a 28-byte salt");
    let mut cache = STRETCHED.lock().unwrap();
    if cache.len() >= 16 {
        cache.clear(); // a process that keeps changing keys must not grow memory
    }
    cache.push((id, out));
    out
}

/// Checks the secret's length and derives the 32-byte signing key from it.
pub fn signing_key(secret: &[u8]) -> Result<[u8; 32]> {
    check(secret)?;
    Ok(blake3::derive_key(SIGNING_CONTEXT, &stretch(secret)))
}

/// The signing key older versions derived (fast, unstretched): only to
/// recognise the user's own artifacts signed by them.
pub fn legacy_signing_key(secret: &[u8]) -> Result<[u8; 32]> {
    check(secret)?;
    Ok(blake3::derive_key(LEGACY_SIGNING_CONTEXT, secret))
}

/// 16 hex characters naming the secret in public (Redis key prefixes, logs).
/// Derived from the stretched secret (see the module's comment): testing a
/// guess against it costs an Argon2id computation, and it reveals nothing
/// about the signing key. Two different secrets get different names.
pub fn fingerprint(secret: &[u8]) -> String {
    let k = blake3::derive_key(FINGERPRINT_CONTEXT, &stretch(secret));
    crate::canon::to_hex(&k[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secrets_are_refused() {
        for bad in [&b""[..], b"secret", b"fifteen bytes!!"] {
            for err in [
                signing_key(bad).unwrap_err(),
                legacy_signing_key(bad).unwrap_err(),
            ] {
                assert!(matches!(err, Error::InvalidKey { .. }));
                let msg = err.to_string();
                assert!(msg.contains("at least 16 bytes"), "{msg}");
                assert!(msg.contains("python -m isocache keygen"), "{msg}");
            }
        }
        assert!(signing_key(b"sixteen bytes!!!").is_ok());
    }

    #[test]
    fn signing_key_is_stretched_stable_and_distinct() {
        let a = signing_key(b"0123456789abcdef").unwrap();
        assert_eq!(a, signing_key(b"0123456789abcdef").unwrap());
        assert_ne!(a, signing_key(b"0123456789abcdeF").unwrap());
        assert_ne!(a, legacy_signing_key(b"0123456789abcdef").unwrap());
        // The historic derivation: existing signed stores can be recognised.
        assert_eq!(
            legacy_signing_key(b"0123456789abcdef").unwrap(),
            blake3::derive_key(LEGACY_SIGNING_CONTEXT, b"0123456789abcdef")
        );
    }

    #[test]
    fn stretch_is_argon2id_at_the_fixed_parameters() {
        let secret = b"correct horse battery staple";
        let params = argon2::Params::new(19 * 1024, 2, 1, Some(32)).unwrap();
        let mut expected = [0u8; 32];
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(secret, b"isocache 2026 key stretch v2", &mut expected)
            .unwrap();
        assert_eq!(stretch(secret), expected);
        assert_ne!(expected, *blake3::hash(secret).as_bytes());
    }

    #[test]
    fn fingerprint_is_short_stable_slow_and_not_the_key() {
        let f = fingerprint(b"0123456789abcdef");
        assert_eq!(f.len(), 16);
        assert!(f
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(f, fingerprint(b"0123456789abcdef"));
        assert_ne!(f, fingerprint(b"0123456789abcdeg"));
        let signing = crate::canon::to_hex(&signing_key(b"0123456789abcdef").unwrap());
        assert!(!signing.contains(&f));
        // Not a fast hash of the secret: it is the stretched secret's derivation.
        let stretched = stretch(b"0123456789abcdef");
        assert_eq!(
            f,
            crate::canon::to_hex(&blake3::derive_key(FINGERPRINT_CONTEXT, &stretched)[..8])
        );
        let fast = blake3::derive_key(FINGERPRINT_CONTEXT, b"0123456789abcdef");
        assert_ne!(f, crate::canon::to_hex(&fast[..8]));
        // Pinned: every machine of a fleet names the same secret the same way.
        assert_eq!(f, PINNED_FINGERPRINT);
    }

    const PINNED_FINGERPRINT: &str = "65b22e134c92148a";
}
