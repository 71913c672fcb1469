//! Canonical Huffman coding of small-alphabet symbol streams (cluster indices and relative
//! indices), with code lengths capped so that decoding tables stay small.

use crate::error::{Error, Result};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Longest code length allowed.
pub const MAX_CODE_LEN: u8 = 24;

/// A canonical Huffman code: one length per symbol (0 for absent symbols).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HuffmanCode {
    lengths: Vec<u8>,
    /// Code of each symbol (valid where the length is not 0), MSB first.
    codes: Vec<u32>,
}

impl HuffmanCode {
    /// The optimal code lengths for `counts` (length-limited to [`MAX_CODE_LEN`] by
    /// flattening the counts when needed); a single used symbol gets length 1.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for more than 2²⁴ used symbols: no code within
    /// [`MAX_CODE_LEN`] bits exists for them (flattening the counts could never end).
    pub fn from_counts(counts: &[u64]) -> Result<Self> {
        let used = counts.iter().filter(|&&c| c > 0).count();
        if used > 1 << MAX_CODE_LEN {
            return Err(Error::config(
                "huffman code",
                format!("{used} used symbols do not fit codes of {MAX_CODE_LEN} bits"),
            ));
        }
        let mut scaled: Vec<u64> = counts.to_vec();
        loop {
            let lengths = lengths_of(&scaled);
            // With at most 2²⁴ symbols, counts flattened to all ones give a balanced tree of
            // depth ≤ 24, so the loop ends; those lengths always satisfy Kraft.
            if lengths.iter().all(|&l| l <= MAX_CODE_LEN) {
                return Self::from_lengths(lengths);
            }
            // Too deep (a very skewed distribution): flatten and retry.
            for c in scaled.iter_mut().filter(|c| **c > 0) {
                *c = (*c / 2).max(1);
            }
        }
    }

    /// The canonical code for the given lengths.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the lengths exceed [`MAX_CODE_LEN`] or over-subscribe
    /// the code space (Kraft sum above 1).
    pub fn from_lengths(lengths: Vec<u8>) -> Result<Self> {
        if lengths.iter().any(|&l| l > MAX_CODE_LEN) {
            return Err(Error::config(
                "huffman code",
                "a code length exceeds 24 bits",
            ));
        }
        let kraft: u64 = lengths
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 1u64 << (MAX_CODE_LEN - l))
            .sum();
        if kraft > 1u64 << MAX_CODE_LEN {
            return Err(Error::config(
                "huffman code",
                "code lengths over-subscribe the code space",
            ));
        }
        // Canonical assignment: by (length, symbol).
        let mut order: Vec<usize> = (0..lengths.len()).filter(|&s| lengths[s] > 0).collect();
        order.sort_by_key(|&s| (lengths[s], s));
        let mut codes = vec![0u32; lengths.len()];
        let mut code = 0u32;
        let mut prev_len = 0u8;
        for (i, &s) in order.iter().enumerate() {
            let l = lengths[s];
            if i > 0 {
                code += 1;
            }
            code <<= l - prev_len;
            prev_len = l;
            codes[s] = code;
        }
        Ok(HuffmanCode { lengths, codes })
    }

    /// Code length of every symbol.
    pub fn lengths(&self) -> &[u8] {
        &self.lengths
    }

    /// Encodes `symbols`, returning the bytes (MSB first, zero-padded) and the bit count.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a symbol without a code.
    pub fn encode(&self, symbols: &[u32]) -> Result<(Vec<u8>, u64)> {
        let mut w = BitWriter::default();
        for &s in symbols {
            let l = self.lengths.get(s as usize).copied().unwrap_or(0);
            if l == 0 {
                return Err(Error::config(
                    "huffman encode",
                    format!("symbol {s} has no code"),
                ));
            }
            w.put(self.codes[s as usize], l);
        }
        Ok(w.finish())
    }

    /// Decodes `count` symbols from `bytes` (`bits` valid bits).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the bits run out or do not form a code, or `count`
    /// exceeds `bits` (every symbol takes at least one bit).
    pub fn decode(&self, bytes: &[u8], bits: u64, count: usize) -> Result<Vec<u32>> {
        if bits > bytes.len() as u64 * 8 {
            return Err(Error::config(
                "huffman decode",
                "bit count exceeds the data",
            ));
        }
        // Each symbol takes at least one bit: more symbols than bits cannot decode, and the
        // count must not size the output before that is known.
        if count as u64 > bits {
            return Err(Error::config(
                "huffman decode",
                format!("{count} symbols cannot fit in {bits} bits"),
            ));
        }
        // Canonical decoding: per length, the first code and the symbols in code order.
        let max = self.lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut count_of = vec![0u32; max + 1];
        for &l in &self.lengths {
            if l > 0 {
                count_of[l as usize] += 1;
            }
        }
        let mut order: Vec<u32> = (0..self.lengths.len() as u32)
            .filter(|&s| self.lengths[s as usize] > 0)
            .collect();
        order.sort_by_key(|&s| (self.lengths[s as usize], s));
        let mut out = Vec::with_capacity(count);
        let mut pos = 0u64;
        for _ in 0..count {
            let (mut code, mut first, mut index) = (0u32, 0u32, 0u32);
            let mut found = None;
            for &n in &count_of[1..=max] {
                if pos >= bits {
                    break;
                }
                let bit = (bytes[(pos / 8) as usize] >> (7 - pos % 8)) & 1;
                pos += 1;
                code = (code << 1) | bit as u32;
                if code < first + n {
                    found = Some(order[(index + code - first) as usize]);
                    break;
                }
                index += n;
                first = (first + n) << 1;
            }
            match found {
                Some(s) => out.push(s),
                None => {
                    return Err(Error::config(
                        "huffman decode",
                        "bits run out or do not form a code",
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// Huffman code lengths (unlimited) for `counts`.
fn lengths_of(counts: &[u64]) -> Vec<u8> {
    let used: Vec<usize> = (0..counts.len()).filter(|&s| counts[s] > 0).collect();
    let mut lengths = vec![0u8; counts.len()];
    match used.len() {
        0 => return lengths,
        1 => {
            lengths[used[0]] = 1;
            return lengths;
        }
        _ => {}
    }
    // Nodes: leaves 0..n, internal nodes after; parent links give depths.
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(i, &s)| Reverse((counts[s], i)))
        .collect();
    while heap.len() > 1 {
        let Reverse((a, i)) = heap.pop().expect("two nodes");
        let Reverse((b, j)) = heap.pop().expect("two nodes");
        let k = parent.len();
        parent.push(usize::MAX);
        parent[i] = k;
        parent[j] = k;
        // Saturating: hostile counts near u64::MAX must not overflow (they only lose
        // optimality, never validity).
        heap.push(Reverse((a.saturating_add(b), k)));
    }
    for (i, &s) in used.iter().enumerate() {
        let (mut d, mut n) = (0u32, i);
        while parent[n] != usize::MAX {
            n = parent[n];
            d += 1;
        }
        lengths[s] = d.min(255) as u8;
    }
    lengths
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    bits: u64,
}

impl BitWriter {
    fn put(&mut self, code: u32, len: u8) {
        for i in (0..len).rev() {
            if self.bits.is_multiple_of(8) {
                self.bytes.push(0);
            }
            let bit = ((code >> i) & 1) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= bit << (7 - self.bits % 8);
            self.bits += 1;
        }
    }
    fn finish(self) -> (Vec<u8>, u64) {
        (self.bytes, self.bits)
    }
}
