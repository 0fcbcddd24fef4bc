//! Directory checks and descriptor-relative operations.
//!
//! The store never names a file by its full path after opening. The root is
//! opened by walking from `/` one component at a time, holding a descriptor
//! for each directory, and every later operation (`openat`, `mkdirat`,
//! `renameat`, `unlinkat`, `fstatat` with `AT_SYMLINK_NOFOLLOW`) is relative
//! to a descriptor of a directory that was checked when it was opened. So
//! renaming or replacing a path after opening changes nothing for an open
//! store, and no symbolic link inside the store is ever followed.
//!
//! The checks are OpenSSH's StrictModes: every ancestor of the root must be
//! owned by the user or by root and not writable by group or others unless it
//! is sticky (like `/tmp`); the root and everything below it must be owned by
//! the user and not writable by group or others.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, AtFlags, Dir, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The effective uid of this process.
pub fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Who may own a store's directories and files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// The user only: a store isocache writes.
    Me,
    /// The user or root: a read-only base store (`ISOCACHE_BASE`: an image
    /// layer, a read-only volume), which isocache never writes.
    MeOrRoot,
}

impl Owners {
    /// True when a directory or file owned by `uid` is trusted.
    pub fn trusts(self, uid: u32) -> bool {
        uid == my_uid() || (self == Owners::MeOrRoot && uid == 0)
    }

    /// "you (uid 1000)" or "you (uid 1000) or root", for messages.
    pub fn describe(self) -> String {
        match self {
            Owners::Me => format!("you (uid {})", my_uid()),
            Owners::MeOrRoot => format!("you (uid {}) or root", my_uid()),
        }
    }
}

/// What `fstat` / `fstatat(AT_SYMLINK_NOFOLLOW)` says about an entry.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub kind: FileType,
    /// Permission bits, sticky bit included (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    dev: u64,
    ino: u64,
}

fn time(secs: i64, nanos: u64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.min(999_999_999));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

impl Meta {
    // Field widths differ between architectures; on some the casts are no-ops.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn from_stat(st: &rfs::Stat) -> Meta {
        Meta {
            kind: FileType::from_raw_mode(st.st_mode as _),
            mode: (st.st_mode as u32) & 0o7777,
            uid: st.st_uid as u32,
            size: (st.st_size as i64).max(0) as u64,
            mtime: time(st.st_mtime as i64, st.st_mtime_nsec as u64),
            ctime: time(st.st_ctime as i64, st.st_ctime_nsec as u64),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        }
    }

    /// True when both describe the same inode.
    pub fn same_file(&self, other: &Meta) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    pub fn writable_by_others(&self) -> bool {
        self.mode & 0o022 != 0
    }
}

pub fn fstat(fd: impl AsFd) -> io::Result<Meta> {
    Ok(Meta::from_stat(&rfs::fstat(fd)?))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: impl AsFd, name: impl rustix::path::Arg) -> io::Result<Meta> {
    Ok(Meta::from_stat(&rfs::statat(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
    )?))
}

/// "a symbolic link", "a FIFO", ... for messages.
pub fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice | FileType::BlockDevice => "a device",
        FileType::Unknown => "of an unknown type",
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Ancestors of the root only need to be searched, not listed.
#[cfg(any(target_os = "linux", target_os = "android"))]
const ANCESTOR_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const ANCESTOR_FLAGS: OFlags = DIR_FLAGS;

const PRIVATE: Mode = Mode::RWXU;

/// Opens the directory `name` in `dir` for listing; never follows a link.
pub fn open_dir_at(dir: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    Ok(rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?)
}

/// Opens `name` in `dir` for reading: never follows a link and never blocks
/// (a FIFO opens at once and is then refused by its type).
pub fn open_read_at(dir: impl AsFd, name: impl rustix::path::Arg) -> io::Result<File> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    Ok(File::from(rfs::openat(dir, name, flags, Mode::empty())?))
}

/// Why `meta` cannot be trusted as a directory of the store: `(reason, fix)`.
fn private_dir_problem(meta: &Meta, display: &Path, owners: Owners) -> Option<(String, String)> {
    if meta.kind != FileType::Directory {
        return Some((
            format!("it is {}, not a directory", kind_name(meta.kind)),
            "point ISOCACHE_DIR at a directory".into(),
        ));
    }
    if !owners.trusts(meta.uid) {
        return Some((
            format!(
                "it is owned by uid {}, not by {}",
                meta.uid,
                owners.describe()
            ),
            match owners {
                Owners::Me => "use a directory you own (set ISOCACHE_DIR)".into(),
                Owners::MeOrRoot => {
                    "a base store (ISOCACHE_BASE) must belong to you or root".into()
                }
            },
        ));
    }
    if meta.writable_by_others() {
        return Some((
            format!("its mode {:o} lets others write to it", meta.mode & 0o777),
            format!("run `chmod go-w {}`", display.display()),
        ));
    }
    None
}

fn insecure(path: &Path, (reason, fix): (String, String)) -> Error {
    Error::InsecureStore {
        path: path.to_owned(),
        reason,
        fix,
    }
}

/// Checks an open directory of the store (the root or below it).
pub fn check_private_dir(fd: impl AsFd, display: &Path) -> Result<()> {
    check_dir_owned(fd, display, Owners::Me)
}

/// [`check_private_dir`] for a directory `owners` may own.
pub fn check_dir_owned(fd: impl AsFd, display: &Path, owners: Owners) -> Result<()> {
    let meta = fstat(fd).map_err(|e| Error::io("inspect", display, e))?;
    match private_dir_problem(&meta, display, owners) {
        Some(p) => Err(insecure(display, p)),
        None => Ok(()),
    }
}

/// A directory opened by [`private_dir_at`].
pub struct Opened {
    pub fd: OwnedFd,
    /// It did not exist and was created (mode 0700).
    pub created: bool,
}

/// Opens `name` in `parent` as a private directory of the store, creating it
/// (mode 0700) when it is missing and `create` is set. `Ok(None)`: missing.
pub fn private_dir_at(
    parent: BorrowedFd<'_>,
    name: &str,
    display: &Path,
    create: bool,
) -> Result<Option<Opened>> {
    dir_owned_at(parent, name, display, create, Owners::Me)
}

/// [`private_dir_at`] for a directory `owners` may own.
pub fn dir_owned_at(
    parent: BorrowedFd<'_>,
    name: &str,
    display: &Path,
    create: bool,
    owners: Owners,
) -> Result<Option<Opened>> {
    let mut created = false;
    for _ in 0..8 {
        match open_dir_at(parent, name) {
            Ok(fd) => {
                check_dir_owned(&fd, display, owners)?;
                return Ok(Some(Opened { fd, created }));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                match rfs::mkdirat(parent, name, PRIVATE) {
                    Ok(()) => created = true,
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(Error::io("create directory", display, e.into())),
                }
            }
            Err(e) => {
                return Err(match lstat_at(parent, name) {
                    Ok(m) if m.kind == FileType::Symlink => insecure(
                        display,
                        (
                            "it is a symbolic link".into(),
                            "point ISOCACHE_DIR at the real directory".into(),
                        ),
                    ),
                    Ok(m) => match private_dir_problem(&m, display, owners) {
                        Some(p) => insecure(display, p),
                        None => Error::io("open", display, e),
                    },
                    Err(_) => Error::io("open", display, e),
                })
            }
        }
    }
    Err(Error::io(
        "open",
        display,
        io::Error::other("it keeps disappearing while being created"),
    ))
}

/// An ancestor of the root: owned by the user or root, and not writable by
/// group or others unless sticky.
fn check_ancestor(meta: &Meta, ancestor: &Path, root: &Path) -> Result<()> {
    let me = my_uid();
    let fix_elsewhere =
        "or set ISOCACHE_DIR to a directory whose parent directories only you or root can write";
    if meta.uid != me && meta.uid != 0 {
        return Err(insecure(
            root,
            (
                format!(
                    "its parent directory {} is owned by uid {}, neither you (uid {me}) nor root, \
                     so that user could replace the cache directory",
                    ancestor.display(),
                    meta.uid
                ),
                format!("move it elsewhere, {fix_elsewhere}"),
            ),
        ));
    }
    if meta.writable_by_others() && meta.mode & 0o1000 == 0 {
        return Err(insecure(
            root,
            (
                format!(
                    "its parent directory {} is writable by others (mode {:o}) and not sticky, \
                     so anyone could replace the cache directory",
                    ancestor.display(),
                    meta.mode & 0o777
                ),
                format!("run `chmod go-w {}`, {fix_elsewhere}", ancestor.display()),
            ),
        ));
    }
    Ok(())
}

fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Most symbolic links resolved among the ancestors (Linux's own limit).
const MAX_LINKS: usize = 40;

/// Opens the store root `path`: walks from `/`, holding a descriptor for
/// each directory and checking each like OpenSSH's StrictModes; missing
/// directories are created with mode 0700 when `create` is set. Symbolic
/// links among the ancestors are resolved (each must belong to the user or
/// root); the root itself is never a symbolic link. `Ok(None)`: it does not
/// exist and `create` is not set.
pub fn open_root(path: &Path, create: bool) -> Result<Option<OwnedFd>> {
    open_root_owned(path, create, Owners::Me)
}

/// [`open_root`] for a root (and everything below it) that `owners` may own.
pub fn open_root_owned(path: &Path, create: bool, owners: Owners) -> Result<Option<OwnedFd>> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("find the current directory for", path, e))?
            .join(path)
    };
    let mut pending = components(&abs);
    let name = match pending.pop() {
        Some(n) if n != ".." => n,
        _ => {
            return Err(insecure(
                path,
                (
                    "it does not name a directory of its own".into(),
                    "point ISOCACHE_DIR at a dedicated directory, e.g. ~/.cache/isocache".into(),
                ),
            ))
        }
    };
    pending.reverse(); // a stack: the next component is last
    let slash = rfs::openat(rfs::CWD, "/", ANCESTOR_FLAGS, Mode::empty())
        .map_err(|e| Error::io("open", "/", e.into()))?;
    check_ancestor(
        &fstat(&slash).map_err(|e| Error::io("inspect", "/", e))?,
        Path::new("/"),
        path,
    )?;
    let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(slash, PathBuf::from("/"))];
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let (top, top_path) = stack.last().expect("never empty");
        let here = top_path.join(&c);
        let err = match rfs::openat(top, c.as_os_str(), ANCESTOR_FLAGS, Mode::empty()) {
            Ok(fd) => {
                let meta = fstat(&fd).map_err(|e| Error::io("inspect", &here, e))?;
                check_ancestor(&meta, &here, path)?;
                stack.push((fd, here));
                continue;
            }
            Err(e) => e,
        };
        match lstat_at(top, c.as_os_str()) {
            Ok(m) if m.kind == FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::io("open", &here, Errno::LOOP.into()));
                }
                // A link's own mode means nothing; its owner decides where it points.
                if m.uid != my_uid() && m.uid != 0 {
                    return Err(insecure(
                        path,
                        (
                            format!(
                                "its parent directory {} is a symbolic link owned by uid {}, \
                                 neither you nor root, so that user decides where it points",
                                here.display(),
                                m.uid
                            ),
                            "set ISOCACHE_DIR to the real directory, not through that link".into(),
                        ),
                    ));
                }
                let target = rfs::readlinkat(top, c.as_os_str(), Vec::new())
                    .map_err(|e| Error::io("read link", &here, e.into()))?;
                let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    stack.truncate(1);
                }
                pending.extend(components(target).into_iter().rev());
            }
            Ok(_) => return Err(Error::io("open", &here, err.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                match rfs::mkdirat(top, c.as_os_str(), PRIVATE) {
                    Ok(()) | Err(Errno::EXIST) => pending.push(c),
                    Err(e) => return Err(Error::io("create directory", &here, e.into())),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", &here, e)),
        }
    }
    let (parent, _) = stack.last().expect("never empty");
    let name = name
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::io("open", path, io::Error::other("the name is not UTF-8")))?;
    Ok(dir_owned_at(parent.as_fd(), &name, path, create, owners)?.map(|o| o.fd))
}

/// The entries of a directory (without `.` and `..`), with the type the
/// directory reports (`Unknown` on some filesystems: use [`lstat_at`]).
pub fn entries(dir: impl AsFd) -> io::Result<Vec<(CString, FileType)>> {
    let mut out = Vec::new();
    for e in Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        out.push((name.to_owned(), e.file_type()));
    }
    Ok(out)
}

/// Names that are UTF-8 (everything the store writes is ASCII).
pub fn utf8(name: &CStr) -> Option<&str> {
    name.to_str().ok()
}

/// Deepest directory tree [`remove_at`] removes.
const MAX_DEPTH: usize = 16;

/// Removes `name` from `dir` without following links: a file, a link, a
/// FIFO, or a whole directory tree.
pub fn remove_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    remove_at_depth(dir, name, MAX_DEPTH)
}

fn remove_at_depth(dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) if depth > 0 => {
            let sub = open_dir_at(dir, name)?;
            for (child, _) in entries(&sub)? {
                remove_at_depth(sub.as_fd(), &child, depth - 1)?;
            }
            Ok(rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Bytes under `name` in `dir` (a directory tree counts its files), never
/// following links.
pub fn size_at(dir: BorrowedFd<'_>, name: &CStr) -> u64 {
    size_at_depth(dir, name, MAX_DEPTH)
}

fn size_at_depth(dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> u64 {
    let Ok(meta) = lstat_at(dir, name) else {
        return 0;
    };
    if meta.kind != FileType::Directory {
        return if meta.kind == FileType::RegularFile {
            meta.size
        } else {
            0
        };
    }
    if depth == 0 {
        return 0;
    }
    let Ok(sub) = open_dir_at(dir, name) else {
        return 0;
    };
    entries(&sub)
        .unwrap_or_default()
        .iter()
        .map(|(child, _)| size_at_depth(sub.as_fd(), child, depth - 1))
        .sum()
}

/// `fsync` of a directory, so that entries created or renamed in it last.
pub fn sync_dir(dir: impl AsFd) -> io::Result<()> {
    Ok(rfs::fsync(dir)?)
}

/// Sets a file's modification (and access) time to now.
pub fn touch(fd: impl AsFd) -> io::Result<()> {
    set_times(fd, SystemTime::now())
}

/// Sets a file's modification and access time to `t`.
pub fn set_times(fd: impl AsFd, t: SystemTime) -> io::Result<()> {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ts = rfs::Timespec {
        tv_sec: since.as_secs() as _,
        tv_nsec: since.subsec_nanos() as _,
    };
    Ok(rfs::futimens(
        fd,
        &rfs::Timestamps {
            last_access: ts,
            last_modification: ts,
        },
    )?)
}

/// `flock`; `Ok(false)` when `op` is non-blocking and someone else holds it.
pub fn flock(fd: impl AsFd, op: FlockOperation) -> io::Result<bool> {
    loop {
        match rfs::flock(&fd, op) {
            Ok(()) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(Errno::WOULDBLOCK) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn err(path: &Path, create: bool) -> String {
        match open_root(path, create) {
            Err(e @ Error::InsecureStore { .. }) => e.to_string(),
            Err(e) => panic!("expected InsecureStore, got {e}"),
            Ok(_) => panic!("{} was accepted", path.display()),
        }
    }

    #[test]
    fn creates_missing_components_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/cache");
        assert!(open_root(&root, false).unwrap().is_none());
        assert!(
            !tmp.path().join("a").exists(),
            "a read-only open creates nothing"
        );
        let fd = open_root(&root, true).unwrap().unwrap();
        assert!(fstat(&fd).unwrap().kind == FileType::Directory);
        for p in ["a", "a/b", "a/b/cache"] {
            let mode = fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{p}");
        }
        assert!(open_root(&root, false).unwrap().is_some());
    }

    #[test]
    fn a_symlinked_root_is_refused_even_with_a_trailing_slash() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        for p in [
            link.clone(),
            tmp.path().join("link/"),
            tmp.path().join("link/."),
        ] {
            assert!(err(&p, true).contains("symbolic link"), "{}", p.display());
        }
    }

    #[test]
    fn symlinked_ancestors_are_resolved_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir_all(real.join("cache")).unwrap();
        chmod(&real.join("cache"), 0o700);
        symlink(&real, tmp.path().join("alias")).unwrap();
        symlink("real/../real", tmp.path().join("relative")).unwrap();
        assert!(open_root(&tmp.path().join("alias/cache"), false)
            .unwrap()
            .is_some());
        assert!(open_root(&tmp.path().join("relative/cache"), false)
            .unwrap()
            .is_some());
        assert!(open_root(&tmp.path().join("real/x/../cache"), true)
            .unwrap()
            .is_some());
        // A link loop is an error, not a hang.
        symlink("loop", tmp.path().join("loop")).unwrap();
        assert!(open_root(&tmp.path().join("loop/cache"), true).is_err());
    }

    #[test]
    fn writable_ancestors_are_refused_unless_sticky() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let msg = err(&open.join("cache"), true);
        assert!(
            msg.contains("parent directory") && msg.contains("chmod go-w"),
            "{msg}"
        );
        assert!(!open.join("cache").exists(), "nothing is created under it");
        chmod(&open, 0o1777);
        assert!(open_root(&open.join("cache"), true).unwrap().is_some());
        chmod(&open, 0o775);
        assert!(err(&open.join("cache"), true).contains("mode 775"));
    }

    #[test]
    fn the_root_itself_must_be_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        fs::create_dir(&root).unwrap();
        chmod(&root, 0o770);
        assert!(err(&root, false).contains("chmod go-w"));
        chmod(&root, 0o755);
        assert!(open_root(&root, false).unwrap().is_some());
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(err(&file, true).contains("not a directory"));
    }

    #[test]
    fn remove_and_size_never_follow_links() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"12345").unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), b"abc").unwrap();
        fs::write(tree.join("a/g"), b"de").unwrap();
        symlink(&outside, tree.join("a/link")).unwrap();
        let base = open_dir_at(rfs::CWD, tmp.path()).unwrap();
        assert_eq!(size_at(base.as_fd(), c"tree"), 5);
        remove_at(base.as_fd(), c"tree").unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists());
    }
}
