//! ONNX Runtime's entropy calibration, reproduced to the bit.

use super::observer::{check_bins, min_max, nothing_observed, Observer};
use crate::error::{Error, Result};
use crate::limits::Limits;
use ndarray::ArrayViewD;

/// How [`OrtEntropyObserver`] combines several calibration batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrtMerge {
    /// As ORT's `quantize_static` (and `collect_data` of its entropy calibrator): every batch
    /// is kept, and the stacked values are histogrammed once, over `±max|x|` of all of them,
    /// when the range is asked for. ORT's ranges exactly, for any number of batches; memory
    /// grows with the data (up to [`Limits::max_tensor_elements`] values per tensor, as ORT
    /// also keeps every output).
    #[default]
    Stacked,
    /// As ORT's `HistogramCollector.collect` called once per batch: a batch beyond the
    /// current range widens the histogram by whole bins on both sides, keeping the old counts
    /// in the middle. Where ORT then grows without bound (a late 1000 after batches of
    /// N(0, 1) makes 34,120 bins out of 128, and its search took 79 s), the histogram here
    /// never exceeds [`OrtEntropyObserver::with_max_bins`] (default
    /// [`DEFAULT_ORT_MAX_BINS`] or `num_bins` if larger): a widening past it merges groups of
    /// whole bins around the middle so that about `num_bins` remain. Constant memory; equal
    /// to ORT's per-batch result until the cap is reached.
    PerBatch,
}

/// The bins a per-batch ORT histogram may widen to before it is merged back (see
/// [`OrtMerge::PerBatch`]); the search over it is `O(bins²)` and takes about a second at
/// this size.
pub const DEFAULT_ORT_MAX_BINS: usize = 8192;

/// A histogram as ORT's `HistogramCollector` keeps it: the counts of signed values in equal
/// bins over `±threshold`, the bin edges (in f32, as `numpy.histogram` makes them), and the
/// min and max seen.
#[derive(Clone, Debug, PartialEq)]
pub struct OrtHistogram {
    counts: Vec<u64>,
    edges: Vec<f32>,
    min_max: (f32, f32),
    threshold: f32,
}

impl OrtHistogram {
    /// A histogram from its parts, as in ORT's `histogram_dict` entry
    /// `(hist, hist_edges, min, max, threshold)`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless there are 1 to [`MAX_HISTOGRAM_BINS`](super::MAX_HISTOGRAM_BINS) counts and one
    /// more edge, the edges are finite and ascending, `min ≤ max` are finite, `threshold` is
    /// finite and not negative, and the counts' total fits in a `u64`.
    pub fn new(
        counts: Vec<u64>,
        edges: Vec<f32>,
        min_max: (f32, f32),
        threshold: f32,
    ) -> Result<Self> {
        let bad = |why: String| Err(Error::config("ORT histogram", why));
        check_bins("ORT histogram", counts.len(), 1)?;
        if edges.len() != counts.len() + 1 {
            return bad(format!(
                "{} edges for {} bins (one more needed)",
                edges.len(),
                counts.len()
            ));
        }
        if edges.iter().any(|e| !e.is_finite()) || edges.windows(2).any(|w| w[1] < w[0]) {
            return bad("edges must be finite and ascending".into());
        }
        let (lo, hi) = min_max;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return bad(format!("min {lo} and max {hi}"));
        }
        if !(threshold.is_finite() && threshold >= 0.0) {
            return bad(format!("threshold {threshold}"));
        }
        if counts
            .iter()
            .try_fold(0u64, |a, &c| a.checked_add(c))
            .is_none()
        {
            return bad("the counts' total overflows".into());
        }
        Ok(OrtHistogram {
            counts,
            edges,
            min_max,
            threshold,
        })
    }

    /// The histogram of `data` (min and max `min_max`) over `±threshold` in `bins` bins,
    /// `numpy.histogram(data, bins, range=(-t, t))` to the bit.
    fn of(data: &[f32], bins: usize, min_max: (f32, f32), threshold: f32) -> Self {
        let edges = linspace_edges(bins, threshold);
        let mut counts = vec![0u64; bins];
        add_counts(&mut counts, &edges, data);
        OrtHistogram {
            counts,
            edges,
            min_max,
            threshold,
        }
    }

    /// Bin counts.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The `counts + 1` bin edges.
    pub fn edges(&self) -> &[f32] {
        &self.edges
    }

    /// The signed min and max seen.
    pub fn min_max(&self) -> (f32, f32) {
        self.min_max
    }

    /// The half-width of the binned range (at least `max|x|`).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Adds a batch with min `lo` and max `hi` as ORT's `merge_histogram` does, but merging
    /// whole bins where the widened histogram would pass `max_bins`.
    fn merge(
        &mut self,
        data: &[f32],
        (lo, hi): (f32, f32),
        target_bins: usize,
        max_bins: usize,
    ) -> Result<()> {
        let t = lo.abs().max(hi.abs());
        let old_bins = self.counts.len();
        self.min_max = (self.min_max.0.min(lo), self.min_max.1.max(hi));
        if t <= self.threshold {
            add_counts(&mut self.counts, &self.edges, data);
            return Ok(());
        }
        if self.threshold == 0.0 {
            // Only zeros so far: they stay in the middle bin of the new range.
            let old = std::mem::take(&mut self.counts);
            *self = Self::of(data, old_bins, self.min_max, t);
            self.counts.iter_mut().zip(&old).for_each(|(a, b)| *a += b);
            return Ok(());
        }
        // ORT's arithmetic: an f32 stride, whole bins added on both sides.
        let stride = 2.0 * self.threshold / old_bins as f32;
        if !stride.is_finite() {
            self.merge_far(data, t, target_bins);
            return Ok(());
        }
        let grow = (f64::from(t - self.threshold) / f64::from(stride)).floor() + 1.0;
        let widened = old_bins as f64 + 2.0 * grow;
        if widened <= max_bins as f64 {
            let (grow, bins) = (grow as usize, widened as usize);
            let new_t = grow as f32 * stride + self.threshold;
            let old = std::mem::take(&mut self.counts);
            *self = Self::of(data, bins, self.min_max, new_t);
            self.counts[grow..bins - grow]
                .iter_mut()
                .zip(&old)
                .for_each(|(a, b)| *a += b);
            return Ok(());
        }
        self.merge_wide(data, t, stride, widened, target_bins)
    }

    /// The widening of `merge` past the cap: groups of `k` whole old bins become one new bin,
    /// symmetric about zero, with about `target_bins` bins covering `t`.
    fn merge_wide(
        &mut self,
        data: &[f32],
        t: f32,
        stride: f32,
        widened: f64,
        target_bins: usize,
    ) -> Result<()> {
        // Bin counts stay exact integers in f64 below 2⁵³; beyond, the outlier is so far out
        // that the old histogram lands in the middle bin(s) whatever the grouping.
        if widened.is_nan() || widened >= (1u64 << 53) as f64 {
            self.merge_far(data, t, target_bins);
            return Ok(());
        }
        let old_bins = self.counts.len();
        let n = widened as u64;
        let mut k = n.div_ceil(target_bins as u64);
        // With an odd count the middle bin straddles zero and must stay centred: odd groups.
        if !n.is_multiple_of(2) && k.is_multiple_of(2) {
            k += 1;
        }
        let (groups, pad) = if n.is_multiple_of(2) {
            let half = n / 2;
            let g = half.div_ceil(k);
            (2 * g, g * k - half)
        } else {
            let side = (n - k) / 2;
            let g = side.div_ceil(k);
            (1 + 2 * g, g * k - side)
        };
        // At most `target_bins + 2` groups.
        let bins = groups as usize;
        // The old bins sit `grow` bins in from the widened edges; the merged range adds `pad`.
        let grow = (n - old_bins as u64) / 2;
        let offset = grow + pad;
        let new_t = ((offset as f64) * f64::from(stride) + f64::from(self.threshold)) as f32;
        if !new_t.is_finite() {
            self.merge_far(data, t, target_bins);
            return Ok(());
        }
        let old = std::mem::take(&mut self.counts);
        *self = Self::of(data, bins, self.min_max, new_t);
        for (i, &c) in old.iter().enumerate() {
            let j = ((i as u64 + offset) / k) as usize;
            self.counts[j.min(bins - 1)] += c;
        }
        Ok(())
    }

    /// A new histogram of `target_bins` over `±t` for a batch so far beyond the range that
    /// the old counts all fall in the middle: those below zero in the bin just below it, the
    /// others in the bin holding zero.
    fn merge_far(&mut self, data: &[f32], t: f32, target_bins: usize) {
        let old = std::mem::take(&mut self.counts);
        let below: u64 = old[..old.len() / 2].iter().sum();
        let total: u64 = old.iter().sum();
        *self = Self::of(data, target_bins, self.min_max, t);
        let mid = target_bins / 2;
        if target_bins.is_multiple_of(2) && mid > 0 {
            self.counts[mid - 1] += below;
            self.counts[mid] += total - below;
        } else {
            self.counts[mid] += total;
        }
    }
}

/// `numpy.linspace(-t, t, bins + 1)` in f32 as `numpy.histogram` makes its edges (a zero
/// range is widened to `±0.5`).
fn linspace_edges(bins: usize, t: f32) -> Vec<f32> {
    let (first, last) = if t > 0.0 { (-t, t) } else { (-0.5, 0.5) };
    // Past f32::MAX / 2 the width overflows in f32 (numpy's edges are then NaN); in f64 they
    // stay finite.
    let step = (last - first) / bins as f32;
    if !step.is_finite() {
        let step = (f64::from(last) - f64::from(first)) / bins as f64;
        return (0..=bins)
            .map(|i| (i as f64 * step + f64::from(first)) as f32)
            .collect();
    }
    let mut edges: Vec<f32> = (0..=bins).map(|i| i as f32 * step + first).collect();
    edges[bins] = last;
    edges
}

/// Counts `data` into the bins of `edges` as `numpy.histogram` does (the last bin closed,
/// values outside ignored).
fn add_counts(counts: &mut [u64], edges: &[f32], data: &[f32]) {
    let bins = counts.len();
    let (first, last) = (edges[0], edges[bins]);
    if last.partial_cmp(&first) != Some(std::cmp::Ordering::Greater) {
        return;
    }
    for &v in data {
        if v < first || v > last {
            continue;
        }
        let mut i = (((v - first) / (last - first)) * bins as f32) as usize;
        // With an f32-overflowing width the guess is 0; the walks below correct any guess.
        i = i.min(bins - 1);
        while i > 0 && v < edges[i] {
            i -= 1;
        }
        while i + 1 < bins && v >= edges[i + 1] {
            i += 1;
        }
        counts[i] += 1;
    }
}

/// ONNX Runtime's entropy calibration (`onnxruntime.quantization`, `CalibrationMethod.Entropy`),
/// reproduced so that users moving from ORT get the same ranges for the same settings
/// (ORT's defaults are 128 bins and 128 quantized bins).
///
/// It differs from [`KldObserver`](super::KldObserver) in the ways ORT's implementation does:
/// the histogram is of the signed values over `±max|x|` (`num_bins` bins); candidate ranges
/// are symmetric windows of `2i + 1` bins around the zero bin for `i` from
/// `num_quantized_bins / 2` up; outliers go to the window's end bins; the candidate `Q`
/// spreads each merged bin's count over *all* its bins, truncated to an integer, and leaves
/// bins past the last whole merged bin empty; zeros are smoothed with `ε = 1e-4` on counts;
/// `KL(P‖Q)` is taken on the normalized smoothed counts; the first minimum wins; the
/// window's edges are clipped to the min and max seen.
///
/// Several batches are combined as [`OrtMerge`] says: by default stacked and histogrammed
/// once, as `quantize_static` does. The search costs `O(bins²)`: with
/// [`OrtMerge::PerBatch`] the bins are capped (see there).
///
/// ```
/// use nncompress::quantizer::{Observer, OrtEntropyObserver, OrtMerge};
/// let mut ort = OrtEntropyObserver::new(128, 128)?.with_merge(OrtMerge::PerBatch);
/// ort.observe(ndarray::arr1(&[-1.0f32, 0.25, 0.5, 2.0]).into_dyn().view())?;
/// let (lo, hi) = ort.range()?;
/// assert!(lo >= -1.0 && hi <= 2.0);
/// # Ok::<(), nncompress::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct OrtEntropyObserver {
    num_bins: usize,
    num_quantized_bins: usize,
    merge: OrtMerge,
    max_bins: usize,
    /// Every value seen ([`OrtMerge::Stacked`]).
    values: Vec<f32>,
    min_max: Option<(f32, f32)>,
    /// The histogram so far ([`OrtMerge::PerBatch`]).
    hist: Option<OrtHistogram>,
}

impl Default for OrtEntropyObserver {
    /// ORT's defaults: 128 bins, 128 quantized bins, stacked batches.
    fn default() -> Self {
        Self::unchecked(128, 128)
    }
}

impl OrtEntropyObserver {
    /// An observer with ORT's `num_bins` (1 to [`MAX_HISTOGRAM_BINS`](super::MAX_HISTOGRAM_BINS)) and
    /// `num_quantized_bins` (at least 1) options, stacking batches ([`OrtMerge::Stacked`]).
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
            merge: OrtMerge::Stacked,
            max_bins: DEFAULT_ORT_MAX_BINS.max(num_bins),
            values: Vec::new(),
            min_max: None,
            hist: None,
        }
    }

    /// An observer that starts from a ready histogram (for instance one ORT collected) and
    /// merges further batches into it ([`OrtMerge::PerBatch`], the cap at least its bins).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for 0 quantized bins.
    pub fn from_histogram(hist: OrtHistogram, num_quantized_bins: usize) -> Result<Self> {
        let mut obs = Self::new(hist.counts.len(), num_quantized_bins)?;
        obs.merge = OrtMerge::PerBatch;
        obs.min_max = Some(hist.min_max);
        obs.hist = Some(hist);
        Ok(obs)
    }

    /// The same observer combining batches as `merge` says; what was observed is dropped.
    pub fn with_merge(mut self, merge: OrtMerge) -> Self {
        self.reset();
        self.merge = merge;
        self
    }

    /// The most bins a [`OrtMerge::PerBatch`] histogram may widen to before whole bins are
    /// merged (`num_bins` to [`MAX_HISTOGRAM_BINS`](super::MAX_HISTOGRAM_BINS); default [`DEFAULT_ORT_MAX_BINS`] or
    /// `num_bins` if larger).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a cap outside that range.
    pub fn with_max_bins(mut self, max_bins: usize) -> Result<Self> {
        check_bins("ORT entropy observer cap", max_bins, self.num_bins)?;
        self.max_bins = max_bins;
        Ok(self)
    }

    /// The histogram the search runs on: for [`OrtMerge::Stacked`], that of every value seen
    /// so far, made now.
    ///
    /// # Errors
    /// [`Error::Empty`] when nothing has been observed.
    pub fn histogram(&self) -> Result<OrtHistogram> {
        match (&self.hist, self.min_max) {
            (Some(h), _) => Ok(h.clone()),
            (None, Some((lo, hi))) => Ok(OrtHistogram::of(
                &self.values,
                self.num_bins,
                (lo, hi),
                lo.abs().max(hi.abs()),
            )),
            (None, None) => Err(nothing_observed()),
        }
    }

    /// The chosen window's half-width `i`: the range spans bins `zero − i ..= zero + i` of
    /// [`histogram`](Self::histogram) (`zero = bins / 2`, the last bin at most), that is
    /// edges `zero − i` to `min(zero + i + 1, bins)`, clipped to the min and max seen.
    ///
    /// # Errors
    /// [`Error::Empty`] when nothing has been observed or the histogram has fewer bins than
    /// `num_quantized_bins` (ORT then returns no threshold).
    pub fn best_bin(&self) -> Result<usize> {
        let h = self.histogram()?;
        search(&h, self.num_quantized_bins)
            .map(|(i, _)| i)
            .ok_or_else(nothing_observed)
    }
}

/// ORT's threshold search over `h` (see [`OrtEntropyObserver`]): the best half-width and its
/// range clipped to the min and max seen.
fn search(h: &OrtHistogram, nq: usize) -> Option<(usize, (f32, f32))> {
    let hist = &h.counts;
    let nb = hist.len();
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
    // Prefix sums make the outlier folds O(1) per candidate: the search is
    // O(bins · candidates).
    let mut prefix = vec![0u64; nb + 1];
    for (i, &c) in hist.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    let mut best: Option<(f32, usize)> = None;
    for i in half..=zero {
        let start = zero - i;
        let end = (zero + i + 1).min(nb);
        let sliced = &hist[start..end];
        let mut p: Vec<i64> = sliced.iter().map(|&c| c as i64).collect();
        p[0] += prefix[start] as i64;
        let last = p.len() - 1;
        p[last] += (prefix[nb] - prefix[end]) as i64;
        let merged = sliced.len() / nq;
        let mut q = vec![0i64; p.len()];
        for j in 0..nq {
            let (s, e) = (j * merged, (j + 1) * merged);
            let mut qb = (prefix[start + e] - prefix[start + s]) as i64;
            if j == nq - 1 {
                qb += (prefix[end] - prefix[start + nq * merged]) as i64;
            }
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
        if best.is_none_or(|(b, _)| div < b) {
            best = Some((div, i));
        }
    }
    let (lo, hi) = h.min_max;
    best.map(|(_, i)| {
        let (start, end) = (zero - i, (zero + i + 1).min(nb));
        (i, (h.edges[start].max(lo), h.edges[end].min(hi)))
    })
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
        match (self.merge, &mut self.hist) {
            (OrtMerge::Stacked, _) => {
                let n = self.values.len().saturating_add(data.len());
                Limits::default().check_elements(&[n], "ORT entropy observer, stacked values")?;
                self.values.extend_from_slice(data);
            }
            (OrtMerge::PerBatch, None) => {
                self.hist = Some(OrtHistogram::of(
                    data,
                    self.num_bins,
                    (lo, hi),
                    lo.abs().max(hi.abs()),
                ));
            }
            (OrtMerge::PerBatch, Some(h)) => {
                h.merge(data, (lo, hi), self.num_bins, self.max_bins)?;
            }
        }
        self.min_max = Some(match self.min_max {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        Ok(())
    }
    fn range(&self) -> Result<(f32, f32)> {
        let h = self.histogram()?;
        search(&h, self.num_quantized_bins)
            .map(|(_, r)| r)
            .ok_or_else(nothing_observed)
    }
    fn reset(&mut self) {
        *self = OrtEntropyObserver {
            merge: self.merge,
            max_bins: self.max_bins,
            ..OrtEntropyObserver::unchecked(self.num_bins, self.num_quantized_bins)
        };
    }
}
