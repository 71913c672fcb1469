//! Relative-index sparse storage (Han et al. 2016, §3): each nonzero is stored as the gap
//! from the previous one in `bits` bits; a gap too long for them is bridged by filler
//! entries that hold the zero symbol.

use crate::error::{Error, Result};
use crate::limits::Limits;

/// A sparse layer as two parallel symbol streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelativeIndex {
    /// Gap minus one of each entry, in `[0, 2^bits)`.
    pub gaps: Vec<u32>,
    /// Value symbol of each entry: a cluster index, or `filler` for a filler entry.
    pub values: Vec<u32>,
}

/// Encodes nonzeros at strictly increasing `positions` with `values` (cluster indices, each
/// `< filler`), gaps in `bits` bits, filler entries carrying `filler`.
///
/// # Errors
/// [`Error::InvalidConfig`] for `bits` outside `1..=16`, positions not strictly increasing,
/// mismatched lengths or a value equal to `filler`; [`Error::LimitExceeded`] for a position
/// past [`Limits::max_tensor_elements`].
pub fn encode(positions: &[u32], values: &[u32], bits: u32, filler: u32) -> Result<RelativeIndex> {
    if !(1..=16).contains(&bits) {
        return Err(Error::config(
            "relative index",
            format!("{bits} index bits (1 to 16)"),
        ));
    }
    if positions.len() != values.len() {
        return Err(Error::config(
            "relative index",
            "one value per position is needed",
        ));
    }
    let span = 1u64 << bits;
    // Bound the work before doing it: a position past any tensor the limits allow would
    // make up to 2^31 filler entries.
    let limit = Limits::default().max_tensor_elements;
    if let Some(&last) = positions.last() {
        if last as usize >= limit {
            return Err(Error::LimitExceeded {
                what: "relative index: position".into(),
                limit: limit as u64,
                requested: last as u64,
            });
        }
    }
    let mut out = RelativeIndex {
        gaps: Vec::with_capacity(positions.len()),
        values: Vec::with_capacity(positions.len()),
    };
    let mut prev: i64 = -1;
    for (&p, &v) in positions.iter().zip(values) {
        if v >= filler {
            return Err(Error::config(
                "relative index",
                format!("value symbol {v} collides with the filler {filler}"),
            ));
        }
        let mut gap = p as i64 - prev;
        if gap < 1 {
            return Err(Error::config(
                "relative index",
                "positions must be strictly increasing",
            ));
        }
        while gap as u64 > span {
            out.gaps.push((span - 1) as u32);
            out.values.push(filler);
            gap -= span as i64;
        }
        out.gaps.push((gap - 1) as u32);
        out.values.push(v);
        prev = p as i64;
    }
    Ok(out)
}

/// Decodes entries back into `(position, value)` pairs (fillers dropped).
///
/// # Errors
/// [`Error::InvalidConfig`] when the streams differ in length or a position passes `len`.
pub fn decode(index: &RelativeIndex, filler: u32, len: usize) -> Result<Vec<(u32, u32)>> {
    if index.gaps.len() != index.values.len() {
        return Err(Error::config("relative index", "streams differ in length"));
    }
    let mut out = Vec::with_capacity(index.values.len());
    let mut pos: i64 = -1;
    for (&g, &v) in index.gaps.iter().zip(&index.values) {
        pos += g as i64 + 1;
        if pos >= len as i64 {
            return Err(Error::config(
                "relative index",
                format!("position {pos} is past the layer's {len} weights"),
            ));
        }
        if v != filler {
            out.push((pos as u32, v));
        }
    }
    Ok(out)
}
