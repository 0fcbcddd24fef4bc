//! Compile leases: at most one compiler per digest on a machine.
//!
//! A lease is an exclusive `flock` on `<store>/leases/<digest>.lock`. The
//! kernel drops the lock when the holder's file descriptor closes, so a
//! process that dies (SIGKILL included) never leaves a stale lease.
//!
//! Lock files are never deleted while unlocked: a process could still hold a
//! descriptor to the old file while another creates a new one at the same
//! path, and both would believe they hold the lease. After locking, a holder
//! checks that the path still names the file it locked, and retries if not.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A held lease; released on drop (or when the process dies).
#[derive(Debug)]
pub struct Lease {
    file: File,
    path: PathBuf,
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: a valid open descriptor and a valid flock operation.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

impl Lease {
    /// Takes the lease at `path` if nobody holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<Lease>> {
        for _ in 0..16 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| Error::io("open lease", path, e))?;
            if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)
                .map_err(|e| Error::io("lock lease", path, e))?
            {
                return Ok(None);
            }
            // The file we locked must still be the one at `path`.
            let ours = file
                .metadata()
                .map_err(|e| Error::io("stat lease", path, e))?;
            match std::fs::symlink_metadata(path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(Some(Lease {
                        file,
                        path: path.to_owned(),
                    }));
                }
                _ => continue, // removed or replaced under us: try the new file
            }
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the lease, polling without holding anything.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<Option<Lease>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(lease) = Lease::try_acquire(path)? {
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

    /// True when some process holds the lease at `path` right now.
    pub fn is_held(path: &Path) -> bool {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
                Ok(got) => !got,
                Err(_) => false,
            },
            Err(_) => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock file while still holding it (safe: see module docs).
    pub fn remove_file(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::thread;

    #[test]
    fn exclusive_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("d.lock");
        let a = Lease::try_acquire(&p).unwrap().expect("free");
        assert!(Lease::is_held(&p));
        // flock is per open file description: a second open in the same
        // process conflicts too, like another process would.
        assert!(Lease::try_acquire(&p).unwrap().is_none());
        drop(a);
        assert!(!Lease::is_held(&p));
        assert!(Lease::try_acquire(&p).unwrap().is_some());
    }

    #[test]
    fn acquire_waits_for_release() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("w.lock");
        let a = Lease::try_acquire(&p).unwrap().unwrap();
        let p2 = p.clone();
        let waiter = thread::spawn(move || Lease::acquire(&p2, Duration::from_secs(10)).unwrap());
        thread::sleep(Duration::from_millis(50));
        drop(a);
        assert!(waiter.join().unwrap().is_some());
    }

    #[test]
    fn acquire_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("t.lock");
        let _a = Lease::try_acquire(&p).unwrap().unwrap();
        let start = Instant::now();
        assert!(Lease::acquire(&p, Duration::from_millis(60))
            .unwrap()
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn removed_lock_file_is_not_shared_by_two_holders() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("r.lock");
        let a = Lease::try_acquire(&p).unwrap().unwrap();
        a.remove_file();
        let b = Lease::try_acquire(&p).unwrap().unwrap();
        assert!(Lease::try_acquire(&p).unwrap().is_none());
        drop(b);
    }

    #[test]
    fn many_threads_one_holder_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Arc::new(tmp.path().join("m.lock"));
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (p, inside, barrier) = (p.clone(), inside.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..20 {
                        let l = Lease::acquire(&p, Duration::from_secs(30))
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
