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

pub(super) fn min_max(x: &ArrayViewD<'_, f32>) -> Result<Option<(f32, f32)>> {
    if x.is_empty() {
        return Ok(None);
    }
    let xs = x.as_standard_layout();
    let data = xs
        .as_slice()
        .ok_or_else(|| Error::Unsupported("non-contiguous tensor".into()))?;
    let (lo, hi, finite) = if crate::tensor::parallel(data.len()) {
        data.par_chunks(1 << 16)
            .map(crate::kernels::min_max)
            .reduce(
                || (f32::INFINITY, f32::NEG_INFINITY, true),
                |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 && b.2),
            )
    } else {
        crate::kernels::min_max(data)
    };
    if finite {
        Ok(Some((lo, hi)))
    } else {
        Err(Error::NonFinite("calibration data".into()))
    }
}

pub(super) fn nothing_observed() -> Error {
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

    /// A histogram from its parts: `counts` of `|x|` in equal bins over `[0, upper)`, of
    /// which `zeros` were exactly zero (and are in bin 0), and the signed min and max seen —
    /// for a search over a histogram made elsewhere.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless there are 1 to [`MAX_HISTOGRAM_BINS`] counts, `upper`
    /// is finite and not negative, `zeros` does not exceed bin 0, the total fits in a `u64`,
    /// and `min_max` is finite with `min ≤ max`, `max|x| ≤ upper`, present exactly when
    /// something was counted.
    pub fn from_counts(
        counts: Vec<u64>,
        upper: f32,
        zeros: u64,
        min_max: Option<(f32, f32)>,
    ) -> Result<Self> {
        let bad = |why: String| Err(Error::config("histogram", why));
        check_bins("histogram", counts.len(), 1)?;
        if !(upper.is_finite() && upper >= 0.0) {
            return bad(format!("upper edge {upper}"));
        }
        if zeros > counts[0] {
            return bad(format!("{zeros} zeros in a first bin of {}", counts[0]));
        }
        let Some(total) = counts.iter().try_fold(0u64, |a, &c| a.checked_add(c)) else {
            return bad("the counts' total overflows".into());
        };
        match min_max {
            Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo <= hi && total > 0 => {
                if lo.abs().max(hi.abs()) > upper {
                    return bad(format!("min {lo} / max {hi} beyond the upper edge {upper}"));
                }
            }
            None if total == 0 => {}
            _ => return bad(format!("min / max {min_max:?} for {total} counted values")),
        }
        Ok(Histogram {
            counts,
            upper,
            total,
            zeros,
            min_max,
        })
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
        Self::from_histogram(Histogram::with_bins(bins), target_bins)
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

    /// An observer that starts from a ready histogram (made by
    /// [`Histogram::from_counts`] or another observer) and adds further batches to it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `target_bins` outside 1 to the histogram's bins.
    pub fn from_histogram(hist: Histogram, target_bins: usize) -> Result<Self> {
        let bins = hist.counts.len();
        if !(1..=bins).contains(&target_bins) {
            return Err(Error::config(
                "KLD observer",
                format!("{target_bins} target bins (1 to the {bins} histogram bins)"),
            ));
        }
        Ok(KldObserver {
            target_bins,
            min_coverage: DEFAULT_MIN_COVERAGE,
            hist,
        })
    }

    /// The histogram observed so far.
    pub fn histogram(&self) -> &Histogram {
        &self.hist
    }

    /// The threshold bin index `i` minimizing `KL(P‖Q)` (see the type docs): the range is
    /// the signed range seen clipped to `±(i + 0.5)·width`; `bins` when the whole range is
    /// kept (only zeros seen, or the coverage guard).
    ///
    /// # Errors
    /// [`Error::Empty`] when nothing has been observed.
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

/// The most bins a calibration histogram may be asked for (the KLD searches are quadratic
/// in the bin count; 2¹⁶ bins already take seconds).
pub const MAX_HISTOGRAM_BINS: usize = 1 << 16;

pub(super) fn check_bins(what: &str, bins: usize, min: usize) -> Result<()> {
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
