//! `open_private_dir`: a private directory outside the store, opened by a
//! checked walk and handed to Python as a descriptor it then owns.

use std::os::fd::IntoRawFd;
use std::path::PathBuf;

use pyo3::prelude::*;

use crate::store::private_dir;

/// The checked directory's descriptor (close-on-exec; the caller owns it),
/// or None when it is missing and `create` is not set. Raises
/// `InsecureStoreError` when others could change it.
#[pyfunction]
#[pyo3(signature = (path, child=None, create=true, variable="ISOCACHE_DIR"))]
fn open_private_dir(
    py: Python<'_>,
    path: PathBuf,
    child: Option<&str>,
    create: bool,
    variable: &str,
) -> PyResult<Option<i32>> {
    let opened = py.detach(|| private_dir::open_private_dir(&path, child, create, variable))?;
    Ok(opened.map(IntoRawFd::into_raw_fd))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(open_private_dir, m)?)?;
    Ok(())
}
