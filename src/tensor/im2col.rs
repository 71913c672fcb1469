//! im2col / col2im for NCHW convolutions with stride, padding, dilation and groups.
//!
//! For one group, `im2col` builds the matrix `cols` of shape
//! `[C_g·kh·kw, N·OH·OW]`: row `(c, i, j)` (in the order of the weight's flattened
//! `[C_g, kh, kw]`) and column `(n, oh, ow)` hold
//! `x[n, g·C_g + c, oh·s_h − p_h + i·d_h, ow·s_w − p_w + j·d_w]`, or 0 in the padding.
//! The group's output is then the single GEMM `W_g · cols` of shape `[O_g, N·OH·OW]`,
//! batched over all images so that even LeNet-sized layers give the GEMM enough columns.

use crate::error::{Error, Result};
use ndarray::{s, Array2, ArrayView2, ArrayView4, ArrayViewMut4, Axis};
use rayon::prelude::*;

/// The geometry of a 2-D convolution (or pooling window) over one input shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels (all groups).
    pub in_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Kernel `[height, width]`.
    pub kernel: [usize; 2],
    /// Stride `[height, width]`.
    pub stride: [usize; 2],
    /// Zero padding added on each side `[height, width]`.
    pub padding: [usize; 2],
    /// Dilation `[height, width]`.
    pub dilation: [usize; 2],
    /// Number of channel groups.
    pub groups: usize,
}

impl ConvGeometry {
    /// Checks the geometry and returns the output `[height, width]`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero kernel, stride, dilation or group count, groups that
    /// do not divide the channels, or a window larger than the padded input.
    pub fn output_hw(&self) -> Result<[usize; 2]> {
        let what = "convolution geometry";
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(Error::config(
                what,
                "kernel, stride and dilation must be at least 1",
            ));
        }
        if self.groups == 0 || self.in_channels % self.groups != 0 {
            return Err(Error::config(
                what,
                format!(
                    "groups ({}) must divide the input channels ({})",
                    self.groups, self.in_channels
                ),
            ));
        }
        let mut out = [0; 2];
        let size = [self.in_h, self.in_w];
        for a in 0..2 {
            let padded = size[a] + 2 * self.padding[a];
            let span = self.dilation[a] * (self.kernel[a] - 1) + 1;
            if span > padded {
                return Err(Error::config(
                    what,
                    format!(
                        "window of {span} does not fit the padded input of {padded} (axis {a})"
                    ),
                ));
            }
            out[a] = (padded - span) / self.stride[a] + 1;
        }
        Ok(out)
    }

    /// Channels per group.
    pub fn group_channels(&self) -> usize {
        self.in_channels / self.groups.max(1)
    }

    /// Rows of the group's column matrix: `C_g · kh · kw`.
    pub fn col_rows(&self) -> usize {
        self.group_channels() * self.kernel[0] * self.kernel[1]
    }

    /// Input coordinate along axis `a` for output index `o` and kernel tap `t`, or `None` in
    /// the padding.
    #[inline]
    fn source(&self, a: usize, o: usize, t: usize, size: usize) -> Option<usize> {
        let pos = (o * self.stride[a] + t * self.dilation[a]) as isize - self.padding[a] as isize;
        (pos >= 0 && (pos as usize) < size).then_some(pos as usize)
    }
}

/// Builds the column matrix of group `group` of `x` (see the module docs).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `x` does not match the geometry, or the geometry's own
/// errors from [`ConvGeometry::output_hw`].
pub fn im2col(x: ArrayView4<f32>, geo: &ConvGeometry, group: usize) -> Result<Array2<f32>> {
    let [oh, ow] = geo.output_hw()?;
    let (n, c, h, w) = x.dim();
    if c != geo.in_channels || h != geo.in_h || w != geo.in_w || group >= geo.groups {
        return Err(Error::shape(
            "im2col",
            None,
            format!(
                "[N, {}, {}, {}] and group < {}",
                geo.in_channels, geo.in_h, geo.in_w, geo.groups
            ),
            x.shape(),
        ));
    }
    let cg = geo.group_channels();
    let [kh, kw] = geo.kernel;
    let plane = oh * ow;
    let mut cols = Array2::<f32>::zeros((geo.col_rows(), n * plane));
    if cols.is_empty() {
        return Ok(cols);
    }
    let row_len = n * plane;
    let buf = cols
        .as_slice_mut()
        .ok_or_else(|| Error::Unsupported("non-contiguous column buffer".into()))?;
    buf.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, out)| {
            let ch = group * cg + row / (kh * kw);
            let i = (row / kw) % kh;
            let j = row % kw;
            for b in 0..n {
                let img = x.slice(s![b, ch, .., ..]);
                for y in 0..oh {
                    let dst = &mut out[b * plane + y * ow..b * plane + (y + 1) * ow];
                    let Some(sy) = geo.source(0, y, i, h) else {
                        continue; // whole output row reads padding: stays zero
                    };
                    let src = img.row(sy);
                    for (xo, d) in dst.iter_mut().enumerate() {
                        if let Some(sx) = geo.source(1, xo, j, w) {
                            *d = src[sx];
                        }
                    }
                }
            }
        });
    Ok(cols)
}

/// Adds the column-matrix gradient `cols` of group `group` back into `dx` (the adjoint of
/// [`im2col`]).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `dx` or `cols` do not match the geometry.
pub fn col2im_add(
    cols: ArrayView2<f32>,
    geo: &ConvGeometry,
    group: usize,
    mut dx: ArrayViewMut4<f32>,
) -> Result<()> {
    let [oh, ow] = geo.output_hw()?;
    let (n, c, h, w) = dx.dim();
    let plane = oh * ow;
    if c != geo.in_channels
        || h != geo.in_h
        || w != geo.in_w
        || group >= geo.groups
        || cols.dim() != (geo.col_rows(), n * plane)
    {
        return Err(Error::shape(
            "col2im",
            None,
            format!("columns [{}, {}]", geo.col_rows(), n * plane),
            cols.shape(),
        ));
    }
    let cg = geo.group_channels();
    let [kh, kw] = geo.kernel;
    // One task per (image, channel) plane: each plane is written by exactly one task, and
    // the summation order inside it is fixed, so the result does not depend on threads.
    dx.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut img)| {
            for cl in 0..cg {
                let mut plane_out = img.index_axis_mut(Axis(0), group * cg + cl);
                for i in 0..kh {
                    for j in 0..kw {
                        let row = cols.row((cl * kh + i) * kw + j);
                        for y in 0..oh {
                            let Some(sy) = geo.source(0, y, i, h) else {
                                continue;
                            };
                            let base = b * plane + y * ow;
                            for xo in 0..ow {
                                if let Some(sx) = geo.source(1, xo, j, w) {
                                    plane_out[[sy, sx]] += row[base + xo];
                                }
                            }
                        }
                    }
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn geo(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize, d: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels: c,
            in_h: h,
            in_w: w,
            kernel: [k, k],
            stride: [s, s],
            padding: [p, p],
            dilation: [d, d],
            groups: 1,
        }
    }

    #[test]
    fn im2col_matches_direct_indexing() {
        let g = geo(2, 5, 4, 3, 2, 1, 1);
        let x = Array4::from_shape_fn((2, 2, 5, 4), |(n, c, y, x)| {
            (n * 100 + c * 20 + y * 4 + x) as f32
        });
        let cols = im2col(x.view(), &g, 0).unwrap();
        let [oh, ow] = g.output_hw().unwrap();
        assert_eq!([oh, ow], [3, 2]);
        for c in 0..2 {
            for i in 0..3 {
                for j in 0..3 {
                    for n in 0..2 {
                        for y in 0..oh {
                            for xo in 0..ow {
                                let sy = (y * 2 + i) as isize - 1;
                                let sx = (xo * 2 + j) as isize - 1;
                                let want = if sy < 0 || sx < 0 || sy >= 5 || sx >= 4 {
                                    0.0
                                } else {
                                    x[[n, c, sy as usize, sx as usize]]
                                };
                                let got = cols[[(c * 3 + i) * 3 + j, n * 6 + y * 2 + xo]];
                                assert_eq!(got, want);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), c> == <x, col2im(c)> for any x, c.
        let mut g = geo(4, 6, 5, 3, 2, 2, 2);
        g.groups = 2;
        let x = Array4::from_shape_fn((2, 4, 6, 5), |(a, b, c, d)| {
            ((a * 7 + b * 5 + c * 3 + d) % 11) as f32 - 5.0
        });
        for group in 0..2 {
            let cols = im2col(x.view(), &g, group).unwrap();
            let c = Array2::from_shape_fn(cols.dim(), |(i, j)| ((i * 3 + j) % 7) as f32 - 3.0);
            let lhs: f32 = (&cols * &c).sum();
            let mut dx = Array4::<f32>::zeros(x.dim());
            col2im_add(c.view(), &g, group, dx.view_mut()).unwrap();
            let rhs: f32 = (&x * &dx).sum();
            assert_eq!(lhs, rhs);
        }
    }

    #[test]
    fn window_larger_than_input_is_an_error() {
        let g = geo(1, 2, 2, 5, 1, 0, 1);
        assert!(matches!(g.output_hw(), Err(Error::InvalidConfig { .. })));
    }
}
