//! Resource limits: how much a reader or a call may allocate on the word of its input.
//!
//! Every count a loader reads from a file is bounded twice before anything is allocated:
//! by the bytes that could encode it (a Huffman stream of `b` bits holds at most `b`
//! symbols, a tensor stored densely needs its bytes in the file), and by a limit of this
//! struct, so that a short hostile file cannot make the process reserve gigabytes. Calls
//! that size an allocation from their arguments (building a layer, a weight from a sparse
//! description) use the same limits.
//!
//! | limit | default | enforced by |
//! |---|---|---|
//! | [`Limits::max_tensor_elements`] | 2²⁸ (1 GiB of f32) | `.nndc` and `.nnq` layers, IDX images, digits CSV, `GraphBuilder` layers, `SharedLayer::weight` |
//! | [`Limits::max_decompressed_bytes`] | 1 GiB | gzip streams (`load_mnist`, `load_digits`) |
//!
//! A trusted, larger input is read by passing raised limits to the `*_with_limits`
//! variant of the loader:
//! ```
//! use nncompress::limits::Limits;
//! let big = Limits { max_tensor_elements: 1 << 32, ..Limits::default() };
//! assert!(big.check_elements(&[1 << 16, 1 << 15], "embedding").is_ok());
//! assert!(Limits::default().check_elements(&[1 << 16, 1 << 15], "embedding").is_err());
//! ```

use crate::error::{Error, Result};

/// The resource limits of one read or call (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Elements one tensor may have.
    pub max_tensor_elements: usize,
    /// Bytes a compressed stream may inflate to.
    pub max_decompressed_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tensor_elements: 1 << 28,
            max_decompressed_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// The element count of `shape`, checked for overflow and against
    /// [`Limits::max_tensor_elements`].
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] when the product overflows or passes the limit.
    pub fn check_elements(&self, shape: &[usize], what: &str) -> Result<usize> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match n {
            Some(n) if n <= self.max_tensor_elements => Ok(n),
            _ => Err(Error::LimitExceeded {
                what: format!("{what}: elements of shape {shape:?}"),
                limit: self.max_tensor_elements as u64,
                requested: n.map_or(u64::MAX, |n| n as u64),
            }),
        }
    }
}
