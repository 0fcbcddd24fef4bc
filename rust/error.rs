//! The one error type of the Rust core. The binding layer maps each variant to
//! a Python exception under `isocache.CacheError`.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid digest {0:?}: expected 64 lowercase hex characters (from isocache.graph_digest)"
    )]
    InvalidDigest(String),

    #[error("invalid namespace {0:?}: use 1-128 characters from [A-Za-z0-9._-]")]
    InvalidNamespace(String),

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("refusing to use {path} as a cache directory: {reason}. Loading a cached artifact runs its code, so the directory must be private: {fix}")]
    InsecureStore {
        path: PathBuf,
        reason: String,
        fix: String,
    },

    #[error("the signing key (ISOCACHE_KEY) is {len} bytes: it must be at least 16 bytes. Make one with `python -m isocache keygen` and set ISOCACHE_KEY to what it prints")]
    InvalidKey { len: usize },

    #[error("no cache directory: set ISOCACHE_DIR (HOME is not set either)")]
    NoRoot,

    #[error("no isocache store at {path}")]
    NoStore { path: PathBuf },

    #[error("the store at {path} was opened read-only: nothing can be written or removed")]
    ReadOnly { path: PathBuf },

    #[error("payload of {size} bytes is too large for the store (limit {limit} bytes)")]
    TooLarge { size: u64, limit: u64 },

    #[error("isocache's core failed unexpectedly ({0}); the operation was skipped. Please report this with the message")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `f`; a panic inside it becomes [`Error::Internal`] instead of
/// unwinding further (into Python, where it would be a `PanicException`).
pub fn catch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        Err(Error::Internal(what))
    })
}

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        assert_eq!(catch(|| Ok(3)).unwrap(), 3);
        let e = catch::<()>(|| panic!("boom {}", 1)).unwrap_err();
        assert!(matches!(&e, Error::Internal(m) if m == "boom 1"), "{e}");
        let e = catch::<()>(|| panic!("static")).unwrap_err();
        assert!(e.to_string().contains("static"), "{e}");
        assert!(matches!(
            catch::<()>(|| Err(Error::NoRoot)),
            Err(Error::NoRoot)
        ));
    }
}
