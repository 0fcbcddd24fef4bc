//! The content-addressed artifact store: one file per digest.
//!
//! ```text
//! <root>/v1/<namespace>/objects/<2 hex>/<digest>   published artifacts
//! <root>/v1/<namespace>/tmp/                       writes in progress
//! <root>/v1/<namespace>/quarantine/                files that failed a check
//! <root>/v1/<namespace>/leases/<digest>.lock        compile leases (lease.rs)
//! <root>/v1/<namespace>/stats                       hit/miss counters of all processes
//! <root>/v1/<namespace>/fields                      what made the namespace (fields.rs)
//! <root>/v1/<namespace>/signed                      the key whose first use was handled (sign.rs)
//! <root>/v1/size                                   running size of the root (size.rs)
//! ```
//!
//! Each file is an artifact image (`image.rs`). A file is written to `tmp/`,
//! fsynced and renamed into place, so readers see either nothing or a whole
//! file. A reader that finds a bad header, length, checksum, digest or
//! signature, or anything but a private regular file, moves it to
//! `quarantine/` and reports a miss; bad bytes are never returned.
//!
//! The store holds descriptors of its directories, opened and checked once
//! (`fs.rs`, `root.rs`), and does everything relative to them without
//! following links. Every change to what the root's running size counts
//! happens under its size lock and updates it (`size.rs`), so the size cap
//! is checked in O(1) after a publish.
//! A store opened with [`Store::open_existing`] creates, cleans and moves
//! nothing: it only reads. One opened with [`Store::open_base`] (a base
//! store, `ISOCACHE_BASE`) only reads too, and also trusts what root owns.

pub mod fields;
pub mod fs;
pub mod gc;
pub mod image;
pub mod private_dir;
pub mod root;
pub mod sign;
pub mod size;
pub mod tmp;
pub mod usage;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, AtFlags, FileType};
use rustix::io::Errno;

use self::fs::{
    dir_owned_at, fstat, kind_name, lstat_at, open_dir_at, open_read_at, private_dir_at, remove_at,
    size_at, sync_dir, touch, utf8, Meta, Owners,
};
pub use self::gc::{BadEntry, GcReport, Quarantined, VerifyReport};
pub use self::image::{
    check_file, file_image, ArtifactKind, Corruption, CorruptionKind, Header, FORMAT_VERSION,
    HEADER_LEN, MAGIC, MAX_PAYLOAD,
};
pub use self::root::Root;
pub use self::sign::SignReport;
use self::size::Delta;
pub use self::size::RootSize;
use self::tmp::TempFile;
pub use self::usage::UsageStats;
pub use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::lease::Lease;

/// A temporary file this old belongs to no live write, lock or not.
pub const TMP_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Of the total a put finds over the cap, eviction brings the root down to
/// this share of the cap, so that a store kept at its cap scans for victims
/// once per tenth of the cap published, not at every put.
pub const EVICT_TO_PERCENT: u64 = 90;

pub fn validate_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= 128
        && ns != "."
        && ns != ".."
        && ns != size::SIZE
        && ns != size::STALE
        && ns
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidNamespace(ns.to_owned()))
    }
}

/// What became of an entry that failed a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Moved to this path under `quarantine/`.
    Quarantined(PathBuf),
    /// Another process moved or replaced it first.
    Gone,
    /// Left where it is (a read-only store, or it could not be moved).
    LeftInPlace,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit {
        payload: Vec<u8>,
        compile_seconds: f64,
        kind: ArtifactKind,
    },
    Miss,
    /// The entry failed a check and was not returned.
    Corrupt {
        corruption: Corruption,
        fate: Fate,
    },
}

/// One stored artifact, as listed by [`Store::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectInfo {
    pub namespace: String,
    pub digest: Digest,
    pub size: u64,
    pub last_used: f64,
    pub compile_seconds: f64,
    pub kind: ArtifactKind,
}

/// A published artifact as a directory listing sees it (no header read).
#[derive(Debug, Clone)]
pub(crate) struct ObjectEntry {
    pub digest: Digest,
    pub size: u64,
    pub mtime: SystemTime,
}

/// Why an entry is not a usable artifact.
pub(crate) enum Problem {
    Missing,
    Bad {
        corruption: Corruption,
        /// Move it to quarantine (false: a transient error, leave it).
        quarantine: bool,
        /// What was inspected, so that only that inode is moved.
        meta: Option<Meta>,
    },
}

impl Problem {
    fn bad(corruption: Corruption, meta: Option<Meta>) -> Problem {
        Problem::Bad {
            corruption,
            quarantine: true,
            meta,
        }
    }

    fn of(kind: CorruptionKind, reason: impl Into<String>, meta: Option<Meta>) -> Problem {
        Problem::bad(Corruption::new(kind, reason), meta)
    }

    fn unreadable(reason: String) -> Problem {
        Problem::Bad {
            corruption: Corruption::new(CorruptionKind::Unreadable, reason),
            quarantine: false,
            meta: None,
        }
    }
}

/// Descriptors that only a writable store holds (all present when writable).
pub(crate) struct Writable<'a> {
    pub objects: BorrowedFd<'a>,
    pub tmp: BorrowedFd<'a>,
    pub quarantine: BorrowedFd<'a>,
    pub leases: &'a Arc<OwnedFd>,
}

pub struct Store {
    root: Arc<Root>,
    namespace: String,
    dir: PathBuf,
    key: Option<[u8; 32]>,
    writable: bool,
    ns: Arc<OwnedFd>,
    objects: Option<OwnedFd>,
    tmp: Option<OwnedFd>,
    quarantine: Option<OwnedFd>,
    leases: Option<Arc<OwnedFd>>,
    /// Bad entries this handle refused.
    refused: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the store for `namespace` under `root`,
    /// and removes temporary files of writers that are gone.
    pub fn open(root: &Path, namespace: &str, key: Option<[u8; 32]>) -> Result<Store> {
        let store = Store::open_with(root, namespace, key, true)?;
        store.clean_tmp(TMP_MAX_AGE);
        Ok(store)
    }

    /// Opens an existing store read-only: creates, cleans and moves nothing.
    /// `Error::NoStore` when the namespace does not exist.
    pub fn open_existing(root: &Path, namespace: &str, key: Option<[u8; 32]>) -> Result<Store> {
        Store::open_with(root, namespace, key, false)
    }

    /// Opens an existing store as a read-only base (`ISOCACHE_BASE`: an
    /// image layer, a read-only volume): it creates, locks, quarantines and
    /// updates nothing (no last use), needs no write permission, and trusts
    /// directories and files owned by the user or by root that nobody else
    /// can write; with a key every artifact must be signed with it.
    /// `Error::NoStore` when the namespace does not exist.
    pub fn open_base(root: &Path, namespace: &str, key: Option<[u8; 32]>) -> Result<Store> {
        validate_namespace(namespace)?;
        let missing = || Error::NoStore {
            path: root.join(root::LAYOUT).join(namespace),
        };
        let root = Root::open_base(root)?.ok_or_else(missing)?;
        Store::in_root(Arc::new(root), namespace, key, false)
    }

    fn open_with(
        root: &Path,
        namespace: &str,
        key: Option<[u8; 32]>,
        create: bool,
    ) -> Result<Store> {
        validate_namespace(namespace)?;
        let missing = || Error::NoStore {
            path: root.join(root::LAYOUT).join(namespace),
        };
        let root = Root::open(root, create)?.ok_or_else(missing)?;
        Store::in_root(Arc::new(root), namespace, key, create)
    }

    /// Opens the store of `namespace` in an opened root.
    pub(crate) fn in_root(
        root: Arc<Root>,
        namespace: &str,
        key: Option<[u8; 32]>,
        create: bool,
    ) -> Result<Store> {
        validate_namespace(namespace)?;
        let dir = root.layout().join(namespace);
        let missing = || Error::NoStore { path: dir.clone() };
        let owners = root.owners;
        let ns =
            dir_owned_at(root.v1.as_fd(), namespace, &dir, create, owners)?.ok_or_else(missing)?;
        let sub = |name: &str| -> Result<Option<OwnedFd>> {
            Ok(dir_owned_at(ns.fd.as_fd(), name, &dir.join(name), create, owners)?.map(|o| o.fd))
        };
        Ok(Store {
            objects: sub("objects")?,
            tmp: sub("tmp")?,
            quarantine: sub("quarantine")?,
            leases: sub("leases")?.map(Arc::new),
            ns: Arc::new(ns.fd),
            namespace: namespace.to_owned(),
            root,
            dir,
            key,
            writable: create,
            refused: AtomicU64::new(0),
        })
    }

    /// Lists the namespaces that exist under `root` (read-only; the root and
    /// its ancestors are checked like a store's).
    pub fn namespaces(root: &Path) -> Result<Vec<String>> {
        match Root::open(root, false)? {
            Some(r) => r.namespaces(),
            None => Ok(Vec::new()),
        }
    }

    /// The opened root this store belongs to.
    pub fn root_handle(&self) -> &Arc<Root> {
        &self.root
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Bad entries this handle has refused (and, when writable, moved to quarantine).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Changes this process made to the root without its size lock (another
    /// process held it): each skipped the running size, recounted later.
    pub fn size_lock_skips(&self) -> u64 {
        self.root.size_lock.skipped()
    }

    pub(crate) fn writable(&self) -> Result<Writable<'_>> {
        match (&self.objects, &self.tmp, &self.quarantine, &self.leases) {
            (Some(objects), Some(tmp), Some(quarantine), Some(leases)) if self.writable => {
                Ok(Writable {
                    objects: objects.as_fd(),
                    tmp: tmp.as_fd(),
                    quarantine: quarantine.as_fd(),
                    leases,
                })
            }
            _ => Err(Error::ReadOnly {
                path: self.dir.clone(),
            }),
        }
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Who may own this store's directories and files.
    pub(crate) fn owners(&self) -> Owners {
        self.root.owners
    }

    fn lease_name(digest: &Digest) -> String {
        format!("{}.lock", digest.hex())
    }

    /// Takes the compile lease for `digest`, waiting up to `timeout`.
    pub fn lease(&self, digest: &Digest, timeout: Duration) -> Result<Option<Lease>> {
        let w = self.writable()?;
        let name = Store::lease_name(digest);
        Lease::acquire(w.leases, &name, timeout)
            .map_err(|e| Error::io("take lease", self.dir.join("leases").join(&name), e))
    }

    /// True when some process holds the compile lease of `digest`.
    pub fn lease_held(&self, digest: &Digest) -> bool {
        self.leases
            .as_ref()
            .is_some_and(|l| Lease::is_held(l, &Store::lease_name(digest)))
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `<root>/v1/<namespace>`, for messages (the store itself uses descriptors).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_signed(&self) -> bool {
        self.key.is_some()
    }

    /// Where the artifact of `digest` lives, for messages and tests.
    pub fn object_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir.join("objects").join(&hex[..2]).join(hex)
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir.join("quarantine")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Publishes a piece under `digest` (see [`Store::publish`]).
    pub fn put(&self, digest: &Digest, payload: &[u8], compile_seconds: f64) -> Result<()> {
        self.publish(digest, payload, compile_seconds, ArtifactKind::Piece, None)
            .map(|_| ())
    }

    /// Publishes `payload` under `digest`: temp file (locked), fsync, then
    /// under the root's size lock the rename and the size update, then
    /// fsync of the shard directory (and of `objects/` when the shard is
    /// new). With `max_bytes`, a root whose size is now over it is brought
    /// down to [`EVICT_TO_PERCENT`] of it, least recently used first, across
    /// every namespace; the report says what went. The cap costs O(1) when
    /// it is not exceeded.
    pub fn publish(
        &self,
        digest: &Digest,
        payload: &[u8],
        compile_seconds: f64,
        kind: ArtifactKind,
        max_bytes: Option<u64>,
    ) -> Result<Option<GcReport>> {
        let w = self.writable()?;
        if payload.len() as u64 > MAX_PAYLOAD {
            return Err(Error::TooLarge {
                size: payload.len() as u64,
                limit: MAX_PAYLOAD,
            });
        }
        let image = file_image(digest, payload, compile_seconds, self.key.as_ref(), kind);
        let hex = digest.hex();
        let final_path = self.object_path(digest);
        let shard_path = final_path.parent().expect("object path has a parent");
        let mut tmp =
            TempFile::create(w.tmp, &hex).map_err(|e| Error::io("write", self.tmp_dir(), e))?;
        if let Err(e) = tmp
            .file
            .write_all(&image)
            .and_then(|()| tmp.file.sync_all())
        {
            tmp.discard(w.tmp);
            return Err(Error::io("write", self.tmp_dir().join(&hex), e));
        }
        let mut lock = self.root.lock_size();
        let mut delta = Delta::default();
        // A link or a stray file where the shard directory belongs is moved
        // out of the way (never followed), as a lookup would.
        if let Err(Problem::Bad {
            quarantine: true,
            meta,
            ..
        }) = Store::open_shard(w.objects, &hex[..2], self.owners())
        {
            self.quarantine_inner(w.objects, &hex[..2], meta.as_ref(), false, &mut delta);
        }
        let shard = match private_dir_at(w.objects, &hex[..2], shard_path, true) {
            Ok(s) => s.expect("created when missing"),
            Err(e) => {
                tmp.discard(w.tmp);
                if let Some(l) = &mut lock {
                    l.apply(delta);
                }
                return Err(e);
            }
        };
        let replaced = match lstat_at(&shard.fd, hex.as_str()) {
            Ok(m) if m.kind == FileType::RegularFile => Delta::artifact(m.size),
            _ => Delta::default(),
        };
        if let Err(e) = rfs::renameat(w.tmp, tmp.name.as_str(), &shard.fd, hex.as_str()) {
            tmp.discard(w.tmp);
            if let Some(l) = &mut lock {
                l.apply(delta);
            }
            return Err(Error::io("publish", &final_path, e.into()));
        }
        drop(tmp);
        delta.add(-replaced);
        delta.add(Delta::artifact(image.len() as u64));
        // Without the lock (it stayed busy) the cap waits for the next put,
        // and the record for a recount (marked when the skipped lock drops).
        let mut evicted = Ok(None);
        if let Some(l) = &mut lock {
            l.apply(delta);
            if let (Some(max), Some(now)) = (max_bytes, l.current()) {
                if now.bytes > max {
                    let target = (max as u128 * EVICT_TO_PERCENT as u128 / 100) as u64;
                    evicted = gc::evict_root(&self.root, Some(l), target, false).map(Some);
                }
            }
        }
        drop(lock);
        if shard.created {
            sync_dir(w.objects).map_err(|e| Error::io("sync", self.dir.join("objects"), e))?;
        }
        let _ = sync_dir(&shard.fd);
        evicted
    }

    /// Opens a shard directory of `objects/`: a private real directory.
    fn open_shard(
        objects: BorrowedFd<'_>,
        name: &str,
        owners: Owners,
    ) -> std::result::Result<OwnedFd, Problem> {
        match open_dir_at(objects, name) {
            Ok(fd) => {
                let Ok(meta) = fstat(&fd) else {
                    return Err(Problem::Missing);
                };
                if !owners.trusts(meta.uid) || meta.writable_by_others() {
                    return Err(Problem::of(
                        CorruptionKind::NotPrivate,
                        format!(
                            "shard directory owned by uid {} with mode {:o}: not private",
                            meta.uid,
                            meta.mode & 0o777
                        ),
                        Some(meta),
                    ));
                }
                Ok(fd)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Problem::Missing),
            Err(e) => Err(match lstat_at(objects, name) {
                Ok(m) if m.kind == FileType::Symlink => Problem::of(
                    CorruptionKind::Symlink,
                    "a symbolic link in the store",
                    Some(m),
                ),
                Ok(m) if m.kind != FileType::Directory => Problem::of(
                    CorruptionKind::NotRegular,
                    format!("{} where a shard directory belongs", kind_name(m.kind)),
                    Some(m),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Problem::Missing,
                _ => Problem::unreadable(format!("unreadable shard directory: {e}")),
            }),
        }
    }

    /// Opens, checks and reads the artifact `name` in `shard`: a regular file
    /// owned by the user that nobody else can write, read without blocking
    /// and only as far as its header says.
    pub(crate) fn read_checked(
        &self,
        shard: BorrowedFd<'_>,
        name: &str,
        digest: &Digest,
    ) -> std::result::Result<(File, Header, Vec<u8>), Problem> {
        self.read_checked_with(shard, name, digest, self.key.as_ref())
    }

    /// [`Store::read_checked`] against `key` rather than the store's (None:
    /// the integrity checks only).
    pub(crate) fn read_checked_with(
        &self,
        shard: BorrowedFd<'_>,
        name: &str,
        digest: &Digest,
        key: Option<&[u8; 32]>,
    ) -> std::result::Result<(File, Header, Vec<u8>), Problem> {
        let file = match open_read_at(shard, name) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Problem::Missing),
            Err(e) => {
                return Err(match lstat_at(shard, name) {
                    Ok(m) if m.kind == FileType::Symlink => Problem::of(
                        CorruptionKind::Symlink,
                        "a symbolic link in the store",
                        Some(m),
                    ),
                    Ok(m) if m.kind != FileType::RegularFile => Problem::of(
                        CorruptionKind::NotRegular,
                        format!("{} in the store, not a regular file", kind_name(m.kind)),
                        Some(m),
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Problem::Missing,
                    _ => Problem::unreadable(format!("unreadable: {e}")),
                })
            }
        };
        let meta = fstat(&file).map_err(|e| Problem::unreadable(format!("unreadable: {e}")))?;
        let refuse = |c: Corruption| Problem::bad(c, Some(meta));
        let refuse_as =
            |kind: CorruptionKind, reason: String| refuse(Corruption::new(kind, reason));
        if meta.kind != FileType::RegularFile {
            return Err(refuse_as(
                CorruptionKind::NotRegular,
                format!("{} in the store, not a regular file", kind_name(meta.kind)),
            ));
        }
        let owners = self.owners();
        if !owners.trusts(meta.uid) {
            return Err(refuse_as(
                CorruptionKind::NotPrivate,
                format!("owned by uid {}, not by {}", meta.uid, owners.describe()),
            ));
        }
        if meta.writable_by_others() {
            return Err(refuse_as(
                CorruptionKind::NotPrivate,
                format!("writable by others (mode {:o})", meta.mode & 0o777),
            ));
        }
        let mut raw = Vec::with_capacity(HEADER_LEN);
        (&file)
            .take(HEADER_LEN as u64)
            .read_to_end(&mut raw)
            .map_err(|e| {
                refuse_as(
                    CorruptionKind::Unreadable,
                    format!("unreadable header: {e}"),
                )
            })?;
        let header = Header::decode(&raw).map_err(refuse)?;
        let body = meta.size.saturating_sub(HEADER_LEN as u64);
        header.check_frame(digest, Some(body)).map_err(refuse)?;
        let mut payload = Vec::new();
        payload
            .try_reserve_exact(header.payload_len as usize)
            .map_err(|e| {
                refuse_as(
                    CorruptionKind::Length,
                    format!("cannot hold {} bytes: {e}", header.payload_len),
                )
            })?;
        (&file)
            .take(header.payload_len)
            .read_to_end(&mut payload)
            .map_err(|e| {
                refuse_as(
                    CorruptionKind::Unreadable,
                    format!("unreadable payload: {e}"),
                )
            })?;
        if payload.len() as u64 != header.payload_len {
            return Err(refuse_as(
                CorruptionKind::Length,
                format!(
                    "length mismatch: header says {} bytes, read {}",
                    header.payload_len,
                    payload.len()
                ),
            ));
        }
        image::check_payload(&header, &raw, &payload, key).map_err(refuse)?;
        Ok((file, header, payload))
    }

    /// Reads and checks the artifact for `digest`. Every problem with the
    /// file is a `Corrupt` result, never an error: a lookup cannot fail a
    /// compile.
    pub fn get(&self, digest: &Digest) -> Result<Lookup> {
        let Some(objects) = &self.objects else {
            return Ok(Lookup::Miss);
        };
        let hex = digest.hex();
        let outcome = match Store::open_shard(objects.as_fd(), &hex[..2], self.owners()) {
            Ok(shard) => match self.read_checked(shard.as_fd(), &hex, digest) {
                Ok((file, header, payload)) => {
                    if self.writable {
                        let _ = touch(&file); // recency orders eviction
                    }
                    return Ok(Lookup::Hit {
                        payload,
                        compile_seconds: header.compile_seconds,
                        kind: header.kind(),
                    });
                }
                Err(p) => (p, Some(shard), hex.clone()),
            },
            Err(p) => (p, None, hex[..2].to_owned()),
        };
        Ok(match outcome {
            (Problem::Missing, ..) => Lookup::Miss,
            (
                Problem::Bad {
                    corruption,
                    quarantine,
                    meta,
                },
                shard,
                name,
            ) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let dir = shard.as_ref().map(|s| s.as_fd()).unwrap_or(objects.as_fd());
                let fate = if quarantine {
                    self.quarantine_entry(dir, &name, meta.as_ref(), shard.is_some())
                } else {
                    Fate::LeftInPlace
                };
                Lookup::Corrupt { corruption, fate }
            }
        })
    }

    /// Moves `name` out of `dir` into `quarantine/` so it is never read
    /// again (only when it is still the inode that was inspected), under the
    /// size lock. `artifact`: `name` is an artifact's name in a shard (what
    /// the running size counts as an artifact), not a shard.
    pub(crate) fn quarantine_entry(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        inspected: Option<&Meta>,
        artifact: bool,
    ) -> Fate {
        if self.writable().is_err() {
            return Fate::LeftInPlace;
        }
        let mut lock = self.root.lock_size();
        let mut delta = Delta::default();
        let fate = self.quarantine_inner(dir, name, inspected, artifact, &mut delta);
        if let Some(l) = &mut lock {
            l.apply(delta);
        }
        fate
    }

    /// [`Store::quarantine_entry`] for a caller holding the size lock.
    fn quarantine_inner(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        inspected: Option<&Meta>,
        artifact: bool,
        delta: &mut Delta,
    ) -> Fate {
        let Ok(w) = self.writable() else {
            return Fate::LeftInPlace;
        };
        let counted = match lstat_at(dir, name) {
            Ok(now) if inspected.is_none_or(|m| m.same_file(&now)) => {
                if artifact && now.kind == FileType::RegularFile {
                    Delta::artifact(now.size)
                } else {
                    Delta::default()
                }
            }
            Ok(_) => return Fate::Gone,
            Err(_) => return Fate::Gone,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dest = format!("{name}.{now}");
        match rfs::renameat(dir, name, w.quarantine, dest.as_str()) {
            Ok(()) => {
                let c = std::ffi::CString::new(dest.clone()).expect("no NUL in names");
                delta.add(-counted);
                delta.add(Delta::bytes(size_at(w.quarantine, &c)));
                self.prune_inner(gc::QUARANTINE_MAX_AGE, delta);
                Fate::Quarantined(self.quarantine_dir().join(dest))
            }
            Err(Errno::NOENT) => Fate::Gone,
            Err(_) => Fate::LeftInPlace,
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        let Some(objects) = &self.objects else {
            return false;
        };
        let hex = digest.hex();
        match Store::open_shard(objects.as_fd(), &hex[..2], self.owners()) {
            Ok(shard) => {
                lstat_at(&shard, hex.as_str()).is_ok_and(|m| m.kind == FileType::RegularFile)
            }
            Err(_) => false,
        }
    }

    /// Removes the artifact of `digest` (whatever is at its name, never
    /// following a link); false when there was none.
    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        self.writable()?;
        let mut lock = self.root.lock_size();
        let mut delta = Delta::default();
        let removed = self.remove_inner(digest, &mut delta);
        if let Some(l) = &mut lock {
            l.apply(delta);
        }
        removed
    }

    /// [`Store::remove`] for a caller holding the size lock.
    pub(crate) fn remove_inner(&self, digest: &Digest, delta: &mut Delta) -> Result<bool> {
        let w = self.writable()?;
        let hex = digest.hex();
        let Ok(shard) = open_dir_at(w.objects, &hex[..2]) else {
            return Ok(false);
        };
        if let Ok(m) = lstat_at(&shard, hex.as_str()) {
            if m.kind == FileType::RegularFile {
                // Counted as gone even if the unlink fails below: the next
                // full scan corrects it.
                delta.add(-Delta::artifact(m.size));
            }
        }
        match rfs::unlinkat(&shard, hex.as_str(), AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(Errno::ISDIR) | Err(Errno::PERM) => {
                let name = std::ffi::CString::new(hex.clone()).expect("hex has no NUL");
                remove_at(shard.as_fd(), &name)
                    .map(|()| true)
                    .map_err(|e| Error::io("remove", self.object_path(digest), e))
            }
            Err(e) => Err(Error::io("remove", self.object_path(digest), e.into())),
        }
    }

    /// The header of the artifact `name` in `shard`, if it is a regular file.
    pub(crate) fn read_header(shard: BorrowedFd<'_>, name: &str) -> Option<Header> {
        let f = open_read_at(shard, name).ok()?;
        if fstat(&f).ok()?.kind != FileType::RegularFile {
            return None;
        }
        let mut h = Vec::with_capacity(HEADER_LEN);
        (&f).take(HEADER_LEN as u64).read_to_end(&mut h).ok()?;
        Header::decode(&h).ok()
    }

    /// Calls `f` with every published artifact: a regular file named by its
    /// digest in a private shard directory. Reads only directories and
    /// `lstat`s, never a file.
    pub(crate) fn each_object(
        &self,
        mut f: impl FnMut(BorrowedFd<'_>, &str, Digest, &Meta),
    ) -> Result<()> {
        let Some(objects) = &self.objects else {
            return Ok(());
        };
        let shards =
            fs::entries(objects).map_err(|e| Error::io("list", self.dir.join("objects"), e))?;
        for (shard_name, _) in shards {
            let Some(shard_name) = utf8(&shard_name) else {
                continue;
            };
            let Ok(shard) = Store::open_shard(objects.as_fd(), shard_name, self.owners()) else {
                continue;
            };
            let Ok(files) = fs::entries(&shard) else {
                continue;
            };
            for (name, _) in files {
                let Some(name) = utf8(&name) else { continue };
                let Ok(digest) = Digest::parse(name) else {
                    continue;
                };
                let Ok(meta) = lstat_at(&shard, name) else {
                    continue;
                };
                if meta.kind == FileType::RegularFile {
                    f(shard.as_fd(), name, digest, &meta);
                }
            }
        }
        Ok(())
    }

    /// Every published artifact with its size and last use (no header read).
    pub(crate) fn object_entries(&self) -> Result<Vec<ObjectEntry>> {
        let mut out = Vec::new();
        self.each_object(|_, _, digest, meta| {
            out.push(ObjectEntry {
                digest,
                size: meta.size,
                mtime: meta.mtime,
            })
        })?;
        Ok(out)
    }

    /// All published artifacts with their size, last use, compile time and
    /// kind (from the header), sorted by digest. Reads only.
    pub fn list(&self) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        self.each_object(|shard, name, digest, meta| {
            let header = Store::read_header(shard, name);
            out.push(ObjectInfo {
                namespace: self.namespace.clone(),
                digest,
                size: meta.size,
                last_used: unix_seconds(meta.mtime),
                compile_seconds: header.as_ref().map_or(0.0, |h| h.compile_seconds),
                kind: header.as_ref().map_or(ArtifactKind::Piece, Header::kind),
            })
        })?;
        out.sort_by_key(|o| o.digest);
        Ok(out)
    }

    /// The root's running size (O(1) when its record is readable).
    pub fn root_size(&self) -> Result<RootSize> {
        self.root.size()
    }
}

pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests;
