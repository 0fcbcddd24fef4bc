//! The artifact image: a fixed 128-byte header followed by the payload. The
//! store writes it to disk and the Redis tier ships it unchanged.
//!
//! | offset | size | field                                              |
//! | ------ | ---- | -------------------------------------------------- |
//! | 0      | 8    | magic `ISOCACHE`                                   |
//! | 8      | 2    | format version (u16 LE)                            |
//! | 10     | 2    | flags (bit 0: signed)                              |
//! | 12     | 4    | reserved, zero                                     |
//! | 16     | 8    | payload length (u64 LE)                            |
//! | 24     | 8    | seconds the compile took (f64 LE), for reporting   |
//! | 32     | 32   | the digest this file is stored under               |
//! | 64     | 32   | BLAKE3 of the payload                              |
//! | 96     | 32   | keyed BLAKE3 of bytes 0..96 and the payload, or 0  |

use crate::digest::Digest;

pub const MAGIC: &[u8; 8] = b"ISOCACHE";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 128;
const FLAG_SIGNED: u16 = 1;
/// Largest payload accepted (a compiled piece is usually well under 10 MB).
pub const MAX_PAYLOAD: u64 = 4 << 30;

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
    fn encode(&self) -> [u8; HEADER_LEN] {
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

    /// Parses a header; `Err` carries a human-readable reason.
    pub fn decode(h: &[u8]) -> std::result::Result<Header, String> {
        if h.len() < HEADER_LEN {
            return Err(format!("truncated header ({} bytes)", h.len()));
        }
        if &h[0..8] != MAGIC {
            return Err("bad magic: not an isocache artifact".into());
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this isocache reads {FORMAT_VERSION}"
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

    /// Checks the header alone against the digest it is looked up under and
    /// the number of payload bytes that follow it (`body`, when known).
    pub fn check_frame(
        &self,
        expected: &Digest,
        body: Option<u64>,
    ) -> std::result::Result<(), String> {
        if self.digest != expected.0 {
            return Err("file is stored under another digest".into());
        }
        if self.payload_len > MAX_PAYLOAD {
            return Err(format!(
                "header says {} payload bytes, more than the limit of {MAX_PAYLOAD}",
                self.payload_len
            ));
        }
        if let Some(body) = body {
            if self.payload_len != body {
                return Err(format!(
                    "length mismatch: header says {} bytes, file has {body}",
                    self.payload_len
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
) -> std::result::Result<(), String> {
    if blake3::hash(payload).as_bytes() != &header.checksum {
        return Err("checksum mismatch".into());
    }
    if let Some(key) = key {
        if !header.is_signed() {
            return Err("artifact is not signed, and ISOCACHE_KEY is set".into());
        }
        let expected_sig = sign(key, &raw_header[..96], payload);
        // Compare through blake3's constant-time Hash equality.
        if blake3::Hash::from(expected_sig) != blake3::Hash::from(header.signature) {
            return Err("signature does not match ISOCACHE_KEY".into());
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
) -> std::result::Result<(Header, std::ops::Range<usize>), String> {
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
) -> Vec<u8> {
    let mut header = Header {
        version: FORMAT_VERSION,
        flags: if key.is_some() { FLAG_SIGNED } else { 0 },
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
        let image = file_image(&d, b"payload", 2.5, None);
        assert_eq!(image.len(), HEADER_LEN + 7);
        let (h, range) = check_file(&image, &d, None).unwrap();
        assert_eq!(&image[range], b"payload");
        assert_eq!(h.compile_seconds, 2.5);
        assert!(!h.is_signed());
        let k = key(b"a secret of 16+ bytes");
        let signed = file_image(&d, b"payload", 0.0, Some(&k));
        assert!(check_file(&signed, &d, Some(&k)).unwrap().0.is_signed());
        // A store without a key still reads signed images.
        assert!(check_file(&signed, &d, None).is_ok());
    }

    #[test]
    fn every_check_names_its_reason() {
        let d = digest(2);
        let k = key(b"a secret of 16+ bytes");
        let image = file_image(&d, b"payload bytes", 0.0, None);
        let reason = |bytes: &[u8], key: Option<&[u8; 32]>| check_file(bytes, &d, key).unwrap_err();
        assert!(reason(&image[..20], None).contains("truncated"));
        assert!(reason(&image[..image.len() - 1], None).contains("length"));
        let mut flipped = image.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(reason(&flipped, None).contains("checksum"));
        let mut magic = image.clone();
        magic[0] = b'X';
        assert!(reason(&magic, None).contains("magic"));
        let mut version = image.clone();
        version[8] = 9;
        assert!(reason(&version, None).contains("version"));
        assert!(check_file(&image, &digest(3), None)
            .unwrap_err()
            .contains("another digest"));
        assert!(reason(&image, Some(&k)).contains("not signed"));
        let other = key(b"another secret, 16+");
        let signed = file_image(&d, b"payload bytes", 0.0, Some(&other));
        assert!(reason(&signed, Some(&k)).contains("signature"));
        let mut huge = image.clone();
        huge[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(reason(&huge, None).contains("limit"));
    }
}
