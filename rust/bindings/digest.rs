//! `Digest` as Python sees it, and the one conversion every method that
//! takes a digest uses: a `Digest` crosses as is, a `str` is parsed once.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyType};

use crate::digest::Digest;

/// The canonical digest of a piece: 32 bytes, shown as 64 lowercase hex
/// characters. Frozen and hashable; equal to another `Digest` with the same
/// bytes (never to a `str`: compare `d.hex`).
#[pyclass(frozen, eq, ord, hash, name = "Digest", module = "isocache._core")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PyDigest(pub Digest);

#[pymethods]
impl PyDigest {
    #[new]
    fn new(hex: &str) -> PyResult<Self> {
        Ok(PyDigest(Digest::parse(hex)?))
    }

    /// Parses 64 lowercase hex characters (`InvalidDigestError` otherwise).
    #[classmethod]
    fn from_hex(_cls: &Bound<'_, PyType>, hex: &str) -> PyResult<Self> {
        PyDigest::new(hex)
    }

    /// 64 lowercase hex characters.
    #[getter]
    fn hex(&self) -> String {
        self.0.hex()
    }

    fn __str__(&self) -> String {
        self.0.hex()
    }

    fn __repr__(&self) -> String {
        format!("Digest('{}')", self.0.hex())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        Ok((slf.get_type().getattr("from_hex")?, (slf.get().0.hex(),)))
    }
}

/// A digest argument: a `Digest`, or the 64 hex characters of one.
#[derive(Clone, Copy)]
pub struct DigestArg(pub Digest);

impl<'a, 'py> FromPyObject<'a, 'py> for DigestArg {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(d) = obj.cast::<PyDigest>() {
            return Ok(DigestArg(d.get().0));
        }
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(DigestArg(Digest::parse(&s.to_cow()?)?));
        }
        Err(PyTypeError::new_err(format!(
            "expected a Digest or its 64 hex characters, not {}",
            obj.get_type().name()?
        )))
    }
}

impl From<Digest> for PyDigest {
    fn from(d: Digest) -> Self {
        PyDigest(d)
    }
}
