//! Int8 convolution in NHWC: im2row + the int8 GEMM, and a direct depthwise kernel.
//!
//! The kernels work on NHWC (`conv2d_nhwc_*`): each row of the patch matrix is then `kh·kw`
//! contiguous copies of `C_g` channel bytes (weights are packed in the matching
//! `[O, kh, kw, C_g]` order), rows are padded to the GEMM's `k` step so the VNNI path reads
//! them in place, and the GEMM's row-major `[N·OH·OW, O]` output *is* the NHWC output. A 1×1,
//! stride-1, unpadded convolution uses the input itself as the patch matrix. Padding reads the
//! input zero point, i.e. real 0. The NCHW entry points (`conv2d_u8i8_*`, the float graph's
//! layout) transpose around the NHWC kernels.

use super::dispatch::KernelChoice;
use super::epilogue::{Dequantize, Epilogue, I32Out, Requantize};
use super::gemm::{run_src, tile_k_step};
use super::pack::{ARows, ASource, AWindows, PackedWeights};
use crate::error::{Error, Result};
use crate::tensor::ConvGeometry;
use ndarray::{s, Array2, Array4, ArrayView4};
use rayon::prelude::*;

/// Stride, padding, dilation and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Padding before the input `[top, left]`.
    pub padding: [usize; 2],
    /// Padding after the input `[bottom, right]` (equal to `padding` but for asymmetric
    /// pads, as ONNX's `[t, l, b, r]` and TensorFlow's "SAME" with stride 2 make).
    pub padding_end: [usize; 2],
    /// Dilation `[h, w]`.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
}

impl Default for ConvSpec {
    fn default() -> Self {
        ConvSpec {
            stride: [1, 1],
            padding: [0, 0],
            padding_end: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

impl ConvSpec {
    /// Sets a square stride.
    pub fn with_stride(mut self, s: usize) -> Self {
        self.stride = [s, s];
        self
    }
    /// Sets the same padding on every side.
    pub fn with_padding(mut self, p: usize) -> Self {
        self.padding = [p, p];
        self.padding_end = [p, p];
        self
    }
    /// Sets ONNX's pads `[top, left, bottom, right]`.
    pub fn with_pads(mut self, [t, l, b, r]: [usize; 4]) -> Self {
        self.padding = [t, l];
        self.padding_end = [b, r];
        self
    }
    /// Whether the padding differs before and after the input on an axis.
    pub fn is_asymmetric(&self) -> bool {
        self.padding != self.padding_end
    }
    /// Sets a square dilation.
    pub fn with_dilation(mut self, d: usize) -> Self {
        self.dilation = [d, d];
        self
    }
    /// Sets the number of groups.
    pub fn with_groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

enum ConvKind {
    /// One packed weight matrix `[O_g, kh·kw·C_g]` per group.
    Gemm(Vec<PackedWeights>),
    /// Depthwise: weights `[kh·kw, O]` (tap-major, so a pixel's channels are contiguous);
    /// output channel `o` reads input channel `o / (O / C)`.
    Depthwise(Vec<i32>, DepthwisePath),
}

/// Which compilation of the depthwise row kernel runs; a SIMD one carries the token of its
/// CPU check.
#[derive(Clone, Copy, Debug)]
enum DepthwisePath {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Simd(super::x86_64::SimdCpu),
}

impl DepthwisePath {
    fn for_kernel(kernel: KernelChoice) -> Result<Self> {
        let unavailable = || Error::Unsupported(format!("the {kernel} kernel on this CPU"));
        #[cfg(target_arch = "x86_64")]
        {
            use super::dispatch::{AmxCpu, Avx2Cpu, VnniCpu};
            use super::x86_64::SimdCpu;
            match kernel {
                KernelChoice::Amx => {
                    let cpu = AmxCpu::detect().ok_or_else(unavailable)?;
                    return Ok(DepthwisePath::Simd(SimdCpu::Avx512(cpu.vnni())));
                }
                KernelChoice::Avx512Vnni => {
                    let cpu = VnniCpu::detect().ok_or_else(unavailable)?;
                    return Ok(DepthwisePath::Simd(SimdCpu::Avx512(cpu)));
                }
                KernelChoice::Avx2 => {
                    let cpu = Avx2Cpu::detect().ok_or_else(unavailable)?;
                    return Ok(DepthwisePath::Simd(SimdCpu::Avx2(cpu)));
                }
                _ => {}
            }
        }
        if kernel.is_available() {
            Ok(DepthwisePath::Portable)
        } else {
            Err(unavailable())
        }
    }
}

/// Int8 convolution weights `[O, C/groups, kh, kw]`, prepared once for the fastest path.
pub struct PackedConv {
    out_channels: usize,
    in_channels: usize,
    kernel: [usize; 2],
    /// Kernel width the weights are packed with: `kw`, or more (zero taps) so that a tap
    /// row of `kw_packed·C` bytes is whole 4-byte groups for the implicit VNNI path.
    kw_packed: usize,
    spec: ConvSpec,
    kind: ConvKind,
}

impl std::fmt::Debug for PackedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedConv")
            .field("out_channels", &self.out_channels)
            .field("in_channels", &self.in_channels)
            .field("kernel", &self.kernel)
            .field("spec", &self.spec)
            .field("depthwise", &self.is_depthwise())
            .finish()
    }
}

impl PackedConv {
    /// Prepares `weights` (`[O, C/groups, kh, kw]`) for the fastest convolution path of this
    /// CPU ([`KernelChoice::best_for_conv`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero stride / dilation / groups or groups that do not
    /// divide the output channels.
    pub fn new(weights: ArrayView4<i8>, spec: ConvSpec) -> Result<Self> {
        Self::with_kernel(weights, spec, KernelChoice::best_for_conv())
    }

    /// Prepares `weights` for a given GEMM path (depthwise convolutions always use the direct
    /// kernel).
    ///
    /// # Errors
    /// As [`PackedConv::new`], and [`Error::Unsupported`] when the CPU cannot run `kernel`.
    pub fn with_kernel(
        weights: ArrayView4<i8>,
        spec: ConvSpec,
        kernel: KernelChoice,
    ) -> Result<Self> {
        Self::build(weights, spec, kernel, None)
    }

    /// Prepares 8-bit weights `[O, C/groups, kh, kw]` in either ONNX convention with their
    /// zero points (one, or one per output channel, in the weights' type range) for the
    /// fastest convolution path of this CPU ([`KernelChoice::best_for_conv`]), as
    /// `ConvInteger` / `QLinearConv` give them.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero points of another count or outside the type's range,
    /// and as [`PackedConv::new`].
    pub fn from_int8(
        weights: super::Int8Tensor4<'_>,
        zero_points: &[i32],
        spec: ConvSpec,
    ) -> Result<Self> {
        Self::from_int8_with_kernel(weights, zero_points, spec, KernelChoice::best_for_conv())
    }

    /// [`PackedConv::from_int8`] for a given GEMM path.
    ///
    /// # Errors
    /// As [`PackedConv::from_int8`] and [`PackedConv::with_kernel`].
    pub fn from_int8_with_kernel(
        weights: super::Int8Tensor4<'_>,
        zero_points: &[i32],
        spec: ConvSpec,
        kernel: KernelChoice,
    ) -> Result<Self> {
        let o = weights.dim().0;
        let zero_points = super::integer::check_zero_points(
            "int8 conv weights",
            weights.is_unsigned(),
            zero_points,
            o,
        )?;
        Self::build(weights.into_i8().view(), spec, kernel, zero_points)
    }

    /// Packs i8 weights; `zero_points` (per output channel, on the i8 grid) when any is
    /// nonzero.
    fn build(
        weights: ArrayView4<i8>,
        spec: ConvSpec,
        kernel: KernelChoice,
        zero_points: Option<Vec<i32>>,
    ) -> Result<Self> {
        let (o, cg, kh, kw) = weights.dim();
        let g = spec.groups;
        if g == 0 || o % g != 0 || spec.stride.contains(&0) || spec.dilation.contains(&0) {
            return Err(Error::config(
                "int8 conv",
                format!("groups ({g}) must divide out channels ({o}); stride and dilation ≥ 1"),
            ));
        }
        let in_channels = cg * g;
        let kind = if cg == 1 && g == in_channels && g > 1 {
            let path = DepthwisePath::for_kernel(kernel)?;
            let flat = weights
                .to_shape((o, kh * kw))
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            // The direct kernel multiplies by i32 taps: weight zero points fold into them.
            let taps: Vec<i32> = flat
                .t()
                .indexed_iter()
                .map(|((_, c), &v)| i32::from(v) - zero_points.as_ref().map_or(0, |z| z[c]))
                .collect();
            ConvKind::Depthwise(taps, path)
        } else {
            let og = o / g;
            // Zero taps would add `−z_w·a` terms to the row-sum correction: none then.
            let kw_packed =
                if implicit_eligible(kernel, spec, kw, in_channels) && zero_points.is_none() {
                    (kw..kw + 4).find(|w| (w * cg) % 4 == 0).unwrap_or(kw)
                } else {
                    kw
                };
            let mut packed = Vec::with_capacity(g);
            for gi in 0..g {
                // [O_g, C_g, kh, kw] → [O_g, kh, kw_packed, C_g] (extra taps zero) → 2-D
                let src = weights.slice(s![gi * og..(gi + 1) * og, .., .., ..]);
                let wg = Array4::from_shape_fn((og, kh, kw_packed, cg), |(oo, i, j, c)| {
                    if j < kw {
                        src[[oo, c, i, j]]
                    } else {
                        0
                    }
                })
                .into_shape_with_order((og, kh * kw_packed * cg))
                .map_err(|e| Error::Unsupported(e.to_string()))?;
                let mut pw = PackedWeights::with_kernel(wg.view(), kernel)?;
                pw.zero_points = zero_points
                    .as_ref()
                    .map(|z| z[gi * og..(gi + 1) * og].to_vec());
                packed.push(pw);
            }
            return Ok(PackedConv {
                out_channels: o,
                in_channels,
                kernel: [kh, kw],
                kw_packed,
                spec,
                kind: ConvKind::Gemm(packed),
            });
        };
        Ok(PackedConv {
            out_channels: o,
            in_channels,
            kernel: [kh, kw],
            kw_packed: kw,
            spec,
            kind,
        })
    }

    /// Whether the direct depthwise kernel runs this convolution.
    pub fn is_depthwise(&self) -> bool {
        matches!(self.kind, ConvKind::Depthwise(..))
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The GEMM path (`None` for depthwise).
    pub fn kernel_choice(&self) -> Option<KernelChoice> {
        match &self.kind {
            ConvKind::Gemm(p) => p.first().map(PackedWeights::kernel),
            ConvKind::Depthwise(..) => None,
        }
    }

    /// The geometry of an `h × w` input under `spec` (its symmetric `padding`).
    fn geometry(&self, spec: &ConvSpec, h: usize, w: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels: self.in_channels,
            in_h: h,
            in_w: w,
            kernel: self.kernel,
            stride: spec.stride,
            padding: spec.padding,
            dilation: spec.dilation,
            groups: spec.groups,
        }
    }

    /// The output `[height, width]` of an `h × w` input, asymmetric pads included.
    fn output_hw(&self, h: usize, w: usize) -> Result<[usize; 2]> {
        if !self.spec.is_asymmetric() {
            return self.geometry(&self.spec, h, w).output_hw();
        }
        let [hp, wp] = padded_hw(&self.spec, h, w)?;
        self.geometry(&unpadded(self.spec), hp, wp).output_hw()
    }
}

/// `spec` without padding (the input has been padded explicitly).
fn unpadded(spec: ConvSpec) -> ConvSpec {
    ConvSpec {
        padding: [0, 0],
        padding_end: [0, 0],
        ..spec
    }
}

/// The input size after `spec`'s padding, checked against overflow.
fn padded_hw(spec: &ConvSpec, h: usize, w: usize) -> Result<[usize; 2]> {
    let add = |size: usize, a: usize| {
        size.checked_add(spec.padding[a])
            .and_then(|v| v.checked_add(spec.padding_end[a]))
            .ok_or_else(|| Error::config("int8 conv", "padding overflows the index range"))
    };
    Ok([add(h, 0)?, add(w, 1)?])
}

/// Whether the VNNI path can read this convolution's patches in place (one group, dilation 1).
fn implicit_eligible(kernel: KernelChoice, spec: ConvSpec, kw: usize, channels: usize) -> bool {
    kernel == KernelChoice::Avx512Vnni
        && spec.groups == 1
        && spec.dilation == [1, 1]
        && !(kw == 1
            && spec.stride == [1, 1]
            && spec.padding == [0, 0]
            && channels.is_multiple_of(4))
}

/// Shifts an epilogue's channel index (a group's GEMM sees channels from 0).
struct Offset<'a, E> {
    inner: &'a E,
    offset: usize,
}

impl<E: Epilogue> Epilogue for Offset<'_, E> {
    type Out = E::Out;
    fn columns(&self) -> Option<usize> {
        None
    }
    #[inline(always)]
    fn apply(&self, n: usize, acc: i32) -> E::Out {
        self.inner.apply(n + self.offset, acc)
    }
    #[inline(always)]
    fn apply_row(&self, n0: usize, acc: &[i32], corr: &[i32], out: &mut [E::Out]) {
        self.inner.apply_row(n0 + self.offset, acc, corr, out)
    }
}

/// An NHWC u8 batch: `data[((n·h + y)·w + x)·c + ch]`.
#[derive(Clone, Copy)]
struct Nhwc<'a> {
    data: &'a [u8],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

/// Patch matrix of group `group`: `[N·OH·OW, lda]`, row `(n, y, x)` holding, for each tap
/// `(i, j)`, the `C_g` channel bytes it reads (`zero` in the padding), then zeros up to `lda`.
fn im2row(x: Nhwc<'_>, geo: &ConvGeometry, group: usize, zero: u8, lda: usize) -> Result<Vec<u8>> {
    let [oh, ow] = geo.output_hw()?;
    let cg = geo.group_channels();
    let [kh, kw] = geo.kernel;
    let mut rows = vec![0u8; x.n * oh * ow * lda];
    if rows.is_empty() {
        return Ok(rows);
    }
    // With one group and dilation 1, a tap row's `kw` pixels are `kw·C` contiguous bytes.
    let whole_rows = geo.groups == 1 && geo.dilation[1] == 1;
    // One task per output row (n, y): enough parallelism even for batch 1.
    let work = rows.len();
    let body = |(ny, out): (usize, &mut [u8])| {
        let (b, y) = (ny / oh, ny % oh);
        let img = &x.data[b * x.h * x.w * x.c..(b + 1) * x.h * x.w * x.c];
        for (xo, row) in out.chunks_exact_mut(lda).enumerate() {
            for i in 0..kh {
                let sy =
                    (y * geo.stride[0] + i * geo.dilation[0]) as isize - geo.padding[0] as isize;
                let tap_row = &mut row[i * kw * cg..(i + 1) * kw * cg];
                if sy < 0 || sy as usize >= x.h {
                    tap_row.fill(zero);
                    continue;
                }
                let line = &img[sy as usize * x.w * x.c..(sy as usize + 1) * x.w * x.c];
                let sx0 = (xo * geo.stride[1]) as isize - geo.padding[1] as isize;
                if whole_rows && sx0 >= 0 && sx0 as usize + kw <= x.w {
                    let at = sx0 as usize * x.c;
                    copy_bytes(tap_row, &line[at..at + kw * cg]);
                    continue;
                }
                for (j, dst) in tap_row.chunks_exact_mut(cg.max(1)).enumerate() {
                    let sx = sx0 + (j * geo.dilation[1]) as isize;
                    if sx < 0 || sx as usize >= x.w {
                        dst.fill(zero);
                    } else {
                        let at = sx as usize * x.c + group * cg;
                        copy_bytes(dst, &line[at..at + cg]);
                    }
                }
            }
        }
    };
    if crate::tensor::parallel(work) {
        rows.par_chunks_mut(ow * lda).enumerate().for_each(body);
    } else {
        rows.chunks_mut(ow * lda).enumerate().for_each(body);
    }
    Ok(rows)
}

/// `dst.copy_from_slice(src)`, without a `memcpy` call for the few-byte copies of
/// convolutions with few input channels.
#[inline(always)]
fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    if dst.len() <= 16 {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// The GEMM convolution under `spec` (symmetric padding: asymmetric pads were applied to `x`).
fn conv_gemm<E: Epilogue>(
    x: Nhwc<'_>,
    zero: u8,
    conv: &PackedConv,
    spec: ConvSpec,
    packed: &[PackedWeights],
    ep: &E,
) -> Result<Array2<E::Out>>
where
    E::Out: Default,
{
    let geo = conv.geometry(&spec, x.h, x.w);
    let [oh, ow] = geo.output_hw()?;
    let o = conv.out_channels;
    let og = o / spec.groups;
    let m = x.n * oh * ow;
    let mut out = Array2::<E::Out>::default((m, o));
    let pointwise = conv.kernel == [1, 1]
        && spec.stride == [1, 1]
        && spec.padding == [0, 0]
        && spec.groups == 1;
    // Implicit im2row: with one group and dilation 1, a window's tap row `i` is
    // `kw_packed·C` contiguous bytes of a spatially padded input (widened on the right for
    // the zero taps), which the VNNI kernel reads in place.
    let implicit = packed.first().is_some_and(|p| {
        implicit_eligible(p.kernel(), spec, conv.kernel[1], x.c)
            && (conv.kw_packed * x.c).is_multiple_of(4)
    });
    let extra = conv.kw_packed - conv.kernel[1];
    let padded_buf;
    let (padded, hp, wp) = if implicit && (spec.padding != [0, 0] || extra > 0) {
        let end = [spec.padding[0], spec.padding[1] + extra];
        let (buf, hp, wp) = pad_spatially(x, spec.padding, end, zero);
        padded_buf = buf;
        (&padded_buf[..], hp, wp)
    } else {
        (x.data, x.h, x.w)
    };
    for (g, pw) in packed.iter().enumerate() {
        let offset = Offset {
            inner: ep,
            offset: g * og,
        };
        let dst = out.slice_mut(s![.., g * og..(g + 1) * og]);
        let k = pw.depth();
        let kpad = k.div_ceil(tile_k_step(pw)) * tile_k_step(pw);
        if pointwise && kpad == k {
            let rows = ARows {
                data: x.data,
                rows: m,
                k,
                lda: x.c,
            };
            run_src(ASource::Rows(rows), zero, pw, &offset, dst)?;
        } else if implicit {
            let win = AWindows {
                data: padded,
                hp,
                wp,
                c: x.c,
                oh,
                ow,
                stride: spec.stride,
                kh: conv.kernel[0],
                seg_len: conv.kw_packed * x.c,
                row0: 0,
                rows: m,
            };
            run_src(ASource::Windows(win), zero, pw, &offset, dst)?;
        } else {
            debug_assert_eq!(conv.kw_packed, conv.kernel[1]);
            let buf = im2row(x, &geo, g, zero, kpad)?;
            let rows = ARows {
                data: &buf,
                rows: m,
                k,
                lda: kpad,
            };
            run_src(ASource::Rows(rows), zero, pw, &offset, dst)?;
        }
    }
    Ok(out)
}

/// Copies an NHWC batch into one with `begin` rows and columns of `zero` before it (top,
/// left) and `end` after it (bottom, right). The caller has bounded the padded size.
fn pad_spatially(
    x: Nhwc<'_>,
    begin: [usize; 2],
    end: [usize; 2],
    zero: u8,
) -> (Vec<u8>, usize, usize) {
    let (hp, wp) = (x.h + begin[0] + end[0], x.w + begin[1] + end[1]);
    let mut out = vec![zero; x.n * hp * wp * x.c];
    let row = x.w * x.c;
    for b in 0..x.n {
        for y in 0..x.h {
            let src = &x.data[((b * x.h + y) * x.w) * x.c..][..row];
            let at = ((b * hp + y + begin[0]) * wp + begin[1]) * x.c;
            out[at..at + row].copy_from_slice(src);
        }
    }
    (out, hp, wp)
}

/// One image and the weights of a depthwise convolution: what every output row reads.
pub(crate) struct DepthwiseRow<'a, E> {
    /// The image, NHWC `[h, w, c]`.
    pub x: &'a [u8],
    pub dims: (usize, usize, usize),
    /// Weights `[kh·kw, O]`.
    pub taps: &'a [i32],
    pub geo: &'a ConvGeometry,
    pub zero: i32,
    pub ep: &'a E,
}

/// The depthwise body: output row `y` of the image, `ow` pixels × `O` channels.
#[inline(always)]
pub(crate) fn depthwise_row<E: Epilogue>(row: &DepthwiseRow<'_, E>, y: usize, out: &mut [E::Out]) {
    let DepthwiseRow {
        x,
        dims: (h, w, c),
        taps,
        geo,
        zero,
        ep,
    } = *row;
    let o = taps.len() / (geo.kernel[0] * geo.kernel[1]).max(1);
    let mult = o / c;
    let [kh, kw] = geo.kernel;
    let zeros = vec![0i32; o];
    let mut acc = vec![0i32; o];
    let mut widened = vec![0i32; o];
    for (xo, dst) in out.chunks_exact_mut(o).enumerate() {
        acc.fill(0);
        for i in 0..kh {
            let sy = (y * geo.stride[0] + i * geo.dilation[0]) as isize - geo.padding[0] as isize;
            if sy < 0 || sy as usize >= h {
                continue;
            }
            for j in 0..kw {
                let sx =
                    (xo * geo.stride[1] + j * geo.dilation[1]) as isize - geo.padding[1] as isize;
                if sx < 0 || sx as usize >= w {
                    continue;
                }
                let at = (sy as usize * w + sx as usize) * c;
                let src = &x[at..at + c];
                let wt = &taps[(i * kw + j) * o..(i * kw + j + 1) * o];
                if mult == 1 {
                    for ((a, &s), &t) in acc.iter_mut().zip(src).zip(wt) {
                        *a += (s as i32 - zero) * t;
                    }
                } else {
                    for (ch, v) in widened.iter_mut().enumerate() {
                        *v = src[ch / mult] as i32 - zero;
                    }
                    for ((a, &s), &t) in acc.iter_mut().zip(&widened).zip(wt) {
                        *a += s * t;
                    }
                }
            }
        }
        ep.apply_row(0, &acc, &zeros, dst);
    }
}

fn conv_depthwise<E: Epilogue>(
    x: Nhwc<'_>,
    zero: u8,
    conv: &PackedConv,
    spec: ConvSpec,
    taps: &[i32],
    path: DepthwisePath,
    ep: &E,
) -> Result<Array2<E::Out>>
where
    E::Out: Default,
{
    let geo = conv.geometry(&spec, x.h, x.w);
    let [oh, ow] = geo.output_hw()?;
    let o = conv.out_channels;
    let mut out = Array2::<E::Out>::default((x.n * oh * ow, o));
    let Some(buf) = out.as_slice_mut() else {
        return Err(Error::Unsupported("non-contiguous output".into()));
    };
    if buf.is_empty() {
        return Ok(out);
    }
    let img_len = x.h * x.w * x.c;
    let work = buf.len() * conv.kernel[0] * conv.kernel[1];
    let body = |(ny, row): (usize, &mut [E::Out])| {
        let (b, y) = (ny / oh, ny % oh);
        let img = &x.data[b * img_len..(b + 1) * img_len];
        let args = DepthwiseRow {
            x: img,
            dims: (x.h, x.w, x.c),
            taps,
            geo: &geo,
            zero: zero as i32,
            ep,
        };
        match path {
            #[cfg(target_arch = "x86_64")]
            DepthwisePath::Simd(cpu) => super::x86_64::depthwise_row_simd(cpu, &args, y, row),
            DepthwisePath::Portable => depthwise_row(&args, y, row),
        }
    };
    if crate::tensor::parallel(work) {
        buf.par_chunks_mut(ow * o).enumerate().for_each(body);
    } else {
        buf.chunks_mut(ow * o).enumerate().for_each(body);
    }
    Ok(out)
}

/// Checks an NHWC input and the epilogue, then runs the convolution: `[N·OH·OW, O]` out.
fn conv_nhwc<E: Epilogue>(
    x: Nhwc<'_>,
    zero: u8,
    conv: &PackedConv,
    ep: &E,
) -> Result<Array2<E::Out>>
where
    E::Out: Default,
{
    if x.c != conv.in_channels || x.data.len() != x.n * x.h * x.w * x.c {
        return Err(Error::shape(
            "conv2d_u8i8",
            None,
            format!("[N, H, W, {}] (NHWC)", conv.in_channels),
            &[x.n, x.h, x.w, x.c],
        ));
    }
    if let Some(cols) = ep.columns().filter(|&v| v != conv.out_channels) {
        return Err(Error::shape(
            "conv2d_u8i8",
            None,
            format!("epilogue parameters for {} channels", conv.out_channels),
            &[cols],
        ));
    }
    // Asymmetric pads: pad explicitly with the zero point, then run unpadded.
    let padded_buf;
    let (x, spec) = if conv.spec.is_asymmetric() {
        let [hp, wp] = padded_hw(&conv.spec, x.h, x.w)?;
        crate::limits::Limits::default()
            .check_elements(&[x.n, hp, wp, x.c], "padded int8 conv input")?;
        let (buf, hp, wp) = pad_spatially(x, conv.spec.padding, conv.spec.padding_end, zero);
        padded_buf = buf;
        (
            Nhwc {
                data: &padded_buf,
                h: hp,
                w: wp,
                ..x
            },
            unpadded(conv.spec),
        )
    } else {
        (x, conv.spec)
    };
    match &conv.kind {
        ConvKind::Gemm(p) => conv_gemm(x, zero, conv, spec, p, ep),
        ConvKind::Depthwise(taps, path) => conv_depthwise(x, zero, conv, spec, taps, *path, ep),
    }
}

/// NHWC in (any layout view), `[N, OH, OW, O]` out.
fn run_nhwc<E: Epilogue>(
    x: ArrayView4<u8>,
    zero: u8,
    conv: &PackedConv,
    ep: &E,
) -> Result<Array4<E::Out>>
where
    E::Out: Default,
{
    let (n, h, w, c) = x.dim();
    let x = x.as_standard_layout();
    let data = x
        .as_slice()
        .ok_or_else(|| Error::Unsupported("non-contiguous input".into()))?;
    if c != conv.in_channels {
        return Err(Error::shape(
            "conv2d_nhwc_u8i8",
            None,
            format!("[N, H, W, {}]", conv.in_channels),
            &[n, h, w, c],
        ));
    }
    let [oh, ow] = conv.output_hw(h, w)?;
    let out = conv_nhwc(Nhwc { data, n, h, w, c }, zero, conv, ep)?;
    out.into_shape_with_order((n, oh, ow, conv.out_channels))
        .map_err(|e| Error::Unsupported(e.to_string()))
}

/// NCHW in and out, through the NHWC kernels.
fn run_nchw<E: Epilogue>(
    x: ArrayView4<u8>,
    zero: u8,
    conv: &PackedConv,
    ep: &E,
) -> Result<Array4<E::Out>>
where
    E::Out: Default,
{
    let (n, c, h, w) = x.dim();
    if c != conv.in_channels {
        return Err(Error::shape(
            "conv2d_u8i8",
            None,
            format!("[N, {}, H, W]", conv.in_channels),
            x.shape(),
        ));
    }
    let [oh, ow] = conv.output_hw(h, w)?;
    let nhwc = to_nhwc(x);
    let out = conv_nhwc(
        Nhwc {
            data: &nhwc,
            n,
            h,
            w,
            c,
        },
        zero,
        conv,
        ep,
    )?;
    Ok(to_nchw(&out, n, oh, ow))
}

/// Transposes a row-major `[rows, cols]` matrix into `[cols, rows]`, in 16 × 16 tiles so
/// that both the reads and the writes of a tile stay within a few cache lines.
pub(crate) fn transpose_block<T: Copy>(src: &[T], dst: &mut [T], rows: usize, cols: usize) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for r in r0..r1 {
                let row = &src[r * cols + c0..r * cols + c1];
                for (k, &v) in row.iter().enumerate() {
                    dst[(c0 + k) * rows + r] = v;
                }
            }
        }
    }
}

/// `[N, C, H, W]` → NHWC bytes.
fn to_nhwc(x: ArrayView4<u8>) -> Vec<u8> {
    let (n, c, h, w) = x.dim();
    let x = x.as_standard_layout();
    let hw = h * w;
    let mut out = vec![0u8; n * hw * c];
    if let (Some(src), false) = (x.as_slice(), out.is_empty()) {
        let body = |(dst, img): (&mut [u8], &[u8])| transpose_block(img, dst, c, hw);
        if n > 1 && crate::tensor::parallel(out.len()) {
            out.par_chunks_mut(hw * c)
                .zip(src.par_chunks(hw * c))
                .for_each(body);
        } else {
            out.chunks_mut(hw * c)
                .zip(src.chunks(hw * c))
                .for_each(body);
        }
    }
    out
}

/// `[N·OH·OW, O]` (NHWC) → `[N, O, OH, OW]`.
fn to_nchw<T: Copy + Default + Send + Sync>(
    y: &Array2<T>,
    n: usize,
    oh: usize,
    ow: usize,
) -> Array4<T> {
    let o = y.ncols();
    let hw = oh * ow;
    let mut out = Array4::<T>::default((n, o, oh, ow));
    if let (Some(src), Some(dst)) = (y.as_slice(), out.as_slice_mut()) {
        let body = |(d, img): (&mut [T], &[T])| transpose_block(img, d, hw, o);
        if dst.is_empty() {
        } else if n > 1 && crate::tensor::parallel(dst.len()) {
            dst.par_chunks_mut(hw * o)
                .zip(src.par_chunks(hw * o))
                .for_each(body);
        } else {
            dst.chunks_mut(hw * o)
                .zip(src.chunks(hw * o))
                .for_each(body);
        }
    }
    out
}

/// Int8 convolution with the requantizing epilogue: u8 NCHW in, u8 NCHW out.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the input channels or the epilogue's channel count do not
/// match; [`Error::InvalidConfig`] when the window does not fit the padded input.
pub fn conv2d_u8i8_u8(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    requant: &Requantize,
) -> Result<Array4<u8>> {
    requant.check_signed(false)?;
    run_nchw(x, x_zero_point, conv, requant)
}

/// Int8 convolution with the "i32 out" epilogue (accumulators plus an optional bias), NCHW.
///
/// # Errors
/// As [`conv2d_u8i8_u8`].
pub fn conv2d_u8i8_i32(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    bias: Option<&[i32]>,
) -> Result<Array4<i32>> {
    run_nchw(x, x_zero_point, conv, &I32Out { bias })
}

/// Int8 convolution with the dequantizing epilogue (f32 out), NCHW.
///
/// # Errors
/// As [`conv2d_u8i8_u8`].
pub fn conv2d_u8i8_f32(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    dequant: &Dequantize,
) -> Result<Array4<f32>> {
    run_nchw(x, x_zero_point, conv, dequant)
}

/// [`conv2d_u8i8_u8`] in NHWC: `[N, H, W, C]` in, `[N, OH, OW, O]` out, no transposes (the
/// layout an int8 model keeps between layers).
///
/// # Errors
/// As [`conv2d_u8i8_u8`].
pub fn conv2d_nhwc_u8i8_u8(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    requant: &Requantize,
) -> Result<Array4<u8>> {
    requant.check_signed(false)?;
    run_nhwc(x, x_zero_point, conv, requant)
}

/// [`conv2d_u8i8_i32`] in NHWC.
///
/// # Errors
/// As [`conv2d_u8i8_u8`].
pub fn conv2d_nhwc_u8i8_i32(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    bias: Option<&[i32]>,
) -> Result<Array4<i32>> {
    run_nhwc(x, x_zero_point, conv, &I32Out { bias })
}

/// [`conv2d_u8i8_f32`] in NHWC.
///
/// # Errors
/// As [`conv2d_u8i8_u8`].
pub fn conv2d_nhwc_u8i8_f32(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    dequant: &Dequantize,
) -> Result<Array4<f32>> {
    run_nhwc(x, x_zero_point, conv, dequant)
}

/// The requantizing convolution with i8 output (NCHW), for
/// [`qlinear_conv`](super::qlinear_conv).
pub(crate) fn conv2d_signed_out(
    x: ArrayView4<u8>,
    x_zero_point: u8,
    conv: &PackedConv,
    requant: &super::integer::SignedOut<'_>,
) -> Result<Array4<i8>> {
    run_nchw(x, x_zero_point, conv, requant)
}
