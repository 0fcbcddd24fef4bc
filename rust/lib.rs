//! `isocache._core`: the PyO3 binding layer. Thin by design: argument
//! conversion, detaching from the interpreter around heavy work, and error
//! mapping. Logic lives in `canon`, `index` and `store`.

pub mod canon;
pub mod digest;
pub mod error;
pub mod index;
pub mod key;
pub mod lease;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::digest::Digest;
use crate::error::Error;
use crate::index::Claim;
use crate::store::{Fate, Lookup, UsageStats};

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
    "An artifact failed its checksum, length, digest or signature check."
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
            | Error::NoStore { .. }
            | Error::ReadOnly { .. } => StoreError::new_err(msg),
        }
    }
}

fn warn(py: Python<'_>, logger: &str, msg: String) -> PyResult<()> {
    py.import("logging")?
        .call_method1("getLogger", (logger,))?
        .call_method1("warning", (msg,))?;
    Ok(())
}

/// The canonical encoding of a graph module.
#[pyclass(frozen, module = "isocache._core")]
struct Encoding {
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

/// Returns `(hex digest, reason it is not reusable or None)`.
#[pyfunction(name = "digest")]
#[pyo3(signature = (gm, example_inputs=None, namespace=""))]
fn graph_digest(
    gm: &Bound<'_, PyAny>,
    example_inputs: Option<&Bound<'_, PyAny>>,
    namespace: &str,
) -> PyResult<(String, Option<String>)> {
    let enc = canon::fx::encode_graph_module(gm, example_inputs, false)?;
    let salt = enc.unencodable.as_ref().map(|_| canon::unique_salt());
    let d = canon::digest(namespace.as_bytes(), &enc.bytes, salt.as_ref());
    Ok((canon::to_hex(&d), enc.unencodable))
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

/// The checked file image of an artifact (header + payload), as the store
/// writes it: used to ship artifacts through other tiers (Redis).
#[pyfunction]
#[pyo3(signature = (digest, payload, compile_seconds=0.0, key=None))]
fn pack_artifact<'py>(
    py: Python<'py>,
    digest: &str,
    payload: &[u8],
    compile_seconds: f64,
    key: Option<&[u8]>,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = Digest::parse(digest)?;
    let key = key.map(key::signing_key).transpose()?;
    let image = py.detach(|| store::file_image(&d, payload, compile_seconds, key.as_ref()));
    Ok(PyBytes::new(py, &image))
}

/// Checks an artifact image against `digest` (and `key`): `(payload, compile_seconds)`.
/// Raises `CorruptArtifactError` naming what is wrong.
#[pyfunction]
#[pyo3(signature = (digest, image, key=None))]
fn unpack_artifact<'py>(
    py: Python<'py>,
    digest: &str,
    image: &[u8],
    key: Option<&[u8]>,
) -> PyResult<(Bound<'py, PyBytes>, f64)> {
    let d = Digest::parse(digest)?;
    let key = key.map(key::signing_key).transpose()?;
    match py.detach(|| store::check_file(image, &d, key.as_ref())) {
        Ok((header, range)) => Ok((PyBytes::new(py, &image[range]), header.compile_seconds)),
        Err(reason) => Err(CorruptArtifactError::new_err(reason)),
    }
}

/// 16 hex characters naming `key` in public (a one-way BLAKE3 derivation).
#[pyfunction]
fn key_fingerprint(key: &[u8]) -> String {
    key::fingerprint(key)
}

/// The namespaces that exist under a store root.
#[pyfunction]
fn list_namespaces(py: Python<'_>, root: PathBuf) -> PyResult<Vec<String>> {
    Ok(py.detach(|| store::Store::namespaces(&root))?)
}

/// The canonical name of a call target (`aten::add.Tensor`, `torch.nn.functional.silu`).
#[pyfunction]
fn canonical_target(target: &Bound<'_, PyAny>) -> PyResult<String> {
    canon::fx::canonical_target(target)?
        .map(|n| n.to_string())
        .map_err(|e| CacheError::new_err(e.to_string()))
}

type PyIndex = index::Index<Arc<Py<PyAny>>>;

/// A snapshot of one index entry.
#[pyclass(frozen, module = "isocache._core")]
struct IndexEntry {
    #[pyo3(get)]
    digest: String,
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
    fn __repr__(&self) -> String {
        format!(
            "IndexEntry(digest={:?}, state={:?}, hits={}, compile_seconds={:.3})",
            self.digest, self.state, self.hits, self.compile_seconds
        )
    }
}

fn entry_snapshot(py: Python<'_>, digest: &str, e: &index::Entry<Arc<Py<PyAny>>>) -> IndexEntry {
    IndexEntry {
        digest: digest.to_owned(),
        state: e.state.as_str(),
        value: e.value.as_ref().map(|v| v.clone_ref(py)),
        hits: e.hits(),
        compile_seconds: e.compile_seconds,
        reason: e.reason.clone(),
    }
}

/// Lock-free map digest -> compiled callable, shared by the threads of a process.
#[pyclass(frozen, module = "isocache._core")]
struct Index {
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

    fn get(&self, py: Python<'_>, digest: &str) -> Option<IndexEntry> {
        self.inner
            .get(digest)
            .map(|e| entry_snapshot(py, digest, &e))
    }

    /// True when the caller now owns the compile of `digest`.
    fn claim(&self, digest: &str) -> bool {
        matches!(self.inner.claim(digest), Claim::Claimed)
    }

    #[pyo3(signature = (digest, value, compile_seconds=0.0))]
    fn publish(&self, py: Python<'_>, digest: &str, value: Py<PyAny>, compile_seconds: f64) {
        let value = Arc::new(value);
        py.detach(|| self.inner.publish(digest, value, compile_seconds));
    }

    fn fail(&self, py: Python<'_>, digest: &str, reason: String) {
        py.detach(|| self.inner.fail(digest, reason));
    }

    fn abandon(&self, py: Python<'_>, digest: &str) {
        py.detach(|| self.inner.abandon(digest));
    }

    fn remove(&self, py: Python<'_>, digest: &str) -> bool {
        py.detach(|| self.inner.remove(digest))
    }

    fn record_hit(&self, digest: &str) -> u64 {
        self.inner.record_hit(digest)
    }

    /// Waits (without holding the GIL) until `digest` is no longer compiling.
    fn wait(&self, py: Python<'_>, digest: &str, timeout: f64) -> Option<IndexEntry> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let e = py.detach(|| self.inner.wait(digest, timeout));
        e.map(|e| entry_snapshot(py, digest, &e))
    }

    fn entries(&self, py: Python<'_>) -> Vec<IndexEntry> {
        self.inner
            .entries()
            .iter()
            .map(|(d, e)| entry_snapshot(py, d, e))
            .collect()
    }

    fn clear(&self, py: Python<'_>) {
        py.detach(|| self.inner.clear());
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, digest: &str) -> bool {
        self.inner.get(digest).is_some()
    }
}

/// A held compile lease (an OS file lock; released on `release()`, on exit
/// from a `with` block, or when the process dies).
#[pyclass(module = "isocache._core")]
struct Lease {
    inner: Option<lease::Lease>,
}

#[pymethods]
impl Lease {
    fn release(&mut self) {
        self.inner = None;
    }

    #[getter]
    fn held(&self) -> bool {
        self.inner.is_some()
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.inner = None;
        false
    }
}

fn default_root() -> PyResult<PathBuf> {
    if let Some(dir) = std::env::var_os("ISOCACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("isocache")),
        None => Err(StoreError::new_err(
            "no cache directory: set ISOCACHE_DIR (HOME is not set either)",
        )),
    }
}

/// Content-addressed store of checked byte blobs under a private directory.
#[pyclass(frozen, module = "isocache._core")]
struct Store {
    inner: store::Store,
    quarantined: AtomicU64,
}

#[pymethods]
impl Store {
    /// Opens the store for `namespace` under `root`. `create=False` opens an
    /// existing store read-only: it creates, cleans and moves nothing, and
    /// raises `StoreError` when the store does not exist.
    #[new]
    #[pyo3(signature = (root=None, namespace="default", key=None, create=true))]
    fn new(
        py: Python<'_>,
        root: Option<PathBuf>,
        namespace: &str,
        key: Option<&[u8]>,
        create: bool,
    ) -> PyResult<Self> {
        let root = match root {
            Some(r) => r,
            None => default_root()?,
        };
        let key = key.map(key::signing_key).transpose()?;
        let inner = py.detach(|| {
            if create {
                store::Store::open(&root, namespace, key)
            } else {
                store::Store::open_existing(&root, namespace, key)
            }
        })?;
        Ok(Store {
            inner,
            quarantined: AtomicU64::new(0),
        })
    }

    #[pyo3(signature = (digest, data, compile_seconds=0.0))]
    fn put(&self, py: Python<'_>, digest: &str, data: &[u8], compile_seconds: f64) -> PyResult<()> {
        let d = Digest::parse(digest)?;
        py.detach(|| self.inner.put(&d, data, compile_seconds))?;
        Ok(())
    }

    /// `(payload, compile_seconds)` or None on a miss or a bad entry (which
    /// costs one warning on the `isocache.store` logger).
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        digest: &str,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, f64)>> {
        let d = Digest::parse(digest)?;
        match py.detach(|| self.inner.get(&d))? {
            Lookup::Hit {
                payload,
                compile_seconds,
            } => Ok(Some((PyBytes::new(py, &payload), compile_seconds))),
            Lookup::Miss => Ok(None),
            Lookup::Corrupt { reason, fate } => {
                self.quarantined.fetch_add(1, Ordering::Relaxed);
                let whereto = match fate {
                    Fate::Quarantined(p) => format!("moved to {}", p.display()),
                    Fate::Gone => "already moved by another process".into(),
                    Fate::LeftInPlace => "left in place".into(),
                };
                warn(
                    py,
                    "isocache.store",
                    format!("isocache: ignoring bad artifact {digest}: {reason} ({whereto})"),
                )?;
                Ok(None)
            }
        }
    }

    fn get<'py>(&self, py: Python<'py>, digest: &str) -> PyResult<Option<Bound<'py, PyBytes>>> {
        Ok(self.lookup(py, digest)?.map(|(b, _)| b))
    }

    fn contains(&self, py: Python<'_>, digest: &str) -> PyResult<bool> {
        let d = Digest::parse(digest)?;
        Ok(py.detach(|| self.inner.contains(&d)))
    }

    fn __contains__(&self, py: Python<'_>, digest: &str) -> PyResult<bool> {
        self.contains(py, digest)
    }

    fn remove(&self, py: Python<'_>, digest: &str) -> PyResult<bool> {
        let d = Digest::parse(digest)?;
        Ok(py.detach(|| self.inner.remove(&d))?)
    }

    /// `[(digest, size_bytes, last_used_unix_seconds, compile_seconds), ...]`
    fn list(&self, py: Python<'_>) -> PyResult<Vec<(String, u64, f64, f64)>> {
        let objs = py.detach(|| self.inner.list())?;
        Ok(objs
            .into_iter()
            .map(|o| (o.digest, o.size, o.last_used, o.compile_seconds))
            .collect())
    }

    /// `[(name, size_bytes, quarantined_at_unix_seconds), ...]`, oldest first.
    fn quarantine(&self, py: Python<'_>) -> Vec<(String, u64, f64)> {
        py.detach(|| self.inner.quarantined())
            .into_iter()
            .map(|q| (q.name, q.size, q.quarantined_at))
            .collect()
    }

    /// Removes one entry of the quarantine; false when there was none.
    fn remove_quarantined(&self, py: Python<'_>, name: &str) -> PyResult<bool> {
        Ok(py.detach(|| self.inner.remove_quarantined(name))?)
    }

    /// Takes the compile lease of `digest`, waiting up to `timeout` seconds
    /// (0: do not wait). None when another process still holds it.
    #[pyo3(signature = (digest, timeout=0.0))]
    fn lease(&self, py: Python<'_>, digest: &str, timeout: f64) -> PyResult<Option<Lease>> {
        let d = Digest::parse(digest)?;
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let held = py.detach(|| self.inner.lease(&d, timeout))?;
        Ok(held.map(|l| Lease { inner: Some(l) }))
    }

    /// True when some process holds the compile lease of `digest`.
    fn lease_held(&self, py: Python<'_>, digest: &str) -> PyResult<bool> {
        let d = Digest::parse(digest)?;
        Ok(py.detach(|| self.inner.lease_held(&d)))
    }

    /// Brings artifacts and quarantine down to at most `max_bytes` (quarantine
    /// first, then least recently used): `(removed, freed_bytes, remaining,
    /// remaining_bytes)`.
    fn gc(&self, py: Python<'_>, max_bytes: u64) -> PyResult<(usize, u64, usize, u64)> {
        let r = py.detach(|| self.inner.gc(max_bytes))?;
        Ok((r.removed, r.freed_bytes, r.remaining, r.remaining_bytes))
    }

    /// `(entries checked, [(name, reason), ...])`; `fix` moves bad entries to quarantine.
    #[pyo3(signature = (fix=false))]
    fn verify(&self, py: Python<'_>, fix: bool) -> PyResult<(usize, Vec<(String, String)>)> {
        Ok(py.detach(|| self.inner.verify(fix))?)
    }

    /// Bytes of artifacts and quarantine.
    fn total_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(py.detach(|| self.inner.total_bytes())?)
    }

    /// Adds to the counters shared by every process using this namespace,
    /// waiting up to `timeout` seconds for their lock. False: the lock stayed
    /// busy and the update was skipped.
    #[pyo3(signature = (hits=0, misses=0, saved_seconds=0.0, remote_hits=0, remote_misses=0, remote_errors=0, timeout=10.0))]
    #[allow(clippy::too_many_arguments)]
    fn record_usage(
        &self,
        py: Python<'_>,
        hits: u64,
        misses: u64,
        saved_seconds: f64,
        remote_hits: u64,
        remote_misses: u64,
        remote_errors: u64,
        timeout: f64,
    ) -> PyResult<bool> {
        let delta = UsageStats {
            hits,
            misses,
            saved_seconds,
            remote_hits,
            remote_misses,
            remote_errors,
        };
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        Ok(py
            .detach(|| self.inner.record_usage(delta, timeout))?
            .is_some())
    }

    /// Counters over every process that used this namespace: `hits`,
    /// `misses`, `saved_seconds`, `remote_hits`, `remote_misses`, `remote_errors`.
    fn usage<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let u = py.detach(|| self.inner.usage());
        let d = pyo3::types::PyDict::new(py);
        d.set_item("hits", u.hits)?;
        d.set_item("misses", u.misses)?;
        d.set_item("saved_seconds", u.saved_seconds)?;
        d.set_item("remote_hits", u.remote_hits)?;
        d.set_item("remote_misses", u.remote_misses)?;
        d.set_item("remote_errors", u.remote_errors)?;
        Ok(d)
    }

    /// Removes every artifact of this namespace; returns how many.
    fn clear(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(py.detach(|| self.inner.clear())?)
    }

    /// Removes temporary files no writer holds a lock on (or older than
    /// `max_age` seconds); a read-only store removes nothing.
    #[pyo3(signature = (max_age=86400.0))]
    fn clean_tmp(&self, py: Python<'_>, max_age: f64) -> usize {
        let age = Duration::from_secs_f64(max_age.max(0.0));
        py.detach(|| self.inner.clean_tmp(age))
    }

    fn object_path(&self, digest: &str) -> PyResult<PathBuf> {
        Ok(self.inner.object_path(&Digest::parse(digest)?))
    }

    #[getter]
    fn root(&self) -> PathBuf {
        self.inner.root().to_owned()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir().to_owned()
    }

    #[getter]
    fn signed(&self) -> bool {
        self.inner.is_signed()
    }

    /// False for a store opened with `create=False`.
    #[getter]
    fn writable(&self) -> bool {
        self.inner.is_writable()
    }

    /// Bad entries this handle has refused (and, when writable, moved to quarantine).
    #[getter]
    fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    fn __repr__(&self) -> String {
        format!("Store({:?})", self.inner.dir().display().to_string())
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", canon::FORMAT_VERSION)?;
    m.add("STORE_FORMAT_VERSION", store::FORMAT_VERSION)?;
    m.add("CacheError", py.get_type::<CacheError>())?;
    m.add("InvalidDigestError", py.get_type::<InvalidDigestError>())?;
    m.add("InvalidKeyError", py.get_type::<InvalidKeyError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("InsecureStoreError", py.get_type::<InsecureStoreError>())?;
    m.add(
        "CorruptArtifactError",
        py.get_type::<CorruptArtifactError>(),
    )?;
    m.add_class::<Encoding>()?;
    m.add_class::<IndexEntry>()?;
    m.add_class::<Index>()?;
    m.add_class::<Store>()?;
    m.add_class::<Lease>()?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(graph_digest, m)?)?;
    m.add_function(wrap_pyfunction!(digest_encoding, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_target, m)?)?;
    m.add_function(wrap_pyfunction!(blake3_hex, m)?)?;
    m.add_function(wrap_pyfunction!(list_namespaces, m)?)?;
    m.add_function(wrap_pyfunction!(key_fingerprint, m)?)?;
    m.add("MIN_KEY_BYTES", key::MIN_KEY_LEN)?;
    m.add_function(wrap_pyfunction!(pack_artifact, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_artifact, m)?)?;
    Ok(())
}
