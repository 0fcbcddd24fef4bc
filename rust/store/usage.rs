//! The namespace's shared counters: a 48-byte file `stats`, rewritten under
//! the lock `stats.lock` by every process that used the namespace.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::fs::{self as rfs, FileType};

use super::fs::{fstat, open_read_at};
use super::tmp::TempFile;
use super::Store;
use crate::error::{Error, Result};
use crate::lease::Lease;

/// Counters shared by every process using a namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageStats {
    pub hits: u64,
    pub misses: u64,
    pub saved_seconds: f64,
    pub remote_hits: u64,
    pub remote_misses: u64,
    pub remote_errors: u64,
}

impl UsageStats {
    pub const LEN: usize = 48;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.hits.to_le_bytes());
        b[8..16].copy_from_slice(&self.misses.to_le_bytes());
        b[16..24].copy_from_slice(&self.saved_seconds.to_le_bytes());
        b[24..32].copy_from_slice(&self.remote_hits.to_le_bytes());
        b[32..40].copy_from_slice(&self.remote_misses.to_le_bytes());
        b[40..48].copy_from_slice(&self.remote_errors.to_le_bytes());
        b
    }

    /// Reads the current layout, or the first 24 bytes of an older one.
    pub fn decode(b: &[u8]) -> UsageStats {
        let u = |r: std::ops::Range<usize>| -> u64 {
            b.get(r)
                .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
                .unwrap_or(0)
        };
        if b.len() != 24 && b.len() != Self::LEN {
            return UsageStats::default();
        }
        UsageStats {
            hits: u(0..8),
            misses: u(8..16),
            saved_seconds: f64::from_bits(u(16..24)),
            remote_hits: u(24..32),
            remote_misses: u(32..40),
            remote_errors: u(40..48),
        }
    }

    pub fn add(&mut self, d: &UsageStats) {
        self.hits = self.hits.saturating_add(d.hits);
        self.misses = self.misses.saturating_add(d.misses);
        self.saved_seconds += d.saved_seconds;
        self.remote_hits = self.remote_hits.saturating_add(d.remote_hits);
        self.remote_misses = self.remote_misses.saturating_add(d.remote_misses);
        self.remote_errors = self.remote_errors.saturating_add(d.remote_errors);
    }
}

const STATS: &str = "stats";
const STATS_LOCK: &str = "stats.lock";

impl Store {
    /// Adds to the namespace's shared counters under the lock `stats.lock`,
    /// waiting up to `timeout` for it. `Ok(None)`: the lock stayed busy and
    /// nothing was written (the update is skipped, never made unlocked).
    pub fn record_usage(&self, delta: UsageStats, timeout: Duration) -> Result<Option<UsageStats>> {
        let w = self.writable()?;
        let lock_path = self.dir.join(STATS_LOCK);
        let Some(_guard) = Lease::acquire(&self.ns, STATS_LOCK, timeout)
            .map_err(|e| Error::io("lock", &lock_path, e))?
        else {
            return Ok(None);
        };
        let mut current = self.usage();
        current.add(&delta);
        let path = self.dir.join(STATS);
        let mut tmp =
            TempFile::create(w.tmp.as_fd(), STATS).map_err(|e| Error::io("write", &path, e))?;
        let write = |tmp: &mut TempFile| -> std::io::Result<()> {
            tmp.file.write_all(&current.encode())?;
            tmp.file.sync_all()?;
            rfs::renameat(w.tmp.as_fd(), tmp.name.as_str(), self.ns.as_fd(), STATS)?;
            Ok(())
        };
        if let Err(e) = write(&mut tmp) {
            tmp.discard(w.tmp.as_fd());
            return Err(Error::io("write", &path, e));
        }
        Ok(Some(current))
    }

    /// The namespace's counters (zero when missing or unreadable).
    pub fn usage(&self) -> UsageStats {
        let Ok(mut f) = open_read_at(self.ns.as_fd(), STATS) else {
            return UsageStats::default();
        };
        match fstat(&f) {
            Ok(m) if m.kind == FileType::RegularFile && m.size <= UsageStats::LEN as u64 => {}
            _ => return UsageStats::default(),
        }
        let mut b = Vec::with_capacity(UsageStats::LEN);
        match (&mut f).take(UsageStats::LEN as u64).read_to_end(&mut b) {
            Ok(_) => UsageStats::decode(&b),
            Err(_) => UsageStats::default(),
        }
    }

    /// Removes the counters (`clear`).
    pub(super) fn remove_usage(&self) {
        let _ = rfs::unlinkat(self.ns.as_fd(), STATS, rfs::AtFlags::empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trip_and_old_layout() {
        let u = UsageStats {
            hits: 4,
            misses: 2,
            saved_seconds: 3.5,
            remote_hits: 1,
            remote_misses: 7,
            remote_errors: 9,
        };
        assert_eq!(UsageStats::decode(&u.encode()), u);
        let old = UsageStats::decode(&u.encode()[..24]);
        assert_eq!((old.hits, old.misses, old.saved_seconds), (4, 2, 3.5));
        assert_eq!(old.remote_hits, 0);
        assert_eq!(UsageStats::decode(&[1, 2, 3]), UsageStats::default());
    }
}
