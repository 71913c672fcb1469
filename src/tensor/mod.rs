//! Tensors: thin aliases over `ndarray`, shape checks, and the im2col / col2im lowering that
//! turns a convolution into a GEMM.
//!
//! Layout is NCHW throughout: activations `[batch, channels, height, width]`, conv weights
//! `[out_channels, in_channels / groups, kernel_h, kernel_w]`, linear weights
//! `[out_features, in_features]` (the PyTorch layouts).

mod im2col;
mod quant;
mod value;

pub use im2col::{col2im_add, im2col, ConvGeometry, Im2colPlan};
pub(crate) use quant::min_max_finite;
pub use quant::QuantGrid;
pub use value::{DType, Value};

use crate::error::{Error, Result};
use ndarray::{Array2, Array4, ArrayD, ArrayView2, ArrayView4, Ix2, Ix4};

/// A dynamic-rank f32 tensor; the batch is always axis 0.
pub type Tensor = ArrayD<f32>;
/// A 4-D f32 tensor in NCHW layout.
pub type Tensor4 = Array4<f32>;
/// A 2-D f32 tensor `[batch, features]`.
pub type Tensor2 = Array2<f32>;

/// Below this many elements of work a loop runs on the calling thread: handing tiny loops to
/// rayon costs a thread wake-up and a context switch, more than the loop itself (a LeNet-5
/// forward pass at batch 1 spent most of its time there).
const PAR_MIN_WORK: usize = 1 << 16;

/// Whether a loop over `work` elements is worth splitting across rayon's threads.
pub(crate) fn parallel(work: usize) -> bool {
    work >= PAR_MIN_WORK && rayon::current_num_threads() > 1
}

/// Views `t` as 4-D, or returns a [`Error::ShapeMismatch`] naming `op` and `node`.
///
/// # Errors
/// When `t` does not have rank 4.
pub fn as_4d<'a>(t: &'a Tensor, op: &str, node: Option<&str>) -> Result<ArrayView4<'a, f32>> {
    view_4d(t.view(), op, node)
}

/// [`as_4d`] of a view.
pub(crate) fn view_4d<'a>(
    v: ndarray::ArrayViewD<'a, f32>,
    op: &str,
    node: Option<&str>,
) -> Result<ArrayView4<'a, f32>> {
    let shape = v.shape().to_vec();
    v.into_dimensionality::<Ix4>()
        .map_err(|_| Error::shape(op, node, "a 4-D tensor [N, C, H, W]", &shape))
}

/// Views `t` as 2-D, or returns a [`Error::ShapeMismatch`] naming `op` and `node`.
///
/// # Errors
/// When `t` does not have rank 2.
pub fn as_2d<'a>(t: &'a Tensor, op: &str, node: Option<&str>) -> Result<ArrayView2<'a, f32>> {
    view_2d(t.view(), op, node)
}

/// [`as_2d`] of a view.
pub(crate) fn view_2d<'a>(
    v: ndarray::ArrayViewD<'a, f32>,
    op: &str,
    node: Option<&str>,
) -> Result<ArrayView2<'a, f32>> {
    let shape = v.shape().to_vec();
    v.into_dimensionality::<Ix2>()
        .map_err(|_| Error::shape(op, node, "a 2-D tensor [N, features]", &shape))
}

/// Returns an error naming the first non-finite element of `t`, if any.
///
/// # Errors
/// [`Error::NonFinite`] when `t` holds NaN or infinity.
pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    // A flat slice when there is one: the generic n-d iterator is several times slower.
    let finite = match t.as_slice_memory_order() {
        Some(s) => s.iter().fold(true, |ok, v| ok & v.is_finite()),
        None => t.iter().all(|v| v.is_finite()),
    };
    if finite {
        Ok(())
    } else {
        Err(Error::NonFinite(what.to_string()))
    }
}
