//! ONNX's integer matrix products in every 8-bit convention, on the same kernels.
//!
//! `MatMulInteger` is `Y = (A − z_a)·(B − z_b)` in i32 and `QLinearMatMul` requantizes that
//! to `s_y`, with A and B each u8 or i8 and `z_b` per tensor or per column. The kernels
//! multiply u8 by i8; the other conventions reach them through exact identities:
//! - i8 activations: `a = (a ⊕ 0x80) − 128`, so `a ⊕ 0x80` (u8) with zero point `z_a + 128`
//!   gives the same differences; one pass flips the sign bits as the rows are read.
//! - u8 weights: `w − 128` is i8, with zero point `z_b − 128` ([`PackedWeights::from_int8`]).
//! - nonzero weight zero points: `Σ_k (a − z_a)(w − z_w) = Σ_k (a − z_a)·w − z_w·Σ_k (a − z_a)`,
//!   the second term from one row sum per output row.
//! - i8 outputs: requantize on the u8 grid with the zero point moved by 128, then flip the
//!   sign bit.
//!
//! The i32 results are exact (equal to ORT's `MatMulInteger`) whenever the true value fits
//! i32 (always for `k ≤ 33,025`); beyond, they wrap modulo 2³² as ORT's do.

use super::epilogue::{Epilogue, I32Out, Requantize};
use super::gemm;
use super::pack::{PackedWeights, MAX_NR};
use crate::error::{Error, Result};
use ndarray::{Array, Array4, ArrayView, ArrayViewMut2, CowArray, Dimension, Ix2, Ix4};

/// An 8-bit integer array view in either of ONNX's conventions.
#[derive(Clone, Copy, Debug)]
pub enum Int8View<'a, D: Dimension> {
    /// Unsigned bytes (ONNX `uint8`).
    U8(ArrayView<'a, u8, D>),
    /// Signed bytes (ONNX `int8`).
    I8(ArrayView<'a, i8, D>),
}

/// An 8-bit matrix (activations `[m, k]`, or weights `[n, k]`).
pub type Int8Matrix<'a> = Int8View<'a, Ix2>;

/// An 8-bit NCHW tensor (or `[O, C/groups, kh, kw]` weights).
pub type Int8Tensor4<'a> = Int8View<'a, Ix4>;

impl<'a, D: Dimension> Int8View<'a, D> {
    /// The shape.
    pub fn dim(&self) -> D::Pattern {
        match self {
            Int8View::U8(a) => a.dim(),
            Int8View::I8(a) => a.dim(),
        }
    }

    pub(crate) fn is_unsigned(&self) -> bool {
        matches!(self, Int8View::U8(_))
    }

    /// The values as i8 (u8 moved down by 128).
    pub(crate) fn into_i8(self) -> Array<i8, D> {
        match self {
            Int8View::U8(a) => a.mapv(|v| (v ^ 0x80) as i8),
            Int8View::I8(a) => a.to_owned(),
        }
    }

    /// The values as u8 with `zero_point` in their type's range, moved with them: as they
    /// are, or i8 with the sign bit flipped (`a ⊕ 0x80 = a + 128`).
    fn into_u8(self, zero_point: i32, what: &str) -> Result<(CowArray<'a, u8, D>, u8)> {
        let bad = |range: &str| {
            Err(Error::config(
                what,
                format!("zero point {zero_point} is outside {range}"),
            ))
        };
        match self {
            Int8View::U8(a) => match u8::try_from(zero_point) {
                Ok(z) => Ok((CowArray::from(a), z)),
                Err(_) => bad("0..=255"),
            },
            Int8View::I8(a) => match i8::try_from(zero_point) {
                Ok(z) => Ok((
                    CowArray::from(a.mapv(|v| (v as u8) ^ 0x80)),
                    (z as u8) ^ 0x80,
                )),
                Err(_) => bad("-128..=127"),
            },
        }
    }
}

/// A mutable 8-bit output matrix in either convention.
#[derive(Debug)]
pub enum Int8MatrixMut<'a> {
    /// Unsigned bytes (ONNX `uint8`).
    U8(ArrayViewMut2<'a, u8>),
    /// Signed bytes (ONNX `int8`).
    I8(ArrayViewMut2<'a, i8>),
}

/// An 8-bit NCHW result in either convention.
#[derive(Clone, Debug, PartialEq)]
pub enum Int8Array4 {
    /// Unsigned bytes (ONNX `uint8`).
    U8(Array4<u8>),
    /// Signed bytes (ONNX `int8`).
    I8(Array4<i8>),
}

/// Checks 8-bit weight zero points (one, or one per output channel, in the type's range)
/// and returns them per channel on the i8 grid (u8 ones moved down by 128), or `None` when
/// all are zero there.
pub(crate) fn check_zero_points(
    what: &str,
    unsigned: bool,
    zero_points: &[i32],
    channels: usize,
) -> Result<Option<Vec<i32>>> {
    let (range, shift) = if unsigned {
        (0..=255, 128)
    } else {
        (-128..=127, 0)
    };
    if zero_points.len() != 1 && zero_points.len() != channels {
        return Err(Error::config(
            what,
            format!(
                "{} zero points for {channels} output channels (1 or {channels})",
                zero_points.len()
            ),
        ));
    }
    if let Some(z) = zero_points.iter().find(|z| !range.contains(*z)) {
        return Err(Error::config(
            what,
            format!("zero point {z} is outside {range:?}"),
        ));
    }
    let shifted: Vec<i32> = (0..channels)
        .map(|c| zero_points[c.min(zero_points.len() - 1)] - shift)
        .collect();
    Ok(shifted.iter().any(|&z| z != 0).then_some(shifted))
}

/// ONNX `MatMulInteger` (plus an optional i32 bias per column):
/// `out[m, n] = Σ_k (a[m, k] − z_a)·(w[n, k] − z_w[n]) + bias[n]`, with `a` u8 or i8 and
/// `w` packed by [`PackedWeights::from_int8`] (or [`PackedWeights::new`]).
///
/// # Errors
/// [`Error::InvalidConfig`] for a zero point outside `a`'s type range;
/// [`Error::ShapeMismatch`] as [`gemm_u8i8_i32`](super::gemm_u8i8_i32).
pub fn matmul_integer(
    a: Int8Matrix<'_>,
    a_zero_point: i32,
    w: &PackedWeights,
    bias: Option<&[i32]>,
    out: ArrayViewMut2<i32>,
) -> Result<()> {
    let (rows, z) = a.into_u8(a_zero_point, "integer matmul activations")?;
    gemm::run(rows.view(), z, w, &I32Out { bias }, out)
}

/// ONNX `QLinearMatMul`: [`matmul_integer`] requantized to u8 or i8 by `requant`, whose
/// output type must be `out`'s (see [`Requantize::from_scales`]).
///
/// # Errors
/// [`Error::InvalidConfig`] for a zero point outside `a`'s type range or a `requant` made for
/// the other output type; [`Error::ShapeMismatch`] as
/// [`gemm_u8i8_u8`](super::gemm_u8i8_u8).
pub fn qlinear_matmul(
    a: Int8Matrix<'_>,
    a_zero_point: i32,
    w: &PackedWeights,
    requant: &Requantize,
    out: Int8MatrixMut<'_>,
) -> Result<()> {
    let (rows, z) = a.into_u8(a_zero_point, "integer matmul activations")?;
    match out {
        Int8MatrixMut::U8(out) => {
            requant.check_signed(false)?;
            gemm::run(rows.view(), z, w, requant, out)
        }
        Int8MatrixMut::I8(out) => {
            requant.check_signed(true)?;
            gemm::run(rows.view(), z, w, &SignedOut(requant), out)
        }
    }
}

/// The requantizing epilogue with i8 output: `requant` works on the u8 grid (its zero point
/// moved up by 128) and the sign bit is flipped on the way out.
pub(crate) struct SignedOut<'a>(pub &'a Requantize);

impl Epilogue for SignedOut<'_> {
    type Out = i8;
    fn columns(&self) -> Option<usize> {
        Epilogue::columns(self.0)
    }
    #[inline(always)]
    fn apply(&self, n: usize, acc: i32) -> i8 {
        (Epilogue::apply(self.0, n, acc) ^ 0x80) as i8
    }
    #[inline(always)]
    fn apply_row(&self, n0: usize, acc: &[i32], corr: &[i32], out: &mut [i8]) {
        let mut buf = [0u8; MAX_NR];
        for (c, chunk) in out.chunks_mut(MAX_NR).enumerate() {
            let (len, at) = (chunk.len(), c * MAX_NR);
            self.0.apply_row(
                n0 + at,
                &acc[at..at + len],
                &corr[at..at + len],
                &mut buf[..len],
            );
            for (o, &b) in chunk.iter_mut().zip(&buf[..len]) {
                *o = (b ^ 0x80) as i8;
            }
        }
    }
}

/// ONNX `ConvInteger` (plus an optional i32 bias per output channel), NCHW:
/// `Σ (x − z_x)·(w − z_w[o]) + bias[o]` over each window, with `x` u8 or i8, the weights
/// packed by [`PackedConv::from_int8`](super::PackedConv::from_int8), padding (asymmetric
/// pads included) reading the zero point, i.e. real 0.
///
/// # Errors
/// [`Error::InvalidConfig`] for a zero point outside `x`'s type range, and as
/// [`conv2d_u8i8_i32`](super::conv2d_u8i8_i32).
pub fn conv_integer(
    x: Int8Tensor4<'_>,
    x_zero_point: i32,
    conv: &super::PackedConv,
    bias: Option<&[i32]>,
) -> Result<Array4<i32>> {
    let (x, z) = x.into_u8(x_zero_point, "integer conv input")?;
    super::conv2d_u8i8_i32(x.view(), z, conv, bias)
}

/// ONNX `QLinearConv`, NCHW: [`conv_integer`] requantized by `requant` (its bias on the
/// accumulator's scale), to u8 or i8 as `requant` was made for (see
/// [`Requantize::from_scales`]).
///
/// # Errors
/// As [`conv_integer`] and [`conv2d_u8i8_u8`](super::conv2d_u8i8_u8).
pub fn qlinear_conv(
    x: Int8Tensor4<'_>,
    x_zero_point: i32,
    conv: &super::PackedConv,
    requant: &Requantize,
) -> Result<Int8Array4> {
    let (x, z) = x.into_u8(x_zero_point, "integer conv input")?;
    if requant.is_signed() {
        super::conv::conv2d_signed_out(x.view(), z, conv, &SignedOut(requant)).map(Int8Array4::I8)
    } else {
        super::conv2d_u8i8_u8(x.view(), z, conv, requant).map(Int8Array4::U8)
    }
}
