//! Packed operand layouts and the micro-kernel contract.
//!
//! Weights `w[n, k]` (i8, one row per output channel) are packed once into panels of `NR`
//! output channels; within a panel, `KG` consecutive `k` of one channel are adjacent, then
//! the next channel: `panel[g][c][j] = w[p·NR + c, g·KG + j]`. Activations `a[m, k]` (u8) are
//! packed per tile of `MR` rows the same way: `tile[g][r][j] = a[m0 + r, g·KG + j]`. Rows,
//! channels and `k` beyond the matrix are zero, so kernels only ever see full tiles and the
//! padding adds nothing to a dot product.
//!
//! | path | MR × NR | KG | A element | B element |
//! |---|---|---|---|---|
//! | generic | 4 × 16 | 2 | i16 (u8 widened) | i16 (i8 widened) |
//! | avx2 | 6 × 16 | 2 | i16 (u8 widened) | i16 (i8 widened) |
//! | avx512vnni | 6 × 64, 12 × 32, 12 × 16 (by output width) | 4 | u8 (read in place) | i8 |
//! | amx | 16 × 32 (two 16 × 16 AMX tiles) | 4 | u8 (read in place) | i8 |

use super::dispatch::KernelChoice;
#[cfg(target_arch = "x86_64")]
use super::dispatch::{AmxCpu, Avx2Cpu, VnniCpu};
use crate::error::{Error, Result};
use ndarray::{Array2, ArrayView2};

/// The largest `MR · NR` of any micro-kernel: the size of the accumulator tile buffer.
pub(crate) const MAX_TILE: usize = 1024;

/// The largest `k` for which an i32 accumulator cannot overflow: `255 · 128 · k < 2^31`.
pub const MAX_K: usize = 65_792;

/// Activation rows: row `r` is `data[r·lda .. r·lda + k]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ARows<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    pub k: usize,
    pub lda: usize,
}

impl<'a> ARows<'a> {
    /// Row `r`'s `k` values.
    #[inline(always)]
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.lda..r * self.lda + self.k]
    }

    /// Rows `r0..r0 + rows`.
    pub fn sub(&self, r0: usize, rows: usize) -> ARows<'a> {
        ARows {
            data: &self.data[(r0 * self.lda).min(self.data.len())..],
            rows,
            k: self.k,
            lda: self.lda,
        }
    }

    /// Whether every row has `kpad ≥ k` readable bytes (what direct kernels read).
    pub fn readable(&self, kpad: usize) -> bool {
        self.rows == 0 || (self.lda >= kpad && self.data.len() >= (self.rows - 1) * self.lda + kpad)
    }
}

/// Implicit im2row rows over a spatially padded NHWC batch (`[N, hp, wp, c]`): row `m`
/// (output pixel `(n, y, x)`) is `kh` segments of `seg_len = kw·c` contiguous bytes, segment
/// `i` starting at [`AWindows::base`]`(m) + i·wp·c`. Valid for one group, dilation 1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AWindows<'a> {
    pub data: &'a [u8],
    pub hp: usize,
    pub wp: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: [usize; 2],
    pub kh: usize,
    pub seg_len: usize,
    /// First output pixel of this view and the number of rows.
    pub row0: usize,
    pub rows: usize,
}

impl AWindows<'_> {
    /// The reduction length `kh · kw · c`.
    pub fn k(&self) -> usize {
        self.kh * self.seg_len
    }

    /// Byte offset of row `m`'s first segment.
    #[inline(always)]
    pub fn base(&self, m: usize) -> usize {
        let m = self.row0 + m;
        let plane = self.oh * self.ow;
        let (b, rem) = (m / plane, m % plane);
        let (y, x) = (rem / self.ow, rem % self.ow);
        ((b * self.hp + y * self.stride[0]) * self.wp + x * self.stride[1]) * self.c
    }

    /// Bytes between consecutive segments of a row.
    pub fn seg_stride(&self) -> usize {
        self.wp * self.c
    }

    /// Whether every row's segments lie inside `data`.
    ///
    /// Only the last row is measured against `data`; that suffices because the two
    /// geometry bounds checked first make [`AWindows::base`] non-decreasing in `m`: a window
    /// row fits its padded image row (`(ow − 1)·s_w·c + seg_len ≤ wp·c`), so stepping to the
    /// next output row adds `s_h·wp·c − (ow − 1)·s_w·c ≥ seg_len ≥ 0`; and the window
    /// fits the padded image (`(oh − 1)·s_h + kh ≤ hp`), so stepping to the next image adds
    /// at least `(kh − 1)·wp·c ≥ 0`. All arithmetic is checked: an overflow is "not in
    /// bounds".
    pub fn in_bounds(&self) -> bool {
        if self.rows == 0 {
            return true;
        }
        let check = || -> Option<bool> {
            let row_fits = self
                .ow
                .checked_sub(1)?
                .checked_mul(self.stride[1])?
                .checked_mul(self.c)?
                .checked_add(self.seg_len)?
                <= self.wp.checked_mul(self.c)?;
            let image_fits = self
                .oh
                .checked_sub(1)?
                .checked_mul(self.stride[0])?
                .checked_add(self.kh)?
                <= self.hp;
            let plane = self.oh.checked_mul(self.ow)?;
            let last = self.row0.checked_add(self.rows - 1)?;
            let images = last / plane.max(1) + 1;
            // `base` of the last row must not overflow either.
            images
                .checked_mul(self.hp)?
                .checked_mul(self.wp)?
                .checked_mul(self.c)?;
            let end = self
                .base(self.rows - 1)
                .checked_add(
                    self.kh
                        .max(1)
                        .checked_sub(1)?
                        .checked_mul(self.seg_stride())?,
                )?
                .checked_add(self.seg_len)?;
            Some(row_fits && image_fits && self.stride[0] >= 1 && end <= self.data.len())
        };
        check().unwrap_or(false)
    }

    /// Writes row `m`'s `k` values into `dst`.
    pub fn copy_row(&self, m: usize, dst: &mut [u8]) {
        let base = self.base(m);
        for (i, seg) in dst
            .chunks_exact_mut(self.seg_len.max(1))
            .take(self.kh)
            .enumerate()
        {
            let at = base + i * self.seg_stride();
            seg.copy_from_slice(&self.data[at..at + self.seg_len]);
        }
    }
}

/// Where the activations come from: a matrix of rows, or implicit im2row windows.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ASource<'a> {
    Rows(ARows<'a>),
    Windows(AWindows<'a>),
}

impl<'a> ASource<'a> {
    pub fn rows(&self) -> usize {
        match self {
            ASource::Rows(r) => r.rows,
            ASource::Windows(w) => w.rows,
        }
    }
    pub fn k(&self) -> usize {
        match self {
            ASource::Rows(r) => r.k,
            ASource::Windows(w) => w.k(),
        }
    }
    /// Rows `r0..r0 + rows`.
    pub fn sub(&self, r0: usize, rows: usize) -> ASource<'a> {
        match self {
            ASource::Rows(r) => ASource::Rows(r.sub(r0, rows)),
            ASource::Windows(w) => ASource::Windows(AWindows {
                row0: w.row0 + r0,
                rows,
                ..*w
            }),
        }
    }
}

/// The most rows any micro-kernel tile has.
pub(crate) const MAX_MR: usize = 16;

/// The most columns any micro-kernel tile has (the widest VNNI tile: four 16-lane vectors).
pub(crate) const MAX_NR: usize = 64;

/// A micro-kernel: computes one `MR × NR` tile of i32 dot products over packed operands.
pub(crate) trait Micro {
    const MR: usize;
    const NR: usize;
    const KG: usize;
    type A: Copy + Default + Send + Sync;
    type B: Copy + Default + Send + Sync;
    /// Widens an activation byte into the packed A element.
    fn a_elem(v: u8) -> Self::A;
    /// Widens a weight byte into the packed B element.
    fn b_elem(v: i8) -> Self::B;
    /// `acc[r·NR + c] = Σ_g Σ_j a[g][r][j] · b[g][c][j]` for `kgroups` groups.
    ///
    /// # Safety
    /// `a` holds `kgroups·MR·KG` elements, `b` holds `kgroups·NR·KG`, and the CPU supports the
    /// instructions of the implementing path.
    unsafe fn tile(kgroups: usize, a: &[Self::A], b: &[Self::B], acc: &mut [i32; MAX_TILE]);

    /// Packs rows `m0..m0 + rows` of `a` into `out`, which holds `kgroups·MR·KG` elements.
    /// Positions past `k` are never written, so they keep the zeros `out` was created with;
    /// rows past `rows` keep stale values, whose results the caller discards.
    #[inline(always)]
    fn pack_a(a: &ARows<'_>, m0: usize, rows: usize, kgroups: usize, out: &mut [Self::A]) {
        let k = a.k;
        debug_assert!(kgroups * Self::KG >= k && out.len() >= kgroups * Self::MR * Self::KG);
        for r in 0..rows {
            let src = a.row(m0 + r);
            let mut groups = src.chunks_exact(Self::KG);
            for (g, group) in groups.by_ref().enumerate() {
                let at = (g * Self::MR + r) * Self::KG;
                Self::widen(group, &mut out[at..at + Self::KG]);
            }
            let tail = groups.remainder();
            if !tail.is_empty() {
                let at = ((k / Self::KG) * Self::MR + r) * Self::KG;
                Self::widen(tail, &mut out[at..at + tail.len()]);
            }
        }
    }

    /// Whether the kernel reads activation rows in place ([`Micro::tile_rows`]) instead of
    /// packed tiles.
    const DIRECT_A: bool = false;

    /// Weight panels hold a multiple of this many `k` groups (zero-padded), for kernels
    /// that consume `k` in fixed blocks (AMX: 16 groups of 4).
    const B_GROUP_ALIGN: usize = 1;

    /// `tile` over `MR` row-major u8 rows `rows[r·lda..]`, each with `kgroups·KG` readable
    /// bytes. The default packs them first; direct kernels read them in place.
    ///
    /// # Safety
    /// As [`Micro::tile`], and `rows` holds `(MR − 1)·lda + kgroups·KG` bytes.
    #[inline(always)]
    unsafe fn tile_rows(
        kgroups: usize,
        rows: &[u8],
        lda: usize,
        b: &[Self::B],
        acc: &mut [i32; MAX_TILE],
    ) {
        let k = kgroups * Self::KG;
        let view = ARows {
            data: rows,
            rows: Self::MR,
            k,
            lda,
        };
        let mut packed = vec![Self::A::default(); kgroups * Self::MR * Self::KG];
        Self::pack_a(&view, 0, Self::MR, kgroups, &mut packed);
        // SAFETY: forwarded from the caller; `packed` holds exactly `kgroups` groups.
        unsafe { Self::tile(kgroups, &packed, b, acc) }
    }

    /// `tile` over `MR` implicit-im2row rows: row `r` is `segs` segments of
    /// `seg_groups·KG` bytes at `data[bases[r] + s·seg_stride ..]`. The default gathers the
    /// rows first; direct kernels read the segments in place.
    ///
    /// # Safety
    /// As [`Micro::tile`], and every segment lies inside `data`.
    /// [`Micro::tile_rows`] told how many of the `MR` rows are real (the rest are zero
    /// padding whose results are dropped), for kernels that can do less work then.
    ///
    /// # Safety
    /// As [`Micro::tile_rows`].
    #[inline(always)]
    unsafe fn tile_rows_valid(
        valid: usize,
        kgroups: usize,
        rows: &[u8],
        lda: usize,
        b: &[Self::B],
        acc: &mut [i32; MAX_TILE],
    ) {
        let _ = valid;
        // SAFETY: forwarded.
        unsafe { Self::tile_rows(kgroups, rows, lda, b, acc) }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_windows(
        seg_groups: usize,
        segs: usize,
        data: &[u8],
        bases: &[usize; MAX_MR],
        seg_stride: usize,
        b: &[Self::B],
        acc: &mut [i32; MAX_TILE],
    ) {
        let seg_len = seg_groups * Self::KG;
        let kpad = segs * seg_len;
        let mut rows = vec![0u8; Self::MR * kpad];
        for (r, row) in rows.chunks_exact_mut(kpad.max(1)).enumerate() {
            for (s, seg) in row.chunks_exact_mut(seg_len.max(1)).enumerate() {
                let at = bases[r] + s * seg_stride;
                seg.copy_from_slice(&data[at..at + seg_len]);
            }
        }
        // SAFETY: forwarded from the caller; `rows` holds `MR` rows of `kpad` bytes.
        unsafe { Self::tile_rows(segs * seg_groups, &rows, kpad, b, acc) }
    }

    /// Converts activation bytes into packed A elements (`dst.len() == src.len()`).
    #[inline(always)]
    fn widen(src: &[u8], dst: &mut [Self::A]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = Self::a_elem(v);
        }
    }

    /// Packs all of `w` (`[n, k]`) into panels.
    fn pack_b(w: &ArrayView2<i8>) -> Vec<Self::B> {
        let (n, k) = w.dim();
        let kgroups = k.div_ceil(Self::KG).next_multiple_of(Self::B_GROUP_ALIGN);
        let panels = n.div_ceil(Self::NR);
        let mut out = vec![Self::B::default(); panels * kgroups * Self::NR * Self::KG];
        for ch in 0..n {
            let (p, c) = (ch / Self::NR, ch % Self::NR);
            let base = p * kgroups * Self::NR * Self::KG;
            for kk in 0..k {
                let (g, j) = (kk / Self::KG, kk % Self::KG);
                out[base + (g * Self::NR + c) * Self::KG + j] = Self::b_elem(w[[ch, kk]]);
            }
        }
        out
    }
}

/// Packed weights, one variant per path (so the data always matches its kernel). A SIMD
/// variant holds the token that proves its CPU check, so it cannot exist on a CPU that
/// lacks the instructions, whoever builds it.
pub(crate) enum PackedData {
    /// The reference path keeps the weights as given.
    Reference(Array2<i8>),
    Generic(Vec<i16>),
    #[cfg(target_arch = "x86_64")]
    Avx2(Vec<i16>, Avx2Cpu),
    #[cfg(target_arch = "x86_64")]
    /// Packed for the VNNI tile of `nv` 16-lane vectors (see `x86_64::vnni_vectors`).
    Vnni(Vec<i8>, usize, VnniCpu),
    #[cfg(target_arch = "x86_64")]
    /// Packed in 32-column panels: two AMX B tiles side by side.
    Amx(Vec<i8>, AmxCpu),
}

/// Int8 weights `[n, k]` packed once for one kernel path, with their per-channel sums (for
/// the activation zero-point correction). A layer keeps one and reuses it for every call.
///
/// Weights in ONNX's other conventions (u8, nonzero zero points per tensor or per output
/// channel) are packed by [`PackedWeights::from_int8`]: u8 weights become i8 through
/// `w = (w − 128) + 128` with the zero point moved by 128, and nonzero zero points are
/// folded into the correction by activation row sums, so the micro-kernels stay the same.
pub struct PackedWeights {
    pub(crate) kernel: KernelChoice,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) row_sums: Vec<i32>,
    /// The weights' zero points per output channel (on the i8 grid), when any is nonzero.
    pub(crate) zero_points: Option<Vec<i32>>,
    pub(crate) data: PackedData,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("kernel", &self.kernel)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

impl PackedWeights {
    /// Packs `weights` (`[out_channels, k]`, i8, zero point 0) for the fastest path of this CPU.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `k` exceeds [`MAX_K`] (the i32 accumulator could overflow).
    pub fn new(weights: ArrayView2<i8>) -> Result<Self> {
        Self::with_kernel(weights, KernelChoice::best())
    }

    /// Packs `weights` for a given path (tests and benchmarks force paths this way).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when this CPU cannot run `kernel`; [`Error::InvalidConfig`] when
    /// `k` exceeds [`MAX_K`].
    pub fn with_kernel(weights: ArrayView2<i8>, kernel: KernelChoice) -> Result<Self> {
        if !kernel.is_available() {
            return Err(Error::Unsupported(format!(
                "the {kernel} int8 kernel needs CPU features this machine lacks"
            )));
        }
        let (n, k) = weights.dim();
        if k > MAX_K {
            return Err(Error::config(
                "int8 GEMM",
                format!("k = {k} exceeds {MAX_K}, where an i32 accumulator could overflow"),
            ));
        }
        let row_sums = weights
            .outer_iter()
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        let data = match kernel {
            KernelChoice::Reference => PackedData::Reference(weights.to_owned()),
            KernelChoice::Generic => PackedData::Generic(super::generic::Generic::pack_b(&weights)),
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx2 => PackedData::Avx2(
                super::x86_64::Avx2::pack_b(&weights),
                Avx2Cpu::detect().ok_or_else(|| unavailable(kernel))?,
            ),
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx512Vnni => {
                use super::x86_64::{vnni_vectors, VnniMid, VnniNarrow, VnniWide};
                let nv = vnni_vectors(n);
                let packed = match nv {
                    1 => VnniNarrow::pack_b(&weights),
                    2 => VnniMid::pack_b(&weights),
                    _ => VnniWide::pack_b(&weights),
                };
                PackedData::Vnni(
                    packed,
                    nv,
                    VnniCpu::detect().ok_or_else(|| unavailable(kernel))?,
                )
            }
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Amx => PackedData::Amx(
                super::x86_64::Amx::pack_b(&weights),
                AmxCpu::detect().ok_or_else(|| unavailable(kernel))?,
            ),
            #[cfg(not(target_arch = "x86_64"))]
            _ => return Err(Error::Unsupported(format!("{kernel} on this architecture"))),
        };
        Ok(PackedWeights {
            kernel,
            n,
            k,
            row_sums,
            zero_points: None,
            data,
        })
    }

    /// Packs 8-bit weights `[out_channels, k]` in either ONNX convention with their zero
    /// points (one for the tensor, or one per output channel; in the weights' type range),
    /// for the fastest path of this CPU. ONNX's `B` of `MatMulInteger` (`[k, n]`) is packed
    /// as its transpose view (`b.t()`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero points of another count or outside the type's
    /// range, and as [`PackedWeights::with_kernel`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, Array2};
    /// use nncompress::kernels::{matmul_integer, Int8Matrix, PackedWeights};
    /// // u8 weights with zero point 130 per tensor, i8 activations with zero point −1.
    /// let w = array![[131u8, 128], [130, 140]];
    /// let packed = PackedWeights::from_int8(Int8Matrix::U8(w.view()), &[130])?;
    /// let a = array![[1i8, 3]];
    /// let mut out = Array2::<i32>::zeros((1, 2));
    /// matmul_integer(Int8Matrix::I8(a.view()), -1, &packed, None, out.view_mut())?;
    /// assert_eq!(out, array![[2 * 1 + 4 * -2, 2 * 0 + 4 * 10]]);
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn from_int8(weights: super::Int8Matrix<'_>, zero_points: &[i32]) -> Result<Self> {
        Self::from_int8_with_kernel(weights, zero_points, KernelChoice::best())
    }

    /// [`PackedWeights::from_int8`] for a given path.
    ///
    /// # Errors
    /// As [`PackedWeights::from_int8`] and [`PackedWeights::with_kernel`].
    pub fn from_int8_with_kernel(
        weights: super::Int8Matrix<'_>,
        zero_points: &[i32],
        kernel: KernelChoice,
    ) -> Result<Self> {
        let n = weights.dim().0;
        let zero_points = super::integer::check_zero_points(
            "int8 weights",
            weights.is_unsigned(),
            zero_points,
            n,
        )?;
        let mut packed = Self::with_kernel(weights.into_i8().view(), kernel)?;
        packed.zero_points = zero_points;
        Ok(packed)
    }

    /// The path the weights are packed for.
    pub fn kernel(&self) -> KernelChoice {
        self.kernel
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.n
    }

    /// Reduction length `k`.
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Bytes held by the packed data.
    pub fn packed_bytes(&self) -> usize {
        match &self.data {
            PackedData::Reference(a) => a.len(),
            PackedData::Generic(v) => 2 * v.len(),
            #[cfg(target_arch = "x86_64")]
            PackedData::Avx2(v, _) => 2 * v.len(),
            #[cfg(target_arch = "x86_64")]
            PackedData::Vnni(v, ..) => v.len(),
            #[cfg(target_arch = "x86_64")]
            PackedData::Amx(v, _) => v.len(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn unavailable(kernel: KernelChoice) -> Error {
    Error::Unsupported(format!("the {kernel} kernel on this CPU"))
}
