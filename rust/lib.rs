//! The Rust core of isocache: the canonical encoder (`canon`), the digest
//! type (`digest`), the process index (`index`), the artifact store
//! (`store`), compile leases (`lease`) and the signing key (`key`), exposed
//! to Python as `isocache._core` by `bindings`.

mod bindings;
pub mod bounds;
pub mod canon;
pub mod digest;
pub mod error;
pub mod index;
pub mod key;
pub mod lease;
pub mod store;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bindings::register(m)
}
