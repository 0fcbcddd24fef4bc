//! What made a namespace: a small text file `fields` (JSON written by the
//! Python side: torch version, device and capability, Inductor options, grad
//! mode, ...), so the command line can show why two namespaces differ
//! without importing torch. It describes; nothing is loaded from it.

use std::io::{Read, Write};
use std::os::fd::AsFd;

use rustix::fs::{self as rfs, FileType};

use super::fs::{fstat, open_read_at};
use super::tmp::TempFile;
use super::Store;
use crate::error::{Error, Result};

const FIELDS: &str = "fields";
/// A description larger than this is refused when written and ignored when read.
pub const MAX_FIELDS_LEN: usize = 64 * 1024;

impl Store {
    /// Writes the namespace's description unless it already holds `text`.
    /// Every process that opens the namespace computes the same fields (the
    /// namespace is their digest), so a concurrent writer writes the same
    /// bytes; the file is replaced atomically, never seen half-written.
    /// Returns whether the file was written.
    pub fn describe(&self, text: &str) -> Result<bool> {
        if text.len() > MAX_FIELDS_LEN {
            return Err(Error::TooLarge {
                size: text.len() as u64,
                limit: MAX_FIELDS_LEN as u64,
            });
        }
        if self.description().as_deref() == Some(text) {
            return Ok(false);
        }
        let w = self.writable()?;
        let path = self.dir.join(FIELDS);
        let mut tmp =
            TempFile::create(w.tmp.as_fd(), FIELDS).map_err(|e| Error::io("write", &path, e))?;
        let write = |tmp: &mut TempFile| -> std::io::Result<()> {
            tmp.file.write_all(text.as_bytes())?;
            tmp.file.sync_all()?;
            rfs::renameat(w.tmp.as_fd(), tmp.name.as_str(), self.ns.as_fd(), FIELDS)?;
            Ok(())
        };
        if let Err(e) = write(&mut tmp) {
            tmp.discard(w.tmp.as_fd());
            return Err(Error::io("write", &path, e));
        }
        Ok(true)
    }

    /// The namespace's description, or None when it has none (a store
    /// written before descriptions existed), or it is not a private regular
    /// file of at most `MAX_FIELDS_LEN` bytes of UTF-8.
    pub fn description(&self) -> Option<String> {
        let mut f = open_read_at(self.ns.as_fd(), FIELDS).ok()?;
        match fstat(&f) {
            Ok(m)
                if m.kind == FileType::RegularFile
                    && m.size <= MAX_FIELDS_LEN as u64
                    && !m.writable_by_others() => {}
            _ => return None,
        }
        let mut b = Vec::new();
        (&mut f)
            .take(MAX_FIELDS_LEN as u64)
            .read_to_end(&mut b)
            .ok()?;
        String::from_utf8(b).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache"), "cpu-0123456789abcdef", None).unwrap();
        (dir, store)
    }

    #[test]
    fn written_once_read_back_and_replaced_when_different() {
        let (_dir, store) = store();
        assert_eq!(store.description(), None);
        assert!(store.describe("{\"grad_mode\": \"on\"}").unwrap());
        assert!(!store.describe("{\"grad_mode\": \"on\"}").unwrap());
        assert_eq!(
            store.description().as_deref(),
            Some("{\"grad_mode\": \"on\"}")
        );
        assert!(store.describe("{\"grad_mode\": \"off\"}").unwrap());
        assert_eq!(
            store.description().as_deref(),
            Some("{\"grad_mode\": \"off\"}")
        );
        let root = store.root().to_path_buf();
        let read_only = Store::open_existing(&root, "cpu-0123456789abcdef", None).unwrap();
        assert_eq!(
            read_only.description().as_deref(),
            Some("{\"grad_mode\": \"off\"}")
        );
        assert!(
            read_only.describe("{}").is_err(),
            "a read-only store writes nothing"
        );
    }

    #[test]
    fn oversized_links_and_shared_files_are_not_descriptions() {
        let (_dir, store) = store();
        assert!(store.describe(&"x".repeat(MAX_FIELDS_LEN + 1)).is_err());
        let path = store.dir().join(FIELDS);
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert_eq!(store.description(), None, "a link is never followed");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "{}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            store.description(),
            None,
            "a file others may write is ignored"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(store.description().as_deref(), Some("{}"));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(store.description(), None, "not UTF-8");
    }
}
