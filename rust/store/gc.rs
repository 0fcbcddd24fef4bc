//! Maintenance: eviction under a size cap, verification, clearing, the
//! quarantine's caps and stale temporary and lock files. None of it follows
//! a symbolic link: a link found where a directory belongs is itself removed
//! or quarantined, never what it points to.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, SystemTime};

use rustix::fs::FileType;

use super::root::{self, lstat_at, remove_at, size_at, utf8};
use super::{tmp, unix_seconds, Digest, Problem, Store};
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

impl Store {
    /// The entries of `quarantine/`, oldest first.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        let Some(q) = &self.quarantine else {
            return Vec::new();
        };
        let mut out: Vec<Quarantined> = root::entries(q)
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
        let w = self.writable()?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Ok(false);
        }
        let Some(c) = cstring(name) else {
            return Ok(false);
        };
        match remove_at(w.quarantine, &c) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", self.quarantine_dir().join(name), e)),
        }
    }

    /// Applies the quarantine's limits: entries older than `max_age` go,
    /// then the oldest until at most [`QUARANTINE_MAX_FILES`] entries and
    /// [`QUARANTINE_MAX_BYTES`] remain. Returns `(entries, bytes)` removed.
    pub fn prune_quarantine(&self, max_age: Duration) -> (usize, u64) {
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
            if self.remove_quarantined(&e.name).unwrap_or(false) {
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
        let objects: u64 = self.list()?.iter().map(|o| o.size).sum();
        let quarantine: u64 = self.quarantined().iter().map(|q| q.size).sum();
        Ok(objects + quarantine)
    }

    /// Brings artifacts and quarantine together down to at most `max_bytes`:
    /// the quarantine goes first (past its age and caps, then as needed),
    /// then the least recently used artifacts. Readers holding a file keep
    /// reading it: unlink does not cut them off, and a later lookup is a
    /// plain miss. Also removes stale temporary and lock files.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport> {
        self.writable()?;
        let mut report = GcReport::default();
        let (n, bytes) = self.prune_quarantine(QUARANTINE_MAX_AGE);
        report.quarantine_removed += n;
        report.freed_bytes += bytes;
        let mut objects = self.list()?;
        objects.sort_by(|a, b| a.last_used.total_cmp(&b.last_used));
        let quarantined = self.quarantined();
        let mut total: u64 = objects.iter().map(|o| o.size).sum::<u64>()
            + quarantined.iter().map(|q| q.size).sum::<u64>();
        for q in &quarantined {
            if total <= max_bytes {
                break;
            }
            if self.remove_quarantined(&q.name)? {
                total = total.saturating_sub(q.size);
                report.quarantine_removed += 1;
                report.freed_bytes += q.size;
            }
        }
        for o in &objects {
            if total <= max_bytes {
                break;
            }
            let Ok(d) = Digest::parse(&o.digest) else {
                continue;
            };
            if self.remove(&d)? {
                total = total.saturating_sub(o.size);
                report.removed += 1;
                report.freed_bytes += o.size;
            }
        }
        report.remaining_bytes = total;
        report.remaining = objects.len() - report.removed;
        self.clean_tmp(super::TMP_MAX_AGE);
        self.clean_leases();
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
        for (name, _) in root::entries(w.leases.as_ref()).unwrap_or_default() {
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

    /// Checks every entry under `objects/`; returns how many were checked and
    /// `(name, reason)` for the bad ones, moving them to quarantine when
    /// `fix` is set (a symlinked shard directory: the link itself).
    pub fn verify(&self, fix: bool) -> Result<(usize, Vec<(String, String)>)> {
        if fix {
            self.writable()?;
        }
        let Some(objects) = &self.objects else {
            return Ok((0, Vec::new()));
        };
        let mut shards =
            root::entries(objects).map_err(|e| Error::io("list", self.dir.join("objects"), e))?;
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        let mut checked = 0;
        let mut bad = Vec::new();
        for (shard_name, _) in shards {
            let Some(shard_name) = utf8(&shard_name) else {
                continue;
            };
            let shard = match Store::open_shard(objects.as_fd(), shard_name) {
                Ok(s) => s,
                Err(p) => {
                    if matches!(p, Problem::Bad { .. }) {
                        checked += 1;
                    }
                    self.report_bad(fix, objects.as_fd(), shard_name, p, &mut bad);
                    continue;
                }
            };
            let mut files = root::entries(&shard).unwrap_or_default();
            files.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, _) in files {
                let Some(name) = utf8(&name) else { continue };
                let Ok(d) = Digest::parse(name) else { continue };
                match self.read_checked(shard.as_fd(), name, &d) {
                    Ok(_) => checked += 1,
                    Err(Problem::Missing) => {}
                    Err(p) => {
                        checked += 1;
                        self.report_bad(fix, shard.as_fd(), name, p, &mut bad);
                    }
                }
            }
        }
        Ok((checked, bad))
    }

    fn report_bad(
        &self,
        fix: bool,
        dir: BorrowedFd<'_>,
        name: &str,
        problem: Problem,
        bad: &mut Vec<(String, String)>,
    ) {
        if let Problem::Bad {
            reason,
            quarantine,
            meta,
        } = problem
        {
            if fix && quarantine {
                self.quarantine_entry(dir, name, meta.as_ref());
            }
            bad.push((name.to_owned(), reason));
        }
    }

    /// Removes every artifact, quarantined entry and counter of this
    /// namespace; returns how many artifacts were removed. A link where a
    /// shard directory belongs is removed itself; what it points to is never
    /// touched.
    pub fn clear(&self) -> Result<usize> {
        let w = self.writable()?;
        let mut removed = 0;
        let shards =
            root::entries(w.objects).map_err(|e| Error::io("list", self.dir.join("objects"), e))?;
        for (shard_name, _) in shards {
            let Some(name) = utf8(&shard_name) else {
                continue;
            };
            match Store::open_shard(w.objects, name) {
                Ok(shard) => {
                    for (file, _) in root::entries(&shard).unwrap_or_default() {
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
            let _ = self.remove_quarantined(&q.name);
        }
        self.remove_usage();
        self.clean_leases();
        Ok(removed)
    }
}
