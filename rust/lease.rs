//! Compile leases: at most one compiler per digest on a machine.
//!
//! A lease is an exclusive `flock` on `<store>/leases/<digest>.lock`, opened
//! relative to the store's descriptor of `leases/` and never through a
//! symbolic link. The kernel drops the lock when the holder's file descriptor
//! closes, so a process that dies (SIGKILL included) never leaves a stale
//! lease.
//!
//! Lock files are never deleted while unlocked: a process could still hold a
//! descriptor to the old file while another creates a new one at the same
//! name, and both would believe they hold the lease. After locking, a holder
//! checks that the name still refers to the file it locked, and retries if not.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{self as rfs, AtFlags, FileType, FlockOperation, Mode, OFlags};

use crate::store::fs::{flock, fstat, lstat_at, open_read_at};

/// A held lease; released on drop (or when the process dies).
#[derive(Debug)]
pub struct Lease {
    file: File,
    dir: Arc<OwnedFd>,
    name: String,
}

fn not_a_lock_file(kind: FileType) -> io::Error {
    io::Error::other(format!(
        "the lock file is {}, not a regular file",
        crate::store::fs::kind_name(kind)
    ))
}

impl Lease {
    /// Takes the lease `name` in `dir` if nobody holds it.
    pub fn try_acquire(dir: &Arc<OwnedFd>, name: &str) -> io::Result<Option<Lease>> {
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        for _ in 0..16 {
            let fd = rfs::openat(dir.as_ref(), name, flags, Mode::RUSR | Mode::WUSR)?;
            let ours = fstat(&fd)?;
            if ours.kind != FileType::RegularFile {
                return Err(not_a_lock_file(ours.kind));
            }
            if !flock(&fd, FlockOperation::NonBlockingLockExclusive)? {
                return Ok(None);
            }
            // The file we locked must still be the one named `name`.
            match lstat_at(dir.as_ref(), name) {
                Ok(now) if now.same_file(&ours) => {
                    return Ok(Some(Lease {
                        file: File::from(fd),
                        dir: dir.clone(),
                        name: name.to_owned(),
                    }));
                }
                _ => continue, // removed or replaced under us: try the new file
            }
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the lease, polling without holding anything.
    pub fn acquire(dir: &Arc<OwnedFd>, name: &str, timeout: Duration) -> io::Result<Option<Lease>> {
        let deadline = crate::bounds::deadline(Instant::now(), timeout);
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(lease) = Lease::try_acquire(dir, name)? {
                return Ok(Some(lease));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// True when some process holds the lease `name` in `dir` right now.
    pub fn is_held(dir: &OwnedFd, name: &str) -> bool {
        match open_read_at(dir, name) {
            Ok(file) => {
                fstat(&file).is_ok_and(|m| m.kind == FileType::RegularFile)
                    && matches!(
                        flock(&file, FlockOperation::NonBlockingLockShared),
                        Ok(false)
                    )
            }
            Err(_) => false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Removes the lock file while still holding it (safe: see module docs).
    pub fn remove_file(self) {
        let _ = rfs::unlinkat(self.dir.as_ref(), self.name.as_str(), AtFlags::empty());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fs::open_dir_at;
    use std::sync::Barrier;
    use std::thread;

    fn dir() -> (tempfile::TempDir, Arc<OwnedFd>) {
        let tmp = tempfile::tempdir().unwrap();
        let fd = open_dir_at(rfs::CWD, tmp.path()).unwrap();
        (tmp, Arc::new(fd))
    }

    #[test]
    fn exclusive_and_released_on_drop() {
        let (_t, d) = dir();
        let a = Lease::try_acquire(&d, "d.lock").unwrap().expect("free");
        assert!(Lease::is_held(&d, "d.lock"));
        // flock is per open file description: a second open in the same
        // process conflicts too, like another process would.
        assert!(Lease::try_acquire(&d, "d.lock").unwrap().is_none());
        drop(a);
        assert!(!Lease::is_held(&d, "d.lock"));
        assert!(Lease::try_acquire(&d, "d.lock").unwrap().is_some());
    }

    #[test]
    fn acquire_waits_for_release() {
        let (_t, d) = dir();
        let a = Lease::try_acquire(&d, "w.lock").unwrap().unwrap();
        let d2 = d.clone();
        let waiter =
            thread::spawn(move || Lease::acquire(&d2, "w.lock", Duration::from_secs(10)).unwrap());
        thread::sleep(Duration::from_millis(50));
        drop(a);
        assert!(waiter.join().unwrap().is_some());
    }

    #[test]
    fn acquire_times_out() {
        let (_t, d) = dir();
        let _a = Lease::try_acquire(&d, "t.lock").unwrap().unwrap();
        let start = Instant::now();
        assert!(Lease::acquire(&d, "t.lock", Duration::from_millis(60))
            .unwrap()
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn removed_lock_file_is_not_shared_by_two_holders() {
        let (_t, d) = dir();
        let a = Lease::try_acquire(&d, "r.lock").unwrap().unwrap();
        a.remove_file();
        let b = Lease::try_acquire(&d, "r.lock").unwrap().unwrap();
        assert!(Lease::try_acquire(&d, "r.lock").unwrap().is_none());
        drop(b);
    }

    #[test]
    fn planted_links_and_fifos_are_not_lock_files() {
        let (t, d) = dir();
        let target = t.path().join("target");
        std::os::unix::fs::symlink(&target, t.path().join("l.lock")).unwrap();
        assert!(Lease::try_acquire(&d, "l.lock").is_err());
        assert!(!target.exists(), "the link is never followed");
        rfs::mkfifoat(d.as_ref(), "f.lock", Mode::RUSR | Mode::WUSR).unwrap();
        assert!(Lease::try_acquire(&d, "f.lock").is_err());
        assert!(!Lease::is_held(&d, "f.lock"));
    }

    #[test]
    fn many_threads_one_holder_at_a_time() {
        let (_t, d) = dir();
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (d, inside, barrier) = (d.clone(), inside.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..20 {
                        let l = Lease::acquire(&d, "m.lock", Duration::from_secs(30))
                            .unwrap()
                            .unwrap();
                        let n = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        assert_eq!(n, 0, "two holders at once");
                        thread::sleep(Duration::from_micros(200));
                        inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        drop(l);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
}
