//! Quantized node implementations that run inside the float graph's executor: a
//! quantized model is the same graph with some nodes swapped for these (the one-executor
//! design of issue 17), so every op the graph has runs beside them unchanged.

use super::layers::over_rows;
use crate::error::{Error, Result};
use crate::kernels::{gemm_u8i8_f32, gemm_u8i8_f32_per_row, Dequantize, PackedWeights};
use crate::tensor::{QuantGrid, Tensor};
use ndarray::{Array1, Array2, ArrayView2};
use std::sync::Arc;

/// How a dynamic layer's input is quantized on the fly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ActivationGranularity {
    /// One u8 scale and zero point for the whole input (ONNX Runtime's
    /// `DynamicQuantizeLinear`).
    PerTensor,
    /// One u8 scale and zero point per row (per token of a sequence): an outlier token
    /// no longer coarsens every other token's grid.
    PerRow,
}

/// The affine u8 grid activations are quantized on (the range always holds zero).
const U8: QuantGrid = QuantGrid {
    qmin: 0,
    qmax: 255,
    symmetric: false,
};

/// A Linear with int8 weights (symmetric, per output channel) whose input is quantized to
/// u8 on the fly, per tensor or per row; the int8 GEMM's epilogue dequantizes and adds the
/// f32 bias, so the output is f32: `y ≈ x · Wᵀ + b` over the last axis of any rank.
#[derive(Clone, Debug)]
pub struct DynamicLinear {
    weight: Array2<i8>,
    weight_scales: Vec<f32>,
    bias: Option<Array1<f32>>,
    granularity: ActivationGranularity,
    /// Packed once, shared by clones.
    packed: Arc<PackedWeights>,
}

impl PartialEq for DynamicLinear {
    fn eq(&self, other: &Self) -> bool {
        self.weight == other.weight
            && self.weight_scales == other.weight_scales
            && self.bias == other.bias
            && self.granularity == other.granularity
    }
}

impl DynamicLinear {
    /// From int8 weights `[out, in]`, one finite positive scale per output channel, an
    /// optional bias and the activation granularity.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for scales that are not one finite positive number per
    /// output channel or a bias of another length; as [`PackedWeights::new`].
    pub fn new(
        weight: Array2<i8>,
        weight_scales: Vec<f32>,
        bias: Option<Array1<f32>>,
        granularity: ActivationGranularity,
    ) -> Result<Self> {
        let out = weight.nrows();
        if weight_scales.len() != out || weight_scales.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::config(
                "dynamic linear",
                format!("{out} finite positive weight scales are needed"),
            ));
        }
        if bias.as_ref().is_some_and(|b| b.len() != out) {
            return Err(Error::config(
                "dynamic linear",
                format!("a bias of {out} entries is needed"),
            ));
        }
        let packed = Arc::new(PackedWeights::new(weight.view())?);
        Ok(DynamicLinear {
            weight,
            weight_scales,
            bias,
            granularity,
            packed,
        })
    }

    /// The int8 weights `[out, in]`.
    pub fn weight(&self) -> &Array2<i8> {
        &self.weight
    }

    /// The per-output-channel weight scales.
    pub fn weight_scales(&self) -> &[f32] {
        &self.weight_scales
    }

    /// The f32 bias.
    pub fn bias(&self) -> Option<&Array1<f32>> {
        self.bias.as_ref()
    }

    /// How the input is quantized.
    pub fn granularity(&self) -> ActivationGranularity {
        self.granularity
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }

    /// The layer on rows `x` (`[m, in]`).
    ///
    /// # Errors
    /// [`Error::NonFinite`] for a NaN or infinite input (its range has no grid);
    /// [`Error::ShapeMismatch`] for rows of another width.
    pub fn forward_rows(&self, x: ArrayView2<'_, f32>, node: &str) -> Result<Array2<f32>> {
        let (m, k) = x.dim();
        if k != self.in_features() {
            return Err(Error::shape(
                "dynamic_linear",
                Some(node),
                format!("[m, {}]", self.in_features()),
                &[m, k],
            ));
        }
        let x = x.as_standard_layout();
        let src = x
            .as_slice()
            .ok_or_else(|| Error::Unsupported("non-contiguous rows".into()))?;
        let non_finite = || Error::NonFinite(format!("input of dynamic layer `{node}`"));
        let mut q = Array2::<u8>::zeros((m, k));
        let mut out = Array2::<f32>::zeros((m, self.out_features()));
        let dst = q
            .as_slice_mut()
            .ok_or_else(|| Error::Unsupported("non-contiguous buffer".into()))?;
        match self.granularity {
            ActivationGranularity::PerTensor => {
                let (lo, hi, finite) = parallel_min_max(src, k);
                if !finite {
                    return Err(non_finite());
                }
                let (s, z) = U8.params(lo, hi);
                parallel_quantize(src, k, dst, s, z);
                let dq = Dequantize::new(
                    s,
                    &self.weight_scales,
                    self.bias.as_ref().map(|b| b.to_vec()),
                )?;
                gemm_u8i8_f32(q.view(), z as u8, &self.packed, &dq, out.view_mut())?;
            }
            ActivationGranularity::PerRow => {
                let mut zeros = vec![0u8; m];
                let mut scales = vec![0f32; m];
                if !quantize_rows(src, k, dst, &mut zeros, &mut scales) {
                    return Err(non_finite());
                }
                gemm_u8i8_f32_per_row(
                    q.view(),
                    &zeros,
                    &scales,
                    &self.packed,
                    &self.weight_scales,
                    self.bias.as_ref().and_then(|b| b.as_slice()),
                    out.view_mut(),
                )?;
            }
        }
        Ok(out)
    }

    /// The layer over the last axis of `x` (`[N, …, in]`).
    ///
    /// # Errors
    /// As [`DynamicLinear::forward_rows`].
    pub fn forward(&self, x: &Tensor, node: &str) -> Result<Tensor> {
        over_rows(x.view(), self.in_features(), Some(node), |rows| {
            self.forward_rows(rows, node)
        })
    }
}

/// Rows per task of the quantizing passes: below this much work one thread does it all.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// `rows` of width `k` cut into a few chunks per thread, as `(first row, row count)`.
fn row_chunks(rows: usize, k: usize) -> Vec<(usize, usize)> {
    let threads = rayon::current_num_threads();
    let chunks = if threads > 1 && rows * k >= PARALLEL_MIN_VALUES {
        (4 * threads).min(rows)
    } else {
        1
    };
    let per = rows.div_ceil(chunks.max(1)).max(1);
    (0..rows)
        .step_by(per)
        .map(|r0| (r0, per.min(rows - r0)))
        .collect()
}

/// Quantizes each row of `src` (width `k`) to u8 on its own grid, writing `dst` and the
/// rows' zero points and scales; false when a value is not finite.
fn quantize_rows(
    src: &[f32],
    k: usize,
    dst: &mut [u8],
    zeros: &mut [u8],
    scales: &mut [f32],
) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    let k = k.max(1);
    let finite = AtomicBool::new(true);
    let mut items = Vec::new();
    let (mut d, mut z, mut s) = (dst, zeros, scales);
    for (r0, rows) in row_chunks(src.len() / k, k) {
        let (dh, dt) = d.split_at_mut(rows * k);
        let (zh, zt) = z.split_at_mut(rows);
        let (sh, st) = s.split_at_mut(rows);
        items.push((&src[r0 * k..(r0 + rows) * k], dh, zh, sh));
        (d, z, s) = (dt, zt, st);
    }
    crate::kernels::parallel::for_each(items, &|(src, dst, zeros, scales)| {
        for (((row, qrow), z), s) in src
            .chunks_exact(k)
            .zip(dst.chunks_exact_mut(k))
            .zip(zeros.iter_mut())
            .zip(scales.iter_mut())
        {
            let (lo, hi, ok) = crate::kernels::min_max(row);
            if !ok {
                finite.store(false, Ordering::Relaxed);
                return;
            }
            let (scale, zero) = U8.params(lo, hi);
            crate::kernels::quantize_u8(&U8, row, scale, zero, qrow);
            *z = zero as u8;
            *s = scale;
        }
    });
    finite.load(Ordering::Relaxed)
}

/// `(min, max, all finite)` of `src` (rows of width `k`), over the threads.
fn parallel_min_max(src: &[f32], k: usize) -> (f32, f32, bool) {
    let k = k.max(1);
    let parts = std::sync::Mutex::new(Vec::new());
    let items: Vec<&[f32]> = row_chunks(src.len() / k, k)
        .into_iter()
        .map(|(r0, rows)| &src[r0 * k..(r0 + rows) * k])
        .collect();
    crate::kernels::parallel::for_each(items, &|chunk| {
        let part = crate::kernels::min_max(chunk);
        if let Ok(mut p) = parts.lock() {
            p.push(part);
        }
    });
    parts.into_inner().unwrap_or_default().into_iter().fold(
        (f32::INFINITY, f32::NEG_INFINITY, true),
        |(lo, hi, ok), (l, h, o)| (lo.min(l), hi.max(h), ok && o),
    )
}

/// Quantizes `src` (rows of width `k`) at one `(scale, zero)` into `dst`, over the threads.
fn parallel_quantize(src: &[f32], k: usize, dst: &mut [u8], scale: f32, zero: i32) {
    let k = k.max(1);
    let mut items = Vec::new();
    let mut d = dst;
    for (r0, rows) in row_chunks(src.len() / k, k) {
        let (head, tail) = d.split_at_mut(rows * k);
        items.push((&src[r0 * k..(r0 + rows) * k], head));
        d = tail;
    }
    crate::kernels::parallel::for_each(items, &|(src, dst)| {
        crate::kernels::quantize_u8(&U8, src, scale, zero, dst);
    });
}
