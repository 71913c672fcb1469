//! The int8 GEMM driver: shape checks, the zero-point correction, the split over threads,
//! and the tile loop every path shares.
//!
//! `out[m, n] = epilogue(n, Σ_k (a[m, k] − z_a) · w[n, k])`, computed as
//! `Σ_k a[m, k]·w[n, k] − z_a·Σ_k w[n, k]` so the micro-kernels multiply raw u8 by raw i8.
//! Integer arithmetic is exact, so results are identical whatever the path or thread count.

use super::epilogue::{Dequantize, DequantizeRows, Epilogue, I32Out, Requantize};
use super::pack::{ARows, ASource, Micro, PackedData, PackedWeights, MAX_MR, MAX_NR, MAX_TILE};
use crate::error::{Error, Result};
use ndarray::{ArrayView2, ArrayViewMut2, Axis};

/// Below this many multiply-adds (~15 µs on one VNNI core) the calling thread does the
/// whole GEMM. Above it, helpers are offered tasks through `parallel::for_each`, which does
/// not wait for a helper still asleep, so splitting costs little more than the wake-up
/// call when no helper comes in time.
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// The correction for nonzero weight zero points `z_w[n]`:
/// `Σ_k (a − z_a)(w − z_w) = Σ_k (a − z_a)·w − z_w[n]·Σ_k (a[m, k] − z_a)`.
#[derive(Clone, Copy)]
pub(crate) struct RowCorrection<'a> {
    /// `Σ_k (a[m, k] − z_a)` for every row of the task.
    pub row_sums: &'a [i32],
    /// `z_w[n]` for every column of the whole problem.
    pub zero_points: &'a [i32],
}

impl<'a> RowCorrection<'a> {
    fn sub(self, r0: usize, rows: usize) -> Self {
        RowCorrection {
            row_sums: &self.row_sums[r0..r0 + rows],
            ..self
        }
    }
}

/// One thread's share: rows of `a` and `out`, and the columns `n0..n0 + out.ncols()`.
pub(crate) struct Task<'a, 'o, E: Epilogue> {
    pub a: ASource<'a>,
    /// `z_a · Σ_k w[n, k]` for every column of the whole problem.
    pub corr: &'a [i32],
    /// The weight zero-point correction, when any is nonzero.
    pub rows: Option<RowCorrection<'a>>,
    pub n0: usize,
    /// The problem's row of the task's first row (row-dependent epilogues index by it).
    pub row0: usize,
    pub ep: &'a E,
    pub out: ArrayViewMut2<'o, E::Out>,
}

/// Writes the valid `rows × cols` part of a tile through the epilogue.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store<E: Epilogue>(
    acc: &[i32; MAX_TILE],
    nr: usize,
    row0: usize,
    r0: usize,
    rows: usize,
    out_c0: usize,
    n0: usize,
    cols: usize,
    corr: &[i32],
    rows_corr: Option<RowCorrection<'_>>,
    ep: &E,
    out: &mut ArrayViewMut2<E::Out>,
) {
    let col_corr = &corr[n0..n0 + cols];
    match rows_corr {
        // The common case keeps the plain loop: nothing per row but the store.
        None => {
            for r in 0..rows {
                store_row(
                    &acc[r * nr..r * nr + cols],
                    r0 + r,
                    row0 + r0 + r,
                    out_c0,
                    n0,
                    col_corr,
                    ep,
                    out,
                );
            }
        }
        Some(rc) => {
            let mut both = [0i32; MAX_NR];
            let zero_points = &rc.zero_points[n0..n0 + cols];
            for r in 0..rows {
                let s = rc.row_sums[r0 + r];
                for ((b, &c), &z) in both.iter_mut().zip(col_corr).zip(zero_points) {
                    *b = c.wrapping_add(z.wrapping_mul(s));
                }
                store_row(
                    &acc[r * nr..r * nr + cols],
                    r0 + r,
                    row0 + r0 + r,
                    out_c0,
                    n0,
                    &both[..cols],
                    ep,
                    out,
                );
            }
        }
    }
}

/// Writes one row of a tile: `src` less `corr` through the epilogue into columns
/// `out_c0..` of output row `r` (the problem's row `row`). A function, not a closure, so
/// that it inlines into (and compiles with the target features of) every path's tile loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store_row<E: Epilogue>(
    src: &[i32],
    r: usize,
    row: usize,
    out_c0: usize,
    n0: usize,
    corr: &[i32],
    ep: &E,
    out: &mut ArrayViewMut2<E::Out>,
) {
    let cols = src.len();
    let mut out_row = out.row_mut(r);
    match out_row.as_slice_mut() {
        // The corrected sum fits i32 (k ≤ MAX_K); the raw terms may not, and wrapping
        // arithmetic gives the exact result modulo 2^32.
        Some(dst) => ep.apply_row_at(row, n0, src, corr, &mut dst[out_c0..out_c0 + cols]),
        None => {
            for c in 0..cols {
                out_row[out_c0 + c] = ep.apply_at(row, n0 + c, src[c].wrapping_sub(corr[c]));
            }
        }
    }
}

/// The tile loop. For each `NR`-column weight panel (it stays in L1 while it is used), every
/// `MR`-row tile is multiplied against it and written through the epilogue. Packing kernels
/// pack all of the task's row tiles once up front; direct kernels read the rows in place
/// (only a last partial tile is copied, zero-padded, into a scratch tile).
///
/// # Safety
/// The CPU supports every instruction `K`'s micro-kernel uses (the caller holds the
/// capability token of `K`'s path, or `K` is the portable kernel).
#[inline(always)]
pub(crate) unsafe fn drive<K: Micro, E: Epilogue>(mut task: Task<'_, '_, E>, b: &[K::B]) {
    let (m, k) = (task.a.rows(), task.a.k());
    let kg = k.div_ceil(K::KG);
    let kpad = kg * K::KG;
    let panel_len = kg.next_multiple_of(K::B_GROUP_ALIGN) * K::NR * K::KG;
    let tile_len = kg * K::MR * K::KG;
    let n_end = task.n0 + task.out.ncols();
    let tiles = m.div_ceil(K::MR);
    let full_tiles = m / K::MR;
    // Implicit im2row is read in place by direct kernels only; anything else gets rows.
    let windows = match task.a {
        ASource::Windows(w) if K::DIRECT_A && w.seg_len % K::KG == 0 => Some(w),
        _ => None,
    };
    let gathered;
    let rows = match task.a {
        ASource::Rows(r) => r,
        ASource::Windows(w) => {
            let mut buf = Vec::new();
            if windows.is_none() {
                buf = vec![0u8; m * kpad];
                for (r, dst) in buf.chunks_exact_mut(kpad.max(1)).take(m).enumerate() {
                    w.copy_row(r, &mut dst[..k]);
                }
            }
            gathered = buf;
            ARows {
                data: &gathered,
                rows: if windows.is_some() { 0 } else { m },
                k,
                lda: kpad,
            }
        }
    };
    let mut apack = Vec::new();
    let mut scratch = Vec::new();
    if K::DIRECT_A {
        if windows.is_none() && full_tiles < tiles {
            scratch = vec![0u8; K::MR * kpad];
            for r in 0..m - full_tiles * K::MR {
                scratch[r * kpad..r * kpad + k].copy_from_slice(rows.row(full_tiles * K::MR + r));
            }
        }
    } else {
        apack = vec![K::A::default(); tiles * tile_len];
        for (t, dst) in apack
            .chunks_exact_mut(tile_len.max(1))
            .take(tiles)
            .enumerate()
        {
            let m0 = t * K::MR;
            K::pack_a(&rows, m0, (m - m0).min(K::MR), kg, dst);
        }
    }
    let mut acc = [0i32; MAX_TILE];
    for p in task.n0 / K::NR..n_end.div_ceil(K::NR) {
        let panel = &b[p * panel_len..(p + 1) * panel_len];
        let c0 = p * K::NR;
        let cols = n_end.min(c0 + K::NR) - c0;
        for t in 0..tiles {
            let m0 = t * K::MR;
            let valid = (m - m0).min(K::MR);
            match (K::DIRECT_A, &windows) {
                (true, Some(w)) => {
                    // Rows past the end repeat the tile's first row; their results are dropped.
                    let mut bases = [0usize; MAX_MR];
                    for (r, base) in bases.iter_mut().enumerate().take(K::MR) {
                        *base = w.base(m0 + if r < valid { r } else { 0 });
                    }
                    // SAFETY: `run_src` checked that every window lies inside `w.data`; the
                    // segments are whole `KG` groups (`seg_len % KG == 0`, checked above);
                    // the caller of this `unsafe fn` guarantees the CPU.
                    unsafe {
                        K::tile_windows(
                            w.seg_len / K::KG,
                            w.kh,
                            w.data,
                            &bases,
                            w.seg_stride(),
                            panel,
                            &mut acc,
                        )
                    };
                }
                (true, None) => {
                    let (data, lda) = if t < full_tiles {
                        (&rows.data[m0 * rows.lda..], rows.lda)
                    } else {
                        (&scratch[..], kpad)
                    };
                    // SAFETY: full tiles lie inside `rows`, whose rows all have `kpad`
                    // readable bytes (checked by `run_src`); the scratch tile has `MR` rows
                    // of `kpad`; the caller of this `unsafe fn` guarantees the CPU.
                    unsafe { K::tile_rows_valid(valid, kg, data, lda, panel, &mut acc) };
                }
                (false, _) => {
                    let a_tile = &apack[t * tile_len..(t + 1) * tile_len];
                    // SAFETY: `a_tile` and `panel` hold exactly `kg` groups by construction,
                    // and the caller of this `unsafe fn` guarantees the CPU.
                    unsafe { K::tile(kg, a_tile, panel, &mut acc) };
                }
            }
            store(
                &acc,
                K::NR,
                task.row0,
                m0,
                valid,
                c0 - task.n0,
                c0,
                cols,
                task.corr,
                task.rows,
                task.ep,
                &mut task.out,
            );
        }
    }
}

/// The reference path over unpacked weights.
fn drive_reference<E: Epilogue>(mut task: Task<'_, '_, E>, w: &ndarray::Array2<i8>) {
    let cols = task.out.ncols();
    let mut buf = vec![0u8; task.a.k()];
    for r in 0..task.a.rows() {
        let arow: &[u8] = match &task.a {
            ASource::Rows(rows) => rows.row(r),
            ASource::Windows(win) => {
                win.copy_row(r, &mut buf);
                &buf
            }
        };
        for c in 0..cols {
            let n = task.n0 + c;
            let dot: i32 = arow
                .iter()
                .zip(w.row(n))
                .fold(0i32, |s, (&x, &y)| s.wrapping_add(x as i32 * y as i32));
            let corr = match task.rows {
                None => task.corr[n],
                Some(rc) => {
                    task.corr[n].wrapping_add(rc.zero_points[n].wrapping_mul(rc.row_sums[r]))
                }
            };
            task.out[[r, c]] = task.ep.apply_at(task.row0 + r, n, dot.wrapping_sub(corr));
        }
    }
}

fn run_task<E: Epilogue>(w: &PackedWeights, task: Task<'_, '_, E>) {
    match &w.data {
        PackedData::Reference(plain) => drive_reference(task, plain),
        // SAFETY: the generic micro-kernel uses no instruction beyond the baseline target.
        PackedData::Generic(b) => unsafe { drive::<super::generic::Generic, E>(task, b) },
        #[cfg(target_arch = "x86_64")]
        PackedData::Avx2(b, cpu) => super::x86_64::run_avx2(*cpu, task, b),
        #[cfg(target_arch = "x86_64")]
        PackedData::Vnni(b, nv, cpu) => super::x86_64::run_vnni(*cpu, task, b, *nv),
        #[cfg(target_arch = "x86_64")]
        PackedData::Amx(b, cpu) => super::x86_64::run_amx(*cpu, task, b),
    }
}

/// The `k` granularity of `w`'s path (patch rows padded to it can be read in place).
pub(crate) fn tile_k_step(w: &PackedWeights) -> usize {
    match &w.data {
        PackedData::Reference(_) => 1,
        PackedData::Generic(_) => super::generic::Generic::KG,
        #[cfg(target_arch = "x86_64")]
        PackedData::Avx2(..) => super::x86_64::Avx2::KG,
        #[cfg(target_arch = "x86_64")]
        PackedData::Vnni(..) => super::x86_64::VnniWide::KG,
        #[cfg(target_arch = "x86_64")]
        PackedData::Amx(..) => super::x86_64::Amx::KG,
    }
}

fn tile_shape(w: &PackedWeights) -> (usize, usize) {
    match &w.data {
        PackedData::Reference(_) => (1, 1),
        PackedData::Generic(_) => (super::generic::Generic::MR, super::generic::Generic::NR),
        #[cfg(target_arch = "x86_64")]
        PackedData::Avx2(..) => (super::x86_64::Avx2::MR, super::x86_64::Avx2::NR),
        #[cfg(target_arch = "x86_64")]
        PackedData::Vnni(_, nv, _) => super::x86_64::vnni_tile(*nv),
        #[cfg(target_arch = "x86_64")]
        PackedData::Amx(..) => (super::x86_64::Amx::MR, super::x86_64::Amx::NR),
    }
}

/// `k` rounded up to what a direct-reading kernel reads per row, if `w`'s path is one.
fn direct_kpad(w: &PackedWeights) -> Option<usize> {
    match &w.data {
        #[cfg(target_arch = "x86_64")]
        PackedData::Vnni(..) | PackedData::Amx(..) => Some(w.k.div_ceil(4) * 4),
        _ => None,
    }
}

/// Runs the GEMM over a matrix view (copied when it is not contiguous, or when a direct
/// kernel would read past its end).
pub(crate) fn run<E: Epilogue>(
    a: ArrayView2<u8>,
    a_zero_point: u8,
    w: &PackedWeights,
    ep: &E,
    out: ArrayViewMut2<E::Out>,
) -> Result<()> {
    run_rows(a, a_zero_point, None, w, ep, out)
}

/// [`run`], with `row_zero_points[m]` (one per row of `a`, `a_zero_point` 0) subtracted
/// from every row instead of one zero point: `Σ_k (a[m, k] − z[m])·w[n, k]`, corrected
/// exactly in integers as the weight zero points are. The weights must have none.
fn run_rows<E: Epilogue>(
    a: ArrayView2<u8>,
    a_zero_point: u8,
    row_zero_points: Option<&[i32]>,
    w: &PackedWeights,
    ep: &E,
    out: ArrayViewMut2<E::Out>,
) -> Result<()> {
    let (m, k) = a.dim();
    if k != w.k {
        return Err(Error::shape(
            "gemm_u8i8",
            None,
            format!("a [m, {}]", w.k),
            a.shape(),
        ));
    }
    let kpad = direct_kpad(w).unwrap_or(k);
    let contiguous = a.as_slice().filter(|_| kpad == k);
    let owned;
    let rows = match contiguous {
        Some(data) => ARows {
            data,
            rows: m,
            k,
            lda: k,
        },
        None => {
            let mut buf = vec![0u8; m * kpad];
            for (dst, src) in buf.chunks_exact_mut(kpad.max(1)).zip(a.outer_iter()) {
                dst[..k]
                    .iter_mut()
                    .zip(src.iter())
                    .for_each(|(d, &v)| *d = v);
            }
            owned = buf;
            ARows {
                data: &owned,
                rows: m,
                k,
                lda: kpad,
            }
        }
    };
    run_src_rows(
        ASource::Rows(rows),
        a_zero_point,
        row_zero_points,
        w,
        ep,
        out,
    )
}

/// Runs the GEMM over an activation source.
pub(crate) fn run_src<E: Epilogue>(
    a: ASource<'_>,
    a_zero_point: u8,
    w: &PackedWeights,
    ep: &E,
    out: ArrayViewMut2<E::Out>,
) -> Result<()> {
    run_src_rows(a, a_zero_point, None, w, ep, out)
}

/// [`run_src`] with optional per-row zero points (see [`run_rows`]).
fn run_src_rows<E: Epilogue>(
    a: ASource<'_>,
    a_zero_point: u8,
    row_zero_points: Option<&[i32]>,
    w: &PackedWeights,
    ep: &E,
    mut out: ArrayViewMut2<E::Out>,
) -> Result<()> {
    let (m, k) = (a.rows(), a.k());
    let n = w.n;
    let readable = match &a {
        ASource::Rows(r) => r.readable(direct_kpad(w).unwrap_or(k)),
        ASource::Windows(win) => win.in_bounds(),
    };
    if k != w.k || !readable {
        return Err(Error::shape(
            "gemm_u8i8",
            None,
            format!("rows of {} readable values", w.k),
            &[m, k],
        ));
    }
    if out.dim() != (m, n) {
        return Err(Error::shape(
            "gemm_u8i8",
            None,
            format!("out [{m}, {n}]"),
            out.shape(),
        ));
    }
    if let Some(c) = ep.columns().filter(|&c| c != n) {
        return Err(Error::shape(
            "gemm_u8i8",
            None,
            format!("epilogue parameters for {n} channels"),
            &[c],
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let corr: Vec<i32> = w
        .row_sums
        .iter()
        .map(|&s| s.wrapping_mul(a_zero_point as i32))
        .collect();
    let row_sums: Vec<i32> = match &w.zero_points {
        None => Vec::new(),
        Some(_) => {
            // |Σ_k (a − z_a)| ≤ 255·k fits i32 for k ≤ MAX_K.
            let offset = k as i32 * a_zero_point as i32;
            let mut buf = vec![0u8; k];
            (0..m)
                .map(|r| {
                    let row: &[u8] = match &a {
                        ASource::Rows(rows) => rows.row(r),
                        ASource::Windows(win) => {
                            win.copy_row(r, &mut buf);
                            &buf
                        }
                    };
                    row.iter().map(|&v| v as i32).sum::<i32>() - offset
                })
                .collect()
        }
    };
    let rows_corr = match (row_zero_points, w.zero_points.as_deref()) {
        (None, zero_points) => zero_points.map(|zero_points| RowCorrection {
            row_sums: &row_sums,
            zero_points,
        }),
        // `Σ_k (a − z[m])·w = Σ_k a·w − z[m]·Σ_k w[n, k]`: the weight zero-point correction
        // with the roles of rows and columns exchanged.
        (Some(z), None) if z.len() == m && a_zero_point == 0 => Some(RowCorrection {
            row_sums: z,
            zero_points: &w.row_sums,
        }),
        (Some(z), _) => {
            return Err(Error::shape(
                "gemm_u8i8",
                None,
                format!("{m} row zero points, a zero point of 0 and weights without zero points"),
                &[z.len()],
            ))
        }
    };
    let (mr, nr) = tile_shape(w);
    let threads = rayon::current_num_threads();
    // Four tasks per thread, so that a helper that wakes late still finds some.
    let tasks = if threads > 1 && m * n * k.max(1) >= PARALLEL_MIN_MACS {
        4 * threads
    } else {
        1
    };
    let corr = corr.as_slice();
    let task = |a, rows, n0, row0, out| Task {
        a,
        corr,
        rows,
        n0,
        row0,
        ep,
        out,
    };
    if tasks == 1 {
        run_task(w, task(a, rows_corr, 0, 0, out.view_mut()));
    } else if m >= 2 * tasks * mr {
        let rows = m.div_ceil(tasks).div_ceil(mr) * mr;
        let chunks: Vec<_> = out
            .axis_chunks_iter_mut(Axis(0), rows)
            .enumerate()
            .collect();
        super::parallel::for_each(chunks, &|(i, o)| {
            let (r0, len) = (i * rows, o.nrows());
            let rc = rows_corr.map(|rc| rc.sub(r0, len));
            run_task(w, task(a.sub(r0, len), rc, 0, r0, o))
        });
    } else {
        let cols = n.div_ceil(tasks).div_ceil(nr) * nr;
        let chunks: Vec<_> = out
            .axis_chunks_iter_mut(Axis(1), cols)
            .enumerate()
            .collect();
        super::parallel::for_each(chunks, &|(i, o)| {
            run_task(w, task(a, rows_corr, i * cols, 0, o))
        });
    }
    Ok(())
}

/// `out[m, n] = Σ_k (a[m, k] − z_a)·w[n, k] + bias[n]` in i32 (the "i32 out" epilogue).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `a` is not `[m, k]` with the weights' `k`, `out` is not
/// `[m, n]`, or `bias` does not have `n` entries.
///
/// # Examples
/// ```
/// use ndarray::{array, Array2};
/// use nncompress::kernels::{gemm_u8i8_i32, PackedWeights};
/// let a = array![[130u8, 128, 129]];               // zero point 128: real values 2, 0, 1
/// let w = PackedWeights::new(array![[1i8, 5, -3], [2, 2, 2]].view())?;
/// let mut out = Array2::<i32>::zeros((1, 2));
/// gemm_u8i8_i32(a.view(), 128, &w, Some(&[10, 0]), out.view_mut())?;
/// assert_eq!(out, array![[2 - 3 + 10, 4 + 2]]);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn gemm_u8i8_i32(
    a: ArrayView2<u8>,
    a_zero_point: u8,
    w: &PackedWeights,
    bias: Option<&[i32]>,
    out: ArrayViewMut2<i32>,
) -> Result<()> {
    run(a, a_zero_point, w, &I32Out { bias }, out)
}

/// The int8 GEMM with the fused requantizing epilogue: u8 out (see [`Requantize`]).
///
/// # Errors
/// As [`gemm_u8i8_i32`], with `requant` needing one entry per output channel and u8 output
/// ([`qlinear_matmul`](super::qlinear_matmul) writes i8).
pub fn gemm_u8i8_u8(
    a: ArrayView2<u8>,
    a_zero_point: u8,
    w: &PackedWeights,
    requant: &Requantize,
    out: ArrayViewMut2<u8>,
) -> Result<()> {
    requant.check_signed(false)?;
    run(a, a_zero_point, w, requant, out)
}

/// The int8 GEMM with the dequantizing epilogue: f32 out (see [`Dequantize`]), for
/// dynamic-range quantization.
///
/// # Errors
/// As [`gemm_u8i8_i32`], with `dequant` needing one entry per output channel.
pub fn gemm_u8i8_f32(
    a: ArrayView2<u8>,
    a_zero_point: u8,
    w: &PackedWeights,
    dequant: &Dequantize,
    out: ArrayViewMut2<f32>,
) -> Result<()> {
    run(a, a_zero_point, w, dequant, out)
}

/// The int8 GEMM for activations quantized per row (per token), f32 out:
/// `out[m, n] = (Σ_k (a[m, k] − z[m])·w[n, k]) · (s[m]·s_w[n]) + bias[n]`, the zero points
/// corrected exactly in integers and the scales applied in the epilogue (no second pass).
///
/// # Errors
/// [`Error::ShapeMismatch`] unless there is one zero point and scale per row of `a`, one
/// weight scale (and bias) per output channel and `out` is `[m, n]`, or when `w` has zero
/// points of its own; [`Error::InvalidConfig`] for non-finite scales.
///
/// # Examples
/// ```
/// use ndarray::{array, Array2};
/// use nncompress::kernels::{gemm_u8i8_f32_per_row, PackedWeights};
/// // Row 0 at (scale 0.5, zero 128), row 1 at (scale 2, zero 0).
/// let a = array![[130u8, 128], [1, 3]];
/// let w = PackedWeights::new(array![[1i8, -1], [2, 2]].view())?;
/// let mut out = Array2::<f32>::zeros((2, 2));
/// gemm_u8i8_f32_per_row(a.view(), &[128, 0], &[0.5, 2.0], &w, &[1.0, 0.25], None, out.view_mut())?;
/// assert_eq!(out, array![[1.0, 0.5], [-4.0, 4.0]]);
/// # Ok::<(), nncompress::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gemm_u8i8_f32_per_row(
    a: ArrayView2<u8>,
    row_zero_points: &[u8],
    row_scales: &[f32],
    w: &PackedWeights,
    weight_scales: &[f32],
    bias: Option<&[f32]>,
    out: ArrayViewMut2<f32>,
) -> Result<()> {
    let m = a.nrows();
    if row_zero_points.len() != m || row_scales.len() != m {
        return Err(Error::shape(
            "gemm_u8i8_f32_per_row",
            None,
            format!("{m} row zero points and scales"),
            &[row_zero_points.len(), row_scales.len()],
        ));
    }
    let ep = DequantizeRows::new(row_scales, weight_scales, bias)?;
    let zeros: Vec<i32> = row_zero_points.iter().map(|&z| i32::from(z)).collect();
    run_rows(a, 0, Some(&zeros), w, &ep, out)
}
