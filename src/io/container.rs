//! The envelope shared by the crate's own file formats (`.nnq`, `.nndc`): a 4-byte magic, a
//! format version, the payload length and a CRC-32 of the payload, so that a truncated,
//! padded, mis-versioned or damaged file is caught before its payload is parsed.
//!
//! ```text
//! offset  size  field
//! 0       4     magic
//! 4       4     format version, u32 little-endian
//! 8       8     payload length in bytes, u64 little-endian
//! 16      4     CRC-32 (IEEE) of the payload, u32 little-endian
//! 20      ...   payload
//! ```

use crate::error::{Error, Result};
use std::path::Path;

/// Bytes before the payload.
pub(crate) const HEADER: usize = 20;

/// Wraps `payload` in the envelope.
pub(crate) fn wrap(magic: &[u8; 4], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut crc = flate2::Crc::new();
    crc.update(payload);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the envelope of a `kind` file (e.g. `"nnq"`) and returns its payload.
///
/// # Errors
/// [`Error::CorruptFile`] for a short file, another magic, another version, a length that
/// does not match or a checksum mismatch.
pub(crate) fn unwrap<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    version: u32,
    kind: &str,
    path: Option<&Path>,
) -> Result<&'a [u8]> {
    let bad = |r: String| Error::corrupt(path, r);
    if bytes.len() < HEADER {
        return Err(bad(format!(
            "{} bytes is shorter than the {HEADER}-byte header",
            bytes.len()
        )));
    }
    if &bytes[..4] != magic {
        return Err(bad(format!(
            "not an {kind} file (magic is not \"{}\")",
            String::from_utf8_lossy(magic)
        )));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let found = word(4);
    if found != version {
        return Err(bad(format!(
            "{kind} version {found}; this build reads version {version}"
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let len = u64::from_le_bytes(len);
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(bad(format!(
            "header says {len} payload bytes, the file has {} (truncated or padded)",
            payload.len()
        )));
    }
    let mut crc = flate2::Crc::new();
    crc.update(payload);
    if crc.sum() != word(16) {
        return Err(bad("checksum mismatch".into()));
    }
    Ok(payload)
}
