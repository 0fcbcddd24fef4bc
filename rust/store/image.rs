//! The artifact image: a fixed 128-byte header followed by the payload. The
//! store writes it to disk and the Redis tier ships it unchanged.
//!
//! | offset | size | field                                              |
//! | ------ | ---- | -------------------------------------------------- |
//! | 0      | 8    | magic `ISOCACHE`                                   |
//! | 8      | 2    | format version (u16 LE)                            |
//! | 10     | 2    | flags (bit 0: signed, bit 1: a model entry)        |
//! | 12     | 4    | reserved, zero                                     |
//! | 16     | 8    | payload length (u64 LE)                            |
//! | 24     | 8    | seconds the compile took (f64 LE), for reporting   |
//! | 32     | 32   | the digest this file is stored under               |
//! | 64     | 32   | BLAKE3 of the payload                              |
//! | 96     | 32   | keyed BLAKE3 of bytes 0..96 and the payload, or 0  |

use std::fmt;

use crate::digest::Digest;

pub const MAGIC: &[u8; 8] = b"ISOCACHE";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 128;
const FLAG_SIGNED: u16 = 1;
/// Set on a whole-model entry (`isocache.compile`); a file without it
/// (every file written before kinds existed) is a piece.
const FLAG_MODEL: u16 = 2;
/// Largest payload accepted (a compiled piece is usually well under 10 MB).
pub const MAX_PAYLOAD: u64 = 4 << 30;

/// What an artifact holds: one compiled piece (the backend) or a whole
/// compiled model (`isocache.compile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ArtifactKind {
    #[default]
    Piece,
    Model,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 2] = [ArtifactKind::Piece, ArtifactKind::Model];

    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Piece => "piece",
            ArtifactKind::Model => "model",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactKind> {
        ArtifactKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn flag(self) -> u16 {
        match self {
            ArtifactKind::Piece => 0,
            ArtifactKind::Model => FLAG_MODEL,
        }
    }
}

/// Why an artifact (or what stands at its name) was refused: a closed set
/// that callers match on, with a sentence for people beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CorruptionKind {
    /// Fewer bytes than a header.
    Truncated,
    /// Not an isocache artifact.
    Magic,
    /// Another format version.
    Version,
    /// Stored under another digest than its own.
    Digest,
    /// The payload length disagrees with the header, or exceeds the limit.
    Length,
    /// The payload's BLAKE3 does not match.
    Checksum,
    /// `ISOCACHE_KEY` is set and the artifact carries no signature.
    Unsigned,
    /// The signature does not match `ISOCACHE_KEY`.
    Signature,
    /// Owned by someone else or writable by others.
    NotPrivate,
    /// A FIFO, a directory, a device: not a regular file.
    NotRegular,
    /// A symbolic link where a file or a shard directory belongs.
    Symlink,
    /// Could not be read (an I/O error; left in place).
    Unreadable,
}

impl CorruptionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CorruptionKind::Truncated => "truncated",
            CorruptionKind::Magic => "magic",
            CorruptionKind::Version => "version",
            CorruptionKind::Digest => "digest",
            CorruptionKind::Length => "length",
            CorruptionKind::Checksum => "checksum",
            CorruptionKind::Unsigned => "unsigned",
            CorruptionKind::Signature => "signature",
            CorruptionKind::NotPrivate => "not_private",
            CorruptionKind::NotRegular => "not_regular",
            CorruptionKind::Symlink => "symlink",
            CorruptionKind::Unreadable => "unreadable",
        }
    }
}

/// A refused artifact: its kind and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub kind: CorruptionKind,
    pub reason: String,
}

impl Corruption {
    pub fn new(kind: CorruptionKind, reason: impl Into<String>) -> Corruption {
        Corruption {
            kind,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
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
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
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

    /// Parses a header.
    pub fn decode(h: &[u8]) -> std::result::Result<Header, Corruption> {
        use CorruptionKind as K;
        if h.len() < HEADER_LEN {
            return Err(Corruption::new(
                K::Truncated,
                format!("truncated header ({} bytes)", h.len()),
            ));
        }
        if &h[0..8] != MAGIC {
            return Err(Corruption::new(
                K::Magic,
                "bad magic: not an isocache artifact",
            ));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(Corruption::new(
                K::Version,
                format!("format version {version}, this isocache reads {FORMAT_VERSION}"),
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

    pub fn kind(&self) -> ArtifactKind {
        if self.flags & FLAG_MODEL != 0 {
            ArtifactKind::Model
        } else {
            ArtifactKind::Piece
        }
    }

    /// Checks the header alone against the digest it is looked up under and
    /// the number of payload bytes that follow it (`body`, when known).
    pub fn check_frame(
        &self,
        expected: &Digest,
        body: Option<u64>,
    ) -> std::result::Result<(), Corruption> {
        use CorruptionKind as K;
        if self.digest != expected.0 {
            return Err(Corruption::new(
                K::Digest,
                "file is stored under another digest",
            ));
        }
        if self.payload_len > MAX_PAYLOAD {
            return Err(Corruption::new(
                K::Length,
                format!(
                    "header says {} payload bytes, more than the limit of {MAX_PAYLOAD}",
                    self.payload_len
                ),
            ));
        }
        if let Some(body) = body {
            if self.payload_len != body {
                return Err(Corruption::new(
                    K::Length,
                    format!(
                        "length mismatch: header says {} bytes, file has {body}",
                        self.payload_len
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn sign(key: &[u8; 32], header_prefix: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header_prefix);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// Checks the payload against a decoded header (checksum, then signature).
/// `raw_header` is the header's 128 bytes as stored.
pub fn check_payload(
    header: &Header,
    raw_header: &[u8],
    payload: &[u8],
    key: Option<&[u8; 32]>,
) -> std::result::Result<(), Corruption> {
    use CorruptionKind as K;
    if blake3::hash(payload).as_bytes() != &header.checksum {
        return Err(Corruption::new(K::Checksum, "checksum mismatch"));
    }
    if let Some(key) = key {
        if !header.is_signed() {
            return Err(Corruption::new(
                K::Unsigned,
                "artifact is not signed, and ISOCACHE_KEY is set",
            ));
        }
        let expected_sig = sign(key, &raw_header[..96], payload);
        // Compare through blake3's constant-time Hash equality.
        if blake3::Hash::from(expected_sig) != blake3::Hash::from(header.signature) {
            return Err(Corruption::new(
                K::Signature,
                "signature does not match ISOCACHE_KEY",
            ));
        }
    }
    Ok(())
}

/// Checks a whole file image against the expected digest and key; returns
/// the header and the payload's range in `bytes`.
pub fn check_file(
    bytes: &[u8],
    expected: &Digest,
    key: Option<&[u8; 32]>,
) -> std::result::Result<(Header, std::ops::Range<usize>), Corruption> {
    let header = Header::decode(bytes)?;
    header.check_frame(expected, Some((bytes.len() - HEADER_LEN) as u64))?;
    check_payload(&header, &bytes[..HEADER_LEN], &bytes[HEADER_LEN..], key)?;
    Ok((header, HEADER_LEN..bytes.len()))
}

/// Builds the file image for `payload`.
pub fn file_image(
    digest: &Digest,
    payload: &[u8],
    compile_seconds: f64,
    key: Option<&[u8; 32]>,
    kind: ArtifactKind,
) -> Vec<u8> {
    let signed = if key.is_some() { FLAG_SIGNED } else { 0 };
    let mut header = Header {
        version: FORMAT_VERSION,
        flags: signed | kind.flag(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest(*blake3::hash(&[n]).as_bytes())
    }

    fn key(s: &[u8]) -> [u8; 32] {
        crate::key::signing_key(s).unwrap()
    }

    #[test]
    fn round_trip_plain_and_signed() {
        let d = digest(1);
        let image = file_image(&d, b"payload", 2.5, None, ArtifactKind::Piece);
        assert_eq!(image.len(), HEADER_LEN + 7);
        let (h, range) = check_file(&image, &d, None).unwrap();
        assert_eq!(&image[range], b"payload");
        assert_eq!(h.compile_seconds, 2.5);
        assert!(!h.is_signed());
        let k = key(b"a secret of 16+ bytes");
        let signed = file_image(&d, b"payload", 0.0, Some(&k), ArtifactKind::Piece);
        assert!(check_file(&signed, &d, Some(&k)).unwrap().0.is_signed());
        // A store without a key still reads signed images.
        assert!(check_file(&signed, &d, None).is_ok());
    }

    #[test]
    fn every_check_names_its_reason() {
        let d = digest(2);
        let k = key(b"a secret of 16+ bytes");
        let image = file_image(&d, b"payload bytes", 0.0, None, ArtifactKind::Piece);
        use CorruptionKind as K;
        let check = |bytes: &[u8], key: Option<&[u8; 32]>, kind: K, needle: &str| {
            let c = check_file(bytes, &d, key).unwrap_err();
            assert_eq!(c.kind, kind, "{c}");
            assert!(c.reason.contains(needle), "{c}");
        };
        check(&image[..20], None, K::Truncated, "truncated");
        check(&image[..image.len() - 1], None, K::Length, "length");
        let mut flipped = image.clone();
        *flipped.last_mut().unwrap() ^= 1;
        check(&flipped, None, K::Checksum, "checksum");
        let mut magic = image.clone();
        magic[0] = b'X';
        check(&magic, None, K::Magic, "magic");
        let mut version = image.clone();
        version[8] = 9;
        check(&version, None, K::Version, "version");
        let c = check_file(&image, &digest(3), None).unwrap_err();
        assert_eq!(c.kind, K::Digest);
        assert!(c.reason.contains("another digest"));
        check(&image, Some(&k), K::Unsigned, "not signed");
        let other = key(b"another secret, 16+");
        let signed = file_image(&d, b"payload bytes", 0.0, Some(&other), ArtifactKind::Piece);
        check(&signed, Some(&k), K::Signature, "signature");
        let mut huge = image.clone();
        huge[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        check(&huge, None, K::Length, "limit");
    }

    #[test]
    fn kinds_ride_in_the_flags_and_old_files_are_pieces() {
        let d = digest(4);
        let k = key(b"a secret of 16+ bytes");
        for kind in ArtifactKind::ALL {
            for key in [None, Some(&k)] {
                let image = file_image(&d, b"entry", 1.0, key, kind);
                let (h, _) = check_file(&image, &d, key).unwrap();
                assert_eq!(h.kind(), kind);
                assert_eq!(h.is_signed(), key.is_some());
                assert_eq!(ArtifactKind::parse(kind.as_str()), Some(kind));
            }
        }
        // A file written before kinds existed has only the signed bit (or none).
        let old = file_image(&d, b"entry", 1.0, None, ArtifactKind::Piece);
        assert_eq!(u16::from_le_bytes([old[10], old[11]]), 0);
        // The kind is signed: flipping it breaks the signature.
        let mut model = file_image(&d, b"entry", 1.0, Some(&k), ArtifactKind::Model);
        model[10] &= !(FLAG_MODEL as u8);
        assert_eq!(
            check_file(&model, &d, Some(&k)).unwrap_err().kind,
            CorruptionKind::Signature
        );
        assert_eq!(ArtifactKind::parse("graph"), None);
    }
}
