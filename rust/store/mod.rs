//! The content-addressed artifact store: one file per digest.
//!
//! ```text
//! <root>/v1/<namespace>/objects/<2 hex>/<digest>   published artifacts
//! <root>/v1/<namespace>/tmp/                       writes in progress
//! <root>/v1/<namespace>/quarantine/                files that failed a check
//! <root>/v1/<namespace>/leases/<digest>.lock        compile leases (lease.rs)
//! <root>/v1/<namespace>/stats                       hit/miss counters of all processes
//! ```
//!
//! Each file is a fixed 128-byte header followed by the payload:
//!
//! | offset | size | field                                              |
//! | ------ | ---- | -------------------------------------------------- |
//! | 0      | 8    | magic `ISOCACHE`                                   |
//! | 8      | 2    | format version (u16 LE)                            |
//! | 10     | 2    | flags (bit 0: signed)                              |
//! | 12     | 4    | reserved, zero                                     |
//! | 16     | 8    | payload length (u64 LE)                            |
//! | 24     | 8    | seconds the compile took (f64 LE), for reporting   |
//! | 32     | 32   | the digest this file is stored under               |
//! | 64     | 32   | BLAKE3 of the payload                              |
//! | 96     | 32   | keyed BLAKE3 of bytes 0..96 and the payload, or 0  |
//!
//! A file is written to `tmp/`, fsynced and renamed into place, so readers see
//! either nothing or a whole file. A reader that finds a bad header, length,
//! checksum, digest or signature moves the file to `quarantine/` and reports a
//! miss; bad bytes are never returned.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::lease::Lease;

pub const MAGIC: &[u8; 8] = b"ISOCACHE";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 128;
const FLAG_SIGNED: u16 = 1;
/// Largest payload accepted (a compiled piece is usually well under 10 MB).
pub const MAX_PAYLOAD: u64 = 4 << 30;
/// Layout version of the directory tree.
const LAYOUT: &str = "v1";

/// A validated 32-byte digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn parse(hex: &str) -> Result<Digest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::InvalidDigest(hex.to_owned()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| Error::InvalidDigest(hex.to_owned()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| Error::InvalidDigest(hex.to_owned()))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Digest(out))
    }

    pub fn hex(&self) -> String {
        crate::canon::to_hex(&self.0)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

pub fn validate_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= 128
        && ns != "."
        && ns != ".."
        && ns
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidNamespace(ns.to_owned()))
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit {
        payload: Vec<u8>,
        compile_seconds: f64,
    },
    Miss,
    /// The file failed a check; it was moved to `quarantined` when possible.
    Corrupt {
        reason: String,
        quarantined: Option<PathBuf>,
    },
}

/// Header fields of a stored file.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u16,
    pub flags: u16,
    pub payload_len: u64,
    pub compile_seconds: f64,
    pub digest: [u8; 32],
    pub checksum: [u8; 32],
    pub signature: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&self.version.to_le_bytes());
        h[10..12].copy_from_slice(&self.flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.compile_seconds.to_le_bytes());
        h[32..64].copy_from_slice(&self.digest);
        h[64..96].copy_from_slice(&self.checksum);
        h[96..128].copy_from_slice(&self.signature);
        h
    }

    /// Parses a header; `Err` carries a human-readable reason.
    pub fn decode(h: &[u8]) -> std::result::Result<Header, String> {
        if h.len() < HEADER_LEN {
            return Err(format!("truncated header ({} bytes)", h.len()));
        }
        if &h[0..8] != MAGIC {
            return Err("bad magic: not an isocache artifact".into());
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this isocache reads {FORMAT_VERSION}"
            ));
        }
        let arr = |r: std::ops::Range<usize>| -> [u8; 32] { h[r].try_into().unwrap() };
        Ok(Header {
            version,
            flags: u16::from_le_bytes([h[10], h[11]]),
            payload_len: u64::from_le_bytes(h[16..24].try_into().unwrap()),
            compile_seconds: f64::from_le_bytes(h[24..32].try_into().unwrap()),
            digest: arr(32..64),
            checksum: arr(64..96),
            signature: arr(96..128),
        })
    }

    pub fn is_signed(&self) -> bool {
        self.flags & FLAG_SIGNED != 0
    }
}

fn sign(key: &[u8; 32], header_prefix: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header_prefix);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// Checks a whole file image against the expected digest and key.
pub fn check_file(
    bytes: &[u8],
    expected: &Digest,
    key: Option<&[u8; 32]>,
) -> std::result::Result<(Header, std::ops::Range<usize>), String> {
    let header = Header::decode(bytes)?;
    if header.digest != expected.0 {
        return Err("file is stored under another digest".into());
    }
    let body = bytes.len() - HEADER_LEN;
    if header.payload_len != body as u64 {
        return Err(format!(
            "length mismatch: header says {} bytes, file has {body}",
            header.payload_len
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    if blake3::hash(payload).as_bytes() != &header.checksum {
        return Err("checksum mismatch".into());
    }
    if let Some(key) = key {
        if !header.is_signed() {
            return Err("artifact is not signed, and ISOCACHE_KEY is set".into());
        }
        let expected_sig = sign(key, &bytes[..96], payload);
        // Compare through blake3's constant-time Hash equality.
        if blake3::Hash::from(expected_sig) != blake3::Hash::from(header.signature) {
            return Err("signature does not match ISOCACHE_KEY".into());
        }
    }
    Ok((header, HEADER_LEN..bytes.len()))
}

/// Builds the file image for `payload`.
pub fn file_image(
    digest: &Digest,
    payload: &[u8],
    compile_seconds: f64,
    key: Option<&[u8; 32]>,
) -> Vec<u8> {
    let mut header = Header {
        version: FORMAT_VERSION,
        flags: if key.is_some() { FLAG_SIGNED } else { 0 },
        payload_len: payload.len() as u64,
        compile_seconds,
        digest: digest.0,
        checksum: *blake3::hash(payload).as_bytes(),
        signature: [0; 32],
    };
    let mut image = Vec::with_capacity(HEADER_LEN + payload.len());
    image.extend_from_slice(&header.encode());
    if let Some(key) = key {
        header.signature = sign(key, &image[..96], payload);
        image[96..128].copy_from_slice(&header.signature);
    }
    image.extend_from_slice(payload);
    image
}

/// One stored artifact, as listed by [`Store::list`].
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub digest: String,
    pub size: u64,
    pub last_used: f64,
    pub compile_seconds: f64,
}

pub struct Store {
    root: PathBuf,
    dir: PathBuf,
    key: Option<[u8; 32]>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);
/// A temporary file this old belongs to no live write.
const TMP_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `path` (and parents) with mode 0700, then checks it is private.
fn ensure_private_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| Error::io("create directory", path, e))?;
        }
        Err(e) => return Err(Error::io("inspect", path, e)),
    }
    check_private_dir(path)
}

/// A directory is private when it is a real directory (not a symlink), owned
/// by the current user, and not writable by group or others.
pub fn check_private_dir(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::io("inspect", path, e))?;
    let insecure = |reason: String, fix: String| Error::InsecureStore {
        path: path.to_owned(),
        reason,
        fix,
    };
    if meta.file_type().is_symlink() {
        return Err(insecure(
            "it is a symbolic link".into(),
            "point ISOCACHE_DIR at the real directory".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(insecure(
            "it is not a directory".into(),
            "point ISOCACHE_DIR at a directory".into(),
        ));
    }
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(insecure(
            format!("it is owned by uid {}, not by you (uid {uid})", meta.uid()),
            "use a directory you own (set ISOCACHE_DIR)".into(),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(insecure(
            format!("its mode {:o} lets others write to it", meta.mode() & 0o777),
            format!("run `chmod go-w {}`", path.display()),
        ));
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store for `namespace` under `root`.
    pub fn open(root: &Path, namespace: &str, key: Option<[u8; 32]>) -> Result<Store> {
        validate_namespace(namespace)?;
        ensure_private_dir(root)?;
        let dir = root.join(LAYOUT).join(namespace);
        for sub in [
            root.join(LAYOUT),
            dir.clone(),
            dir.join("objects"),
            dir.join("tmp"),
            dir.join("quarantine"),
            dir.join("leases"),
        ] {
            ensure_private_dir(&sub)?;
        }
        let store = Store {
            root: root.to_owned(),
            dir,
            key,
        };
        store.clean_tmp(TMP_MAX_AGE);
        Ok(store)
    }

    /// Lists the namespaces that exist under `root`.
    pub fn namespaces(root: &Path) -> Result<Vec<String>> {
        let base = root.join(LAYOUT);
        let entries = match fs::read_dir(&base) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", &base, e)),
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| validate_namespace(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn lease_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("leases")
            .join(format!("{}.lock", digest.hex()))
    }

    /// Takes the compile lease for `digest`, waiting up to `timeout`.
    pub fn lease(&self, digest: &Digest, timeout: Duration) -> Result<Option<Lease>> {
        Lease::acquire(&self.lease_path(digest), timeout)
    }

    /// Removes temporary files whose writer is gone (dead pid) or that are
    /// older than `max_age`; returns how many were removed.
    pub fn clean_tmp(&self, max_age: Duration) -> usize {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('.').nth(1).and_then(|p| p.parse::<i32>().ok());
            let dead = pid.is_some_and(|p| !process_alive(p));
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age);
            if (dead || old || pid.is_none()) && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_signed(&self) -> bool {
        self.key.is_some()
    }

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

    /// Publishes `payload` under `digest`: temp file, fsync, rename, fsync dir.
    pub fn put(&self, digest: &Digest, payload: &[u8], compile_seconds: f64) -> Result<()> {
        if payload.len() as u64 > MAX_PAYLOAD {
            return Err(Error::TooLarge {
                size: payload.len() as u64,
                limit: MAX_PAYLOAD,
            });
        }
        let image = file_image(digest, payload, compile_seconds, self.key.as_ref());
        let final_path = self.object_path(digest);
        let shard = final_path.parent().expect("object path has a parent");
        ensure_private_dir(shard)?;
        let tmp = self.tmp_dir().join(format!(
            "{}.{}.{}.tmp",
            digest.hex(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&image)?;
            f.sync_all()?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", &tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, &final_path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("publish", &final_path, e));
        }
        if let Ok(d) = File::open(shard) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads and checks the artifact for `digest`.
    pub fn get(&self, digest: &Digest) -> Result<Lookup> {
        let path = self.object_path(digest);
        let shard = path.parent().expect("object path has a parent");
        match fs::symlink_metadata(shard) {
            Ok(m) if m.file_type().is_symlink() => {
                // Never follow it; move the link itself out of the way.
                return Ok(self.quarantine(shard, "a symbolic link in the store".into()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::Miss),
            Err(e) => return Err(Error::io("inspect", shard, e)),
        }
        let bytes = match read_no_follow(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::Miss),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Ok(self.quarantine(&path, "a symbolic link in the store".into()));
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        match check_file(&bytes, digest, self.key.as_ref()) {
            Ok((header, range)) => {
                touch(&path);
                Ok(Lookup::Hit {
                    payload: bytes[range].to_vec(),
                    compile_seconds: header.compile_seconds,
                })
            }
            Err(reason) => Ok(self.quarantine(&path, reason)),
        }
    }

    /// Moves a bad file out of the way so it is never read again.
    fn quarantine(&self, path: &Path, reason: String) -> Lookup {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unknown".into());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dest = self.quarantine_dir().join(format!("{name}.{now}"));
        let quarantined = match fs::rename(path, &dest) {
            Ok(()) => Some(dest),
            // Someone else moved or replaced it first; either way it is gone.
            Err(_) => None,
        };
        Lookup::Corrupt {
            reason,
            quarantined,
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.object_path(digest))
            .map(|m| m.is_file())
            .unwrap_or(false)
    }

    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        let path = self.object_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    /// All published artifacts with their size, last use and compile time.
    pub fn list(&self) -> Result<Vec<ObjectInfo>> {
        let objects = self.dir.join("objects");
        let mut out = Vec::new();
        let shards = match fs::read_dir(&objects) {
            Ok(s) => s,
            Err(e) => return Err(Error::io("list", &objects, e)),
        };
        for shard in shards.flatten() {
            if !shard.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if Digest::parse(&name).is_err() {
                    continue;
                }
                let Ok(meta) = f.metadata() else { continue };
                let compile_seconds = read_header(&f.path())
                    .map(|h| h.compile_seconds)
                    .unwrap_or(0.0);
                out.push(ObjectInfo {
                    digest: name,
                    size: meta.len(),
                    last_used: meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0),
                    compile_seconds,
                });
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    pub removed: usize,
    pub freed_bytes: u64,
    pub remaining_bytes: u64,
    pub remaining: usize,
}

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
    const LEN: usize = 48;

    fn encode(&self) -> [u8; Self::LEN] {
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
    fn decode(b: &[u8]) -> UsageStats {
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

    fn add(&mut self, d: &UsageStats) {
        self.hits += d.hits;
        self.misses += d.misses;
        self.saved_seconds += d.saved_seconds;
        self.remote_hits += d.remote_hits;
        self.remote_misses += d.remote_misses;
        self.remote_errors += d.remote_errors;
    }
}

impl Store {
    /// Total bytes of published artifacts.
    pub fn total_bytes(&self) -> Result<u64> {
        Ok(self.list()?.iter().map(|o| o.size).sum())
    }

    /// Evicts least-recently-used artifacts until at most `max_bytes` remain.
    /// Readers holding a file keep reading it: unlink does not cut them off,
    /// and a later lookup is a plain miss.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport> {
        let mut objects = self.list()?;
        objects.sort_by(|a, b| a.last_used.total_cmp(&b.last_used));
        let mut total: u64 = objects.iter().map(|o| o.size).sum();
        let mut report = GcReport::default();
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
        self.clean_tmp(TMP_MAX_AGE);
        self.clean_leases();
        Ok(report)
    }

    /// Removes lock files nobody holds (taking each lock first, see lease.rs).
    pub fn clean_leases(&self) -> usize {
        let Ok(entries) = fs::read_dir(self.dir.join("leases")) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            if let Ok(Some(lease)) = Lease::try_acquire(&e.path()) {
                lease.remove_file();
                removed += 1;
            }
        }
        removed
    }

    /// Checks every artifact; returns `(digest, reason)` for the bad ones,
    /// moving them to quarantine when `fix` is set.
    pub fn verify(&self, fix: bool) -> Result<(usize, Vec<(String, String)>)> {
        let objects = self.list_all_files()?;
        let mut bad = Vec::new();
        for (name, path) in &objects {
            let Ok(d) = Digest::parse(name) else { continue };
            let reason = match read_no_follow(path) {
                Ok(bytes) => check_file(&bytes, &d, self.key.as_ref()).err(),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    Some("a symbolic link in the store".to_string())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => Some(format!("unreadable: {e}")),
            };
            if let Some(reason) = reason {
                if fix {
                    self.quarantine(path, reason.clone());
                }
                bad.push((name.clone(), reason));
            }
        }
        Ok((objects.len(), bad))
    }

    /// Every entry under `objects/`, symlinks included (for `verify`).
    fn list_all_files(&self) -> Result<Vec<(String, PathBuf)>> {
        let objects = self.dir.join("objects");
        let mut out = Vec::new();
        let shards = fs::read_dir(&objects).map_err(|e| Error::io("list", &objects, e))?;
        for shard in shards.flatten() {
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                out.push((f.file_name().to_string_lossy().into_owned(), f.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Adds to the namespace's shared counters (under a lease on `stats`).
    pub fn record_usage(&self, delta: UsageStats) -> Result<UsageStats> {
        let path = self.dir.join("stats");
        let lock = self.dir.join("stats.lock");
        let _guard = Lease::acquire(&lock, Duration::from_secs(10))?;
        let mut current = self.usage();
        current.add(&delta);
        let tmp = self
            .tmp_dir()
            .join(format!("stats.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&current.encode())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| Error::io("write", &path, e))?;
        Ok(current)
    }

    pub fn usage(&self) -> UsageStats {
        read_no_follow(&self.dir.join("stats"))
            .map(|b| UsageStats::decode(&b))
            .unwrap_or_default()
    }

    /// Removes every artifact, quarantined file and counter of this namespace.
    pub fn clear(&self) -> Result<usize> {
        let mut removed = 0;
        for (name, path) in self.list_all_files()? {
            if Digest::parse(&name).is_ok() && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        if let Ok(entries) = fs::read_dir(self.quarantine_dir()) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_file(self.dir.join("stats"));
        self.clean_leases();
        Ok(removed)
    }
}

fn read_no_follow(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

fn read_header(path: &Path) -> Option<Header> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h).ok()?;
    Header::decode(&h).ok()
}

/// Marks a file as just used (its mtime orders eviction).
fn touch(path: &Path) {
    if let Ok(f) = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn digest(n: u8) -> Digest {
        Digest(*blake3::hash(&[n]).as_bytes())
    }

    fn store(dir: &Path) -> Store {
        Store::open(&dir.join("cache"), "ns", None).unwrap()
    }

    #[test]
    fn digest_parsing() {
        let d = digest(1);
        assert_eq!(Digest::parse(&d.hex()).unwrap(), d);
        assert!(Digest::parse("abc").is_err());
        assert!(Digest::parse(&d.hex().to_uppercase()).is_err());
        assert!(Digest::parse(&"g".repeat(64)).is_err());
    }

    #[test]
    fn namespace_validation() {
        assert!(validate_namespace("cpu-abc_1.2").is_ok());
        for bad in ["", "..", "a/b", "x y", &"a".repeat(129)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn put_get_round_trip_and_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let d = digest(2);
        assert!(matches!(s.get(&d).unwrap(), Lookup::Miss));
        assert!(!s.contains(&d));
        s.put(&d, b"compiled", 1.25).unwrap();
        assert!(s.contains(&d));
        match s.get(&d).unwrap() {
            Lookup::Hit {
                payload,
                compile_seconds,
            } => {
                assert_eq!(payload, b"compiled");
                assert_eq!(compile_seconds, 1.25);
            }
            other => panic!("{other:?}"),
        }
        let path = s.object_path(&d);
        assert!(path.starts_with(tmp.path().join("cache/v1/ns/objects")));
        assert_eq!(path.parent().unwrap().file_name().unwrap(), &d.hex()[..2]);
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(s.dir()).unwrap().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
        assert!(s.remove(&d).unwrap());
        assert!(!s.remove(&d).unwrap());
        assert!(matches!(s.get(&d).unwrap(), Lookup::Miss));
    }

    #[test]
    fn overwrite_replaces_whole_file() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let d = digest(3);
        s.put(&d, &vec![1u8; 1000], 0.0).unwrap();
        s.put(&d, b"short", 0.0).unwrap();
        match s.get(&d).unwrap() {
            Lookup::Hit { payload, .. } => assert_eq!(payload, b"short"),
            other => panic!("{other:?}"),
        }
    }

    fn corrupt_with(f: impl FnOnce(&mut Vec<u8>)) -> (Lookup, Store, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let d = digest(4);
        s.put(&d, b"some payload bytes", 0.0).unwrap();
        let path = s.object_path(&d);
        let mut bytes = fs::read(&path).unwrap();
        f(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        (s.get(&d).unwrap(), s, tmp)
    }

    fn assert_quarantined(l: Lookup, s: &Store, needle: &str) {
        match l {
            Lookup::Corrupt {
                reason,
                quarantined,
            } => {
                assert!(reason.contains(needle), "{reason}");
                let q = quarantined.expect("moved to quarantine");
                assert!(q.starts_with(s.quarantine_dir()));
                assert!(q.exists());
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        assert!(!s.contains(&digest(4)));
    }

    #[test]
    fn bit_flip_in_payload_is_quarantined() {
        let (l, s, _t) = corrupt_with(|b| {
            let n = b.len() - 1;
            b[n] ^= 1
        });
        assert_quarantined(l, &s, "checksum");
    }

    #[test]
    fn truncation_is_quarantined() {
        let (l, s, _t) = corrupt_with(|b| b.truncate(b.len() - 3));
        assert_quarantined(l, &s, "length");
        let (l, s, _t) = corrupt_with(|b| b.truncate(20));
        assert_quarantined(l, &s, "truncated");
    }

    #[test]
    fn foreign_version_and_magic_are_quarantined() {
        let (l, s, _t) = corrupt_with(|b| b[8] = 9);
        assert_quarantined(l, &s, "version");
        let (l, s, _t) = corrupt_with(|b| b[0] = b'X');
        assert_quarantined(l, &s, "magic");
    }

    #[test]
    fn file_under_wrong_digest_is_quarantined() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.put(&digest(5), b"x", 0.0).unwrap();
        let target = s.object_path(&digest(4));
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(s.object_path(&digest(5)), &target).unwrap();
        assert_quarantined(s.get(&digest(4)).unwrap(), &s, "another digest");
    }

    #[test]
    fn signatures() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let key = crate::key::signing_key(b"a secret of 16+ bytes").unwrap();
        let signed = Store::open(&root, "ns", Some(key)).unwrap();
        let plain = Store::open(&root, "ns", None).unwrap();
        let other = Store::open(
            &root,
            "ns",
            Some(crate::key::signing_key(b"another secret, 16+").unwrap()),
        )
        .unwrap();
        let d = digest(6);
        signed.put(&d, b"payload", 0.0).unwrap();
        assert!(matches!(plain.get(&d).unwrap(), Lookup::Hit { .. }));
        assert!(matches!(signed.get(&d).unwrap(), Lookup::Hit { .. }));
        match other.get(&d).unwrap() {
            Lookup::Corrupt { reason, .. } => assert!(reason.contains("signature")),
            l => panic!("{l:?}"),
        }
        plain.put(&d, b"payload", 0.0).unwrap();
        match signed.get(&d).unwrap() {
            Lookup::Corrupt { reason, .. } => assert!(reason.contains("not signed")),
            l => panic!("{l:?}"),
        }
    }

    #[test]
    fn symlinked_object_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let d = digest(7);
        let evil = tmp.path().join("evil");
        fs::write(&evil, file_image(&d, b"evil", 0.0, None)).unwrap();
        let target = s.object_path(&d);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&evil, &target).unwrap();
        match s.get(&d).unwrap() {
            Lookup::Corrupt { reason, .. } => assert!(reason.contains("symbolic link")),
            l => panic!("{l:?}"),
        }
        assert!(evil.exists(), "the link target is never touched");
    }

    #[test]
    fn insecure_roots_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Store::open(&open, "ns", None).err().unwrap();
        assert!(matches!(err, Error::InsecureStore { .. }), "{err}");
        assert!(err.to_string().contains("chmod go-w"));
        let link = tmp.path().join("link");
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            Store::open(&link, "ns", None),
            Err(Error::InsecureStore { .. })
        ));
    }

    #[test]
    fn list_reports_objects() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.put(&digest(8), b"aaaa", 2.0).unwrap();
        s.put(&digest(9), b"bb", 3.0).unwrap();
        let l = s.list().unwrap();
        assert_eq!(l.len(), 2);
        let total: f64 = l.iter().map(|o| o.compile_seconds).sum();
        assert_eq!(total, 5.0);
        assert!(l.iter().all(|o| o.size > HEADER_LEN as u64));
    }

    #[test]
    fn gc_evicts_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for n in 20..25u8 {
            s.put(&digest(n), &vec![n; 1000], 0.0).unwrap();
            // distinct mtimes, oldest first
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + n as u64);
            File::options()
                .append(true)
                .open(s.object_path(&digest(n)))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        // A load refreshes recency: 20 becomes the newest.
        assert!(matches!(s.get(&digest(20)).unwrap(), Lookup::Hit { .. }));
        let per = HEADER_LEN as u64 + 1000;
        let r = s.gc(3 * per).unwrap();
        assert_eq!(r.removed, 2);
        assert_eq!(r.freed_bytes, 2 * per);
        assert_eq!(r.remaining_bytes, 3 * per);
        assert!(s.contains(&digest(20)));
        assert!(!s.contains(&digest(21)) && !s.contains(&digest(22)));
        assert!(s.contains(&digest(23)) && s.contains(&digest(24)));
        assert_eq!(s.gc(u64::MAX).unwrap().removed, 0);
    }

    #[test]
    fn verify_reports_and_fixes_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.put(&digest(30), b"good", 0.0).unwrap();
        s.put(&digest(31), b"will rot", 0.0).unwrap();
        let p = s.object_path(&digest(31));
        let mut b = fs::read(&p).unwrap();
        b[HEADER_LEN] ^= 0x40;
        fs::write(&p, b).unwrap();
        let (checked, bad) = s.verify(false).unwrap();
        assert_eq!(checked, 2);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, digest(31).hex());
        assert!(p.exists(), "without fix nothing moves");
        let (_, bad) = s.verify(true).unwrap();
        assert_eq!(bad.len(), 1);
        assert!(!p.exists());
        assert_eq!(s.verify(false).unwrap(), (1, vec![]));
    }

    #[test]
    fn tmp_files_of_dead_writers_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let dead = s
            .tmp_dir()
            .join(format!("{}.{}.0.tmp", digest(1).hex(), i32::MAX - 7));
        let alive = s
            .tmp_dir()
            .join(format!("{}.{}.0.tmp", digest(1).hex(), std::process::id()));
        fs::write(&dead, b"partial").unwrap();
        fs::write(&alive, b"in progress").unwrap();
        assert_eq!(s.clean_tmp(TMP_MAX_AGE), 1);
        assert!(!dead.exists() && alive.exists());
        // Opening the store cleans up too.
        fs::write(&dead, b"partial").unwrap();
        let _again = store(tmp.path());
        assert!(!dead.exists());
    }

    #[test]
    fn usage_counters_accumulate() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        assert_eq!(s.usage(), UsageStats::default());
        let d = UsageStats {
            hits: 2,
            misses: 1,
            saved_seconds: 1.5,
            remote_hits: 1,
            ..Default::default()
        };
        s.record_usage(d).unwrap();
        let total = s.record_usage(d).unwrap();
        assert_eq!(total.hits, 4);
        assert_eq!(s.usage().misses, 2);
        assert_eq!(s.usage().saved_seconds, 3.0);
        assert_eq!(s.usage().remote_hits, 2);
        // An older 24-byte counters file still reads.
        fs::write(s.dir().join("stats"), &total.encode()[..24]).unwrap();
        assert_eq!(s.usage().hits, 4);
        assert_eq!(s.usage().remote_hits, 0);
    }

    #[test]
    fn symlinked_shard_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let d = digest(40);
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::write(elsewhere.join(d.hex()), file_image(&d, b"evil", 0.0, None)).unwrap();
        let shard = s.object_path(&d).parent().unwrap().to_owned();
        std::os::unix::fs::symlink(&elsewhere, &shard).unwrap();
        assert!(matches!(s.get(&d).unwrap(), Lookup::Corrupt { .. }));
        assert!(elsewhere.join(d.hex()).exists());
    }

    #[test]
    fn clear_removes_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.put(&digest(50), b"a", 0.0).unwrap();
        s.put(&digest(51), b"b", 0.0).unwrap();
        assert_eq!(s.clear().unwrap(), 2);
        assert!(s.list().unwrap().is_empty());
        assert_eq!(
            Store::namespaces(&tmp.path().join("cache")).unwrap(),
            vec!["ns"]
        );
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_partial_files() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Arc::new(store(tmp.path()));
        let d = digest(10);
        let payloads: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100_000 + i as usize]).collect();
        let writers: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                let p = payloads[i].clone();
                thread::spawn(move || {
                    for _ in 0..20 {
                        s.put(&d, &p, 0.0).unwrap();
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                let payloads = payloads.clone();
                thread::spawn(move || {
                    for _ in 0..200 {
                        match s.get(&d).unwrap() {
                            Lookup::Hit { payload, .. } => assert!(payloads.contains(&payload)),
                            Lookup::Miss => {}
                            l => panic!("reader saw {l:?}"),
                        }
                    }
                })
            })
            .collect();
        for h in writers.into_iter().chain(readers) {
            h.join().unwrap();
        }
        assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
    }
}
