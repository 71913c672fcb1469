//! Naive int8 references: the definitions every optimised path must equal exactly.
//!
//! No packing, no tiling, no `unsafe`: loops straight from the formulas, accumulating in i64
//! and checking that the result fits i32.

use crate::error::{Error, Result};
use crate::tensor::ConvGeometry;
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

fn to_i32(v: i64, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Unsupported(format!("{what}: accumulator {v} overflows i32")))
}

/// `out[m, n] = Σ_k (a[m, k] − z_a) · w[n, k]`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `a` and `w` differ in `k`; [`Error::Unsupported`] if a sum
/// does not fit i32.
pub fn gemm_u8i8_i32(
    a: ArrayView2<u8>,
    a_zero_point: u8,
    w: ArrayView2<i8>,
) -> Result<Array2<i32>> {
    let (m, k) = a.dim();
    let (n, kw) = w.dim();
    if k != kw {
        return Err(Error::shape(
            "reference gemm",
            None,
            format!("w [n, {k}]"),
            w.shape(),
        ));
    }
    let mut out = Array2::<i32>::zeros((m, n));
    for i in 0..m {
        for j in 0..n {
            let mut s = 0i64;
            for p in 0..k {
                s += (a[[i, p]] as i64 - a_zero_point as i64) * w[[j, p]] as i64;
            }
            out[[i, j]] = to_i32(s, "reference gemm")?;
        }
    }
    Ok(out)
}

/// `out[n, o, y, x] = Σ_{c, i, j} (x[n, g·C_g + c, y·s − p + i·d, x·s − p + j·d] − z_x) · w[o, c, i, j]`
/// with `g = o / (O / groups)`, padding contributing 0.
///
/// # Errors
/// [`Error::ShapeMismatch`] / [`Error::InvalidConfig`] when the shapes and `geo` disagree.
pub fn conv2d_u8i8_i32(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    w: ArrayView4<i8>,
    geo: &ConvGeometry,
) -> Result<Array4<i32>> {
    let [oh, ow] = geo.output_hw()?;
    let (n, c, h, wd) = x.dim();
    let (o, cg, kh, kw) = w.dim();
    if c != geo.in_channels
        || h != geo.in_h
        || wd != geo.in_w
        || cg * geo.groups != c
        || [kh, kw] != geo.kernel
        || o % geo.groups != 0
    {
        return Err(Error::shape(
            "reference conv",
            None,
            format!("{geo:?}"),
            w.shape(),
        ));
    }
    let og = o / geo.groups;
    let mut out = Array4::<i32>::zeros((n, o, oh, ow));
    for b in 0..n {
        for oc in 0..o {
            let g = oc / og;
            for y in 0..oh {
                for xo in 0..ow {
                    let mut s = 0i64;
                    for ci in 0..cg {
                        for i in 0..kh {
                            for j in 0..kw {
                                let sy = (y * geo.stride[0] + i * geo.dilation[0]) as isize
                                    - geo.padding[0] as isize;
                                let sx = (xo * geo.stride[1] + j * geo.dilation[1]) as isize
                                    - geo.padding[1] as isize;
                                if sy < 0 || sx < 0 || sy as usize >= h || sx as usize >= wd {
                                    continue;
                                }
                                let v = x[[b, g * cg + ci, sy as usize, sx as usize]] as i64
                                    - x_zero_point as i64;
                                s += v * w[[oc, ci, i, j]] as i64;
                            }
                        }
                    }
                    out[[b, oc, y, xo]] = to_i32(s, "reference conv")?;
                }
            }
        }
    }
    Ok(out)
}
