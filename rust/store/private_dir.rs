//! Private directories outside the store, held by descriptor: where
//! Inductor writes the code that isocache loads (`_torch/inductor.py`).
//!
//! A directory is opened like the store root (fs.rs: a checked walk from
//! `/` that never follows a link at the directory itself), or as a child of
//! a checked store root, so a refused root is never used. The caller keeps
//! the descriptor for the life of the process and names the directory by it
//! (`/proc/<pid>/fd/<n>` on Linux): renaming or replacing the path later
//! changes nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};

use super::fs::{check_private_dir, open_root, private_dir_at};
use crate::error::{Error, Result};

/// Opens the private directory `path`, or `child` inside the store root
/// `path` (both checked, created with mode 0700 when missing and `create`
/// is set). `Ok(None)`: it does not exist and `create` is not set.
///
/// `variable` names the setting that chose `path` in refusals' advice. A
/// path `/proc/<pid>/fd/<n>` (another process of this user handing down its
/// own held directory) is opened through that descriptor and checked itself.
pub fn open_private_dir(
    path: &Path,
    child: Option<&str>,
    create: bool,
    variable: &str,
) -> Result<Option<OwnedFd>> {
    let opened = match child {
        None if is_held_elsewhere(path) => open_held(path).map(Some),
        None => open_root(path, create),
        Some(name) => match open_root(path, create)? {
            None => Ok(None),
            Some(root) => private_dir_at(root.as_fd(), name, &path.join(name), create)
                .map(|o| o.map(|o| o.fd)),
        },
    };
    opened.map_err(|e| advise(e, variable))
}

/// `/proc/<pid>/fd/<n>`: a descriptor another process holds.
fn is_held_elsewhere(path: &Path) -> bool {
    let Some(text) = path.to_str() else {
        return false;
    };
    let parts: Vec<&str> = text.split('/').collect();
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    cfg!(any(target_os = "linux", target_os = "android"))
        && parts.len() == 5
        && parts[..2] == ["", "proc"]
        && number(parts[2])
        && parts[3] == "fd"
        && number(parts[4])
}

/// Opens a held directory through its `/proc` link (only this user's own
/// processes' descriptors can be opened so) and checks the directory.
fn open_held(path: &Path) -> Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd =
        rfs::open(path, flags, Mode::empty()).map_err(|e| Error::io("open", path, e.into()))?;
    check_private_dir(&fd, path)?;
    Ok(fd)
}

/// The store's advice names `ISOCACHE_DIR`; for another directory it names `variable`.
fn advise(e: Error, variable: &str) -> Error {
    match e {
        Error::InsecureStore { path, reason, fix } => Error::InsecureStore {
            path,
            reason,
            fix: fix.replace("ISOCACHE_DIR", variable),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refusal(r: Result<Option<OwnedFd>>) -> String {
        match r {
            Err(e @ Error::InsecureStore { .. }) => e.to_string(),
            Err(e) => panic!("expected InsecureStore, got {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_private_directory_is_created_and_held() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("inductor");
        let fd = open_private_dir(&dir, None, true, "V").unwrap().unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Renamed away and replaced: the descriptor still names the directory it checked.
        fs::rename(&dir, tmp.path().join("moved")).unwrap();
        fs::create_dir(&dir).unwrap();
        let held = super::super::fs::fstat(&fd).unwrap();
        let moved = super::super::fs::fstat(
            super::super::fs::open_dir_at(rfs::CWD, tmp.path().join("moved")).unwrap(),
        )
        .unwrap();
        assert!(held.same_file(&moved));
    }

    #[test]
    fn refusals_name_the_variable() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        let msg = refusal(open_private_dir(
            &link,
            None,
            true,
            "TORCHINDUCTOR_CACHE_DIR",
        ));
        assert!(
            msg.contains("symbolic link") && msg.contains("TORCHINDUCTOR_CACHE_DIR"),
            "{msg}"
        );
        chmod(&real, 0o777);
        let msg = refusal(open_private_dir(
            &real,
            None,
            true,
            "TORCHINDUCTOR_CACHE_DIR",
        ));
        assert!(
            msg.contains("mode 777") && !msg.contains("ISOCACHE_DIR"),
            "{msg}"
        );
    }

    #[test]
    fn a_child_of_a_refused_root_is_never_opened_or_created() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("team");
        fs::create_dir(&root).unwrap();
        chmod(&root, 0o777);
        refusal(open_private_dir(
            &root,
            Some("inductor"),
            true,
            "ISOCACHE_DIR",
        ));
        assert!(!root.join("inductor").exists());
        chmod(&root, 0o1777); // sticky, still others' to write: refused as a root
        refusal(open_private_dir(
            &root,
            Some("inductor"),
            true,
            "ISOCACHE_DIR",
        ));
        assert!(!root.join("inductor").exists());
        chmod(&root, 0o700);
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        chmod(&elsewhere, 0o700);
        symlink(&elsewhere, root.join("inductor")).unwrap();
        assert!(refusal(open_private_dir(
            &root,
            Some("inductor"),
            true,
            "ISOCACHE_DIR"
        ))
        .contains("symbolic link"));
        fs::remove_file(root.join("inductor")).unwrap();
        assert!(
            open_private_dir(&root, Some("inductor"), true, "ISOCACHE_DIR")
                .unwrap()
                .is_some()
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_held_directory_is_opened_through_proc_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let fd = open_private_dir(&dir, None, true, "V").unwrap().unwrap();
        let proc = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        fs::rename(&dir, tmp.path().join("moved")).unwrap();
        let again = open_private_dir(Path::new(&proc), None, false, "V")
            .unwrap()
            .unwrap();
        let a = super::super::fs::fstat(&fd).unwrap();
        assert!(a.same_file(&super::super::fs::fstat(&again).unwrap()));
        chmod(&tmp.path().join("moved"), 0o777);
        assert!(refusal(open_private_dir(Path::new(&proc), None, false, "V")).contains("mode 777"));
        assert!(!is_held_elsewhere(Path::new("/proc/1/fd/x")));
        assert!(!is_held_elsewhere(Path::new("/proc/self/fd/3")));
    }
}
