//! Walks a `torch.fx.GraphModule` and writes its canonical encoding.
//!
//! The walk needs the interpreter (it reads Python objects), so it runs while
//! attached; hashing of large constant tensors is done detached on a private
//! copy. Everything the walk cannot encode is written as an `UNENCODABLE`
//! marker with a reason, which makes the graph non-reusable instead of
//! silently shared.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyComplex, PyDict, PyFloat, PyInt, PyList, PySlice, PyString, PyTuple, PyType,
};

use super::{content_digest, op, tag, CanonWriter, SymbolRange};

/// Constant tensors larger than this are copied and hashed detached.
const DETACHED_HASH_BYTES: usize = 1 << 20;

/// Python types the walker dispatches on, imported once.
struct Types {
    node: Py<PyType>,
    graph_module: Py<PyType>,
    nn_module: Py<PyType>,
    tensor: Py<PyType>,
    plain_tensor_types: Vec<Py<PyType>>,
    fake_tensor: Py<PyType>,
    dtype: Py<PyType>,
    device: Py<PyType>,
    layout: Py<PyType>,
    memory_format: Py<PyType>,
    size: Py<PyType>,
    sym_int: Py<PyType>,
    sym_float: Py<PyType>,
    sym_bool: Py<PyType>,
    op_overload: Py<PyType>,
    op_overload_packet: Py<PyType>,
    higher_order_op: Py<PyType>,
    function: Py<PyType>,
    builtin_function: Py<PyType>,
    module: Py<PyType>,
    ellipsis: Py<PyAny>,
    strided: Py<PyAny>,
    no_torch_function: Py<PyAny>,
    /// The C getter behind `Tensor.layout`.
    tensor_layout: Py<PyAny>,
    /// `torch._C._NodeIter`: iterates a graph's nodes without Python frames.
    node_iter: Option<Py<PyAny>>,
    /// The MkldnnCPU dispatch key (what FakeTensor.is_mkldnn tests, in Python).
    mkldnn_key: Option<Py<PyAny>>,
}

static TYPES: PyOnceLock<Types> = PyOnceLock::new();

fn ty(py: Python<'_>, module: &str, name: &str) -> PyResult<Py<PyType>> {
    Ok(py
        .import(module)?
        .getattr(name)?
        .cast_into::<PyType>()?
        .unbind())
}

fn types(py: Python<'_>) -> PyResult<&'static Types> {
    TYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        Ok(Types {
            node: ty(py, "torch.fx", "Node")?,
            graph_module: ty(py, "torch.fx", "GraphModule")?,
            nn_module: ty(py, "torch.nn", "Module")?,
            tensor: ty(py, "torch", "Tensor")?,
            plain_tensor_types: vec![
                ty(py, "torch", "Tensor")?,
                ty(py, "torch.nn", "Parameter")?,
                ty(py, "torch.nn.parameter", "Buffer")?,
                ty(py, "torch._subclasses.fake_tensor", "FakeTensor")?,
            ],
            fake_tensor: ty(py, "torch._subclasses.fake_tensor", "FakeTensor")?,
            dtype: ty(py, "torch", "dtype")?,
            device: ty(py, "torch", "device")?,
            layout: ty(py, "torch", "layout")?,
            memory_format: ty(py, "torch", "memory_format")?,
            size: ty(py, "torch", "Size")?,
            sym_int: ty(py, "torch", "SymInt")?,
            sym_float: ty(py, "torch", "SymFloat")?,
            sym_bool: ty(py, "torch", "SymBool")?,
            op_overload: ty(py, "torch._ops", "OpOverload")?,
            op_overload_packet: ty(py, "torch._ops", "OpOverloadPacket")?,
            higher_order_op: ty(py, "torch._ops", "HigherOrderOperator")?,
            function: ty(py, "types", "FunctionType")?,
            builtin_function: ty(py, "types", "BuiltinFunctionType")?,
            module: ty(py, "types", "ModuleType")?,
            ellipsis: py.Ellipsis().into_any(),
            strided: torch.getattr("strided")?.unbind(),
            node_iter: torch
                .getattr("_C")?
                .getattr_opt("_NodeIter")?
                .map(Bound::unbind),
            mkldnn_key: match torch.getattr("_C")?.getattr_opt("_dispatch_key_parse")? {
                Some(parse) => parse.call1(("MkldnnCPU",)).ok().map(Bound::unbind),
                None => None,
            },
            tensor_layout: torch
                .getattr("_C")?
                .getattr("TensorBase")?
                .getattr("layout")?
                .unbind(),
            no_torch_function: torch
                .getattr("_C")?
                .getattr("DisableTorchFunctionSubclass")?
                .unbind(),
        })
    })
}

/// Hasher for object addresses: they are already well spread, so a multiply
/// is enough (SipHash showed up in profiles).
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type AddressMap<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;

/// A target's canonical name, or why it has none.
pub type TargetName = Result<Arc<str>, Arc<str>>;

/// Canonical names of call targets, keyed by object address. Each entry keeps
/// its object alive, so an address is never reused for another object.
type TargetCache = AddressMap<(Py<PyAny>, TargetName)>;
static TARGET_NAMES: Mutex<Option<TargetCache>> = Mutex::new(None);

/// `str()` of torch's singleton objects (dtypes, layouts, memory formats),
/// cached by address; each entry keeps its object alive.
type TextCache = AddressMap<(Py<PyAny>, Arc<str>)>;
static SINGLETON_TEXT: Mutex<Option<TextCache>> = Mutex::new(None);

fn singleton_text(obj: &Bound<'_, PyAny>) -> PyResult<Arc<str>> {
    let key = obj.as_ptr() as usize;
    let mut cache = SINGLETON_TEXT.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(AddressMap::default);
    if let Some((_, text)) = cache.get(&key) {
        return Ok(text.clone());
    }
    // str() of these types is implemented in C and cannot re-enter this lock.
    let text: Arc<str> = obj.str()?.to_cow()?.into();
    cache.insert(key, (obj.clone().unbind(), text.clone()));
    Ok(text)
}

/// The result of encoding one graph module.
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Byte range of each node record, in graph order (only when asked for).
    pub spans: Option<Vec<(usize, usize)>>,
    /// Why the graph is not reusable, if it is not.
    pub unencodable: Option<String>,
}

/// Encodes `gm`. Placeholder metadata comes from `node.meta["val"]` or
/// `node.meta["example_value"]`, else from `example_inputs[i]`.
pub fn encode_graph_module<'py>(
    gm: &Bound<'py, PyAny>,
    example_inputs: Option<&Bound<'py, PyAny>>,
    with_spans: bool,
) -> PyResult<Encoded> {
    let py = gm.py();
    let inputs: Vec<Bound<'py, PyAny>> = match example_inputs {
        Some(seq) if !seq.is_none() => seq.try_iter()?.collect::<PyResult<_>>()?,
        _ => Vec::new(),
    };
    let mut walker = Walker {
        py,
        t: types(py)?,
        w: CanonWriter::new(),
        positions: AddressMap::default(),
        texts: AddressMap::default(),
        root: gm.clone(),
    };
    // Tensor subclasses (FakeTensor, Parameter) route every metadata getter
    // through `__torch_function__` checks; reading metadata needs none of
    // that, and skipping it halves the cost of a placeholder.
    let guard = walker.t.no_torch_function.bind(py).call0()?;
    guard.call_method0(intern!(py, "__enter__"))?;
    let walked = walker.walk(&inputs, with_spans);
    let none = py.None();
    guard.call_method1(intern!(py, "__exit__"), (&none, &none, &none))?;
    let spans = walked?;
    let (bytes, unencodable) = walker.w.finish();
    Ok(Encoded {
        bytes,
        spans,
        unencodable,
    })
}

/// The canonical name of a call target, or why it has none.
pub fn canonical_target(target: &Bound<'_, PyAny>) -> PyResult<TargetName> {
    let py = target.py();
    let key = target.as_ptr() as usize;
    if let Some((_, name)) = TARGET_NAMES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok(name.clone());
    }
    let (name, cacheable) = compute_target_name(types(py)?, target)?;
    let name: TargetName = name.map(Arc::from).map_err(Arc::from);
    if cacheable {
        TARGET_NAMES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(AddressMap::default)
            .insert(key, (target.clone().unbind(), name.clone()));
    }
    Ok(name)
}

/// pybind11's internal per-function record, which it binds module functions to.
fn is_pybind11_record(owner: &Bound<'_, PyAny>) -> bool {
    owner
        .get_type()
        .name()
        .is_ok_and(|n| n.to_string().starts_with("pybind11_detail_function_record"))
}

fn qualified_name(obj: &Bound<'_, PyAny>) -> PyResult<Option<(String, String)>> {
    let py = obj.py();
    let module = obj.getattr_opt(intern!(py, "__module__"))?;
    let qualname = obj.getattr_opt(intern!(py, "__qualname__"))?;
    match (module, qualname) {
        (Some(m), Some(q)) if !m.is_none() && !q.is_none() => {
            Ok(Some((m.str()?.to_string(), q.str()?.to_string())))
        }
        _ => Ok(None),
    }
}

/// The name a factory-made function is published under in its (already
/// imported) module, when the module attribute of that name is this very
/// object: `torch.nn.functional.max_pool2d` is `boolean_dispatch`'s local `fn`.
fn published_name(target: &Bound<'_, PyAny>, module: &str) -> PyResult<Option<String>> {
    let py = target.py();
    let Some(name) = target.getattr_opt(intern!(py, "__name__"))? else {
        return Ok(None);
    };
    let Ok(name) = name.extract::<String>() else {
        return Ok(None);
    };
    let modules = py
        .import(intern!(py, "sys"))?
        .getattr(intern!(py, "modules"))?;
    let Some(owner) = modules.call_method1(intern!(py, "get"), (module,)).ok() else {
        return Ok(None);
    };
    if owner.is_none() {
        return Ok(None);
    }
    match owner.getattr_opt(name.as_str())? {
        Some(published) if published.is(target) => Ok(Some(name)),
        _ => Ok(None),
    }
}

/// Returns the name and whether it may be cached by object address.
fn compute_target_name(
    t: &Types,
    target: &Bound<'_, PyAny>,
) -> PyResult<(Result<String, String>, bool)> {
    let py = target.py();
    if target.is_instance(t.op_overload.bind(py))? {
        let name: String = target.call_method0(intern!(py, "name"))?.extract()?;
        return Ok((Ok(name), true));
    }
    if target.is_instance(t.op_overload_packet.bind(py))? {
        let name: String = target
            .getattr(intern!(py, "_qualified_op_name"))?
            .extract()?;
        return Ok((Ok(format!("packet:{name}")), true));
    }
    if target.is_instance(t.higher_order_op.bind(py))? {
        let name: String = target.call_method0(intern!(py, "name"))?.extract()?;
        return Ok((Ok(format!("hop:{name}")), true));
    }
    let Some((module, mut qualname)) = qualified_name(target)? else {
        let type_name = target.get_type().name()?.to_string();
        return Ok((
            Err(format!(
                "call target of type {type_name} has no __module__/__qualname__"
            )),
            true,
        ));
    };
    let mut owner = target.getattr_opt(intern!(py, "__self__"))?;
    if target.is_instance(t.builtin_function.bind(py))?
        && owner.as_ref().is_some_and(is_pybind11_record)
    {
        // pybind11 (>= 2.13, as in torch 2.11) binds module functions to an
        // internal record object: still a plain function of its module.
        qualname = target.getattr(intern!(py, "__name__"))?.str()?.to_string();
        owner = None;
    }
    if qualname.contains("<locals>") {
        if let Some(name) = published_name(target, &module)? {
            qualname = name;
        }
    }
    let full = format!("{module}.{qualname}");
    if qualname.contains("<locals>") || qualname.contains("<lambda>") {
        return Ok((
            Err(format!(
                "call target {full} is a local function: its name does not identify its code"
            )),
            false,
        ));
    }
    if let Some(owner) = owner {
        if !owner.is_none()
            && !owner.is_instance(t.module.bind(py))?
            && !owner.is_instance_of::<PyType>()
        {
            return Ok((
                Err(format!("call target {full} is a method bound to an object")),
                false,
            ));
        }
    }
    let trusted_module = ["torch", "_operator", "operator", "builtins", "math"]
        .iter()
        .any(|m| module == *m || module.starts_with(&format!("{m}.")));
    if target.is_instance(t.function.bind(py))? && !trusted_module {
        // A user function: its name alone does not pin its code, which may
        // change between runs, so its bytecode is part of the name.
        if !target.getattr(intern!(py, "__closure__"))?.is_none() {
            return Ok((Err(format!("call target {full} is a closure")), false));
        }
        let code = target.getattr(intern!(py, "__code__"))?;
        let dumped = py
            .import("marshal")?
            .call_method1(intern!(py, "dumps"), (code,))?;
        let bytes: Vec<u8> = dumped.extract()?;
        let hash = super::to_hex(&blake3::hash(&bytes).as_bytes()[..8]);
        return Ok((Ok(format!("{full}#{hash}")), false));
    }
    Ok((Ok(full), true))
}

struct Walker<'py> {
    py: Python<'py>,
    t: &'static Types,
    w: CanonWriter,
    positions: AddressMap<u32>,
    /// UTF-8 of strings seen in this walk (they stay alive while it runs).
    texts: AddressMap<Box<[u8]>>,
    root: Bound<'py, PyAny>,
}

fn op_tag(op: &str) -> Option<u8> {
    Some(match op {
        "placeholder" => op::PLACEHOLDER,
        "get_attr" => op::GET_ATTR,
        "call_function" => op::CALL_FUNCTION,
        "call_method" => op::CALL_METHOD,
        "call_module" => op::CALL_MODULE,
        "output" => op::OUTPUT,
        _ => return None,
    })
}

impl<'py> Walker<'py> {
    fn walk(
        &mut self,
        inputs: &[Bound<'py, PyAny>],
        with_spans: bool,
    ) -> PyResult<Option<Vec<(usize, usize)>>> {
        let py = self.py;
        let graph = self.root.getattr(intern!(py, "graph"))?;
        // `graph.nodes` builds a Python `_node_list` (and its __len__ and
        // __iter__ run as Python frames); its C iterator over `_root` does not.
        let fast = match (
            &self.t.node_iter,
            graph.getattr_opt(intern!(py, "_root"))?,
            graph.getattr_opt(intern!(py, "_len"))?,
        ) {
            (Some(node_iter), Some(root), Some(len)) => Some((
                node_iter.bind(py).call1((root, false))?,
                len.extract::<usize>()?,
            )),
            _ => None,
        };
        let (nodes, count) = match fast {
            Some(found) => found,
            None => {
                let nodes = graph.getattr(intern!(py, "nodes"))?;
                let count = nodes.len()?;
                (nodes, count)
            }
        };
        self.w.header(count as u32);
        self.positions.reserve(count);
        let mut spans = with_spans.then(|| Vec::with_capacity(count));
        let mut placeholder_index = 0usize;
        for (position, node) in nodes.try_iter()?.enumerate() {
            let node = node?;
            let start = self.w.len();
            self.positions
                .insert(node.as_ptr() as usize, position as u32);
            let op_obj = node.getattr(intern!(py, "op"))?;
            let Some(op_tag) = self.op_tag(&op_obj)? else {
                let op_str = op_obj.str()?.to_cow()?.into_owned();
                self.w.unencodable(&format!("node op {op_str:?}"));
                continue;
            };
            self.w.byte(op_tag);
            match op_tag {
                op::PLACEHOLDER => {
                    self.w.u32(placeholder_index as u32);
                    self.placeholder_meta(&node, inputs.get(placeholder_index))?;
                    self.value(&self.node_args(&node)?)?;
                    placeholder_index += 1;
                }
                op::GET_ATTR => {
                    let target = node.getattr(intern!(py, "target"))?;
                    match self.resolve_attr(&target)? {
                        Some(obj) => self.attr(&obj)?,
                        None => self.w.unencodable("get_attr target does not exist"),
                    }
                }
                op::OUTPUT => {
                    self.value(&self.node_args(&node)?)?;
                }
                _ => {
                    let target = node.getattr(intern!(py, "target"))?;
                    match op_tag {
                        op::CALL_FUNCTION => self.callable(&target)?,
                        op::CALL_METHOD => match target.cast::<PyString>() {
                            Ok(name) => {
                                self.w.byte(tag::STR);
                                self.text(name)?;
                            }
                            Err(_) => self.w.unencodable("call_method target is not a string"),
                        },
                        _ => match self.resolve_attr(&target)? {
                            Some(module) => self.module(&module)?,
                            None => self.w.unencodable("call_module target does not exist"),
                        },
                    }
                    self.value(&self.node_args(&node)?)?;
                    self.value(&self.node_kwargs(&node)?)?;
                }
            }
            if let Some(spans) = spans.as_mut() {
                spans.push((start, self.w.len()));
            }
        }
        Ok(spans)
    }

    /// The op tag, comparing against interned names first (no decoding).
    fn op_tag(&self, op: &Bound<'py, PyAny>) -> PyResult<Option<u8>> {
        let py = self.py;
        for (name, t) in [
            (intern!(py, "call_function"), op::CALL_FUNCTION),
            (intern!(py, "placeholder"), op::PLACEHOLDER),
            (intern!(py, "call_method"), op::CALL_METHOD),
            (intern!(py, "get_attr"), op::GET_ATTR),
            (intern!(py, "output"), op::OUTPUT),
            (intern!(py, "call_module"), op::CALL_MODULE),
        ] {
            if op.is(name) {
                return Ok(Some(t));
            }
        }
        match op.cast::<PyString>() {
            Ok(s) => Ok(op_tag(&s.to_cow()?)),
            Err(_) => Ok(None),
        }
    }

    /// Writes a Python string as `str`, decoding each string object once per walk.
    fn text(&mut self, s: &Bound<'py, PyString>) -> PyResult<()> {
        let key = s.as_ptr() as usize;
        if let Some(bytes) = self.texts.get(&key) {
            self.w.u32(bytes.len() as u32);
            self.w.raw(bytes);
            return Ok(());
        }
        let text = s.to_cow()?;
        self.w.str(&text);
        self.texts.insert(key, text.as_bytes().into());
        Ok(())
    }

    fn node_args(&self, node: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        // `_args` is the stored tuple; `args` is a Python property around it.
        match node.getattr_opt(intern!(self.py, "_args"))? {
            Some(a) => Ok(a),
            None => node.getattr(intern!(self.py, "args")),
        }
    }

    fn node_kwargs(&self, node: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match node.getattr_opt(intern!(self.py, "_kwargs"))? {
            Some(k) => Ok(k),
            None => node.getattr(intern!(self.py, "kwargs")),
        }
    }

    fn resolve_attr(&self, target: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Ok(path) = target.cast::<PyString>() else {
            return Ok(None);
        };
        let mut obj = self.root.clone();
        for part in path.to_cow()?.split('.') {
            match obj.getattr_opt(part)? {
                Some(next) => obj = next,
                None => return Ok(None),
            }
        }
        Ok(Some(obj))
    }

    fn placeholder_meta(
        &mut self,
        node: &Bound<'py, PyAny>,
        example: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<()> {
        let py = self.py;
        let meta = node.getattr(intern!(py, "meta"))?;
        let meta = meta.cast::<PyDict>()?;
        let from_meta = match meta.get_item(intern!(py, "val"))? {
            Some(v) if !v.is_none() => Some(v),
            _ => meta
                .get_item(intern!(py, "example_value"))?
                .filter(|v| !v.is_none()),
        };
        match from_meta.as_ref().or(example) {
            None => self.w.byte(tag::NO_META),
            Some(v) if v.is_instance(self.t.tensor.bind(py))? => {
                self.w.byte(tag::TENSOR_META);
                self.tensor_meta(v)?;
            }
            Some(v) => self.value(v)?,
        }
        Ok(())
    }

    /// dtype, device type, layout, requires_grad, sizes, strides, storage offset.
    fn tensor_meta(&mut self, t: &Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        let tensor_type = t.get_type();
        if !self
            .t
            .plain_tensor_types
            .iter()
            .any(|k| tensor_type.is(k.bind(py)))
        {
            let name = tensor_type.qualname()?.to_string();
            self.w
                .unencodable(&format!("tensor subclass {name} is not supported"));
        }
        let dtype = t.getattr(intern!(py, "dtype"))?;
        self.w.str(&singleton_text(&dtype)?);
        // FakeTensor's `device`, `fake_device` and `layout` are Python
        // properties; read what they wrap directly.
        let is_fake = tensor_type.is(self.t.fake_tensor.bind(py));
        let device = if is_fake {
            match t.getattr_opt(intern!(py, "_fake_device"))? {
                Some(d) => d,
                None => t.getattr(intern!(py, "fake_device"))?,
            }
        } else {
            t.getattr(intern!(py, "device"))?
        };
        let device_type = device.getattr(intern!(py, "type"))?;
        self.text(device_type.cast::<PyString>()?)?;
        let layout = if is_fake && !self.fake_is_mkldnn(t)? {
            self.t
                .tensor_layout
                .bind(py)
                .call_method1(intern!(py, "__get__"), (t,))?
        } else {
            t.getattr(intern!(py, "layout"))?
        };
        self.w.str(&singleton_text(&layout)?);
        self.w
            .bool(t.getattr(intern!(py, "requires_grad"))?.is_truthy()?);
        let shape = t.getattr(intern!(py, "shape"))?;
        let shape = shape.cast::<PyTuple>()?;
        self.w.u32(shape.len() as u32);
        for d in shape.iter() {
            self.value(&d)?;
        }
        let stride = t.call_method0(intern!(py, "stride"))?;
        let stride = stride.cast::<PyTuple>()?;
        self.w.u32(stride.len() as u32);
        for s in stride.iter() {
            self.value(&s)?;
        }
        self.value(&t.call_method0(intern!(py, "storage_offset"))?)?;
        Ok(())
    }

    fn value(&mut self, v: &Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        let t = self.t;
        let vt = v.get_type();
        if vt.is(t.node.bind(py)) {
            match self.positions.get(&(v.as_ptr() as usize)) {
                Some(&p) => self.w.node_ref(p),
                None => self.w.unencodable("reference to a node of another graph"),
            }
        } else if v.is_none() {
            self.w.none();
        } else if let Ok(b) = v.cast::<PyBool>() {
            self.w.bool(b.is_true());
        } else if let Ok(i) = v.cast::<PyInt>() {
            match i.extract::<i64>() {
                Ok(x) => self.w.int(x),
                Err(_) => self.w.bigint(&i.str()?.to_cow()?),
            }
        } else if let Ok(f) = v.cast::<PyFloat>() {
            self.w.float(f.value());
        } else if let Ok(s) = v.cast::<PyString>() {
            self.w.byte(tag::STR);
            self.text(s)?;
        } else if let Ok(tuple) = v.cast::<PyTuple>() {
            let seq_tag = if vt.is(t.size.bind(py)) {
                tag::SIZE
            } else {
                tag::TUPLE
            };
            self.w.seq(seq_tag, tuple.len());
            for item in tuple.iter() {
                self.value(&item)?;
            }
        } else if let Ok(list) = v.cast::<PyList>() {
            self.w.seq(tag::LIST, list.len());
            for item in list.iter() {
                self.value(&item)?;
            }
        } else if let Ok(d) = v.cast::<PyDict>() {
            self.dict(d)?;
        } else if vt.is(t.dtype.bind(py)) {
            self.w.named(tag::DTYPE, &singleton_text(v)?);
        } else if vt.is(t.device.bind(py)) {
            let kind = v.getattr(intern!(py, "type"))?;
            let index: Option<i64> = v.getattr(intern!(py, "index"))?.extract()?;
            self.w.device(&kind.cast::<PyString>()?.to_cow()?, index);
        } else if vt.is(t.layout.bind(py)) {
            self.w.named(tag::LAYOUT, &singleton_text(v)?);
        } else if vt.is(t.memory_format.bind(py)) {
            self.w.named(tag::MEMORY_FORMAT, &singleton_text(v)?);
        } else if let Ok(s) = v.cast::<PySlice>() {
            self.w.byte(tag::SLICE);
            for field in [
                intern!(py, "start"),
                intern!(py, "stop"),
                intern!(py, "step"),
            ] {
                self.value(&s.getattr(field)?)?;
            }
        } else if v.is(t.ellipsis.bind(py)) {
            self.w.byte(tag::ELLIPSIS);
        } else if vt.is(t.sym_int.bind(py)) {
            self.symbolic(tag::SYM_INT, v)?;
        } else if vt.is(t.sym_float.bind(py)) {
            self.symbolic(tag::SYM_FLOAT, v)?;
        } else if vt.is(t.sym_bool.bind(py)) {
            self.symbolic(tag::SYM_BOOL, v)?;
        } else if v.is_instance(t.tensor.bind(py))? {
            self.tensor_content(v)?;
        } else if v.is_instance(t.graph_module.bind(py))? {
            self.nested_graph(v)?;
        } else if let Ok(c) = v.cast::<PyComplex>() {
            self.w.complex(c.real(), c.imag());
        } else if v.is_callable() {
            self.callable(v)?;
        } else {
            let name = vt.qualname()?.to_string();
            self.w.unencodable(&format!("value of type {name}"));
        }
        Ok(())
    }

    /// Dict items sorted by key when all keys are strings (keyword order
    /// carries no meaning), else in insertion order.
    fn dict(&mut self, d: &Bound<'py, PyDict>) -> PyResult<()> {
        if d.is_empty() {
            self.w.seq(tag::DICT, 0);
            return Ok(());
        }
        let mut items: Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)> = d.iter().collect();
        self.w.seq(tag::DICT, items.len());
        if items.iter().all(|(k, _)| k.cast::<PyString>().is_ok()) {
            let mut keyed: Vec<(String, Bound<'py, PyAny>)> = Vec::with_capacity(items.len());
            for (k, v) in items.drain(..) {
                keyed.push((k.cast::<PyString>()?.to_cow()?.into_owned(), v));
            }
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in keyed {
                self.w.string(&k);
                self.value(&v)?;
            }
        } else {
            for (k, v) in items {
                self.value(&k)?;
                self.value(&v)?;
            }
        }
        Ok(())
    }

    fn callable(&mut self, target: &Bound<'py, PyAny>) -> PyResult<()> {
        match canonical_target(target)? {
            Ok(name) => self.w.named(tag::CALLABLE, &name),
            Err(reason) => self.w.unencodable(&reason),
        }
        Ok(())
    }

    /// FakeTensor.is_mkldnn without its two Python frames.
    fn fake_is_mkldnn(&self, t: &Bound<'py, PyAny>) -> PyResult<bool> {
        let py = self.py;
        let Some(key) = &self.t.mkldnn_key else {
            return t.getattr(intern!(py, "is_mkldnn"))?.is_truthy();
        };
        match t.getattr_opt(intern!(py, "dispatch_keys"))? {
            Some(keys) if !keys.is_none() => keys
                .call_method1(intern!(py, "has"), (key.bind(py),))?
                .is_truthy(),
            _ => Ok(false),
        }
    }

    /// A SymInt/SymFloat/SymBool: its expression with symbols renamed, plus the
    /// value ranges of the symbols it uses for the first time.
    fn symbolic(&mut self, sym_tag: u8, v: &Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        let sym_node = v.getattr(intern!(py, "node"))?;
        let expr = sym_node.getattr(intern!(py, "expr"))?;
        let mut introduced = Vec::new();
        let text = if expr.getattr(intern!(py, "is_Symbol"))?.is_truthy()? {
            let name = expr.str()?.to_string();
            let (canonical, new) = self.w.symbols.rename(&name);
            if new {
                introduced.push(self.symbol_range(&sym_node, &expr, canonical.clone())?);
            }
            canonical
        } else {
            let free = expr.getattr(intern!(py, "free_symbols"))?;
            let mut symbols: Vec<(String, Bound<'py, PyAny>)> = Vec::new();
            for s in free.try_iter()? {
                let s = s?;
                symbols.push((s.str()?.to_string(), s));
            }
            if symbols.is_empty() {
                expr.str()?.to_string()
            } else {
                // Symbols first seen inside an expression are numbered in name
                // order: deterministic, and a consistent renaming either way.
                symbols.sort_by(|a, b| a.0.cmp(&b.0));
                let sympy_symbol = py.import("sympy")?.getattr("Symbol")?;
                let mapping = PyDict::new(py);
                for (name, s) in &symbols {
                    let (canonical, new) = self.w.symbols.rename(name);
                    if new {
                        introduced.push(self.symbol_range(&sym_node, s, canonical.clone())?);
                    }
                    mapping.set_item(s, sympy_symbol.call1((canonical,))?)?;
                }
                expr.call_method1(intern!(py, "xreplace"), (mapping,))?
                    .str()?
                    .to_string()
            }
        };
        self.w.symbolic(sym_tag, &text, &introduced);
        Ok(())
    }

    fn symbol_range(
        &self,
        sym_node: &Bound<'py, PyAny>,
        symbol: &Bound<'py, PyAny>,
        canonical: String,
    ) -> PyResult<SymbolRange> {
        let py = self.py;
        let unknown = || SymbolRange {
            canonical: canonical.clone(),
            lower: "?".into(),
            upper: "?".into(),
        };
        let Some(shape_env) = sym_node.getattr_opt(intern!(py, "shape_env"))? else {
            return Ok(unknown());
        };
        if shape_env.is_none() {
            return Ok(unknown());
        }
        let ranges = shape_env.getattr(intern!(py, "var_to_range"))?;
        let Some(range) = ranges
            .call_method1(intern!(py, "get"), (symbol,))
            .ok()
            .filter(|r| !r.is_none())
        else {
            return Ok(unknown());
        };
        Ok(SymbolRange {
            canonical,
            lower: range.getattr(intern!(py, "lower"))?.str()?.to_string(),
            upper: range.getattr(intern!(py, "upper"))?.str()?.to_string(),
        })
    }

    fn attr(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        if obj.is_instance(self.t.tensor.bind(py))? {
            self.tensor_content(obj)
        } else if obj.is_instance(self.t.graph_module.bind(py))? {
            self.nested_graph(obj)
        } else {
            let name = obj.get_type().qualname()?.to_string();
            self.w.unencodable(&format!("get_attr of a {name}"));
            Ok(())
        }
    }

    /// A constant tensor: its metadata and a BLAKE3 of its bytes.
    fn tensor_content(&mut self, t: &Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        self.w.byte(tag::TENSOR);
        self.tensor_meta(t)?;
        let is_fake = t.is_instance(self.t.fake_tensor.bind(py))?;
        let device_type: String = t
            .getattr(intern!(py, "device"))?
            .getattr(intern!(py, "type"))?
            .extract()?;
        if is_fake || device_type == "meta" {
            self.w
                .unencodable("constant tensor without data (fake or meta tensor)");
            return Ok(());
        }
        if !t
            .getattr(intern!(py, "layout"))?
            .is(self.t.strided.bind(py))
        {
            self.w
                .unencodable("constant tensor with a non-strided layout");
            return Ok(());
        }
        let mut data = t
            .call_method0(intern!(py, "detach"))?
            .call_method1(intern!(py, "to"), ("cpu",))?
            .call_method0(intern!(py, "contiguous"))?;
        let numel: usize = data.call_method0(intern!(py, "numel"))?.extract()?;
        let item: usize = data.call_method0(intern!(py, "element_size"))?.extract()?;
        let nbytes = numel * item;
        let hash = if nbytes >= DETACHED_HASH_BYTES {
            // A private copy nobody else can resize, hashed without the GIL.
            data = data.call_method0(intern!(py, "clone"))?;
            let ptr: usize = data.call_method0(intern!(py, "data_ptr"))?.extract()?;
            py.detach(|| {
                // SAFETY: `data` is a contiguous CPU tensor of `nbytes` bytes that
                // only this function references, and it outlives this closure.
                let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, nbytes) };
                *blake3::hash(bytes).as_bytes()
            })
        } else if nbytes == 0 {
            *blake3::hash(&[]).as_bytes()
        } else {
            let ptr: usize = data.call_method0(intern!(py, "data_ptr"))?.extract()?;
            // SAFETY: attached, so no other Python code runs while we read; the
            // tensor is contiguous on the CPU and `data` keeps it alive.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, nbytes) };
            *blake3::hash(bytes).as_bytes()
        };
        drop(data);
        self.w.raw(&hash);
        Ok(())
    }

    fn nested_graph(&mut self, gm: &Bound<'py, PyAny>) -> PyResult<()> {
        let nested = encode_graph_module(gm, None, false)?;
        if let Some(reason) = nested.unencodable {
            self.w.unencodable(&format!("nested graph: {reason}"));
        } else {
            self.w.digest32(tag::GRAPH, &content_digest(&nested.bytes));
        }
        Ok(())
    }

    /// A called submodule: a nested graph, or a `torch.nn` leaf module without
    /// children (its type, configuration, mode and state by content).
    fn module(&mut self, m: &Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        if m.is_instance(self.t.graph_module.bind(py))? {
            return self.nested_graph(m);
        }
        if !m.is_instance(self.t.nn_module.bind(py))? {
            self.w.unencodable("call_module target is not a module");
            return Ok(());
        }
        let Some((module, qualname)) = qualified_name(m.get_type().as_any())? else {
            self.w
                .unencodable("call_module of a module type without a name");
            return Ok(());
        };
        let has_children = m
            .call_method0(intern!(py, "children"))?
            .try_iter()?
            .next()
            .is_some();
        if !module.starts_with("torch.nn.") || has_children {
            self.w.unencodable(&format!(
                "call_module of {module}.{qualname}: only torch.nn leaf modules are encodable"
            ));
            return Ok(());
        }
        self.w.byte(tag::LEAF_MODULE);
        self.w.str(&format!("{module}.{qualname}"));
        self.w
            .str(&m.call_method0(intern!(py, "extra_repr"))?.str()?.to_cow()?);
        self.w
            .bool(m.getattr(intern!(py, "training"))?.is_truthy()?);
        let kwargs = PyDict::new(py);
        kwargs.set_item("recurse", false)?;
        let mut state: Vec<(String, Bound<'py, PyAny>)> = Vec::new();
        for method in [
            intern!(py, "named_parameters"),
            intern!(py, "named_buffers"),
        ] {
            for item in m.call_method(method, (), Some(&kwargs))?.try_iter()? {
                let (name, tensor): (String, Bound<'py, PyAny>) = item?.extract()?;
                state.push((name, tensor));
            }
        }
        self.w.u32(state.len() as u32);
        for (name, tensor) in state {
            self.w.str(&name);
            self.tensor_content(&tensor)?;
        }
        Ok(())
    }
}
