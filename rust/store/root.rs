//! The store root and its namespaces.
//!
//! ```text
//! <root>/v1/size            running size of every namespace (size.rs)
//! <root>/v1/<namespace>/    one store per namespace (mod.rs)
//! ```
//!
//! A [`Root`] holds a descriptor of `<root>/v1`, opened once by a checked
//! walk from `/` (fs.rs). Every namespace is opened relative to it, so the
//! stores of one root, and the root-wide size and eviction, all work on the
//! directories that were checked, never on paths.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::FileType;

use super::fs::{self, dir_owned_at, lstat_at, utf8, Owners};
use super::size::SizeLockState;
use super::{validate_namespace, Store};
use crate::error::{Error, Result};

/// Layout version of the directory tree.
pub const LAYOUT: &str = "v1";

/// An opened store root: `<root>/v1`, checked and held by descriptor.
pub struct Root {
    path: PathBuf,
    layout: PathBuf,
    pub(crate) v1: OwnedFd,
    writable: bool,
    /// Who may own its directories and files: the user, or (a base store) the user or root.
    pub(crate) owners: Owners,
    /// Threads of this process queue here before taking the size lock.
    pub(crate) local: Mutex<()>,
    /// The size lock's state in this process (size.rs): busy, stale, skips.
    pub(crate) size_lock: SizeLockState,
}

impl Root {
    /// Opens the root `path` (creating it, mode 0700, when `create` is set).
    /// `Ok(None)`: it does not exist and `create` is not set. A root opened
    /// without `create` changes nothing on disk.
    pub fn open(path: &Path, create: bool) -> Result<Option<Root>> {
        Root::open_with(path, create, create, Owners::Me)
    }

    /// Opens an existing root as a read-only base store (`ISOCACHE_BASE`):
    /// creates, locks and changes nothing, needs no write permission, and
    /// trusts directories and files owned by the user or by root that
    /// nobody else can write. `Ok(None)` when it does not exist.
    pub fn open_base(path: &Path) -> Result<Option<Root>> {
        Root::open_with(path, false, false, Owners::MeOrRoot)
    }

    /// Opens an existing root for writing (eviction): creates nothing at
    /// the root; `Ok(None)` when it does not exist.
    pub fn open_existing_writable(path: &Path) -> Result<Option<Root>> {
        Root::open_with(path, false, true, Owners::Me)
    }

    fn open_with(
        path: &Path,
        create: bool,
        writable: bool,
        owners: Owners,
    ) -> Result<Option<Root>> {
        let Some(root_fd) = fs::open_root_owned(path, create, owners)? else {
            return Ok(None);
        };
        let layout = path.join(LAYOUT);
        let Some(v1) = dir_owned_at(root_fd.as_fd(), LAYOUT, &layout, create, owners)? else {
            return Ok(None);
        };
        Ok(Some(Root {
            path: path.to_owned(),
            layout,
            v1: v1.fd,
            writable,
            owners,
            local: Mutex::new(()),
            size_lock: SizeLockState::default(),
        }))
    }

    /// `$ISOCACHE_DIR`, else `~/.cache/isocache`: the root of a store opened
    /// without one. (Python's `isocache.config` is the one place that
    /// decides the root for isocache itself; this serves `_core.Store()`.)
    pub fn default_path() -> Result<PathBuf> {
        if let Some(dir) = std::env::var_os("ISOCACHE_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
        match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".cache").join("isocache")),
            None => Err(Error::NoRoot),
        }
    }

    /// The root as the caller named it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<root>/v1`, for messages.
    pub fn layout(&self) -> &Path {
        &self.layout
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The namespaces under this root, sorted (directories with a valid
    /// namespace name; the size record and strays are not namespaces).
    pub fn namespaces(&self) -> Result<Vec<String>> {
        let entries = fs::entries(&self.v1).map_err(|e| Error::io("list", &self.layout, e))?;
        let mut out: Vec<String> = entries
            .into_iter()
            .filter_map(|(name, kind)| {
                let name = utf8(&name)?.to_owned();
                let is_dir = kind == FileType::Directory
                    || (kind == FileType::Unknown
                        && lstat_at(&self.v1, name.as_str())
                            .is_ok_and(|m| m.kind == FileType::Directory));
                (is_dir && validate_namespace(&name).is_ok()).then_some(name)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Opens the store of `namespace` in this root. `create` needs a
    /// writable root; without it the store is read-only and must exist.
    pub fn store(
        self: &Arc<Self>,
        namespace: &str,
        key: Option<[u8; 32]>,
        create: bool,
    ) -> Result<Store> {
        Store::in_root(self.clone(), namespace, key, create && self.writable)
    }

    /// Every namespace's store (writable when the root is), for root-wide
    /// work: size, eviction. A namespace that vanished meanwhile is skipped.
    pub(crate) fn stores(self: &Arc<Self>) -> Result<Vec<Store>> {
        let mut out = Vec::new();
        for ns in self.namespaces()? {
            match Store::in_root(self.clone(), &ns, None, self.writable) {
                Ok(s) => out.push(s),
                Err(Error::NoStore { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
