//! The process index as Python sees it.

use std::sync::Arc;

use pyo3::prelude::*;

use super::digest::{DigestArg, PyDigest};
use super::py_repr;
use crate::digest::Digest;
use crate::index::{self, Claim};

type PyIndex = index::Index<Arc<Py<PyAny>>>;

/// A snapshot of one index entry.
#[pyclass(frozen, module = "isocache._core")]
pub struct IndexEntry {
    digest: PyDigest,
    /// `"compiling"`, `"ready"` or `"failed"`.
    #[pyo3(get)]
    state: &'static str,
    #[pyo3(get)]
    value: Option<Py<PyAny>>,
    #[pyo3(get)]
    hits: u64,
    #[pyo3(get)]
    compile_seconds: f64,
    #[pyo3(get)]
    reason: Option<String>,
}

#[pymethods]
impl IndexEntry {
    #[getter]
    fn digest(&self) -> PyDigest {
        self.digest
    }

    fn __repr__(&self) -> String {
        format!(
            "IndexEntry(digest='{}', state={}, hits={}, compile_seconds={:.3})",
            self.digest.0.hex(),
            py_repr(self.state),
            self.hits,
            self.compile_seconds
        )
    }
}

fn snapshot(py: Python<'_>, digest: Digest, e: &index::Entry<Arc<Py<PyAny>>>) -> IndexEntry {
    IndexEntry {
        digest: PyDigest(digest),
        state: e.state.as_str(),
        value: e.value.as_ref().map(|v| v.clone_ref(py)),
        hits: e.hits(),
        compile_seconds: e.compile_seconds,
        reason: e.reason.clone(),
    }
}

/// Lock-free map digest -> compiled callable, shared by the threads of a process.
#[pyclass(frozen, module = "isocache._core")]
pub struct Index {
    inner: PyIndex,
}

#[pymethods]
impl Index {
    #[new]
    fn new() -> Self {
        Index {
            inner: PyIndex::new(),
        }
    }

    fn get(&self, py: Python<'_>, digest: DigestArg) -> Option<IndexEntry> {
        self.inner
            .get(&digest.0)
            .map(|e| snapshot(py, digest.0, &e))
    }

    /// True when the caller now owns the compile of `digest`.
    fn claim(&self, digest: DigestArg) -> bool {
        matches!(self.inner.claim(&digest.0), Claim::Claimed)
    }

    #[pyo3(signature = (digest, value, compile_seconds=0.0))]
    fn publish(&self, py: Python<'_>, digest: DigestArg, value: Py<PyAny>, compile_seconds: f64) {
        let value = Arc::new(value);
        py.detach(|| self.inner.publish(&digest.0, value, compile_seconds));
    }

    fn fail(&self, py: Python<'_>, digest: DigestArg, reason: String) {
        py.detach(|| self.inner.fail(&digest.0, reason));
    }

    fn abandon(&self, py: Python<'_>, digest: DigestArg) {
        py.detach(|| self.inner.abandon(&digest.0));
    }

    fn remove(&self, py: Python<'_>, digest: DigestArg) -> bool {
        py.detach(|| self.inner.remove(&digest.0))
    }

    fn record_hit(&self, digest: DigestArg) -> u64 {
        self.inner.record_hit(&digest.0)
    }

    /// Waits (without holding the GIL) until `digest` is no longer compiling.
    fn wait(
        &self,
        py: Python<'_>,
        digest: DigestArg,
        timeout: f64,
    ) -> PyResult<Option<IndexEntry>> {
        let timeout = crate::bounds::wait(timeout);
        let e = super::detached(py, || Ok(self.inner.wait(&digest.0, timeout)))?;
        Ok(e.map(|e| snapshot(py, digest.0, &e)))
    }

    fn entries(&self, py: Python<'_>) -> Vec<IndexEntry> {
        self.inner
            .entries()
            .iter()
            .map(|(d, e)| snapshot(py, *d, e))
            .collect()
    }

    fn clear(&self, py: Python<'_>) {
        py.detach(|| self.inner.clear());
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, digest: DigestArg) -> bool {
        self.inner.get(&digest.0).is_some()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<IndexEntry>()?;
    m.add_class::<Index>()?;
    Ok(())
}
