//! The canonical byte encoding of an FX graph and its BLAKE3 digest.
//!
//! This module owns the *format*; [`fx`] walks a `torch.fx.GraphModule` and
//! drives a [`CanonWriter`]. The format is a contract shared with the pure-Python
//! reference encoder in `tests/reference_encoder.py`: both must produce the
//! same bytes for the same graph, so every change here is a format change and
//! bumps [`FORMAT_VERSION`].
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! encoding := "ISOCANON" u8(FORMAT_VERSION) u32(node_count) node*
//! node     := 'P' u32(placeholder_index) meta value(args)          placeholder
//!           | 'G' attr                                            get_attr
//!           | 'F' str(canonical target) value(args) value(kwargs) call_function
//!           | 'M' str(method name)      value(args) value(kwargs) call_method
//!           | 'C' module                value(args) value(kwargs) call_module
//!           | 'O' value(args)                                     output
//! str      := u32(len) utf8
//! ```
//!
//! Names never appear: a node is referred to by its position in graph order.
//! Values are tagged ([`tag`]); symbolic sizes are renamed `c0, c1, …` in order
//! of first use and carry their value range where they first appear.

pub mod fx;

use std::collections::HashMap;

/// Version of the canonical encoding; mixed into every digest.
pub const FORMAT_VERSION: u8 = 1;
/// Leading bytes of every encoding.
pub const MAGIC: &[u8; 8] = b"ISOCANON";

/// Value tags. Kept in one place so the Python reference encoder can mirror them.
pub mod tag {
    pub const NONE: u8 = 0x00;
    pub const FALSE: u8 = 0x01;
    pub const TRUE: u8 = 0x02;
    pub const INT: u8 = 0x03;
    pub const BIGINT: u8 = 0x04;
    pub const FLOAT: u8 = 0x05;
    pub const STR: u8 = 0x06;
    pub const NODE: u8 = 0x07;
    pub const TUPLE: u8 = 0x08;
    pub const LIST: u8 = 0x09;
    pub const DICT: u8 = 0x0A;
    pub const DTYPE: u8 = 0x0B;
    pub const DEVICE: u8 = 0x0C;
    pub const LAYOUT: u8 = 0x0D;
    pub const MEMORY_FORMAT: u8 = 0x0E;
    pub const SLICE: u8 = 0x0F;
    pub const ELLIPSIS: u8 = 0x10;
    pub const SIZE: u8 = 0x11;
    pub const CALLABLE: u8 = 0x12;
    pub const SYM_INT: u8 = 0x13;
    pub const SYM_FLOAT: u8 = 0x14;
    pub const SYM_BOOL: u8 = 0x15;
    pub const COMPLEX: u8 = 0x16;
    pub const TENSOR: u8 = 0x17;
    pub const GRAPH: u8 = 0x18;
    pub const LEAF_MODULE: u8 = 0x19;
    /// Placeholder metadata of a tensor input (dtype, shape, stride, …).
    pub const TENSOR_META: u8 = 0x20;
    /// Placeholder without metadata and without an example input.
    pub const NO_META: u8 = 0x21;
    /// Something the encoder cannot encode; followed by the reason.
    pub const UNENCODABLE: u8 = 0xFF;
}

/// Node op tags.
pub mod op {
    pub const PLACEHOLDER: u8 = b'P';
    pub const GET_ATTR: u8 = b'G';
    pub const CALL_FUNCTION: u8 = b'F';
    pub const CALL_METHOD: u8 = b'M';
    pub const CALL_MODULE: u8 = b'C';
    pub const OUTPUT: u8 = b'O';
}

/// Renames free symbols (`s17`, `u3`, …) to canonical names in order of first use.
#[derive(Debug, Default, Clone)]
pub struct SymbolTable {
    names: HashMap<String, u32>,
}

impl SymbolTable {
    /// The canonical name of `symbol` and whether this is its first use.
    pub fn rename(&mut self, symbol: &str) -> (String, bool) {
        let next = self.names.len() as u32;
        match self.names.get(symbol) {
            Some(i) => (format!("c{i}"), false),
            None => {
                self.names.insert(symbol.to_owned(), next);
                (format!("c{next}"), true)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The value range of a symbol, as printed by torch (`2`, `int_oo`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolRange {
    pub canonical: String,
    pub lower: String,
    pub upper: String,
}

/// Append-only writer of the canonical encoding.
#[derive(Debug, Default)]
pub struct CanonWriter {
    buf: Vec<u8>,
    pub symbols: SymbolTable,
    unencodable: Option<String>,
}

impl CanonWriter {
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    pub fn with_capacity(capacity: usize) -> Self {
        CanonWriter {
            buf: Vec::with_capacity(capacity),
            symbols: SymbolTable::default(),
            unencodable: None,
        }
    }

    pub fn header(&mut self, node_count: u32) {
        self.buf.extend_from_slice(MAGIC);
        self.buf.push(FORMAT_VERSION);
        self.u32(node_count);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn byte(&mut self, b: u8) {
        self.buf.push(b);
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn none(&mut self) {
        self.byte(tag::NONE);
    }

    pub fn bool(&mut self, v: bool) {
        self.byte(if v { tag::TRUE } else { tag::FALSE });
    }

    pub fn int(&mut self, v: i64) {
        self.byte(tag::INT);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// An integer outside i64, by its decimal text.
    pub fn bigint(&mut self, decimal: &str) {
        self.byte(tag::BIGINT);
        self.str(decimal);
    }

    /// A float by its exact bit pattern (so `0.0`, `-0.0` and NaNs stay distinct).
    pub fn float(&mut self, v: f64) {
        self.byte(tag::FLOAT);
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
    }

    pub fn complex(&mut self, re: f64, im: f64) {
        self.byte(tag::COMPLEX);
        self.buf.extend_from_slice(&re.to_bits().to_le_bytes());
        self.buf.extend_from_slice(&im.to_bits().to_le_bytes());
    }

    pub fn string(&mut self, s: &str) {
        self.byte(tag::STR);
        self.str(s);
    }

    pub fn node_ref(&mut self, position: u32) {
        self.byte(tag::NODE);
        self.u32(position);
    }

    /// Opens a sequence (tuple, list, torch.Size) or dict of `len` items.
    pub fn seq(&mut self, seq_tag: u8, len: usize) {
        self.byte(seq_tag);
        self.u32(len as u32);
    }

    /// A value printed by torch, tagged: dtype, layout, memory format, callable.
    pub fn named(&mut self, value_tag: u8, name: &str) {
        self.byte(value_tag);
        self.str(name);
    }

    pub fn device(&mut self, device_type: &str, index: Option<i64>) {
        self.byte(tag::DEVICE);
        self.str(device_type);
        self.buf
            .extend_from_slice(&index.unwrap_or(-1).to_le_bytes());
    }

    /// A symbolic expression with its symbols already renamed, and the ranges
    /// of the symbols it introduces.
    pub fn symbolic(&mut self, sym_tag: u8, expr: &str, introduced: &[SymbolRange]) {
        self.byte(sym_tag);
        self.str(expr);
        self.u32(introduced.len() as u32);
        for r in introduced {
            self.str(&r.canonical);
            self.str(&r.lower);
            self.str(&r.upper);
        }
    }

    pub fn digest32(&mut self, value_tag: u8, digest: &[u8; 32]) {
        self.byte(value_tag);
        self.raw(digest);
    }

    /// Marks something the encoder cannot encode. The encoding stays
    /// well-formed (so `explain` can still point at it) but the graph is not
    /// reusable: [`digest`] then mixes in a unique salt.
    pub fn unencodable(&mut self, reason: &str) {
        self.byte(tag::UNENCODABLE);
        self.str(reason);
        if self.unencodable.is_none() {
            self.unencodable = Some(reason.to_owned());
        }
    }

    pub fn unencodable_reason(&self) -> Option<&str> {
        self.unencodable.as_deref()
    }

    pub fn finish(self) -> (Vec<u8>, Option<String>) {
        (self.buf, self.unencodable)
    }
}

/// BLAKE3 of an encoding without namespace: used for nested graph modules.
pub fn content_digest(encoding: &[u8]) -> [u8; 32] {
    *blake3::hash(encoding).as_bytes()
}

/// The digest of a graph: BLAKE3 over the namespace (length-prefixed) and the
/// canonical encoding. `salt` makes a non-reusable graph's digest unique.
pub fn digest(namespace: &[u8], encoding: &[u8], salt: Option<&[u8; 32]>) -> [u8; 32] {
    // Deriving the key from the context string is a hash of its own: do it once.
    static BASE: std::sync::LazyLock<blake3::Hasher> = std::sync::LazyLock::new(|| {
        blake3::Hasher::new_derive_key("isocache 2026 graph digest v1")
    });
    let mut h = BASE.clone();
    h.update(&(namespace.len() as u64).to_le_bytes());
    h.update(namespace);
    h.update(encoding);
    if let Some(salt) = salt {
        h.update(b"unique");
        h.update(salt);
    }
    *h.finalize().as_bytes()
}

/// A fresh random salt for graphs that must never be shared.
pub fn unique_salt() -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    *h.finalize().as_bytes()
}

/// The digest of a piece: `digest` of its encoding, salted afresh when the
/// piece is not reusable (`unencodable`), so no other piece ever shares it.
pub fn piece_digest(namespace: &[u8], encoding: &[u8], unencodable: bool) -> [u8; 32] {
    let salt = unencodable.then(unique_salt);
    digest(namespace, encoding, salt.as_ref())
}

pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xF) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let mut w = CanonWriter::new();
        w.header(3);
        let (bytes, reason) = w.finish();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(bytes[8], FORMAT_VERSION);
        assert_eq!(&bytes[9..13], &3u32.to_le_bytes());
        assert!(reason.is_none());
    }

    #[test]
    fn floats_are_encoded_by_bit_pattern() {
        let enc = |v: f64| {
            let mut w = CanonWriter::new();
            w.float(v);
            w.finish().0
        };
        assert_ne!(enc(0.0), enc(-0.0));
        assert_eq!(enc(1.5), enc(1.5));
        assert_ne!(enc(f64::NAN), enc(-f64::NAN));
        assert_eq!(enc(1.0)[0], tag::FLOAT);
        assert_eq!(&enc(1.0)[1..], &1.0f64.to_bits().to_le_bytes());
    }

    #[test]
    fn ints_and_strings_are_length_safe() {
        // "ab" + "c" must differ from "a" + "bc": lengths are prefixed.
        let mut a = CanonWriter::new();
        a.string("ab");
        a.string("c");
        let mut b = CanonWriter::new();
        b.string("a");
        b.string("bc");
        assert_ne!(a.finish().0, b.finish().0);
        let mut w = CanonWriter::new();
        w.int(-2);
        assert_eq!(
            w.finish().0,
            [&[tag::INT][..], &(-2i64).to_le_bytes()].concat()
        );
    }

    #[test]
    fn bool_is_not_int() {
        let mut a = CanonWriter::new();
        a.bool(true);
        let mut b = CanonWriter::new();
        b.int(1);
        assert_ne!(a.finish().0, b.finish().0);
    }

    #[test]
    fn symbols_are_renamed_in_order_of_first_use() {
        let mut t = SymbolTable::default();
        assert_eq!(t.rename("s17"), ("c0".to_string(), true));
        assert_eq!(t.rename("s3"), ("c1".to_string(), true));
        assert_eq!(t.rename("s17"), ("c0".to_string(), false));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn unencodable_keeps_first_reason() {
        let mut w = CanonWriter::new();
        w.unencodable("first");
        w.unencodable("second");
        assert_eq!(w.unencodable_reason(), Some("first"));
        let (bytes, reason) = w.finish();
        assert_eq!(bytes[0], tag::UNENCODABLE);
        assert_eq!(reason.as_deref(), Some("first"));
    }

    #[test]
    fn digest_depends_on_namespace_encoding_and_salt() {
        let base = digest(b"ns", b"enc", None);
        assert_eq!(base, digest(b"ns", b"enc", None));
        assert_ne!(base, digest(b"ns2", b"enc", None));
        assert_ne!(base, digest(b"ns", b"enc2", None));
        // The namespace is length-prefixed, so bytes cannot move across the boundary.
        assert_ne!(digest(b"nse", b"nc", None), digest(b"ns", b"enc", None));
        let s1 = unique_salt();
        let s2 = unique_salt();
        assert_ne!(s1, s2);
        assert_ne!(
            digest(b"ns", b"enc", Some(&s1)),
            digest(b"ns", b"enc", Some(&s2))
        );
    }

    #[test]
    fn a_reusable_piece_digest_is_the_plain_digest_and_an_unencodable_one_is_unique() {
        assert_eq!(
            piece_digest(b"ns", b"enc", false),
            digest(b"ns", b"enc", None)
        );
        let first = piece_digest(b"ns", b"enc", true);
        assert_ne!(first, digest(b"ns", b"enc", None));
        assert_ne!(first, piece_digest(b"ns", b"enc", true));
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(to_hex(&[0x00, 0xAB, 0x9f]), "00ab9f");
        assert_eq!(to_hex(&digest(b"", b"", None)).len(), 64);
    }

    #[test]
    fn symbolic_records_introduced_ranges() {
        let mut w = CanonWriter::new();
        w.symbolic(
            tag::SYM_INT,
            "c0",
            &[SymbolRange {
                canonical: "c0".into(),
                lower: "2".into(),
                upper: "int_oo".into(),
            }],
        );
        let (bytes, _) = w.finish();
        assert_eq!(bytes[0], tag::SYM_INT);
        assert_eq!(&bytes[1..5], &2u32.to_le_bytes());
        assert_eq!(&bytes[5..7], b"c0");
        assert_eq!(&bytes[7..11], &1u32.to_le_bytes());
    }
}
