//! The canonical encoder's functions: encodings, digests, target names.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::digest::PyDigest;
use super::errors::CacheError;
use crate::canon;
use crate::digest::Digest;

/// The canonical encoding of a graph module.
#[pyclass(frozen, module = "isocache._core")]
pub struct Encoding {
    #[pyo3(get)]
    data: Py<PyBytes>,
    #[pyo3(get)]
    spans: Option<Vec<(usize, usize)>>,
    #[pyo3(get)]
    unencodable: Option<String>,
}

#[pyfunction]
#[pyo3(signature = (gm, example_inputs=None, spans=false))]
fn encode(
    py: Python<'_>,
    gm: &Bound<'_, PyAny>,
    example_inputs: Option<&Bound<'_, PyAny>>,
    spans: bool,
) -> PyResult<Encoding> {
    let enc = canon::fx::encode_graph_module(gm, example_inputs, spans)?;
    Ok(Encoding {
        data: PyBytes::new(py, &enc.bytes).unbind(),
        spans: enc.spans,
        unencodable: enc.unencodable,
    })
}

fn digest_of(
    gm: &Bound<'_, PyAny>,
    example_inputs: Option<&Bound<'_, PyAny>>,
    namespace: &str,
) -> PyResult<(Digest, Option<String>)> {
    let enc = canon::fx::encode_graph_module(gm, example_inputs, false)?;
    let d = canon::piece_digest(namespace.as_bytes(), &enc.bytes, enc.unencodable.is_some());
    Ok((Digest(d), enc.unencodable))
}

/// `(Digest, reason it is not reusable or None)`: the digest of a piece,
/// made once and passed as is to the index and the store.
#[pyfunction]
#[pyo3(signature = (gm, example_inputs=None, namespace=""))]
fn piece_digest(
    gm: &Bound<'_, PyAny>,
    example_inputs: Option<&Bound<'_, PyAny>>,
    namespace: &str,
) -> PyResult<(PyDigest, Option<String>)> {
    let (d, reason) = digest_of(gm, example_inputs, namespace)?;
    Ok((PyDigest(d), reason))
}

/// `(hex digest, reason it is not reusable or None)`; `piece_digest` gives
/// a `Digest` instead of its hex.
#[pyfunction(name = "digest")]
#[pyo3(signature = (gm, example_inputs=None, namespace=""))]
fn graph_digest(
    gm: &Bound<'_, PyAny>,
    example_inputs: Option<&Bound<'_, PyAny>>,
    namespace: &str,
) -> PyResult<(String, Option<String>)> {
    let (d, reason) = digest_of(gm, example_inputs, namespace)?;
    Ok((d.hex(), reason))
}

/// The digest of an already encoded graph (used to check the reference encoder).
#[pyfunction]
#[pyo3(signature = (encoding, namespace=""))]
fn digest_encoding(encoding: &[u8], namespace: &str) -> String {
    canon::to_hex(&canon::digest(namespace.as_bytes(), encoding, None))
}

/// BLAKE3 of `data`, as 64 hex characters.
#[pyfunction]
fn blake3_hex(py: Python<'_>, data: &[u8]) -> String {
    py.detach(|| canon::to_hex(blake3::hash(data).as_bytes()))
}

/// The canonical name of a call target (`aten::add.Tensor`, `torch.nn.functional.silu`).
#[pyfunction]
fn canonical_target(target: &Bound<'_, PyAny>) -> PyResult<String> {
    canon::fx::canonical_target(target)?
        .map(|n| n.to_string())
        .map_err(|e| CacheError::new_err(e.to_string()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FORMAT_VERSION", canon::FORMAT_VERSION)?;
    m.add_class::<Encoding>()?;
    m.add_class::<PyDigest>()?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(graph_digest, m)?)?;
    m.add_function(wrap_pyfunction!(piece_digest, m)?)?;
    m.add_function(wrap_pyfunction!(digest_encoding, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_target, m)?)?;
    m.add_function(wrap_pyfunction!(blake3_hex, m)?)?;
    Ok(())
}
