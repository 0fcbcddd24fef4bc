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
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
