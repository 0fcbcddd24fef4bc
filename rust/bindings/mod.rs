//! `isocache._core`: the binding. It registers, converts arguments (a
//! `Digest` or its hex, paths, kinds), detaches from the interpreter around
//! work, maps errors, and returns frozen typed classes. It decides nothing:
//! the logic is in `canon`, `index` and `store`.

mod artifact;
mod canon;
mod digest;
mod errors;
mod index;
mod private_dir;
mod store;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::error::{catch, Result};

/// Runs `f` with the interpreter detached. A panic inside becomes
/// `InternalError` (a `CacheError`), never a `PanicException`.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T> + Send) -> PyResult<T> {
    Ok(py.detach(|| catch(f))?)
}

/// A byte count argument: an int >= 0; one above `u64::MAX` saturates (the
/// core then clamps it to `bounds::MAX_BYTES`) instead of raising `OverflowError`.
pub struct ByteCap(pub u64);

impl<'a, 'py> FromPyObject<'a, 'py> for ByteCap {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<u64>() {
            Ok(n) => Ok(ByteCap(n)),
            Err(_) if obj.cast::<PyInt>().is_ok() && obj.gt(0)? => Ok(ByteCap(u64::MAX)),
            Err(_) if obj.cast::<PyInt>().is_ok() => Err(PyValueError::new_err(format!(
                "a number of bytes must be >= 0, not {}",
                obj.repr()?
            ))),
            Err(e) => Err(e),
        }
    }
}

/// A string as Python's `repr` shows it (for `__repr__`s).
fn py_repr(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `None` or the repr of the string.
fn py_repr_opt(s: Option<&str>) -> String {
    s.map_or_else(|| "None".to_owned(), py_repr)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    canon::register(m)?;
    artifact::register(m)?;
    index::register(m)?;
    store::register(m)?;
    private_dir::register(m)?;
    Ok(())
}
