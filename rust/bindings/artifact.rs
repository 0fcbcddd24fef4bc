//! Artifact images outside the store (the Redis tier ships them) and the
//! signing key's public name.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::detached;
use super::digest::DigestArg;
use super::errors::corrupt_artifact;
use crate::key;
use crate::store::{self, ArtifactKind};

/// `"piece"` or `"model"`.
pub fn artifact_kind(kind: &str) -> PyResult<ArtifactKind> {
    ArtifactKind::parse(kind).ok_or_else(|| {
        PyValueError::new_err(format!("kind must be \"piece\" or \"model\", not {kind:?}"))
    })
}

/// The checked file image of an artifact (header + payload), as the store
/// writes it: used to ship artifacts through other tiers (Redis).
#[pyfunction]
#[pyo3(signature = (digest, payload, compile_seconds=0.0, key=None, kind="piece"))]
fn pack_artifact<'py>(
    py: Python<'py>,
    digest: DigestArg,
    payload: &[u8],
    compile_seconds: f64,
    key: Option<&[u8]>,
    kind: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let kind = artifact_kind(kind)?;
    let key = key
        .map(|k| detached(py, || key::signing_key(k)))
        .transpose()?;
    let image = detached(py, || {
        Ok(store::file_image(
            &digest.0,
            payload,
            compile_seconds,
            key.as_ref(),
            kind,
        ))
    })?;
    Ok(PyBytes::new(py, &image))
}

/// Checks an artifact image against `digest` (and `key`): `(payload, compile_seconds)`.
/// Raises `CorruptArtifactError` naming what is wrong.
#[pyfunction]
#[pyo3(signature = (digest, image, key=None))]
fn unpack_artifact<'py>(
    py: Python<'py>,
    digest: DigestArg,
    image: &[u8],
    key: Option<&[u8]>,
) -> PyResult<(Bound<'py, PyBytes>, f64)> {
    let key = key
        .map(|k| detached(py, || key::signing_key(k)))
        .transpose()?;
    match py.detach(|| store::check_file(image, &digest.0, key.as_ref())) {
        Ok((header, range)) => Ok((PyBytes::new(py, &image[range]), header.compile_seconds)),
        Err(c) => Err(corrupt_artifact(py, &c)),
    }
}

/// 16 hex characters naming `key` in public: derived from the key stretched
/// with Argon2id (once per process), so a guess costs an Argon2id to test.
#[pyfunction]
fn key_fingerprint(py: Python<'_>, key: &[u8]) -> PyResult<String> {
    detached(py, || Ok(key::fingerprint(key)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MIN_KEY_BYTES", key::MIN_KEY_LEN)?;
    m.add("STORE_FORMAT_VERSION", store::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(key_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(pack_artifact, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_artifact, m)?)?;
    Ok(())
}
