//! Maintenance: eviction under a size cap (one least-recently-used order,
//! for one namespace or a whole root), verification, clearing, the
//! quarantine's caps and stale temporary and lock files. None of it follows
//! a symbolic link: a link found where a directory belongs is itself removed
//! or quarantined, never what it points to.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::fs::FileType;

use super::fs::{self, lstat_at, open_dir_at, remove_at, size_at, utf8};
use super::root::Root;
use super::size::{now_secs, Delta, RootSize, SizeLock};
use super::{
    tmp, unix_seconds, ArtifactKind, Corruption, Digest, Fate, Header, ObjectInfo, Problem, Store,
};
use crate::error::{Error, Result};
use crate::lease::Lease;

/// Quarantined entries older than this are removed by `gc`.
pub const QUARANTINE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most this many entries are kept in quarantine (oldest removed first).
pub const QUARANTINE_MAX_FILES: usize = 64;
/// At most this many bytes are kept in quarantine (oldest removed first).
pub const QUARANTINE_MAX_BYTES: u64 = 256 << 20;

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Artifacts evicted.
    pub removed: usize,
    /// Quarantined entries removed (by age, by the quarantine's caps or to
    /// meet the size cap).
    pub quarantine_removed: usize,
    /// Bytes freed, quarantine included.
    pub freed_bytes: u64,
    /// Bytes left, quarantine included.
    pub remaining_bytes: u64,
    /// Artifacts left.
    pub remaining: usize,
    /// The artifacts evicted, least recently used first.
    pub evicted: Vec<ObjectInfo>,
}

/// An entry `verify` found bad.
#[derive(Debug, Clone, PartialEq)]
pub struct BadEntry {
    /// Its name in its shard (a digest), or the shard's name when the shard
    /// directory itself is bad.
    pub name: String,
    pub corruption: Corruption,
    /// What `verify(fix=true)` did with it; None without `fix`.
    pub fate: Option<Fate>,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    /// Entries checked, good and bad.
    pub checked: usize,
    /// Good pieces and good model entries.
    pub pieces: usize,
    pub models: usize,
    pub bad: Vec<BadEntry>,
}

/// One entry of `quarantine/`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub name: String,
    pub size: u64,
    /// When it was quarantined (Unix seconds).
    pub quarantined_at: f64,
}

/// Quarantined names end in `.<nanoseconds since the epoch>`.
fn quarantined_at(name: &str) -> Option<f64> {
    let (_, nanos) = name.rsplit_once('.')?;
    let nanos: u128 = nanos.parse().ok()?;
    Some(nanos as f64 / 1e9)
}

fn cstring(name: &str) -> Option<CString> {
    CString::new(name).ok()
}

/// Something the least-recently-used order may remove.
enum Victim {
    Quarantined {
        store: usize,
        name: String,
        size: u64,
        at: f64,
    },
    Artifact {
        store: usize,
        digest: Digest,
        size: u64,
        used: f64,
    },
}

impl Victim {
    /// Quarantine first (it is never loaded again), oldest first; then
    /// artifacts, least recently used first.
    fn order(&self) -> (u8, f64) {
        match self {
            Victim::Quarantined { at, .. } => (0, *at),
            Victim::Artifact { used, .. } => (1, *used),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Victim::Quarantined { size, .. } | Victim::Artifact { size, .. } => *size,
        }
    }
}

/// The one eviction order: brings the artifacts and quarantine of `stores`
/// down to at most `target` bytes. Caller holds the size lock (or goes
/// without the record). Returns what is left of `stores`.
fn lru(
    stores: &[Store],
    target: u64,
    report: &mut GcReport,
    delta: &mut Delta,
) -> Result<RootSize> {
    let mut victims = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        for q in s.quarantined() {
            victims.push(Victim::Quarantined {
                store: i,
                name: q.name,
                size: q.size,
                at: q.quarantined_at,
            });
        }
        for o in s.object_entries()? {
            victims.push(Victim::Artifact {
                store: i,
                digest: o.digest,
                size: o.size,
                used: unix_seconds(o.mtime),
            });
        }
    }
    let mut left = RootSize {
        bytes: victims.iter().map(Victim::size).sum(),
        artifacts: victims
            .iter()
            .filter(|v| matches!(v, Victim::Artifact { .. }))
            .count() as u64,
        scanned_at: now_secs(),
    };
    victims.sort_by(|a, b| {
        let (ka, kb) = (a.order(), b.order());
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    for v in &victims {
        if left.bytes <= target {
            break;
        }
        match v {
            Victim::Quarantined {
                store, name, size, ..
            } => {
                if stores[*store].remove_quarantined_inner(name, delta)? {
                    left.bytes = left.bytes.saturating_sub(*size);
                    report.quarantine_removed += 1;
                    report.freed_bytes += size;
                }
            }
            Victim::Artifact {
                store,
                digest,
                size,
                used,
            } => {
                let s = &stores[*store];
                let header = s.header_of(digest);
                if s.remove_inner(digest, delta)? {
                    left.bytes = left.bytes.saturating_sub(*size);
                    left.artifacts = left.artifacts.saturating_sub(1);
                    report.removed += 1;
                    report.freed_bytes += size;
                    report.evicted.push(ObjectInfo {
                        namespace: s.namespace().to_owned(),
                        digest: *digest,
                        size: *size,
                        last_used: *used,
                        compile_seconds: header.as_ref().map_or(0.0, |h| h.compile_seconds),
                        kind: header.as_ref().map_or(ArtifactKind::Piece, Header::kind),
                    });
                }
            }
        }
    }
    report.remaining_bytes = left.bytes;
    report.remaining = left.artifacts as usize;
    Ok(left)
}

/// Brings a whole root (every namespace) down to at most `target` bytes:
/// the quarantine's age and caps first, then one least-recently-used order
/// across namespaces. The listing it works from is a full scan, so the
/// record is rewritten from it. `maintenance` also removes stale temporary
/// and lock files.
pub(crate) fn evict_root(
    root: &Arc<Root>,
    lock: Option<&mut SizeLock<'_>>,
    target: u64,
    maintenance: bool,
) -> Result<GcReport> {
    let stores = root.stores()?;
    let mut report = GcReport::default();
    let mut delta = Delta::default();
    for s in &stores {
        let (n, bytes) = s.prune_inner(QUARANTINE_MAX_AGE, &mut delta);
        report.quarantine_removed += n;
        report.freed_bytes += bytes;
    }
    let left = lru(&stores, target, &mut report, &mut delta)?;
    if maintenance {
        for s in &stores {
            s.clean_tmp(super::TMP_MAX_AGE);
            s.clean_leases();
        }
    }
    if let Some(l) = lock {
        l.set(left);
    }
    Ok(report)
}

impl Root {
    /// Brings every namespace of this root, artifacts and quarantine
    /// together, down to at most `max_bytes` (quarantine first, then least
    /// recently used artifacts across namespaces), removes stale temporary
    /// and lock files, and rewrites the running size from the scan.
    pub fn gc(self: &Arc<Self>, max_bytes: u64) -> Result<GcReport> {
        if !self.is_writable() {
            return Err(Error::ReadOnly {
                path: self.layout().to_owned(),
            });
        }
        let mut lock = self.lock_size();
        evict_root(self, lock.as_mut(), max_bytes, true)
    }

    /// [`Root::gc`] of the root at `path`, opened for this alone: nothing to
    /// do (an empty report) when it does not exist, which it stays.
    pub fn gc_path(path: &Path, max_bytes: u64) -> Result<GcReport> {
        match Root::open_existing_writable(path)? {
            Some(root) => Arc::new(root).gc(max_bytes),
            None => Ok(GcReport::default()),
        }
    }
}

impl Store {
    /// The entries of `quarantine/`, oldest first.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        let Some(q) = &self.quarantine else {
            return Vec::new();
        };
        let mut out: Vec<Quarantined> = fs::entries(q)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, _)| {
                let size = size_at(q.as_fd(), &name);
                let name = utf8(&name)?.to_owned();
                let at = quarantined_at(&name).or_else(|| {
                    lstat_at(q, name.as_str())
                        .ok()
                        .map(|m| unix_seconds(m.ctime))
                })?;
                Some(Quarantined {
                    name,
                    size,
                    quarantined_at: at,
                })
            })
            .collect();
        out.sort_by(|a, b| a.quarantined_at.total_cmp(&b.quarantined_at));
        out
    }

    /// Removes one quarantined entry (a directory tree is removed whole,
    /// links are removed, never followed).
    pub fn remove_quarantined(&self, name: &str) -> Result<bool> {
        self.writable()?;
        let mut lock = self.root_handle().lock_size();
        let mut delta = Delta::default();
        let removed = self.remove_quarantined_inner(name, &mut delta);
        if let Some(l) = &mut lock {
            l.apply(delta);
        }
        removed
    }

    fn remove_quarantined_inner(&self, name: &str, delta: &mut Delta) -> Result<bool> {
        let w = self.writable()?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Ok(false);
        }
        let Some(c) = cstring(name) else {
            return Ok(false);
        };
        let size = size_at(w.quarantine, &c);
        match remove_at(w.quarantine, &c) {
            Ok(()) => {
                delta.add(-Delta::bytes(size));
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => {
                // Part of a tree may be gone: the next full scan settles it.
                Err(Error::io("remove", self.quarantine_dir().join(name), e))
            }
        }
    }

    /// The header of the artifact `digest`, if it is a regular file.
    pub(crate) fn header_of(&self, digest: &Digest) -> Option<Header> {
        let objects = self.objects.as_ref()?;
        let hex = digest.hex();
        let shard = open_dir_at(objects, &hex[..2]).ok()?;
        Store::read_header(shard.as_fd(), &hex)
    }

    /// Applies the quarantine's limits: entries older than `max_age` go,
    /// then the oldest until at most [`QUARANTINE_MAX_FILES`] entries and
    /// [`QUARANTINE_MAX_BYTES`] remain. Returns `(entries, bytes)` removed.
    pub fn prune_quarantine(&self, max_age: Duration) -> (usize, u64) {
        if self.writable().is_err() {
            return (0, 0);
        }
        let mut lock = self.root_handle().lock_size();
        let mut delta = Delta::default();
        let removed = self.prune_inner(max_age, &mut delta);
        if let Some(l) = &mut lock {
            l.apply(delta);
        }
        removed
    }

    /// [`Store::prune_quarantine`] for a caller holding the size lock.
    pub(crate) fn prune_inner(&self, max_age: Duration, delta: &mut Delta) -> (usize, u64) {
        if self.writable().is_err() {
            return (0, 0);
        }
        let entries = self.quarantined();
        let cutoff = unix_seconds(SystemTime::now()) - max_age.as_secs_f64();
        let mut count = entries.len();
        let mut bytes: u64 = entries.iter().map(|e| e.size).sum();
        let mut removed = (0, 0);
        for e in &entries {
            let over = count > QUARANTINE_MAX_FILES || bytes > QUARANTINE_MAX_BYTES;
            if !over && e.quarantined_at >= cutoff {
                break;
            }
            if self
                .remove_quarantined_inner(&e.name, delta)
                .unwrap_or(false)
            {
                count -= 1;
                bytes = bytes.saturating_sub(e.size);
                removed.0 += 1;
                removed.1 += e.size;
            }
        }
        removed
    }

    /// Bytes of published artifacts and of the quarantine.
    pub fn total_bytes(&self) -> Result<u64> {
        let objects: u64 = self.object_entries()?.iter().map(|o| o.size).sum();
        let quarantine: u64 = self.quarantined().iter().map(|q| q.size).sum();
        Ok(objects + quarantine)
    }

    /// Brings this namespace's artifacts and quarantine together down to at
    /// most `max_bytes`: the quarantine goes first (past its age and caps,
    /// then as needed), then the least recently used artifacts (the same
    /// order as [`Root::gc`], over one namespace). Readers holding a file
    /// keep reading it: unlink does not cut them off, and a later lookup is
    /// a plain miss. Also removes stale temporary and lock files, and
    /// rebuilds the root's running size by a full scan.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport> {
        self.writable()?;
        let mut lock = self.root_handle().lock_size();
        let mut report = GcReport::default();
        let mut delta = Delta::default();
        let (n, bytes) = self.prune_inner(QUARANTINE_MAX_AGE, &mut delta);
        report.quarantine_removed += n;
        report.freed_bytes += bytes;
        lru(
            std::slice::from_ref(self),
            max_bytes,
            &mut report,
            &mut delta,
        )?;
        self.clean_tmp(super::TMP_MAX_AGE);
        self.clean_leases();
        if let Some(l) = &mut lock {
            l.set(self.root_handle().scan()?);
        }
        Ok(report)
    }

    /// Removes temporary files nobody is writing (no writer holds their
    /// lock) or older than `max_age`; returns how many were removed. A
    /// read-only store removes nothing.
    pub fn clean_tmp(&self, max_age: Duration) -> usize {
        match self.writable() {
            Ok(w) => tmp::clean(w.tmp, max_age),
            Err(_) => 0,
        }
    }

    /// Removes lock files nobody holds (taking each lock first, see
    /// lease.rs), and anything in `leases/` that is not a regular file.
    pub fn clean_leases(&self) -> usize {
        let Ok(w) = self.writable() else {
            return 0;
        };
        let mut removed = 0;
        for (name, _) in fs::entries(w.leases.as_ref()).unwrap_or_default() {
            let is_file = lstat_at(w.leases.as_ref(), name.as_c_str())
                .is_ok_and(|m| m.kind == FileType::RegularFile);
            if !is_file {
                if remove_at(w.leases.as_fd(), &name).is_ok() {
                    removed += 1;
                }
                continue;
            }
            let Some(name) = utf8(&name) else { continue };
            if let Ok(Some(lease)) = Lease::try_acquire(w.leases, name) {
                lease.remove_file();
                removed += 1;
            }
        }
        removed
    }

    /// Checks every entry under `objects/`: how many were checked, the good
    /// ones by kind, and the bad ones with what is wrong, moving them to
    /// quarantine when `fix` is set (a symlinked shard directory: the link
    /// itself). A writable store then rebuilds the root's running size.
    pub fn verify(&self, fix: bool) -> Result<VerifyReport> {
        if fix {
            self.writable()?;
        }
        let mut report = VerifyReport::default();
        let Some(objects) = &self.objects else {
            return Ok(report);
        };
        let mut shards =
            fs::entries(objects).map_err(|e| Error::io("list", self.dir.join("objects"), e))?;
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        for (shard_name, _) in shards {
            let Some(shard_name) = utf8(&shard_name) else {
                continue;
            };
            let shard = match Store::open_shard(objects.as_fd(), shard_name, self.owners()) {
                Ok(s) => s,
                Err(p) => {
                    if matches!(p, Problem::Bad { .. }) {
                        report.checked += 1;
                    }
                    self.report_bad(fix, objects.as_fd(), shard_name, false, p, &mut report);
                    continue;
                }
            };
            let mut files = fs::entries(&shard).unwrap_or_default();
            files.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, _) in files {
                let Some(name) = utf8(&name) else { continue };
                let Ok(d) = Digest::parse(name) else { continue };
                match self.read_checked(shard.as_fd(), name, &d) {
                    Ok((_, header, _)) => {
                        report.checked += 1;
                        match header.kind() {
                            ArtifactKind::Piece => report.pieces += 1,
                            ArtifactKind::Model => report.models += 1,
                        }
                    }
                    Err(Problem::Missing) => {}
                    Err(p) => {
                        report.checked += 1;
                        self.report_bad(fix, shard.as_fd(), name, true, p, &mut report);
                    }
                }
            }
        }
        if self.is_writable() {
            self.root_handle().rescan()?;
        }
        Ok(report)
    }

    fn report_bad(
        &self,
        fix: bool,
        dir: BorrowedFd<'_>,
        name: &str,
        artifact: bool,
        problem: Problem,
        report: &mut VerifyReport,
    ) {
        if let Problem::Bad {
            corruption,
            quarantine,
            meta,
        } = problem
        {
            let fate = match (fix, quarantine) {
                (true, true) => Some(self.quarantine_entry(dir, name, meta.as_ref(), artifact)),
                (true, false) => Some(Fate::LeftInPlace),
                (false, _) => None,
            };
            report.bad.push(BadEntry {
                name: name.to_owned(),
                corruption,
                fate,
            });
        }
    }

    /// Removes every artifact, quarantined entry and counter of this
    /// namespace; returns how many artifacts were removed. A link where a
    /// shard directory belongs is removed itself; what it points to is never
    /// touched.
    pub fn clear(&self) -> Result<usize> {
        let w = self.writable()?;
        let mut lock = self.root_handle().lock_size();
        let mut ignored = Delta::default();
        let mut removed = 0;
        let shards =
            fs::entries(w.objects).map_err(|e| Error::io("list", self.dir.join("objects"), e))?;
        for (shard_name, _) in shards {
            let Some(name) = utf8(&shard_name) else {
                continue;
            };
            match Store::open_shard(w.objects, name, self.owners()) {
                Ok(shard) => {
                    for (file, _) in fs::entries(&shard).unwrap_or_default() {
                        let is_digest = utf8(&file).is_some_and(|f| Digest::parse(f).is_ok());
                        if is_digest && remove_at(shard.as_fd(), &file).is_ok() {
                            removed += 1;
                        }
                    }
                }
                Err(Problem::Missing) => {}
                Err(Problem::Bad { .. }) => {
                    let _ = remove_at(w.objects, &shard_name);
                }
            }
        }
        for q in self.quarantined() {
            let _ = self.remove_quarantined_inner(&q.name, &mut ignored);
        }
        self.remove_usage();
        self.clean_leases();
        if let Some(l) = &mut lock {
            l.set(self.root_handle().scan()?);
        }
        Ok(removed)
    }
}
