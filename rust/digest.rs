//! `Digest`: the 32-byte name of a piece. It is made once per piece (by the
//! canonical encoder, or parsed once from 64 lowercase hex characters) and
//! keys the index and the store from then on.

use crate::error::{Error, Result};

/// A validated 32-byte digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses 64 lowercase hex characters; anything else is `InvalidDigest`.
    pub fn parse(hex: &str) -> Result<Digest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::InvalidDigest(hex.to_owned()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| Error::InvalidDigest(hex.to_owned()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| Error::InvalidDigest(hex.to_owned()))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Digest(out))
    }

    /// 64 lowercase hex characters.
    pub fn hex(&self) -> String {
        crate::canon::to_hex(&self.0)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_hex_round_trip() {
        let d = Digest(*blake3::hash(b"x").as_bytes());
        assert_eq!(Digest::parse(&d.hex()).unwrap(), d);
        assert_eq!(d.hex().len(), 64);
    }

    #[test]
    fn only_64_lowercase_hex_characters_parse() {
        let d = Digest(*blake3::hash(b"y").as_bytes());
        for bad in [
            "abc".to_string(),
            d.hex().to_uppercase(),
            "g".repeat(64),
            format!("{}0", d.hex()),
            format!("../{}", &d.hex()[3..]),
        ] {
            assert!(
                matches!(Digest::parse(&bad), Err(Error::InvalidDigest(_))),
                "{bad}"
            );
        }
    }
}
