//! Calibration observers: they watch activations and propose a quantization range.

use crate::error::{Error, Result};
use ndarray::ArrayViewD;
use rayon::prelude::*;

/// Watches tensors during calibration and proposes a range `(min, max)` to quantize them to.
///
/// Implement it to add a calibration method; every built-in observer works on any
/// `ArrayViewD<f32>` on its own.
pub trait Observer: Send {
    /// Takes one batch into account.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for NaN or infinite values (nothing is recorded then).
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()>;
    /// The proposed range.
    ///
    /// # Errors
    /// [`Error::Empty`] when nothing has been observed.
    fn range(&self) -> Result<(f32, f32)>;
    /// Forgets everything observed.
    fn reset(&mut self);
}

/// `(min, max, all finite)` of a slice, in a form LLVM vectorises (plain comparisons: a NaN
/// fails `abs ≤ MAX`).
fn slice_min_max(data: &[f32]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let mut finite = [true; 8];
    let mut chunks = data.chunks_exact(8);
    for c in chunks.by_ref() {
        for k in 0..8 {
            let v = c[k];
            lo[k] = if v < lo[k] { v } else { lo[k] };
            hi[k] = if v > hi[k] { v } else { hi[k] };
            finite[k] &= v.abs() <= f32::MAX;
        }
    }
    for &v in chunks.remainder() {
        lo[0] = if v < lo[0] { v } else { lo[0] };
        hi[0] = if v > hi[0] { v } else { hi[0] };
        finite[0] &= v.abs() <= f32::MAX;
    }
    (
        lo.iter().fold(f32::INFINITY, |a, &b| a.min(b)),
        hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        finite.iter().all(|&f| f),
    )
}

fn min_max(x: &ArrayViewD<'_, f32>) -> Result<Option<(f32, f32)>> {
    if x.is_empty() {
        return Ok(None);
    }
    let xs = x.as_standard_layout();
    let data = xs
        .as_slice()
        .ok_or_else(|| Error::Unsupported("non-contiguous tensor".into()))?;
    let (lo, hi, finite) = if crate::tensor::parallel(data.len()) {
        data.par_chunks(1 << 16).map(slice_min_max).reduce(
            || (f32::INFINITY, f32::NEG_INFINITY, true),
            |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 && b.2),
        )
    } else {
        slice_min_max(data)
    };
    if finite {
        Ok(Some((lo, hi)))
    } else {
        Err(Error::NonFinite("calibration data".into()))
    }
}

fn nothing_observed() -> Error {
    Error::Empty("no calibration data observed".into())
}

/// The exact minimum and maximum seen (no saturation).
#[derive(Clone, Debug, Default)]
pub struct MinMaxObserver {
    range: Option<(f32, f32)>,
}

impl MinMaxObserver {
    /// A new observer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Observer for MinMaxObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        if let Some((lo, hi)) = min_max(&x)? {
            self.range = Some(match self.range {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
        }
        Ok(())
    }
    fn range(&self) -> Result<(f32, f32)> {
        self.range.ok_or_else(nothing_observed)
    }
    fn reset(&mut self) {
        self.range = None;
    }
}

/// Moving average of each batch's min and max: `r ← (1 − c)·r + c·batch` (PyTorch's
/// `MovingAverageMinMaxObserver`; the first batch sets the range).
#[derive(Clone, Debug)]
pub struct MovingAverageObserver {
    constant: f32,
    range: Option<(f32, f32)>,
}

impl MovingAverageObserver {
    /// A new observer with averaging constant `c` in `(0, 1]` (PyTorch's default is 0.01).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a constant outside `(0, 1]` or NaN.
    pub fn new(constant: f32) -> Result<Self> {
        if !(constant > 0.0 && constant <= 1.0) {
            return Err(Error::config(
                "moving-average observer",
                format!("averaging constant {constant} is outside (0, 1]"),
            ));
        }
        Ok(MovingAverageObserver {
            constant,
            range: None,
        })
    }
}

impl Observer for MovingAverageObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        if let Some((lo, hi)) = min_max(&x)? {
            let c = self.constant;
            self.range = Some(match self.range {
                Some((a, b)) => ((1.0 - c) * a + c * lo, (1.0 - c) * b + c * hi),
                None => (lo, hi),
            });
        }
        Ok(())
    }
    fn range(&self) -> Result<(f32, f32)> {
        self.range.ok_or_else(nothing_observed)
    }
    fn reset(&mut self) {
        self.range = None;
    }
}

/// A histogram of `|x|` over `[0, upper)` in equal bins, plus the signed min and max seen.
///
/// When a batch exceeds the current upper edge, the edge is multiplied by the smallest power
/// of two that covers it and bins are merged in groups of that power: counts are never lost,
/// and the result equals a histogram built in one pass over the final range (but for values
/// lying exactly on a bin edge, which float rounding may put in the neighbouring bin).
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    upper: f32,
    total: u64,
    zeros: u64,
    min_max: Option<(f32, f32)>,
}

impl Histogram {
    /// An empty histogram with `bins` bins (1 to [`MAX_HISTOGRAM_BINS`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bin count outside that range.
    pub fn new(bins: usize) -> Result<Self> {
        check_bins("histogram", bins, 1)?;
        Ok(Self::with_bins(bins))
    }

    fn with_bins(bins: usize) -> Self {
        Histogram {
            counts: vec![0; bins.max(1)],
            upper: 0.0,
            total: 0,
            zeros: 0,
            min_max: None,
        }
    }

    /// Bin counts.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The upper edge of the last bin.
    pub fn upper(&self) -> f32 {
        self.upper
    }

    /// Width of one bin.
    pub fn bin_width(&self) -> f32 {
        self.upper / self.counts.len() as f32
    }

    /// Values counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many of them were exactly zero (they are also in bin 0).
    pub fn zeros(&self) -> u64 {
        self.zeros
    }

    /// The signed minimum and maximum seen.
    pub fn min_max(&self) -> Option<(f32, f32)> {
        self.min_max
    }

    /// Adds a batch.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for NaN or infinite values (nothing is added then).
    pub fn add(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let Some((lo, hi)) = min_max(&x)? else {
            return Ok(());
        };
        self.min_max = Some(match self.min_max {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        let amax = lo.abs().max(hi.abs());
        if amax > self.upper {
            self.grow(amax);
        }
        let bins = self.counts.len();
        let scale = if self.upper > 0.0 {
            bins as f32 / self.upper
        } else {
            0.0
        };
        let count = |chunk: &[f32]| {
            // Four interleaved sub-histograms: runs of values in the same bin (the peak of a
            // bell curve) would otherwise serialize on one counter's load-add-store. Each has
            // one extra slot for exact zeros, so they are counted in the same pass.
            let width = bins + 1;
            let mut sub = vec![0u32; 4 * width];
            let top = (bins - 1) as f32;
            let bin = |v: f32| {
                let b = (v.abs() * scale).min(top) as usize;
                if v == 0.0 {
                    bins
                } else {
                    b
                }
            };
            let mut quads = chunk.chunks_exact(4);
            for q in quads.by_ref() {
                sub[bin(q[0])] += 1;
                sub[width + bin(q[1])] += 1;
                sub[2 * width + bin(q[2])] += 1;
                sub[3 * width + bin(q[3])] += 1;
            }
            for &v in quads.remainder() {
                sub[bin(v)] += 1;
            }
            let mut local = vec![0u64; bins];
            let mut zeros = 0u64;
            for part in sub.chunks_exact(width) {
                local
                    .iter_mut()
                    .zip(part)
                    .for_each(|(l, &c)| *l += c as u64);
                zeros += part[bins] as u64;
            }
            local[0] += zeros;
            (local, zeros)
        };
        let xs = x.as_standard_layout();
        let data = xs
            .as_slice()
            .ok_or_else(|| Error::Unsupported("non-contiguous tensor".into()))?;
        let (local, zeros) = if crate::tensor::parallel(data.len()) {
            let chunk = (data.len() / (4 * rayon::current_num_threads())).max(1 << 16);
            data.par_chunks(chunk).map(count).reduce(
                || (vec![0u64; bins], 0),
                |(mut a, za), (b, zb)| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    (a, za + zb)
                },
            )
        } else {
            count(data)
        };
        self.counts
            .iter_mut()
            .zip(&local)
            .for_each(|(c, l)| *c += l);
        self.total += data.len() as u64;
        self.zeros += zeros;
        Ok(())
    }

    fn grow(&mut self, amax: f32) {
        if self.upper <= 0.0 {
            // Only zeros so far: they stay in bin 0 whatever the range.
            self.upper = amax;
            return;
        }
        let mut factor = 1usize;
        while self.upper * (factor as f32) < amax {
            factor *= 2;
        }
        let bins = self.counts.len();
        let mut merged = vec![0u64; bins];
        for (i, &c) in self.counts.iter().enumerate() {
            merged[(i / factor).min(bins - 1)] += c;
        }
        self.counts = merged;
        self.upper *= factor as f32;
    }

    /// Clips the signed range seen to `[-t, t]`.
    fn clip(&self, t: f32) -> Result<(f32, f32)> {
        let (lo, hi) = self.min_max.ok_or_else(nothing_observed)?;
        Ok((lo.max(-t), hi.min(t)))
    }
}

/// The range that keeps a given percentile of `|x|` (clipping the rest), from a 2048-bin
/// histogram.
#[derive(Clone, Debug)]
pub struct PercentileObserver {
    percentile: f64,
    hist: Histogram,
}

impl PercentileObserver {
    /// Keeps `percentile` percent of the values (e.g. 99.99), in `(0, 100]`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a percentile outside `(0, 100]` or NaN.
    pub fn new(percentile: f64) -> Result<Self> {
        if !(percentile > 0.0 && percentile <= 100.0) {
            return Err(Error::config(
                "percentile observer",
                format!("percentile {percentile} is outside (0, 100]"),
            ));
        }
        Ok(PercentileObserver {
            percentile,
            hist: Histogram::with_bins(2048),
        })
    }
}

impl Observer for PercentileObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        self.hist.add(x)
    }
    fn range(&self) -> Result<(f32, f32)> {
        let want = (self.hist.total as f64 * self.percentile / 100.0).ceil() as u64;
        let mut seen = 0u64;
        let mut edge = self.hist.counts.len();
        for (i, &c) in self.hist.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                edge = i + 1;
                break;
            }
        }
        self.hist.clip(edge as f32 * self.hist.bin_width())
    }
    fn reset(&mut self) {
        self.hist = Histogram::with_bins(self.hist.counts.len());
    }
}

/// Entropy calibration, TensorRT's algorithm (Migacz, GTC 2017): over a histogram of `|x|`
/// (default 2048 bins), for every candidate threshold bin `i` from `target_bins` up, the
/// reference distribution `P` is bins `0..i` with all counts beyond folded into bin `i − 1`,
/// `Q` is the same bins merged into `target_bins` (default 128) levels and expanded back
/// uniformly over each level's non-empty bins; the threshold is `(i + 0.5)·width` for the
/// `i` minimizing `KL(P‖Q)`. The range is the signed range seen, clipped to `±threshold`.
///
/// Exact zeros are left out of `P` (as NVIDIA's `pytorch-quantization` does with
/// `skip_zeros`): they are represented exactly whatever the range, and after a ReLU, or in
/// images with a black background, their mass in bin 0 otherwise drags the threshold far
/// below the values that matter (on MNIST pixels: 0.50 instead of 1.0).
#[derive(Clone, Debug)]
pub struct KldObserver {
    target_bins: usize,
    min_coverage: f64,
    hist: Histogram,
}

impl Default for KldObserver {
    fn default() -> Self {
        KldObserver {
            target_bins: 128,
            min_coverage: DEFAULT_MIN_COVERAGE,
            hist: Histogram::with_bins(2048),
        }
    }
}

impl KldObserver {
    /// A KLD observer with `bins` histogram bins (2 to [`MAX_HISTOGRAM_BINS`]) and
    /// `target_bins` quantized levels (1 to `bins`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bin counts outside those ranges.
    pub fn new(bins: usize, target_bins: usize) -> Result<Self> {
        check_bins("KLD observer", bins, 2)?;
        if !(1..=bins).contains(&target_bins) {
            return Err(Error::config(
                "KLD observer",
                format!("{target_bins} target bins (1 to the {bins} histogram bins)"),
            ));
        }
        Ok(KldObserver {
            target_bins,
            min_coverage: DEFAULT_MIN_COVERAGE,
            hist: Histogram::with_bins(bins),
        })
    }

    /// The smallest fraction of the (nonzero) values the chosen threshold must keep unclipped
    /// (default [`DEFAULT_MIN_COVERAGE`]): a KL optimum that clips more is the collapse of the
    /// search on data away from zero, and the whole range is kept instead. 0 gives TensorRT's
    /// unguarded search.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a fraction outside `[0, 1]` or NaN.
    pub fn with_min_coverage(mut self, fraction: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::config(
                "KLD observer",
                format!("minimum coverage {fraction} is outside [0, 1]"),
            ));
        }
        self.min_coverage = fraction;
        Ok(self)
    }

    /// The histogram observed so far.
    pub fn histogram(&self) -> &Histogram {
        &self.hist
    }

    /// The threshold bin index `i` minimizing `KL(P‖Q)` (see the type docs).
    pub fn best_bin(&self) -> Result<usize> {
        let mut counts = self.hist.counts().to_vec();
        counts[0] -= self.hist.zeros().min(counts[0]);
        if counts.iter().all(|&c| c == 0) {
            // Only zeros seen: any range holds them.
            return if self.hist.total() > 0 {
                Ok(counts.len())
            } else {
                Err(nothing_observed())
            };
        }
        kld_best_bin(&counts, self.target_bins, self.min_coverage).ok_or_else(nothing_observed)
    }
}

/// `KL(p‖q)` for two unnormalized distributions, after smoothing zeros with `eps` mass taken
/// proportionally from the non-zero entries (as MXNet and TensorRT do).
fn smoothed_kl(p: &mut [f64], q: &mut [f64]) -> Option<f64> {
    fn normalize_smooth(d: &mut [f64]) -> Option<()> {
        let sum: f64 = d.iter().sum();
        if sum <= 0.0 {
            return None;
        }
        let zeros = d.iter().filter(|&&v| v == 0.0).count();
        let nonzeros = d.len() - zeros;
        if nonzeros == 0 {
            return None;
        }
        const EPS: f64 = 1e-4;
        let take = EPS * zeros as f64 / nonzeros as f64;
        for v in d.iter_mut() {
            *v = if *v == 0.0 { EPS } else { *v / sum - take };
        }
        Some(())
    }
    normalize_smooth(p)?;
    normalize_smooth(q)?;
    Some(
        p.iter()
            .zip(q.iter())
            .filter(|(a, _)| **a > 0.0)
            .map(|(a, b)| a * (a / b.max(f64::MIN_POSITIVE)).ln())
            .sum(),
    )
}

/// The TensorRT entropy search over `counts` (a histogram of `|x|`); when its optimum would
/// leave more than `1 − min_coverage` of the counted mass beyond the threshold, the whole
/// range (`bins`) instead.
pub(crate) fn kld_best_bin(counts: &[u64], target: usize, min_coverage: f64) -> Option<usize> {
    let bins = counts.len();
    if counts.iter().all(|&c| c == 0) {
        return None;
    }
    let mut suffix = vec![0u64; bins + 1];
    for i in (0..bins).rev() {
        suffix[i] = suffix[i + 1] + counts[i];
    }
    let candidates: Vec<usize> = (target.max(1)..=bins).collect();
    let score = |&i: &usize| -> Option<(f64, usize)> {
        let mut p: Vec<f64> = counts[..i].iter().map(|&c| c as f64).collect();
        p[i - 1] += suffix[i] as f64;
        let mut q = vec![0.0f64; i];
        let merged = i / target;
        for k in 0..target {
            let start = k * merged;
            let stop = if k + 1 == target { i } else { start + merged };
            let sum: u64 = counts[start..stop].iter().sum();
            let nonzero = p[start..stop].iter().filter(|&&v| v != 0.0).count();
            if nonzero > 0 {
                let each = sum as f64 / nonzero as f64;
                for j in start..stop {
                    if p[j] != 0.0 {
                        q[j] = each;
                    }
                }
            }
        }
        smoothed_kl(&mut p, &mut q).map(|kl| (kl, i))
    };
    let best = if crate::tensor::parallel(bins * bins / 4) {
        candidates
            .par_iter()
            .filter_map(score)
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
    } else {
        candidates
            .iter()
            .filter_map(score)
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
    };
    // Data away from zero (all of N(−1, 0.1) lies in |x| ∈ [0.6, 1.4]) makes the search
    // collapse: a threshold below the data folds everything into one spike bin, whose
    // quantized copy is exact (KL ≈ 0), so the smallest such threshold wins and saturates
    // almost every value. An optimum that clips that much is no calibration of the
    // distribution: keep the whole range. (Restricting the candidates instead only moves the
    // optimum to the edge of the allowed set.)
    let allowed = (1.0 - min_coverage) * suffix[0] as f64;
    best.map(|(_, i)| if suffix[i] as f64 > allowed { bins } else { i })
}

impl Observer for KldObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        self.hist.add(x)
    }
    fn range(&self) -> Result<(f32, f32)> {
        let i = self.best_bin()?;
        self.hist.clip((i as f32 + 0.5) * self.hist.bin_width())
    }
    fn reset(&mut self) {
        self.hist = Histogram::with_bins(self.hist.counts.len());
    }
}

/// The threshold minimizing the expected squared quantization error, estimated from a
/// histogram of `|x|`: values below the threshold `t` cost the rounding noise `Δ²/12` with
/// `Δ = 2t / (2^bits − 1)`, values above cost their clipping error `(|x| − t)²`.
#[derive(Clone, Debug)]
pub struct MseObserver {
    bits: u32,
    hist: Histogram,
}

impl MseObserver {
    /// An MSE search for `bits`-bit quantization (2 to 16) over a 2048-bin histogram.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bits outside `2..=16`.
    pub fn new(bits: u32) -> Result<Self> {
        if !(2..=16).contains(&bits) {
            return Err(Error::config(
                "MSE observer",
                format!("{bits} bits (2 to 16)"),
            ));
        }
        Ok(MseObserver {
            bits,
            hist: Histogram::with_bins(2048),
        })
    }
}

impl Observer for MseObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        self.hist.add(x)
    }
    fn range(&self) -> Result<(f32, f32)> {
        let w = self.hist.bin_width() as f64;
        let levels = ((1u64 << self.bits) - 1) as f64;
        let counts = self.hist.counts();
        let mut best = (f64::INFINITY, counts.len());
        for i in 1..=counts.len() {
            let t = i as f64 * w;
            let step = 2.0 * t / levels;
            let noise = step * step / 12.0;
            let err: f64 = counts
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    let center = (j as f64 + 0.5) * w;
                    let e = if center <= t {
                        noise
                    } else {
                        (center - t).powi(2)
                    };
                    c as f64 * e
                })
                .sum();
            if err < best.0 {
                best = (err, i);
            }
        }
        self.hist.clip(best.1 as f32 * self.hist.bin_width())
    }
    fn reset(&mut self) {
        self.hist = Histogram::with_bins(self.hist.counts.len());
    }
}

/// The distribution ACIQ assumes for the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AciqDistribution {
    /// Normal with the observed mean and standard deviation.
    Gaussian,
    /// Laplace with the observed mean and scale `b = σ/√2`.
    Laplace,
}

/// ACIQ (Banner, Nahshan, Soudry 2019): the analytically optimal clipping `α` for `bits`-bit
/// quantization of Gaussian or Laplace data, `mean ± α`, clipped to the range seen.
/// `α/σ` (Gaussian) and `α/b` (Laplace) for 2–8 bits are the paper's constants.
#[derive(Clone, Debug)]
pub struct AciqObserver {
    distribution: AciqDistribution,
    bits: u32,
    n: f64,
    sum: f64,
    sum_sq: f64,
    min_max: Option<(f32, f32)>,
}

impl AciqObserver {
    /// ACIQ for `bits` (2 to 8) bits.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bits outside `2..=8` (the paper's table).
    pub fn new(distribution: AciqDistribution, bits: u32) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::config(
                "ACIQ observer",
                format!("{bits} bits (2 to 8)"),
            ));
        }
        Ok(AciqObserver {
            distribution,
            bits,
            n: 0.0,
            sum: 0.0,
            sum_sq: 0.0,
            min_max: None,
        })
    }
}

impl Observer for AciqObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let Some((lo, hi)) = min_max(&x)? else {
            return Ok(());
        };
        self.min_max = Some(match self.min_max {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        for &v in x.iter() {
            self.n += 1.0;
            self.sum += v as f64;
            self.sum_sq += (v as f64) * (v as f64);
        }
        Ok(())
    }
    fn range(&self) -> Result<(f32, f32)> {
        const GAUSS: [f64; 7] = [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92];
        const LAPLACE: [f64; 7] = [2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89];
        let (lo, hi) = self.min_max.ok_or_else(nothing_observed)?;
        let mean = self.sum / self.n;
        let sigma = (self.sum_sq / self.n - mean * mean).max(0.0).sqrt();
        let k = (self.bits - 2) as usize;
        let alpha = match self.distribution {
            AciqDistribution::Gaussian => GAUSS[k] * sigma,
            AciqDistribution::Laplace => LAPLACE[k] * sigma / std::f64::consts::SQRT_2,
        };
        Ok((
            (lo as f64).max(mean - alpha) as f32,
            (hi as f64).min(mean + alpha) as f32,
        ))
    }
    fn reset(&mut self) {
        (self.n, self.sum, self.sum_sq, self.min_max) = (0.0, 0.0, 0.0, None);
    }
}

/// ONNX Runtime's entropy calibration (`onnxruntime.quantization`, `CalibrationMethod.Entropy`),
/// reproduced so that users moving from ORT get the same ranges for the same settings
/// (ORT's defaults are 128 bins and 128 quantized bins).
///
/// It differs from [`KldObserver`] in the ways ORT's implementation does: the histogram is of
/// the signed values over `±max|x|` (`num_bins` bins; a later batch with a larger range widens
/// it by whole bins on both sides, keeping the old counts in the middle); candidate ranges are
/// symmetric windows of `2i + 1` bins around the zero bin for `i` from `num_quantized_bins / 2`
/// up; outliers go to the window's end bins; the candidate `Q` spreads each merged bin's count
/// over *all* its bins, truncated to an integer, and leaves bins past the last whole merged
/// bin empty; zeros are smoothed with `ε = 1e-4` on counts; `KL(P‖Q)` is taken on the
/// normalized smoothed counts; the first minimum wins; the window's edges are clipped to the
/// min and max seen.
///
/// A batch that widens the histogram past [`MAX_HISTOGRAM_BINS`] bins (one late outlier far
/// beyond the earlier range) makes `observe` return [`Error::LimitExceeded`] — ORT grows
/// without bound there, and its search then effectively hangs.
#[derive(Clone, Debug)]
pub struct OrtEntropyObserver {
    num_bins: usize,
    num_quantized_bins: usize,
    hist: Vec<u64>,
    edges: Vec<f32>,
    threshold: f32,
    min_max: Option<(f32, f32)>,
}

impl Default for OrtEntropyObserver {
    /// ORT's defaults: 128 bins, 128 quantized bins.
    fn default() -> Self {
        Self::unchecked(128, 128)
    }
}

impl OrtEntropyObserver {
    /// An observer with ORT's `num_bins` (1 to [`MAX_HISTOGRAM_BINS`]) and
    /// `num_quantized_bins` (at least 1) options.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bin counts outside those ranges (ORT itself fails on 0).
    pub fn new(num_bins: usize, num_quantized_bins: usize) -> Result<Self> {
        check_bins("ORT entropy observer", num_bins, 1)?;
        if num_quantized_bins == 0 {
            return Err(Error::config("ORT entropy observer", "0 quantized bins"));
        }
        Ok(Self::unchecked(num_bins, num_quantized_bins))
    }

    fn unchecked(num_bins: usize, num_quantized_bins: usize) -> Self {
        OrtEntropyObserver {
            num_bins,
            num_quantized_bins,
            hist: Vec::new(),
            edges: Vec::new(),
            threshold: 0.0,
            min_max: None,
        }
    }

    /// The histogram collected so far: counts and the `counts + 1` bin edges.
    pub fn histogram(&self) -> (&[u64], &[f32]) {
        (&self.hist, &self.edges)
    }

    /// `bins` equal bins over `[-t, t]` (edges as `numpy.linspace` makes them in f32) and the
    /// counts of `data` in them, the last bin closed.
    fn histogram_of(data: &[f32], bins: usize, t: f32) -> (Vec<u64>, Vec<f32>) {
        let (first, last) = (-t, t);
        let step = (last - first) / bins as f32;
        let mut edges: Vec<f32> = (0..=bins).map(|i| i as f32 * step + first).collect();
        edges[bins] = last;
        let mut counts = vec![0u64; bins];
        if last > first {
            for &v in data {
                if v < first || v > last {
                    continue;
                }
                let mut i = (((v - first) / (last - first)) * bins as f32) as usize;
                i = i.min(bins - 1);
                while i > 0 && v < edges[i] {
                    i -= 1;
                }
                while i + 1 < bins && v >= edges[i + 1] {
                    i += 1;
                }
                counts[i] += 1;
            }
        } else {
            // A zero range: numpy widens it to [-0.5, 0.5]; every value is 0, in the middle bin.
            counts[bins / 2] += data.len() as u64;
            edges = (0..=bins).map(|i| i as f32 / bins as f32 - 0.5).collect();
        }
        (counts, edges)
    }

    /// ORT's threshold search over the collected histogram (see the type docs).
    fn search(&self) -> Option<(f32, f32)> {
        let hist = &self.hist;
        let nb = hist.len();
        let nq = self.num_quantized_bins;
        let zero = nb / 2;
        let half = nq / 2;
        if half > zero {
            return None;
        }
        // ORT's arithmetic, step by step: f32 smoothing of counts, its own f32 `entropy`
        // (`p·ln(p/q)` per element in f32, numpy's pairwise f32 sums), the divergence kept as
        // f32, the first minimum winning.
        let smooth = |d: &[i64]| -> Option<Vec<f32>> {
            let zeros = d.iter().filter(|&&v| v == 0).count();
            let nonzeros = d.len() - zeros;
            if nonzeros == 0 {
                return None;
            }
            let eps = 1e-4f32;
            let eps1 = (1e-4f64 * zeros as f64 / nonzeros as f64) as f32;
            Some(
                d.iter()
                    .map(|&v| {
                        if v == 0 {
                            v as f32 + eps
                        } else {
                            v as f32 + -eps1
                        }
                    })
                    .collect(),
            )
        };
        let kl = |p: &[f32], q: &[f32]| -> f32 {
            let (sp, sq) = (numpy_sum(p), numpy_sum(q));
            let terms: Vec<f32> = p
                .iter()
                .zip(q)
                .map(|(&a, &b)| {
                    let (a, b) = (a / sp, b / sq);
                    // As ORT's `rel_entr`: anything but two positive values is infinite.
                    if a > 0.0 && b > 0.0 {
                        a * (a / b).ln()
                    } else {
                        f32::INFINITY
                    }
                })
                .collect();
            numpy_sum(&terms)
        };
        let mut best: Option<(f32, (f32, f32))> = None;
        for i in half..=zero {
            let start = zero - i;
            let end = (zero + i + 1).min(nb);
            let sliced = &hist[start..end];
            let mut p: Vec<i64> = sliced.iter().map(|&c| c as i64).collect();
            p[0] += hist[..start].iter().sum::<u64>() as i64;
            let last = p.len() - 1;
            p[last] += hist[end..].iter().sum::<u64>() as i64;
            let merged = sliced.len() / nq;
            let mut quantized = vec![0i64; nq];
            for (j, qb) in quantized.iter_mut().enumerate() {
                *qb = sliced[j * merged..(j + 1) * merged].iter().sum::<u64>() as i64;
            }
            quantized[nq - 1] += sliced[nq * merged..].iter().sum::<u64>() as i64;
            let mut q = vec![0i64; p.len()];
            for (j, &qb) in quantized.iter().enumerate() {
                let (s, e) = (j * merged, (j + 1) * merged);
                let norm = p[s..e].iter().filter(|&&v| v != 0).count();
                if norm != 0 {
                    // numpy stores the float quotient into an int64 array: truncation.
                    let v = (qb as f64 / norm as f64) as i64;
                    q[s..e].iter_mut().for_each(|x| *x = v);
                }
            }
            let div = match (smooth(&p), smooth(&q)) {
                (Some(ps), Some(qs)) => kl(&ps, &qs),
                _ => f32::INFINITY,
            };
            let candidate = (self.edges[start], self.edges[end]);
            if best.is_none_or(|(b, _)| div < b) {
                best = Some((div, candidate));
            }
        }
        let (lo, hi) = self.min_max?;
        best.map(|(_, (a, b))| (a.max(lo), b.min(hi)))
    }
}

/// `numpy.sum` of a contiguous f32 array: pairwise summation in f32 (blocks of 128, eight
/// accumulators), so the last bits match.
fn numpy_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        let mut r = 0.0f32;
        for &x in a {
            r += x;
        }
        r
    } else if n <= 128 {
        let mut r = [0.0f32; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

impl Observer for OrtEntropyObserver {
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let Some((lo, hi)) = min_max(&x)? else {
            return Ok(());
        };
        let xs = x.as_standard_layout();
        let data = xs
            .as_slice()
            .ok_or_else(|| Error::Unsupported("non-contiguous tensor".into()))?;
        let t = lo.abs().max(hi.abs());
        if self.hist.is_empty() {
            (self.hist, self.edges) = Self::histogram_of(data, self.num_bins, t);
            self.threshold = t;
        } else if t <= self.threshold {
            let (h, _) = Self::histogram_of(data, self.hist.len(), self.threshold);
            self.hist.iter_mut().zip(&h).for_each(|(a, b)| *a += b);
        } else if self.threshold == 0.0 {
            let (mut h, e) = Self::histogram_of(data, self.hist.len(), t);
            h.iter_mut().zip(&self.hist).for_each(|(a, b)| *a += b);
            (self.hist, self.edges, self.threshold) = (h, e, t);
        } else {
            let old_bins = self.hist.len();
            let stride = 2.0 * self.threshold / old_bins as f32;
            // In f64 and checked: a late outlier (3e38 after values near 1) would overflow
            // the bin count, which then wrapped and dropped the outlier silently. ORT widens
            // by whole bins without bound; past MAX_HISTOGRAM_BINS this is an error until the
            // histogram is rebinned instead.
            let grow = (f64::from(t - self.threshold) / f64::from(stride)).floor() + 1.0;
            let bins = old_bins as f64 + 2.0 * grow;
            if !bins.is_finite() || bins > MAX_HISTOGRAM_BINS as f64 {
                return Err(Error::LimitExceeded {
                    what: format!(
                        "ORT entropy histogram: a batch reaching {t:e} widens the range \
                         ±{:e} by whole bins",
                        self.threshold
                    ),
                    limit: MAX_HISTOGRAM_BINS as u64,
                    requested: if bins.is_finite() {
                        bins as u64
                    } else {
                        u64::MAX
                    },
                });
            }
            let (grow, bins) = (grow as usize, bins as usize);
            let new_t = grow as f32 * stride + self.threshold;
            let (mut h, e) = Self::histogram_of(data, bins, new_t);
            h[grow..bins - grow]
                .iter_mut()
                .zip(&self.hist)
                .for_each(|(a, b)| *a += b);
            (self.hist, self.edges, self.threshold) = (h, e, new_t);
        }
        self.min_max = Some(match self.min_max {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        Ok(())
    }
    fn range(&self) -> Result<(f32, f32)> {
        self.search().ok_or_else(nothing_observed)
    }
    fn reset(&mut self) {
        *self = OrtEntropyObserver::unchecked(self.num_bins, self.num_quantized_bins);
    }
}

/// The most bins a calibration histogram may be asked for (the KLD searches are quadratic
/// in the bin count; 2¹⁶ bins already take seconds).
pub const MAX_HISTOGRAM_BINS: usize = 1 << 16;

fn check_bins(what: &str, bins: usize, min: usize) -> Result<()> {
    if (min..=MAX_HISTOGRAM_BINS).contains(&bins) {
        Ok(())
    } else {
        Err(Error::config(
            what,
            format!("{bins} histogram bins ({min} to {MAX_HISTOGRAM_BINS})"),
        ))
    }
}

/// The fraction of the nonzero values a KLD threshold keeps unclipped at least, by default
/// (see [`KldObserver::with_min_coverage`]).
pub const DEFAULT_MIN_COVERAGE: f64 = 0.99;
