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
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, AtFlags, FileType, FlockOperation, Mode, OFlags};

use super::fs::{flock, fstat, lstat_at, my_uid, open_read_at};
use super::root::Root;
use crate::bounds;
use crate::error::Result;

/// The record's name in `<root>/v1` (a name no namespace may take).
pub const SIZE: &str = "size";
/// Present in `<root>/v1` while the record misses a change made without the
/// lock (a regular file, never a namespace: namespaces are directories).
pub const STALE: &str = "size.stale";
const MAGIC: &[u8; 8] = b"ISOSIZE1";
const LEN: usize = 40;
/// How long a writer waits for another process's size lock before going on
/// without updating the record (its change still happens; the record is
/// recounted by a full scan when the lock is next taken). Short: the lock is
/// held for a rename and a few writes, and a stopped process may hold it for
/// ever.
pub const LOCK_WAIT: Duration = Duration::from_millis(100);
/// How long a thread waits for the other threads of this process that take
/// the lock (they hold it while working, e.g. evicting).
pub const LOCAL_WAIT: Duration = Duration::from_secs(10);

/// This process's view of a root's size lock.
#[derive(Debug, Default)]
pub(crate) struct SizeLockState {
    /// Set when a wait for another process's flock ran out: later takers
    /// only try once, without waiting, until they get it.
    busy: AtomicBool,
    /// Set when a change was made without the lock.
    stale: AtomicBool,
    /// Times this process went on without the lock.
    skipped: AtomicU64,
}
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

    #[cfg(test)]
    pub(crate) fn decode_for_tests(b: &[u8]) -> Option<RootSize> {
        RootSize::decode(b)
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
            bytes: bounds::signed(n),
            artifacts: 0,
        }
    }

    pub fn artifact(size: u64) -> Delta {
        Delta {
            bytes: bounds::signed(size),
            artifacts: 1,
        }
    }

    pub fn add(&mut self, d: Delta) {
        self.bytes = self.bytes.saturating_add(d.bytes);
        self.artifacts = self.artifacts.saturating_add(d.artifacts);
    }
}

impl std::ops::Neg for Delta {
    type Output = Delta;

    fn neg(self) -> Delta {
        Delta {
            bytes: self.bytes.saturating_neg(),
            artifacts: self.artifacts.saturating_neg(),
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
/// applied while holding it are written back when it is dropped. A lock
/// that was busy is *skipped*: it holds nothing, its figures are unknown,
/// and dropping it (after the caller's change) marks the record for a
/// recount.
pub(crate) struct SizeLock<'a> {
    /// None: skipped.
    file: Option<File>,
    current: Option<RootSize>,
    dirty: bool,
    root: &'a Root,
    _local: Option<MutexGuard<'a, ()>>,
}

impl SizeLock<'_> {
    /// The root's size, including the changes made under this lock; None
    /// when it could not be established (a scan failed, or skipped).
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
        match &self.file {
            Some(file) => {
                if let (true, Some(c)) = (self.dirty, self.current) {
                    let _ = rustix::io::pwrite(file, &c.encode(), 0);
                }
                // Unlocked when the descriptor closes.
            }
            None => self.root.size_lock.mark_stale(&self.root.v1),
        }
    }
}

impl SizeLockState {
    /// Records a change made without the lock: the record is recounted by a
    /// full scan when the lock is next taken, by this process (a flag) or
    /// another (the file [`STALE`]); readers scan meanwhile.
    fn mark_stale(&self, v1: &OwnedFd) {
        self.stale.store(true, Ordering::SeqCst);
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let _ = rfs::openat(v1, STALE, flags, Mode::RUSR | Mode::WUSR);
    }

    /// Takes (clears) the mark; true when the record must be recounted.
    fn take_stale(&self, v1: &OwnedFd) -> bool {
        let flagged = self.stale.swap(false, Ordering::SeqCst);
        let marked = lstat_at(v1, STALE).is_ok();
        if marked {
            let _ = rfs::unlinkat(v1, STALE, AtFlags::empty());
        }
        flagged || marked
    }

    /// How many times this process went on without the lock.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// Waits for `try_take` until `deadline`, pausing 50 µs doubling to 10 ms.
fn wait_for<T>(deadline: Instant, mut try_take: impl FnMut() -> Option<T>) -> Option<T> {
    let mut pause = Duration::from_micros(50);
    loop {
        if let Some(t) = try_take() {
            return Some(t);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

impl Root {
    /// Takes the size lock (a writable root only). Threads of this process
    /// queue up to [`LOCAL_WAIT`]; another process's flock is waited for up
    /// to [`LOCK_WAIT`], and after one such wait ran out, only tried once
    /// until it is free again (a stopped process may hold it for ever). A
    /// missing, unreadable, stale or skipped-over record is rebuilt by a full
    /// scan while the lock is held. None: not writable, or the lock was
    /// busy; the caller goes on without updating the record, which is then
    /// marked for a recount (and counted in [`SizeLockState::skipped`]).
    pub(crate) fn lock_size(self: &Arc<Self>) -> Option<SizeLock<'_>> {
        if !self.is_writable() {
            return None;
        }
        let state = &self.size_lock;
        let local = wait_for(bounds::deadline(Instant::now(), LOCAL_WAIT), || match self
            .local
            .try_lock()
        {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        });
        let skip = |busy: bool, local| {
            if busy {
                state.busy.store(true, Ordering::SeqCst);
            }
            state.skipped.fetch_add(1, Ordering::Relaxed);
            Some(SizeLock {
                file: None,
                current: None,
                dirty: false,
                root: self,
                _local: local,
            })
        };
        let Some(local) = local else {
            return skip(false, None);
        };
        let busy = state.busy.load(Ordering::SeqCst);
        let wait = if busy { Duration::ZERO } else { LOCK_WAIT };
        let deadline = bounds::deadline(Instant::now(), wait);
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        for _ in 0..16 {
            let Ok(fd) = rfs::openat(&self.v1, SIZE, flags, Mode::RUSR | Mode::WUSR) else {
                return skip(false, Some(local));
            };
            let ours = match fstat(&fd) {
                Ok(m) if m.kind == FileType::RegularFile && m.uid == my_uid() => m,
                _ => return skip(false, Some(local)),
            };
            let locked = wait_for(deadline, || {
                match flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                    Ok(false) => None,
                    Ok(true) => Some(true),
                    Err(_) => Some(false),
                }
            });
            match locked {
                Some(true) => {}
                Some(false) => return skip(false, Some(local)),
                None => return skip(true, Some(local)),
            }
            // The file we locked must still be the one named `size`.
            match lstat_at(&self.v1, SIZE) {
                Ok(now) if now.same_file(&ours) => {}
                _ => continue,
            }
            state.busy.store(false, Ordering::SeqCst);
            let recount = state.take_stale(&self.v1);
            let file = File::from(fd);
            if ours.size > LEN as u64 {
                let _ = file.set_len(LEN as u64);
            }
            let mut lock = SizeLock {
                current: read_record(&file)
                    .filter(RootSize::fresh)
                    .filter(|_| !recount),
                file: Some(file),
                dirty: false,
                root: self,
                _local: Some(local),
            };
            if lock.current.is_none() {
                match self.scan() {
                    Ok(size) => lock.set(size),
                    Err(_) if recount => state.mark_stale(&self.v1),
                    Err(_) => {}
                }
            }
            return Some(lock);
        }
        skip(false, Some(local))
    }

    /// The root's size: the record when it is readable and not marked for
    /// a recount (O(1)), else a full scan. Writes nothing.
    pub fn size(self: &Arc<Self>) -> Result<RootSize> {
        if lstat_at(&self.v1, STALE).is_ok() {
            return self.scan();
        }
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
                size.bytes = size.bytes.saturating_add(o.size);
                size.artifacts = size.artifacts.saturating_add(1);
            }
            for q in store.quarantined() {
                size.bytes = size.bytes.saturating_add(q.size);
            }
        }
        Ok(size)
    }

    /// Rebuilds the record from a full scan (under the lock when writable
    /// and free); returns the scanned size.
    pub fn rescan(self: &Arc<Self>) -> Result<RootSize> {
        match self.lock_size() {
            Some(mut lock) if lock.file.is_some() => {
                let size = self.scan()?;
                lock.set(size);
                Ok(size)
            }
            _ => self.scan(),
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
