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

use pyo3::prelude::*;

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
