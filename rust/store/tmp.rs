//! Temporary files: every write goes to `tmp/` first and is renamed into
//! place. A writer holds an exclusive `flock` on its temporary file from
//! creation until the rename, so cleanup tells a live writer from a dead one
//! by trying the lock (the kernel drops it when the writer dies), not by a
//! process id, which means nothing across PID namespaces (containers sharing
//! a volume). Files older than a maximum age go regardless.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rustix::fs::{self as rfs, AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::fs::{flock, fstat, lstat_at, open_read_at, remove_at};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file, locked by this process until dropped.
pub struct TempFile {
    pub file: File,
    pub name: String,
}

impl TempFile {
    /// Creates `<prefix>.<pid>.<n>.tmp` in `dir` (mode 0600) and locks it.
    pub fn create(dir: BorrowedFd<'_>, prefix: &str) -> io::Result<TempFile> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        for _ in 0..64 {
            let name = format!(
                "{prefix}.{}.{}.tmp",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let fd = match rfs::openat(dir, name.as_str(), flags, Mode::RUSR | Mode::WUSR) {
                Ok(fd) => fd,
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            };
            flock(&fd, FlockOperation::LockExclusive)?;
            // A cleaner may have removed the file between its creation and
            // our lock: then the name is gone (or someone else's); start over.
            let ours = fstat(&fd)?;
            match lstat_at(dir, name.as_str()) {
                Ok(now) if now.same_file(&ours) => {
                    return Ok(TempFile {
                        file: File::from(fd),
                        name,
                    })
                }
                _ => continue,
            }
        }
        Err(io::Error::other("could not create a temporary file"))
    }

    /// Removes the file (after a failed write).
    pub fn discard(self, dir: BorrowedFd<'_>) {
        let _ = rfs::unlinkat(dir, self.name.as_str(), AtFlags::empty());
    }
}

/// Removes temporary files nobody holds a lock on, and any older than
/// `max_age`; returns how many were removed.
pub fn clean(dir: BorrowedFd<'_>, max_age: Duration) -> usize {
    let Ok(entries) = super::fs::entries(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for (name, _) in entries {
        let Ok(meta) = lstat_at(dir, name.as_c_str()) else {
            continue;
        };
        let old = now
            .duration_since(meta.mtime)
            .is_ok_and(|age| age > max_age);
        if meta.kind != FileType::RegularFile {
            // Nothing isocache writes; never followed, just removed.
            if remove_at(dir, &name).is_ok() {
                removed += 1;
            }
            continue;
        }
        let Ok(file) = open_read_at(dir, name.as_c_str()) else {
            continue;
        };
        let same = fstat(&file).is_ok_and(|m| m.same_file(&meta));
        let unlocked =
            same && flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).unwrap_or(false);
        // Holding the lock (or past the age limit), unlink: a writer that
        // locks the file after this sees its name gone and starts over.
        if (unlocked || old) && rfs::unlinkat(dir, name.as_c_str(), AtFlags::empty()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fs::open_dir_at;
    use std::fs;

    #[test]
    fn locked_files_stay_unlocked_ones_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir_at(rfs::CWD, tmp.path()).unwrap();
        let live = TempFile::create(dir.as_fd(), "x").unwrap();
        // Named after a pid that does not exist: only the lock counts.
        fs::write(tmp.path().join(format!("y.{}.0.tmp", i32::MAX - 7)), b"").unwrap();
        // Named after this (live) process, but nobody holds its lock.
        fs::write(
            tmp.path().join(format!("z.{}.0.tmp", std::process::id())),
            b"",
        )
        .unwrap();
        assert_eq!(clean(dir.as_fd(), Duration::from_secs(3600)), 2);
        assert!(tmp.path().join(&live.name).exists());
        assert_eq!(clean(dir.as_fd(), Duration::ZERO), 1, "past the age limit");
        assert!(!tmp.path().join(&live.name).exists());
    }

    #[test]
    fn a_writer_whose_file_was_cleaned_before_its_lock_starts_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir_at(rfs::CWD, tmp.path()).unwrap();
        let a = TempFile::create(dir.as_fd(), "a").unwrap();
        let b = TempFile::create(dir.as_fd(), "a").unwrap();
        assert_ne!(a.name, b.name);
        drop(a);
        assert_eq!(clean(dir.as_fd(), Duration::from_secs(3600)), 1);
        b.discard(dir.as_fd());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
