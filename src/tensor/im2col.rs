//! im2col / col2im for NCHW convolutions with stride, padding, dilation and groups.
//!
//! For one group, `im2col` builds the matrix `cols` of shape
//! `[C_g·kh·kw, N·OH·OW]`: row `(c, i, j)` (in the order of the weight's flattened
//! `[C_g, kh, kw]`) and column `(n, oh, ow)` hold
//! `x[n, g·C_g + c, oh·s_h − p_h + i·d_h, ow·s_w − p_w + j·d_w]`, or 0 in the padding.
//! The group's output is then the single GEMM `W_g · cols` of shape `[O_g, N·OH·OW]`,
//! batched over all images so that even LeNet-sized layers give the GEMM enough columns.

use crate::error::{Error, Result};
use crate::limits::Limits;
use ndarray::{Array2, ArrayView2, ArrayView4, ArrayViewMut4, Axis};
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
    /// do not divide the channels, a window larger than the padded input, or sizes that
    /// overflow; [`Error::LimitExceeded`] for a padded image past the default limits.
    pub fn output_hw(&self) -> Result<[usize; 2]> {
        let what = "convolution geometry";
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(Error::config(
                what,
                "kernel, stride and dilation must be at least 1",
            ));
        }
        if self.groups == 0 || !self.in_channels.is_multiple_of(self.groups) {
            return Err(Error::config(
                what,
                format!(
                    "groups ({}) must divide the input channels ({})",
                    self.groups, self.in_channels
                ),
            ));
        }
        let size = [self.in_h, self.in_w];
        // Checked: padding, kernel and dilation are user (or file) numbers, and a wrapped
        // size would pass the checks below and index out of bounds later.
        let mut padded = [0; 2];
        let mut span = [0; 2];
        for a in 0..2 {
            let p = self.padding[a]
                .checked_mul(2)
                .and_then(|p| p.checked_add(size[a]));
            let k = self.dilation[a]
                .checked_mul(self.kernel[a] - 1)
                .and_then(|s| s.checked_add(1));
            let (Some(p), Some(k)) = (p, k) else {
                return Err(Error::config(
                    what,
                    format!("padding, kernel or dilation overflow the index range (axis {a})"),
                ));
            };
            (padded[a], span[a]) = (p, k);
        }
        // Some kernels materialise the padded input: keep it within the limits.
        Limits::default().check_elements(
            &[padded[0], padded[1], self.in_channels],
            "padded convolution input",
        )?;
        let mut out = [0; 2];
        for a in 0..2 {
            if span[a] > padded[a] {
                return Err(Error::config(
                    what,
                    format!(
                        "window of {} does not fit the padded input of {} (axis {a})",
                        span[a], padded[a]
                    ),
                ));
            }
            out[a] = (padded[a] - span[a]) / self.stride[a] + 1;
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

    /// The outputs `lo..hi` along axis `a` whose input coordinate for kernel tap `t` lies
    /// inside an input of `size` (the rest read padding).
    ///
    /// # Panics
    /// If `a` is not 0 or 1 (a programming error: there are two spatial axes).
    pub fn valid_outputs(&self, a: usize, t: usize, size: usize, out_len: usize) -> (usize, usize) {
        let off = t.saturating_mul(self.dilation[a]);
        let (p, s) = (self.padding[a], self.stride[a].max(1));
        let lo = if p > off { (p - off).div_ceil(s) } else { 0 };
        // Saturating: the fields are public; `output_hw` bounds them for real geometries.
        let end = size.saturating_add(p);
        let hi = if end > off {
            (end - off).div_ceil(s)
        } else {
            0
        };
        let lo = lo.min(out_len);
        (lo, hi.min(out_len).max(lo))
    }
}

/// Builds the column matrix of group `group` of `x` (see the module docs).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `x` does not match the geometry, or the geometry's own
/// errors from [`ConvGeometry::output_hw`].
pub fn im2col(x: ArrayView4<f32>, geo: &ConvGeometry, group: usize) -> Result<Array2<f32>> {
    let [oh, ow] = geo.output_hw()?;
    let n = x.dim().0;
    let mut cols = Array2::<f32>::zeros((geo.col_rows(), n * oh * ow));
    let buf = cols
        .as_slice_mut()
        .ok_or_else(|| Error::Unsupported("non-contiguous column buffer".into()))?;
    Im2colPlan::new(geo, group)?.fill(x, buf, true)?;
    Ok(cols)
}

/// Where every row of one group's column matrix reads from, worked out once per
/// geometry (the window bounds take divisions) and reused for every image: per-image
/// inference convolutions fill a small buffer per image, and re-deriving the bounds per
/// image cost more than the copies.
#[derive(Clone, Debug)]
pub struct Im2colPlan {
    geo: ConvGeometry,
    group: usize,
    out_hw: [usize; 2],
    rows: Vec<RowPlan>,
}

/// Row `(c, i, j)`: input channel, the valid output rows `ylo..yhi` and columns `lo..hi`,
/// the input column read at output column `lo`, and `i·dilation_h`.
#[derive(Clone, Copy, Debug)]
struct RowPlan {
    channel: usize,
    ylo: usize,
    yhi: usize,
    lo: usize,
    hi: usize,
    sx0: usize,
    dy: usize,
}

impl Im2colPlan {
    /// The plan of group `group` of `geo`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `group` is not below the geometry's groups, or the
    /// geometry's own errors from [`ConvGeometry::output_hw`].
    pub fn new(geo: &ConvGeometry, group: usize) -> Result<Self> {
        let [oh, ow] = geo.output_hw()?;
        if group >= geo.groups {
            return Err(Error::shape(
                "im2col",
                None,
                format!("group < {}", geo.groups),
                &[group],
            ));
        }
        let cg = geo.group_channels();
        let [kh, kw] = geo.kernel;
        let rows = (0..geo.col_rows())
            .map(|row| {
                let (i, j) = ((row / kw) % kh, row % kw);
                let (lo, hi) = geo.valid_outputs(1, j, geo.in_w, ow);
                let (ylo, yhi) = geo.valid_outputs(0, i, geo.in_h, oh);
                RowPlan {
                    channel: group * cg + row / (kh * kw),
                    ylo,
                    yhi,
                    lo,
                    hi,
                    // Only read when lo < hi, where it is non-negative.
                    sx0: (lo * geo.stride[1] + j * geo.dilation[1]).saturating_sub(geo.padding[1]),
                    dy: i * geo.dilation[0],
                }
            })
            .collect();
        Ok(Im2colPlan {
            geo: *geo,
            group,
            out_hw: [oh, ow],
            rows,
        })
    }

    /// Elements of the column matrix for `n` images.
    pub fn len(&self, n: usize) -> usize {
        self.rows.len() * n * self.out_hw[0] * self.out_hw[1]
    }

    /// [`im2col`] into a caller's buffer of [`Im2colPlan::len`] elements (contents on entry
    /// do not matter: positions that read padding are zeroed), on the calling thread unless
    /// `allow_parallel`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `x` does not match the geometry or `buf` has the
    /// wrong length.
    pub fn fill(&self, x: ArrayView4<f32>, buf: &mut [f32], allow_parallel: bool) -> Result<()> {
        if buf.len() != self.len(x.dim().0) {
            return Err(Error::shape(
                "im2col",
                None,
                format!("a buffer of {} values", self.len(x.dim().0)),
                &[buf.len()],
            ));
        }
        self.fill_rows(x, 0, buf, allow_parallel)
    }

    /// [`Im2colPlan::fill`] of rows `first..` only, as many as `buf` holds (a whole number
    /// of rows of `N·oh·ow` values): callers split one image's columns across threads.
    ///
    /// # Errors
    /// As [`Im2colPlan::fill`]; also when the rows run past the matrix or `buf` is not a
    /// whole number of rows.
    pub(crate) fn fill_rows(
        &self,
        x: ArrayView4<f32>,
        first: usize,
        buf: &mut [f32],
        allow_parallel: bool,
    ) -> Result<()> {
        let geo = &self.geo;
        let [oh, ow] = self.out_hw;
        let (n, c, h, w) = x.dim();
        let row_len = n * oh * ow;
        let count = buf.len().checked_div(row_len).unwrap_or(0);
        let fits = buf.len() == count * row_len && first + count <= self.rows.len();
        if c != geo.in_channels || h != geo.in_h || w != geo.in_w || !fits {
            return Err(Error::shape(
                "im2col",
                None,
                format!(
                    "[N, {}, {}, {}] and a buffer of whole rows of N·{} among {} (group {})",
                    geo.in_channels,
                    geo.in_h,
                    geo.in_w,
                    oh * ow,
                    geo.col_rows(),
                    self.group
                ),
                x.shape(),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let rows = &self.rows[first..first + count];
        if geo.padding != [0, 0] {
            buf.fill(0.0);
        }
        let plane = oh * ow;
        let x = x.as_standard_layout();
        let xs = x
            .as_slice()
            .ok_or_else(|| Error::Unsupported("non-contiguous input".into()))?;
        let (sx_stride, sy_stride, pad_y) = (geo.stride[1], geo.stride[0], geo.padding[0]);
        let body = |(r, out): (&RowPlan, &mut [f32])| {
            if r.lo == r.hi {
                return; // every output reads padding: stays zero
            }
            let len = r.hi - r.lo;
            for b in 0..n {
                let img = &xs[(b * c + r.channel) * h * w..(b * c + r.channel + 1) * h * w];
                // Output rows `ylo..yhi` read input rows `sy0, sy0 + s_h, …`: walking both
                // as chunk iterators leaves one bounds check per copy, not six (the rows of
                // small maps are 8–24 values, so the checks cost as much as the copy).
                let sy0 = r.ylo * sy_stride + r.dy - pad_y;
                let src_rows = img[sy0 * w..].chunks(sy_stride * w);
                let dst_rows =
                    out[b * plane + r.ylo * ow..b * plane + r.yhi * ow].chunks_exact_mut(ow);
                for (dst, src) in dst_rows.zip(src_rows) {
                    let dst = &mut dst[r.lo..r.hi];
                    if sx_stride == 1 {
                        copy_short(dst, &src[r.sx0..r.sx0 + len]);
                    } else {
                        for (t, d) in dst.iter_mut().enumerate() {
                            *d = src[r.sx0 + t * sx_stride];
                        }
                    }
                }
            }
        };
        if allow_parallel && super::parallel(buf.len()) {
            rows.par_iter()
                .zip(buf.par_chunks_mut(row_len))
                .for_each(body);
        } else {
            rows.iter().zip(buf.chunks_mut(row_len)).for_each(body);
        }
        Ok(())
    }
}

/// `dst.copy_from_slice(src)` for the short rows of small feature maps (8–32 values in
/// LeNet): 8-wide block moves, the tail as one overlapping block, where a `memcpy` call
/// per row cost more than the copy (a third of LeNet-5's float inference).
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    const B: usize = 8;
    let n = dst.len();
    assert_eq!(n, src.len(), "copy_short: lengths differ");
    if n < B {
        dst.copy_from_slice(src);
        return;
    }
    // Constant-length copies: the compiler emits one 32-byte move for each.
    let mut i = 0;
    while i + B <= n {
        dst[i..i + B].copy_from_slice(&src[i..i + B]);
        i += B;
    }
    if i < n {
        dst[n - B..].copy_from_slice(&src[n - B..]);
    }
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
    let (sxs, dxl, pxl) = (geo.stride[1], geo.dilation[1], geo.padding[1]);
    let work = cols.len();
    let body = |(b, mut img): (usize, ndarray::ArrayViewMut3<f32>)| {
        for cl in 0..cg {
            let mut plane_out = img.index_axis_mut(Axis(0), group * cg + cl);
            for i in 0..kh {
                let (ylo, yhi) = geo.valid_outputs(0, i, h, oh);
                for j in 0..kw {
                    let (lo, hi) = geo.valid_outputs(1, j, w, ow);
                    if lo == hi {
                        continue;
                    }
                    let row = cols.row((cl * kh + i) * kw + j);
                    let sx0 = lo * sxs + j * dxl - pxl;
                    for y in ylo..yhi {
                        let sy = y * geo.stride[0] + i * geo.dilation[0] - geo.padding[0];
                        let base = b * plane + y * ow;
                        let mut dst = plane_out.row_mut(sy);
                        for (t, xo) in (lo..hi).enumerate() {
                            dst[sx0 + t * sxs] += row[base + xo];
                        }
                    }
                }
            }
        }
    };
    if super::parallel(work) {
        dx.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(body);
    } else {
        dx.axis_iter_mut(Axis(0)).enumerate().for_each(body);
    }
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
