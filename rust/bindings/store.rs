//! The store as Python sees it: `Store`, `Lease`, module-level root
//! functions, and the frozen result classes they return. Conversion only:
//! every decision is made in `crate::store`.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::artifact::artifact_kind;
use super::digest::{DigestArg, PyDigest};
use super::{detached, py_repr, py_repr_opt, ByteCap};
use crate::bounds;
use crate::digest::Digest;
use crate::key;
use crate::store::{self, Fate, Root, UsageStats};

/// `"quarantined"`, `"gone"` (another process moved it first) or
/// `"left_in_place"` (a read-only store, or a transient error), and where a
/// quarantined entry went.
fn fate_parts(fate: &Fate) -> (&'static str, Option<PathBuf>) {
    match fate {
        Fate::Quarantined(p) => ("quarantined", Some(p.clone())),
        Fate::Gone => ("gone", None),
        Fate::LeftInPlace => ("left_in_place", None),
    }
}

/// What `Store.get_checked` found.
#[pyclass(frozen, module = "isocache._core")]
pub struct Lookup {
    digest: PyDigest,
    /// `"hit"`, `"miss"` or `"corrupt"`.
    #[pyo3(get)]
    status: &'static str,
    /// The payload of a hit.
    #[pyo3(get)]
    payload: Option<Py<PyBytes>>,
    /// Seconds the compile took (0.0 unless a hit).
    #[pyo3(get)]
    compile_seconds: f64,
    /// `"piece"` or `"model"` for a hit.
    #[pyo3(get)]
    kind: Option<&'static str>,
    /// The check a corrupt entry failed (`"checksum"`, `"symlink"`, ...).
    #[pyo3(get)]
    corruption: Option<&'static str>,
    /// The same, as a sentence.
    #[pyo3(get)]
    reason: Option<String>,
    /// What became of a corrupt entry.
    #[pyo3(get)]
    fate: Option<&'static str>,
    #[pyo3(get)]
    quarantined_to: Option<PathBuf>,
}

#[pymethods]
impl Lookup {
    #[getter]
    fn digest(&self) -> PyDigest {
        self.digest
    }

    fn __repr__(&self) -> String {
        match self.status {
            "corrupt" => format!(
                "Lookup(status='corrupt', digest='{}', corruption={}, reason={}, fate={})",
                self.digest.0.hex(),
                py_repr_opt(self.corruption),
                py_repr_opt(self.reason.as_deref()),
                py_repr_opt(self.fate),
            ),
            status => format!(
                "Lookup(status={}, digest='{}', kind={})",
                py_repr(status),
                self.digest.0.hex(),
                py_repr_opt(self.kind)
            ),
        }
    }
}

impl Lookup {
    fn new(py: Python<'_>, digest: Digest, found: store::Lookup) -> Lookup {
        let mut out = Lookup {
            digest: PyDigest(digest),
            status: "miss",
            payload: None,
            compile_seconds: 0.0,
            kind: None,
            corruption: None,
            reason: None,
            fate: None,
            quarantined_to: None,
        };
        match found {
            store::Lookup::Hit {
                payload,
                compile_seconds,
                kind,
            } => {
                out.status = "hit";
                out.payload = Some(PyBytes::new(py, &payload).unbind());
                out.compile_seconds = compile_seconds;
                out.kind = Some(kind.as_str());
            }
            store::Lookup::Miss => {}
            store::Lookup::Corrupt { corruption, fate } => {
                let (fate, to) = fate_parts(&fate);
                out.status = "corrupt";
                out.corruption = Some(corruption.kind.as_str());
                out.reason = Some(corruption.reason);
                out.fate = Some(fate);
                out.quarantined_to = to;
            }
        }
        out
    }
}

/// One stored artifact.
#[pyclass(frozen, module = "isocache._core")]
#[derive(Clone)]
pub struct ObjectInfo {
    #[pyo3(get)]
    namespace: String,
    digest: PyDigest,
    /// Bytes on disk, header included.
    #[pyo3(get)]
    size: u64,
    /// Last load or publish (Unix seconds): the eviction order.
    #[pyo3(get)]
    last_used: f64,
    #[pyo3(get)]
    compile_seconds: f64,
    /// `"piece"` or `"model"`.
    #[pyo3(get)]
    kind: &'static str,
}

#[pymethods]
impl ObjectInfo {
    #[getter]
    fn digest(&self) -> PyDigest {
        self.digest
    }

    fn __repr__(&self) -> String {
        format!(
            "ObjectInfo(namespace={}, digest='{}', size={}, kind={})",
            py_repr(&self.namespace),
            self.digest.0.hex(),
            self.size,
            py_repr(self.kind)
        )
    }
}

impl From<store::ObjectInfo> for ObjectInfo {
    fn from(o: store::ObjectInfo) -> Self {
        ObjectInfo {
            namespace: o.namespace,
            digest: PyDigest(o.digest),
            size: o.size,
            last_used: o.last_used,
            compile_seconds: o.compile_seconds,
            kind: o.kind.as_str(),
        }
    }
}

/// What a garbage collection (or a put over the size cap) did.
#[pyclass(frozen, module = "isocache._core")]
pub struct GcReport {
    /// Artifacts evicted.
    #[pyo3(get)]
    removed: usize,
    /// Quarantined entries removed.
    #[pyo3(get)]
    quarantine_removed: usize,
    /// Bytes freed, quarantine included.
    #[pyo3(get)]
    freed_bytes: u64,
    /// Artifacts left.
    #[pyo3(get)]
    remaining: usize,
    /// Bytes left, quarantine included.
    #[pyo3(get)]
    remaining_bytes: u64,
    /// The artifacts evicted, least recently used first.
    #[pyo3(get)]
    evicted: Vec<ObjectInfo>,
}

#[pymethods]
impl GcReport {
    fn __repr__(&self) -> String {
        format!(
            "GcReport(removed={}, quarantine_removed={}, freed_bytes={}, remaining={}, remaining_bytes={})",
            self.removed, self.quarantine_removed, self.freed_bytes, self.remaining, self.remaining_bytes
        )
    }
}

impl From<store::GcReport> for GcReport {
    fn from(r: store::GcReport) -> Self {
        GcReport {
            removed: r.removed,
            quarantine_removed: r.quarantine_removed,
            freed_bytes: r.freed_bytes,
            remaining: r.remaining,
            remaining_bytes: r.remaining_bytes,
            evicted: r.evicted.into_iter().map(ObjectInfo::from).collect(),
        }
    }
}

/// An entry `verify` found bad.
#[pyclass(frozen, module = "isocache._core")]
#[derive(Clone)]
pub struct BadEntry {
    /// Its name in its shard (a digest's hex), or a bad shard directory's name.
    #[pyo3(get)]
    name: String,
    /// The check it failed (`"checksum"`, `"symlink"`, ...).
    #[pyo3(get)]
    corruption: &'static str,
    #[pyo3(get)]
    reason: String,
    /// What `verify(fix=True)` did with it; None without `fix`.
    #[pyo3(get)]
    fate: Option<&'static str>,
    #[pyo3(get)]
    quarantined_to: Option<PathBuf>,
}

#[pymethods]
impl BadEntry {
    /// The digest it is stored under; None for a bad shard directory.
    #[getter]
    fn digest(&self) -> Option<PyDigest> {
        Digest::parse(&self.name).ok().map(PyDigest)
    }

    fn __repr__(&self) -> String {
        format!(
            "BadEntry(name={}, corruption={}, reason={})",
            py_repr(&self.name),
            py_repr(self.corruption),
            py_repr(&self.reason)
        )
    }
}

/// What `verify` found.
#[pyclass(frozen, module = "isocache._core")]
pub struct VerifyReport {
    /// Entries checked, good and bad.
    #[pyo3(get)]
    checked: usize,
    /// Good pieces.
    #[pyo3(get)]
    pieces: usize,
    /// Good model entries.
    #[pyo3(get)]
    models: usize,
    #[pyo3(get)]
    bad: Vec<BadEntry>,
}

#[pymethods]
impl VerifyReport {
    fn __repr__(&self) -> String {
        format!(
            "VerifyReport(checked={}, pieces={}, models={}, bad={})",
            self.checked,
            self.pieces,
            self.models,
            self.bad.len()
        )
    }
}

impl From<store::VerifyReport> for VerifyReport {
    fn from(r: store::VerifyReport) -> Self {
        VerifyReport {
            checked: r.checked,
            pieces: r.pieces,
            models: r.models,
            bad: r
                .bad
                .into_iter()
                .map(|b| {
                    let (fate, to) = match &b.fate {
                        Some(f) => {
                            let (f, to) = fate_parts(f);
                            (Some(f), to)
                        }
                        None => (None, None),
                    };
                    BadEntry {
                        name: b.name,
                        corruption: b.corruption.kind.as_str(),
                        reason: b.corruption.reason,
                        fate,
                        quarantined_to: to,
                    }
                })
                .collect(),
        }
    }
}

/// One entry of a namespace's quarantine.
#[pyclass(frozen, module = "isocache._core")]
pub struct QuarantineEntry {
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    size: u64,
    /// When it was quarantined (Unix seconds).
    #[pyo3(get)]
    quarantined_at: f64,
}

#[pymethods]
impl QuarantineEntry {
    fn __repr__(&self) -> String {
        format!(
            "QuarantineEntry(name={}, size={}, quarantined_at={:?})",
            py_repr(&self.name),
            self.size,
            self.quarantined_at
        )
    }
}

/// The counters every process that used a namespace added to.
#[pyclass(frozen, module = "isocache._core")]
pub struct Usage {
    #[pyo3(get)]
    hits: u64,
    #[pyo3(get)]
    misses: u64,
    #[pyo3(get)]
    saved_seconds: f64,
    #[pyo3(get)]
    remote_hits: u64,
    #[pyo3(get)]
    remote_misses: u64,
    #[pyo3(get)]
    remote_errors: u64,
}

#[pymethods]
impl Usage {
    fn __repr__(&self) -> String {
        format!(
            "Usage(hits={}, misses={}, saved_seconds={:?}, remote_hits={}, remote_misses={}, remote_errors={})",
            self.hits, self.misses, self.saved_seconds, self.remote_hits, self.remote_misses, self.remote_errors
        )
    }
}

/// What a root holds, every namespace together.
#[pyclass(frozen, module = "isocache._core")]
pub struct RootSize {
    /// Bytes of artifacts and quarantine.
    #[pyo3(get)]
    bytes: u64,
    #[pyo3(get)]
    artifacts: u64,
    /// When these figures were last established by a full scan (Unix seconds).
    #[pyo3(get)]
    scanned_at: u64,
}

#[pymethods]
impl RootSize {
    fn __repr__(&self) -> String {
        format!(
            "RootSize(bytes={}, artifacts={}, scanned_at={})",
            self.bytes, self.artifacts, self.scanned_at
        )
    }
}

impl From<store::RootSize> for RootSize {
    fn from(s: store::RootSize) -> Self {
        RootSize {
            bytes: s.bytes,
            artifacts: s.artifacts,
            scanned_at: s.scanned_at,
        }
    }
}

/// What `Store.sign_existing` did (see `store/sign.rs`).
#[pyclass(frozen, module = "isocache._core")]
pub struct SignReport {
    /// False: no key, a read-only store, or this key's pass ran before.
    #[pyo3(get)]
    ran: bool,
    /// Artifacts signed in place with the key.
    #[pyo3(get)]
    signed: u64,
    /// Artifacts that failed their integrity check: moved to quarantine.
    #[pyo3(get)]
    damaged: u64,
    /// Artifacts signed with another key: moved to quarantine.
    #[pyo3(get)]
    other_key: u64,
    /// Artifacts already signed with the key.
    #[pyo3(get)]
    already: u64,
    /// Artifacts that could not be read or rewritten: left in place.
    #[pyo3(get)]
    left: u64,
}

#[pymethods]
impl SignReport {
    fn __repr__(&self) -> String {
        format!(
            "SignReport(ran={}, signed={}, damaged={}, other_key={}, already={}, left={})",
            if self.ran { "True" } else { "False" },
            self.signed,
            self.damaged,
            self.other_key,
            self.already,
            self.left
        )
    }
}

impl From<store::SignReport> for SignReport {
    fn from(r: store::SignReport) -> Self {
        SignReport {
            ran: r.ran,
            signed: r.signed,
            damaged: r.damaged,
            other_key: r.other_key,
            already: r.already,
            left: r.left,
        }
    }
}

/// A held compile lease (an OS file lock; released on `release()`, on exit
/// from a `with` block, or when the process dies).
#[pyclass(module = "isocache._core")]
pub struct Lease {
    inner: Option<crate::lease::Lease>,
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

/// Content-addressed store of checked byte blobs under a private directory.
#[pyclass(frozen, module = "isocache._core")]
pub struct Store {
    inner: store::Store,
    /// The signing key older versions derived from the same secret.
    legacy: Option<[u8; 32]>,
}

#[pymethods]
impl Store {
    /// Opens the store for `namespace` under `root` (default: `$ISOCACHE_DIR`
    /// or `~/.cache/isocache`). `create=False` opens an existing store
    /// read-only: it creates, cleans and moves nothing, and raises
    /// `StoreError` when the store does not exist. `base=True` opens an
    /// existing store as a read-only base (`ISOCACHE_BASE`): as
    /// `create=False`, and also trusting what root owns (never written).
    #[new]
    #[pyo3(signature = (root=None, namespace="default", key=None, create=true, base=false))]
    fn new(
        py: Python<'_>,
        root: Option<PathBuf>,
        namespace: &str,
        key: Option<&[u8]>,
        create: bool,
        base: bool,
    ) -> PyResult<Self> {
        let root = match root {
            Some(r) => r,
            None => Root::default_path()?,
        };
        let legacy = key.map(key::legacy_signing_key).transpose()?;
        let key = key
            .map(|k| detached(py, || key::signing_key(k)))
            .transpose()?;
        let inner = detached(py, || {
            if base {
                store::Store::open_base(&root, namespace, key)
            } else if create {
                store::Store::open(&root, namespace, key)
            } else {
                store::Store::open_existing(&root, namespace, key)
            }
        })?;
        Ok(Store { inner, legacy })
    }

    /// Publishes `data` under `digest`. With `max_bytes`, a root now over it
    /// is brought down to 90% of it, least recently used first, across all
    /// its namespaces: the report says what went (None: nothing needed to).
    #[pyo3(signature = (digest, data, compile_seconds=0.0, max_bytes=None, kind="piece"))]
    fn put(
        &self,
        py: Python<'_>,
        digest: DigestArg,
        data: &[u8],
        compile_seconds: f64,
        max_bytes: Option<ByteCap>,
        kind: &str,
    ) -> PyResult<Option<GcReport>> {
        let kind = artifact_kind(kind)?;
        let max_bytes = max_bytes.map(|m| bounds::byte_cap(m.0));
        let report = detached(py, || {
            self.inner
                .publish(&digest.0, data, compile_seconds, kind, max_bytes)
        })?;
        Ok(report.map(GcReport::from))
    }

    /// Reads and checks the artifact of `digest`. Never logs: a bad entry
    /// is a `"corrupt"` result (moved to quarantine when the store is
    /// writable), for the caller to report.
    fn get_checked(&self, py: Python<'_>, digest: DigestArg) -> PyResult<Lookup> {
        let found = detached(py, || self.inner.get(&digest.0))?;
        Ok(Lookup::new(py, digest.0, found))
    }

    fn contains(&self, py: Python<'_>, digest: DigestArg) -> PyResult<bool> {
        detached(py, || Ok(self.inner.contains(&digest.0)))
    }

    fn __contains__(&self, py: Python<'_>, digest: DigestArg) -> PyResult<bool> {
        self.contains(py, digest)
    }

    fn remove(&self, py: Python<'_>, digest: DigestArg) -> PyResult<bool> {
        detached(py, || self.inner.remove(&digest.0))
    }

    /// `[(digest hex, size_bytes, last_used_unix_seconds, compile_seconds), ...]`;
    /// `objects()` gives typed entries with their kind.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<(String, u64, f64, f64)>> {
        let objs = detached(py, || self.inner.list())?;
        Ok(objs
            .into_iter()
            .map(|o| (o.digest.hex(), o.size, o.last_used, o.compile_seconds))
            .collect())
    }

    /// Every artifact of this namespace, sorted by digest.
    fn objects(&self, py: Python<'_>) -> PyResult<Vec<ObjectInfo>> {
        let objs = detached(py, || self.inner.list())?;
        Ok(objs.into_iter().map(ObjectInfo::from).collect())
    }

    /// The quarantine, oldest first.
    fn quarantine(&self, py: Python<'_>) -> PyResult<Vec<QuarantineEntry>> {
        Ok(detached(py, || Ok(self.inner.quarantined()))?
            .into_iter()
            .map(|q| QuarantineEntry {
                name: q.name,
                size: q.size,
                quarantined_at: q.quarantined_at,
            })
            .collect())
    }

    /// Removes one entry of the quarantine; false when there was none.
    fn remove_quarantined(&self, py: Python<'_>, name: &str) -> PyResult<bool> {
        detached(py, || self.inner.remove_quarantined(name))
    }

    /// Takes the compile lease of `digest`, waiting up to `timeout` seconds
    /// (0: do not wait). None when another process still holds it.
    #[pyo3(signature = (digest, timeout=0.0))]
    fn lease(&self, py: Python<'_>, digest: DigestArg, timeout: f64) -> PyResult<Option<Lease>> {
        let timeout = bounds::wait(timeout);
        let held = detached(py, || self.inner.lease(&digest.0, timeout))?;
        Ok(held.map(|l| Lease { inner: Some(l) }))
    }

    /// True when some process holds the compile lease of `digest`.
    fn lease_held(&self, py: Python<'_>, digest: DigestArg) -> PyResult<bool> {
        detached(py, || Ok(self.inner.lease_held(&digest.0)))
    }

    /// Brings this namespace's artifacts and quarantine down to at most
    /// `max_bytes` (quarantine first, then least recently used).
    fn gc(&self, py: Python<'_>, max_bytes: ByteCap) -> PyResult<GcReport> {
        let max_bytes = bounds::byte_cap(max_bytes.0);
        Ok(detached(py, || self.inner.gc(max_bytes))?.into())
    }

    /// Checks every artifact; `fix` moves bad entries to quarantine.
    #[pyo3(signature = (fix=false))]
    fn verify(&self, py: Python<'_>, fix: bool) -> PyResult<VerifyReport> {
        Ok(detached(py, || self.inner.verify(fix))?.into())
    }

    /// Bytes of this namespace's artifacts and quarantine (a scan).
    fn total_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        detached(py, || self.inner.total_bytes())
    }

    /// The whole root's size, every namespace: O(1) from its running record.
    fn root_size(&self, py: Python<'_>) -> PyResult<RootSize> {
        Ok(detached(py, || self.inner.root_size())?.into())
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
        let timeout = bounds::wait(timeout);
        Ok(detached(py, || self.inner.record_usage(delta, timeout))?.is_some())
    }

    /// Counters over every process that used this namespace.
    fn usage(&self, py: Python<'_>) -> PyResult<Usage> {
        let u = detached(py, || Ok(self.inner.usage()))?;
        Ok(Usage {
            hits: u.hits,
            misses: u.misses,
            saved_seconds: u.saved_seconds,
            remote_hits: u.remote_hits,
            remote_misses: u.remote_misses,
            remote_errors: u.remote_errors,
        })
    }

    /// Writes what made this namespace (a short text: isocache writes JSON)
    /// unless it already holds exactly that; True when written.
    fn describe(&self, py: Python<'_>, text: String) -> PyResult<bool> {
        detached(py, || self.inner.describe(&text))
    }

    /// What made this namespace, or None (a store written before
    /// descriptions existed, or a file that is not private and small).
    fn description(&self, py: Python<'_>) -> PyResult<Option<String>> {
        detached(py, || Ok(self.inner.description()))
    }

    /// Signs the existing artifacts with the key, once per key: the first
    /// use of a key (see `store/sign.rs`). Nothing without a key or when
    /// read-only.
    fn sign_existing(&self, py: Python<'_>) -> PyResult<SignReport> {
        Ok(py
            .detach(|| self.inner.sign_existing(self.legacy.as_ref()))?
            .into())
    }

    /// Removes every artifact of this namespace; returns how many.
    fn clear(&self, py: Python<'_>) -> PyResult<usize> {
        detached(py, || self.inner.clear())
    }

    /// Removes temporary files no writer holds a lock on (or older than
    /// `max_age` seconds); a read-only store removes nothing.
    #[pyo3(signature = (max_age=86400.0))]
    fn clean_tmp(&self, py: Python<'_>, max_age: f64) -> PyResult<usize> {
        let age = bounds::seconds(max_age, Duration::MAX);
        detached(py, || Ok(self.inner.clean_tmp(age)))
    }

    fn object_path(&self, digest: DigestArg) -> PathBuf {
        self.inner.object_path(&digest.0)
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
    fn namespace(&self) -> String {
        self.inner.namespace().to_owned()
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
        self.inner.refused()
    }

    /// Times this process changed the root without its size lock (another
    /// process held it past a short wait): the running size skipped those
    /// changes and is recounted when the lock is next free.
    #[getter]
    fn size_lock_skips(&self) -> u64 {
        self.inner.size_lock_skips()
    }

    fn __repr__(&self) -> String {
        format!(
            "Store({})",
            py_repr(&self.inner.dir().display().to_string())
        )
    }
}

/// The namespaces that exist under a store root.
#[pyfunction]
fn list_namespaces(py: Python<'_>, root: PathBuf) -> PyResult<Vec<String>> {
    detached(py, || store::Store::namespaces(&root))
}

/// Brings every namespace under `root` down to at most `max_bytes`:
/// quarantine first, then least recently used artifacts across namespaces;
/// stale temporary and lock files go too. Nothing to do (an empty report)
/// when the root does not exist.
#[pyfunction]
fn gc_root(py: Python<'_>, root: PathBuf, max_bytes: ByteCap) -> PyResult<GcReport> {
    let max_bytes = bounds::byte_cap(max_bytes.0);
    Ok(detached(py, || Root::gc_path(&root, max_bytes))?.into())
}

/// The size of everything under `root`: O(1) from its running record (a
/// scan when there is none yet). Reads only; zero when the root does not exist.
#[pyfunction]
fn root_size(py: Python<'_>, root: PathBuf) -> PyResult<RootSize> {
    Ok(detached(py, || Root::size_of_path(&root))?.into())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Store>()?;
    m.add_class::<Lease>()?;
    m.add_class::<Lookup>()?;
    m.add_class::<ObjectInfo>()?;
    m.add_class::<GcReport>()?;
    m.add_class::<BadEntry>()?;
    m.add_class::<VerifyReport>()?;
    m.add_class::<QuarantineEntry>()?;
    m.add_class::<Usage>()?;
    m.add_class::<RootSize>()?;
    m.add_class::<SignReport>()?;
    m.add_function(wrap_pyfunction!(list_namespaces, m)?)?;
    m.add_function(wrap_pyfunction!(gc_root, m)?)?;
    m.add_function(wrap_pyfunction!(root_size, m)?)?;
    Ok(())
}
