//! NumPy `.npy` arrays (format versions 1–3), the way calibration data usually leaves
//! Python: little-endian `f4` (or `f8`, narrowed) in C order.

use crate::error::{Error, Result};
use crate::limits::Limits;
use ndarray::{ArrayD, IxDyn};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

fn corrupt(path: Option<&Path>, reason: impl Into<String>) -> Error {
    Error::CorruptFile {
        path: path.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

/// Reads a float `.npy` file (see [`npy_from_bytes`]).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; as [`npy_from_bytes`].
pub fn load_npy(path: impl AsRef<Path>, limits: &Limits) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes, Some(path), limits)
}

/// A float array from `.npy` bytes: `<f4` as it is, `<f8` narrowed to f32; C order only.
///
/// # Errors
/// [`Error::CorruptFile`] for a bad magic, a header that is not the dictionary NumPy
/// writes or runs past the data, or data shorter or longer than the shape says;
/// [`Error::UnsupportedDtype`] for other element types and Fortran order;
/// [`Error::LimitExceeded`] for a shape past `limits` (checked before allocating).
///
/// # Examples
/// ```
/// use nncompress::io::npy_from_bytes;
/// let mut file = b"\x93NUMPY\x01\x00".to_vec();
/// let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
/// let padded = format!("{header:<117}\n"); // 10 + 118 = 128 bytes
/// file.extend_from_slice(&(padded.len() as u16).to_le_bytes());
/// file.extend_from_slice(padded.as_bytes());
/// for v in [1.5f32, -2.0] {
///     file.extend_from_slice(&v.to_le_bytes());
/// }
/// let a = npy_from_bytes(&file, &Default::default())?;
/// assert_eq!(a.as_slice().unwrap(), &[1.5, -2.0]);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn npy_from_bytes(bytes: &[u8], limits: &Limits) -> Result<ArrayD<f32>> {
    parse(bytes, None, limits)
}

fn parse(bytes: &[u8], path: Option<&Path>, limits: &Limits) -> Result<ArrayD<f32>> {
    let bad = |why: &str| corrupt(path, format!("not a .npy array: {why}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("no NumPy magic"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (
            usize::from(u16::from_le_bytes([bytes[8], bytes[9]])),
            10usize,
        ),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("an unknown format version")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("a header past the end of the file"))?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| bad("a header not UTF-8"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    let fortran = field("fortran_order").ok_or_else(|| bad("no fortran_order"))?;
    if !fortran.starts_with("False") {
        return Err(Error::UnsupportedDtype {
            name: "npy array".into(),
            dtype: "Fortran order".into(),
        });
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let mut shape = Vec::new();
    for part in shape_text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if shape.len() >= 32 {
            return Err(bad("more than 32 axes"));
        }
        shape.push(
            part.parse::<usize>()
                .map_err(|_| bad("a shape entry that is not a size"))?,
        );
    }
    let count = limits.check_elements(&shape, "npy array")?;
    let data = &bytes[end..];
    let width = match descr {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(Error::UnsupportedDtype {
                name: "npy array".into(),
                dtype: other.into(),
            })
        }
    };
    if Some(data.len()) != count.checked_mul(width) {
        return Err(bad(&format!(
            "{} data bytes for {count} elements of {width} bytes",
            data.len()
        )));
    }
    let values: Vec<f32> = if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect()
    };
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| bad(&e.to_string()))
}

/// Writes `a` as a version-1 `<f4` `.npy` file's bytes.
pub fn npy_to_bytes(a: &ArrayD<f32>) -> Vec<u8> {
    let dims: Vec<String> = a.shape().iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    let padded = format!("{header:<width$}\n", width = total - 11);
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&((padded.len()) as u16).to_le_bytes());
    out.extend_from_slice(padded.as_bytes());
    for v in a.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_lies() {
        let a = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |d| (d[0] * 3 + d[1]) as f32 - 1.5);
        let bytes = npy_to_bytes(&a);
        assert_eq!(
            (bytes.len() - 24) % 64,
            0,
            "the header is padded to 64 bytes"
        );
        let limits = Limits::default();
        assert_eq!(npy_from_bytes(&bytes, &limits).unwrap(), a);
        // Truncated data, a lying shape, a huge shape, another dtype, a bad header length.
        assert!(matches!(
            npy_from_bytes(&bytes[..bytes.len() - 1], &limits),
            Err(Error::CorruptFile { .. })
        ));
        // Edits of the header only, same length (the data bytes are not text).
        let swap = |from: &str, to: &str| {
            assert_eq!(from.len(), to.len());
            let mut t = bytes.clone();
            let at = t
                .windows(from.len())
                .position(|w| w == from.as_bytes())
                .unwrap();
            t[at..at + to.len()].copy_from_slice(to.as_bytes());
            npy_from_bytes(&t, &limits)
        };
        assert!(matches!(
            swap("(2, 3)", "(2, 4)"),
            Err(Error::CorruptFile { .. })
        ));
        assert!(matches!(
            swap("(2, 3), }   ", "(999999999,)"),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(matches!(
            swap("<f4", "<i8"),
            Err(Error::UnsupportedDtype { .. })
        ));
        assert!(matches!(
            swap("False", "True "),
            Err(Error::UnsupportedDtype { .. })
        ));
        let mut long = bytes.clone();
        long[8] = 0xff;
        long[9] = 0xff;
        assert!(matches!(
            npy_from_bytes(&long, &limits),
            Err(Error::CorruptFile { .. })
        ));
        for cut in 0..bytes.len() {
            let _ = npy_from_bytes(&bytes[..cut], &limits);
        }
    }
}
