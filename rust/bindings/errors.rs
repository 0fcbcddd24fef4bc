//! The exceptions of `isocache._core`, all under `CacheError`, and the
//! mapping of the core's errors onto them.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::Error;
use crate::store::Corruption;

create_exception!(
    isocache,
    CacheError,
    PyException,
    "Base class of every error isocache raises."
);
create_exception!(
    isocache,
    InvalidDigestError,
    CacheError,
    "A digest that is not 64 lowercase hex characters."
);
create_exception!(
    isocache,
    InvalidKeyError,
    CacheError,
    "A signing key shorter than 16 bytes."
);
create_exception!(
    isocache,
    StoreError,
    CacheError,
    "The artifact store could not be read or written."
);
create_exception!(
    isocache,
    CorruptArtifactError,
    CacheError,
    "An artifact failed its checksum, length, digest or signature check. \
     unpack_artifact sets `kind`, naming the check as `Lookup.corruption` does."
);
create_exception!(
    isocache,
    InternalError,
    CacheError,
    "isocache's core failed unexpectedly (a bug); the operation was skipped."
);
create_exception!(
    isocache,
    InsecureStoreError,
    StoreError,
    "The cache directory is not private to the current user."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::InvalidDigest(_) | Error::InvalidNamespace(_) => {
                InvalidDigestError::new_err(msg)
            }
            Error::InvalidKey { .. } => InvalidKeyError::new_err(msg),
            Error::InsecureStore { .. } => InsecureStoreError::new_err(msg),
            Error::Io { .. }
            | Error::TooLarge { .. }
            | Error::NoRoot
            | Error::NoStore { .. }
            | Error::ReadOnly { .. } => StoreError::new_err(msg),
            Error::Internal(_) => InternalError::new_err(msg),
        }
    }
}

/// `CorruptArtifactError(reason)` with `.kind` set to the check that failed.
pub fn corrupt_artifact(py: Python<'_>, c: &Corruption) -> PyErr {
    let err = CorruptArtifactError::new_err(c.reason.clone());
    if let Err(e) = err.value(py).setattr("kind", c.kind.as_str()) {
        return e;
    }
    err
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CacheError", py.get_type::<CacheError>())?;
    m.add("InvalidDigestError", py.get_type::<InvalidDigestError>())?;
    m.add("InvalidKeyError", py.get_type::<InvalidKeyError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("InsecureStoreError", py.get_type::<InsecureStoreError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add(
        "CorruptArtifactError",
        py.get_type::<CorruptArtifactError>(),
    )?;
    Ok(())
}
