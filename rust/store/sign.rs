//! First use of a key: the user's own artifacts are signed in place.
//!
//! A store filled without `ISOCACHE_KEY` holds unsigned artifacts, which a
//! store opened with a key refuses. [`Store::sign_existing`] runs once per
//! key and namespace (a marker file `signed` remembers it): every artifact
//! that passes its integrity checks (a private regular file, its header,
//! length, digest and payload checksum) and is unsigned, or was signed by an
//! older isocache with the same secret, is signed with the key and replaced
//! atomically, keeping its last use. One that fails a check is moved to
//! quarantine. One signed with another key is not vouched for by this key:
//! it is moved to quarantine too, counted, never re-signed.
//!
//! Why vouching for the unsigned artifacts is sound: they sit in the user's
//! private directory, which only the user (and root) can write, and the
//! user's own processes are trusted anyway (they can read the key from each
//! other's environment). The key protects against what comes from outside
//! (Redis), which this pass never touches. For the same reason the marker is
//! a keyed hash of the signing key in that private directory: only the
//! trusted can read it, and every signed artifact there says as much.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, FileType};

use super::fs::{fstat, lstat_at, open_read_at, set_times, Meta};
use super::image::{check_payload, file_image};
use super::size::Delta;
use super::tmp::TempFile;
use super::{Digest, Problem, Store, Writable};
use crate::error::{Error, Result};

/// The marker of the key whose pass ran last (`<namespace>/signed`).
pub const MARKER: &str = "signed";
const MARKER_CONTEXT: &[u8] = b"isocache store signed with this key v1";

/// What [`Store::sign_existing`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignReport {
    /// The pass ran (false: no key, a read-only store, or already done for this key).
    pub ran: bool,
    /// Artifacts signed in place with the key.
    pub signed: u64,
    /// Artifacts that failed their integrity check: moved to quarantine.
    pub damaged: u64,
    /// Artifacts signed with another key: moved to quarantine.
    pub other_key: u64,
    /// Artifacts already signed with the key.
    pub already: u64,
    /// Artifacts that could not be read or rewritten: left in place (a
    /// lookup refuses them as before).
    pub left: u64,
}

fn marker_of(key: &[u8; 32]) -> String {
    blake3::keyed_hash(key, MARKER_CONTEXT).to_hex().to_string()
}

enum Outcome {
    Signed,
    Damaged,
    OtherKey,
    Already,
    Left,
}

impl Store {
    /// Signs the user's existing artifacts with the store's key, once per
    /// key (see the module's comment). `legacy`: the signing key an older
    /// isocache derived from the same secret; its artifacts are re-signed.
    pub fn sign_existing(&self, legacy: Option<&[u8; 32]>) -> Result<SignReport> {
        let mut report = SignReport::default();
        let (Some(key), Ok(w)) = (self.key.as_ref(), self.writable()) else {
            return Ok(report);
        };
        let marker = marker_of(key);
        if self.read_marker().as_deref() == Some(marker.as_str()) {
            return Ok(report);
        }
        report.ran = true;
        self.each_object(|shard, name, digest, meta| {
            match self.sign_one(&w, key, legacy, shard, name, &digest, meta) {
                Outcome::Signed => report.signed += 1,
                Outcome::Damaged => report.damaged += 1,
                Outcome::OtherKey => report.other_key += 1,
                Outcome::Already => report.already += 1,
                Outcome::Left => report.left += 1,
            }
        })?;
        if report.left == 0 {
            self.write_marker(&w, &marker)?;
        }
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_one(
        &self,
        w: &Writable<'_>,
        key: &[u8; 32],
        legacy: Option<&[u8; 32]>,
        shard: BorrowedFd<'_>,
        name: &str,
        digest: &Digest,
        listed: &Meta,
    ) -> Outcome {
        let (header, payload) = match self.read_checked_with(shard, name, digest, None) {
            Ok((_, header, payload)) => (header, payload),
            Err(Problem::Missing) => return Outcome::Already, // gone meanwhile: nothing to sign
            Err(Problem::Bad {
                quarantine: true,
                meta,
                ..
            }) => {
                self.quarantine_entry(shard, name, meta.as_ref(), true);
                return Outcome::Damaged;
            }
            Err(Problem::Bad { .. }) => return Outcome::Left,
        };
        let raw = header.encode();
        let signed_by = |k: &[u8; 32]| check_payload(&header, &raw, &payload, Some(k)).is_ok();
        if signed_by(key) {
            return Outcome::Already;
        }
        if header.is_signed() && !legacy.is_some_and(signed_by) {
            self.quarantine_entry(shard, name, Some(listed), true);
            return Outcome::OtherKey;
        }
        let image = file_image(
            digest,
            &payload,
            header.compile_seconds,
            Some(key),
            header.kind(),
        );
        match self.replace(w, shard, name, listed, &image) {
            Ok(true) => Outcome::Signed,
            Ok(false) => Outcome::Already, // replaced by another process meanwhile
            Err(_) => Outcome::Left,
        }
    }

    /// Replaces `name` in `shard` by `image` when it is still the file that
    /// was listed (`listed`), keeping its last use; false when it changed.
    fn replace(
        &self,
        w: &Writable<'_>,
        shard: BorrowedFd<'_>,
        name: &str,
        listed: &Meta,
        image: &[u8],
    ) -> std::io::Result<bool> {
        let mut tmp = TempFile::create(w.tmp, name)?;
        let written = tmp
            .file
            .write_all(image)
            .and_then(|()| set_times(&tmp.file, listed.mtime))
            .and_then(|()| tmp.file.sync_all());
        if let Err(e) = written {
            tmp.discard(w.tmp);
            return Err(e);
        }
        let mut lock = self.root.lock_size();
        let same = lstat_at(shard, name).is_ok_and(|now| now.same_file(listed));
        let renamed = same && rfs::renameat(w.tmp, tmp.name.as_str(), shard, name).is_ok();
        if renamed {
            if let Some(l) = &mut lock {
                let mut delta = Delta::default();
                delta.add(-Delta::artifact(listed.size));
                delta.add(Delta::artifact(image.len() as u64));
                l.apply(delta);
            }
            drop(tmp);
            let _ = super::fs::sync_dir(shard);
        } else {
            tmp.discard(w.tmp);
        }
        Ok(renamed)
    }

    fn read_marker(&self) -> Option<String> {
        let f = open_read_at(self.ns.as_fd(), MARKER).ok()?;
        let m = fstat(&f).ok()?;
        if m.kind != FileType::RegularFile || m.size > 256 {
            return None;
        }
        let mut text = String::new();
        (&f).take(256).read_to_string(&mut text).ok()?;
        Some(text)
    }

    fn write_marker(&self, w: &Writable<'_>, marker: &str) -> Result<()> {
        let path = self.dir.join(MARKER);
        let mut tmp = TempFile::create(w.tmp, MARKER).map_err(|e| Error::io("write", &path, e))?;
        let write = |tmp: &mut TempFile| -> std::io::Result<()> {
            tmp.file.write_all(marker.as_bytes())?;
            tmp.file.sync_all()?;
            rfs::renameat(w.tmp, tmp.name.as_str(), self.ns.as_fd(), MARKER)?;
            Ok(())
        };
        if let Err(e) = write(&mut tmp) {
            tmp.discard(w.tmp);
            return Err(Error::io("write", &path, e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::store::{ArtifactKind, Lookup};

    fn digest(n: u8) -> Digest {
        Digest(*blake3::hash(&[n]).as_bytes())
    }

    fn open(root: &Path, key: Option<[u8; 32]>) -> Store {
        Store::open(root, "ns", key).unwrap()
    }

    fn payload(s: &Store, d: &Digest) -> Option<Vec<u8>> {
        match s.get(d).unwrap() {
            Lookup::Hit { payload, .. } => Some(payload),
            _ => None,
        }
    }

    #[test]
    fn first_use_of_a_key_signs_intact_artifacts_and_moves_damaged_ones_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let plain = open(&root, None);
        for n in 0..4 {
            plain.put(&digest(n), &[n; 100], 1.5).unwrap();
        }
        plain
            .publish(&digest(9), b"model", 3.0, ArtifactKind::Model, None)
            .unwrap();
        // Damage one payload (the checksum no longer matches).
        let bad = plain.object_path(&digest(3));
        let mut bytes = fs::read(&bad).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&bad, bytes).unwrap();
        let mtime_before = fs::metadata(plain.object_path(&digest(0)))
            .unwrap()
            .modified()
            .unwrap();
        let size_before = plain.root_size().unwrap();

        let key = crate::key::signing_key(b"a secret of 16+ bytes").unwrap();
        let signed = open(&root, Some(key));
        let report = signed.sign_existing(None).unwrap();
        assert_eq!(
            report,
            SignReport {
                ran: true,
                signed: 4,
                damaged: 1,
                ..SignReport::default()
            }
        );
        // Last use kept (eviction order), sizes unchanged apart from the moved file.
        let mtime_after = fs::metadata(signed.object_path(&digest(0)))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(mtime_before, mtime_after);
        assert_eq!(signed.root_size().unwrap().bytes, size_before.bytes);
        for n in 0..3 {
            assert_eq!(payload(&signed, &digest(n)).unwrap(), vec![n; 100]);
        }
        match signed.get(&digest(9)).unwrap() {
            Lookup::Hit {
                kind,
                compile_seconds,
                ..
            } => assert_eq!((kind, compile_seconds), (ArtifactKind::Model, 3.0)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(signed.get(&digest(3)).unwrap(), Lookup::Miss));
        assert_eq!(signed.quarantined().len(), 1);
        assert_eq!(signed.refused(), 0, "no lookup refused anything");
        // The pass runs once per key.
        assert_eq!(signed.sign_existing(None).unwrap(), SignReport::default());
        assert!(!open(&root, Some(key)).sign_existing(None).unwrap().ran);
    }

    #[test]
    fn artifacts_of_another_key_are_never_re_signed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let other = crate::key::signing_key(b"another secret, 16+").unwrap();
        open(&root, Some(other))
            .put(&digest(1), b"theirs", 0.0)
            .unwrap();
        let key = crate::key::signing_key(b"a secret of 16+ bytes").unwrap();
        let mine = open(&root, Some(key));
        mine.put(&digest(2), b"mine", 0.0).unwrap();
        let report = mine.sign_existing(None).unwrap();
        assert_eq!((report.signed, report.other_key, report.already), (0, 1, 1));
        assert!(matches!(mine.get(&digest(1)).unwrap(), Lookup::Miss));
        assert_eq!(payload(&mine, &digest(2)).unwrap(), b"mine");
        // The other key's pass finds nothing of its own to sign either.
        let theirs = open(&root, Some(other)).sign_existing(None).unwrap();
        assert_eq!((theirs.ran, theirs.signed, theirs.other_key), (true, 0, 1));
    }

    #[test]
    fn artifacts_signed_by_the_older_derivation_of_the_same_secret_are_re_signed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let secret = b"a secret of 16+ bytes";
        let legacy = crate::key::legacy_signing_key(secret).unwrap();
        open(&root, Some(legacy))
            .put(&digest(1), b"old", 0.0)
            .unwrap();
        let key = crate::key::signing_key(secret).unwrap();
        let s = open(&root, Some(key));
        let report = s.sign_existing(Some(&legacy)).unwrap();
        assert_eq!((report.signed, report.other_key), (1, 0));
        assert_eq!(payload(&s, &digest(1)).unwrap(), b"old");
    }

    #[test]
    fn no_key_or_read_only_does_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let plain = open(&root, None);
        plain.put(&digest(1), b"x", 0.0).unwrap();
        assert_eq!(plain.sign_existing(None).unwrap(), SignReport::default());
        let key = crate::key::signing_key(b"a secret of 16+ bytes").unwrap();
        let ro = Store::open_existing(&root, "ns", Some(key)).unwrap();
        assert_eq!(ro.sign_existing(None).unwrap(), SignReport::default());
        // Still unsigned: a read-only look changes nothing.
        assert_eq!(fs::read(plain.object_path(&digest(1))).unwrap()[10] & 1, 0);
    }
}
