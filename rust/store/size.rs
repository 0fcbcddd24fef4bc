//! The running size of a root: `<root>/v1/size`, the bytes of every
//! namespace's artifacts and quarantine and the number of artifacts, so that
//! checking the size cap after a publish costs O(1), not a walk of the store.
//!
//! Every change to what it counts (publish, remove, quarantine, eviction)
//! happens while holding an exclusive `flock` on the record and applies its
//! delta before letting go, so concurrent writers, threads or processes,
//! keep it exact. Full scans repair drift (a writer that died between its
//! change and its update, files removed by hand, an older isocache): when
//! the record is missing or unreadable, when it is older than
//! [`RESCAN_AFTER`], and whenever `gc`, `verify` or `clear` runs.
//!
//! | offset | size | field                                   |
//! | ------ | ---- | --------------------------------------- |
//! | 0      | 8    | magic `ISOSIZE1`                        |
//! | 8      | 8    | bytes, artifacts and quarantine (u64 LE) |
//! | 16     | 8    | artifacts (u64 LE)                      |
//! | 24     | 8    | last full scan, Unix seconds (u64 LE)   |
//! | 32     | 8    | first 8 bytes of BLAKE3 of bytes 0..32  |

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, MutexGuard, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, FileType, FlockOperation, Mode, OFlags};

use super::fs::{flock, fstat, lstat_at, my_uid, open_read_at};
use super::root::Root;
use crate::error::Result;

/// The record's name in `<root>/v1` (a name no namespace may take).
pub const SIZE: &str = "size";
const MAGIC: &[u8; 8] = b"ISOSIZE1";
const LEN: usize = 40;
/// How long a writer waits for the size lock before giving up on the record
/// (its change still happens; the next full scan accounts for it).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// A record whose last full scan is older than this is rebuilt by a scan.
pub const RESCAN_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What a root holds: artifacts and quarantine of every namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RootSize {
    /// Bytes of artifacts and of the quarantine.
    pub bytes: u64,
    /// Published artifacts.
    pub artifacts: u64,
    /// When these figures were last established by a full scan (Unix seconds).
    pub scanned_at: u64,
}

impl RootSize {
    pub(crate) fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        b[16..24].copy_from_slice(&self.artifacts.to_le_bytes());
        b[24..32].copy_from_slice(&self.scanned_at.to_le_bytes());
        let sum = blake3::hash(&b[0..32]);
        b[32..40].copy_from_slice(&sum.as_bytes()[..8]);
        b
    }

    fn decode(b: &[u8]) -> Option<RootSize> {
        if b.len() != LEN
            || &b[0..8] != MAGIC
            || blake3::hash(&b[0..32]).as_bytes()[..8] != b[32..40]
        {
            return None;
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
        Some(RootSize {
            bytes: u(8..16),
            artifacts: u(16..24),
            scanned_at: u(24..32),
        })
    }

    fn apply(&mut self, d: Delta) {
        self.bytes = self.bytes.saturating_add_signed(d.bytes);
        self.artifacts = self.artifacts.saturating_add_signed(d.artifacts);
    }

    fn fresh(&self) -> bool {
        now_secs().saturating_sub(self.scanned_at) <= RESCAN_AFTER.as_secs()
    }
}

/// A change to what the record counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub bytes: i64,
    pub artifacts: i64,
}

impl Delta {
    pub fn bytes(n: u64) -> Delta {
        Delta {
            bytes: n as i64,
            artifacts: 0,
        }
    }

    pub fn artifact(size: u64) -> Delta {
        Delta {
            bytes: size as i64,
            artifacts: 1,
        }
    }

    pub fn add(&mut self, d: Delta) {
        self.bytes += d.bytes;
        self.artifacts += d.artifacts;
    }
}

impl std::ops::Neg for Delta {
    type Output = Delta;

    fn neg(self) -> Delta {
        Delta {
            bytes: -self.bytes,
            artifacts: -self.artifacts,
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn read_record(file: impl AsFd) -> Option<RootSize> {
    let meta = fstat(&file).ok()?;
    if meta.kind != FileType::RegularFile || meta.size != LEN as u64 {
        return None;
    }
    let mut b = [0u8; LEN];
    match rustix::io::pread(&file, &mut b, 0) {
        Ok(n) if n == LEN => RootSize::decode(&b),
        _ => None,
    }
}

/// The held size lock of a root, with the figures it protects. The changes
/// applied while holding it are written back when it is dropped.
pub(crate) struct SizeLock<'a> {
    file: File,
    current: Option<RootSize>,
    dirty: bool,
    _local: MutexGuard<'a, ()>,
}

impl SizeLock<'_> {
    /// The root's size, including the changes made under this lock; None
    /// when it could not be established (a scan failed).
    pub fn current(&self) -> Option<RootSize> {
        self.current
    }

    pub fn apply(&mut self, d: Delta) {
        if d == Delta::default() {
            return;
        }
        if let Some(c) = &mut self.current {
            c.apply(d);
            self.dirty = true;
        }
    }

    /// Replaces the figures (after a full scan).
    pub fn set(&mut self, size: RootSize) {
        self.current = Some(size);
        self.dirty = true;
    }
}

impl Drop for SizeLock<'_> {
    fn drop(&mut self) {
        if let (true, Some(c)) = (self.dirty, self.current) {
            let _ = rustix::io::pwrite(&self.file, &c.encode(), 0);
        }
        // Unlocked when the descriptor closes.
    }
}

impl Root {
    /// Takes the size lock (a writable root only), waiting up to
    /// [`LOCK_TIMEOUT`]. A missing, unreadable or stale record is rebuilt by
    /// a full scan while the lock is held. None: not writable, or the lock
    /// stayed busy; the caller goes on without updating the record.
    pub(crate) fn lock_size(self: &Arc<Self>) -> Option<SizeLock<'_>> {
        if !self.is_writable() {
            return None;
        }
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let mut pause = Duration::from_micros(50);
        let local = loop {
            match self.local.try_lock() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
            }
        };
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        for _ in 0..16 {
            let fd = rfs::openat(&self.v1, SIZE, flags, Mode::RUSR | Mode::WUSR).ok()?;
            let ours = fstat(&fd).ok()?;
            if ours.kind != FileType::RegularFile || ours.uid != my_uid() {
                return None;
            }
            let mut pause = Duration::from_micros(50);
            loop {
                match flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                    Ok(true) => break,
                    Ok(false) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return None;
                        }
                        std::thread::sleep(pause.min(deadline - now));
                        pause = (pause * 2).min(Duration::from_millis(10));
                    }
                    Err(_) => return None,
                }
            }
            // The file we locked must still be the one named `size`.
            match lstat_at(&self.v1, SIZE) {
                Ok(now) if now.same_file(&ours) => {}
                _ => continue,
            }
            let file = File::from(fd);
            if ours.size > LEN as u64 {
                let _ = file.set_len(LEN as u64);
            }
            let mut lock = SizeLock {
                current: read_record(&file).filter(RootSize::fresh),
                file,
                dirty: false,
                _local: local,
            };
            if lock.current.is_none() {
                if let Ok(size) = self.scan() {
                    lock.set(size);
                }
            }
            return Some(lock);
        }
        None
    }

    /// The root's size: the record when it is readable (O(1)), else a full
    /// scan. Writes nothing.
    pub fn size(self: &Arc<Self>) -> Result<RootSize> {
        for _ in 0..3 {
            let Ok(file) = open_read_at(&self.v1, SIZE) else {
                break;
            };
            if let Some(size) = read_record(&file) {
                return Ok(size);
            }
            // Torn by a concurrent write, or garbage: look again, then scan.
            std::thread::sleep(Duration::from_micros(200));
        }
        self.scan()
    }

    /// [`Root::size`] of the root at `path`, opened read-only for this
    /// alone: zero when it does not exist.
    pub fn size_of_path(path: &Path) -> Result<RootSize> {
        match Root::open(path, false)? {
            Some(root) => Arc::new(root).size(),
            None => Ok(RootSize::default()),
        }
    }

    /// Counts every namespace's artifacts and quarantine (reads only).
    pub fn scan(self: &Arc<Self>) -> Result<RootSize> {
        let mut size = RootSize {
            scanned_at: now_secs(),
            ..RootSize::default()
        };
        for store in self.stores()? {
            for o in store.object_entries()? {
                size.bytes += o.size;
                size.artifacts += 1;
            }
            size.bytes += store.quarantined().iter().map(|q| q.size).sum::<u64>();
        }
        Ok(size)
    }

    /// Rebuilds the record from a full scan (under the lock when writable);
    /// returns the scanned size.
    pub fn rescan(self: &Arc<Self>) -> Result<RootSize> {
        match self.lock_size() {
            Some(mut lock) => {
                let size = self.scan()?;
                lock.set(size);
                Ok(size)
            }
            None => self.scan(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_damage() {
        let s = RootSize {
            bytes: 123_456,
            artifacts: 7,
            scanned_at: 1_700_000_000,
        };
        let b = s.encode();
        assert_eq!(RootSize::decode(&b), Some(s));
        for i in 0..LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(RootSize::decode(&bad), None, "byte {i}");
        }
        assert_eq!(RootSize::decode(&b[..LEN - 1]), None);
    }

    #[test]
    fn deltas_saturate_at_zero() {
        let mut s = RootSize::default();
        s.apply(Delta::artifact(100));
        s.apply(-Delta::artifact(50));
        assert_eq!((s.bytes, s.artifacts), (50, 0));
        s.apply(-Delta::artifact(500));
        assert_eq!((s.bytes, s.artifacts), (0, 0));
    }
}
