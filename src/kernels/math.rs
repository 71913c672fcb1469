//! Element-wise maths for transformer activations, written so that the compiler vectorizes
//! it (no branches, no calls): `exp` and `erf` to within a few ulp of libm, GELU and
//! row-wise softmax over contiguous rows.
//!
//! libm's `erff` and `expf` are calls per element: on all-MiniLM-L6-v2 GELU alone took a
//! quarter of the forward pass (10.5 of 45 ms at batch 1 × 128 tokens).

/// `e^x` in f32: Cody–Waite range reduction by ln 2 and the Cephes `expf` polynomial;
/// relative error within 2 × 10⁻⁷ of libm's, 0 below −87.33 (as libm, which underflows
/// there into subnormals), `+∞` above 88.72.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO: f32 = -87.336_55;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    // Round to nearest by the 1.5 · 2²³ trick: `round` and `mul_add` are libm calls on a
    // target without SSE4.1 and FMA (the crate's default), and would stop vectorization.
    const ROUND: f32 = 12_582_912.0;
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from exponent bits, in two halves: n is in −126..=128 after the clamp, and each
    // half (−63..=64) is a normal f32 power of two, so neither end overflows the bits.
    // The integer n sits in the low mantissa bits of `shifted` (no float-to-int conversion,
    // which Rust's saturating `as` would keep from vectorizing).
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let half = n >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let v = y * pow2(half) * pow2(n - half);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        v
    }
}

/// The error function in f32: the rational approximation of Eigen's and XLA's
/// `fast_erf_float` on `[−4, 4]` (±1 outside, where f32 cannot tell erf from 1); absolute
/// error within 5 × 10⁻⁷ of libm's `erff` (the rational itself is within 6.5 × 10⁻⁸; the rest is f32 rounding near ±4).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let outside = x.abs() > 4.0;
    let sign = 1.0f32.copysign(x);
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_1e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_2e-3;
    q = q * x2 + -1.426_474e-2;
    let r = (x * p / q).clamp(-1.0, 1.0);
    if outside {
        sign
    } else {
        r
    }
}

/// `x · Φ(x)`, GELU with the exact normal CDF.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Below this many elements a softmax runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Softmax of every contiguous row of `row_len` values of `data`, in place (the maximum
/// subtracted first, so no row overflows). A trailing partial row is left as it is
/// (callers pass whole rows).
pub fn softmax_rows(data: &mut [f32], row_len: usize) {
    if row_len == 0 {
        return;
    }
    let rows = data.len() / row_len;
    let threads = rayon::current_num_threads();
    let wide = avx512();
    let run = |chunk: &mut [f32]| {
        if wide {
            // SAFETY: `avx512()` saw AVX-512F and FMA on this CPU, all the function needs.
            unsafe { softmax_rows_avx512(chunk, row_len) }
        } else {
            chunk.chunks_exact_mut(row_len).for_each(softmax_row);
        }
    };
    if threads < 2 || data.len() < PARALLEL_MIN_ELEMENTS || rows < 2 {
        run(data);
        return;
    }
    let per_task = rows.div_ceil(threads * 4).max(1) * row_len;
    let chunks: Vec<&mut [f32]> = data[..rows * row_len].chunks_mut(per_task).collect();
    super::parallel::for_each(chunks, &|chunk: &mut [f32]| run(chunk));
}

/// `softmax(scale · x + bias)` of every contiguous row of `row_len` values of `data`, in
/// place, on the calling thread (attention's scores: the caller splits the heads over the
/// threads). `bias` is one row shared by every row (a key padding mask) or one value per
/// element of `data`.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] when `bias` has neither length.
pub fn scaled_softmax_rows(
    data: &mut [f32],
    row_len: usize,
    scale: f32,
    bias: Option<&[f32]>,
) -> crate::Result<()> {
    if row_len == 0 {
        return Ok(());
    }
    if let Some(b) = bias {
        if b.len() != row_len && b.len() != data.len() {
            return Err(crate::Error::shape(
                "scaled_softmax_rows",
                None,
                format!("a bias of {row_len} or {} values", data.len()),
                &[b.len()],
            ));
        }
    }
    if avx512() {
        // SAFETY: `avx512()` saw AVX-512F and FMA on this CPU, all the function needs.
        unsafe { scaled_softmax_rows_avx512(data, row_len, scale, bias) }
    } else {
        scaled_softmax_rows_portable(data, row_len, scale, bias)
    }
    Ok(())
}

#[inline(always)]
fn scaled_softmax_rows_portable(
    data: &mut [f32],
    row_len: usize,
    scale: f32,
    bias: Option<&[f32]>,
) {
    for (r, row) in data.chunks_exact_mut(row_len).enumerate() {
        match bias {
            Some(b) if b.len() == row_len => {
                for (v, &m) in row.iter_mut().zip(b) {
                    *v = *v * scale + m;
                }
            }
            Some(b) => {
                for (v, &m) in row.iter_mut().zip(&b[r * row_len..]) {
                    *v = *v * scale + m;
                }
            }
            None => {
                for v in row.iter_mut() {
                    *v *= scale;
                }
            }
        }
        softmax_row(row);
    }
}

/// See [`softmax_rows_avx512`].
///
/// # Safety
/// As [`softmax_rows_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scaled_softmax_rows_avx512(
    data: &mut [f32],
    row_len: usize,
    scale: f32,
    bias: Option<&[f32]>,
) {
    scaled_softmax_rows_portable(data, row_len, scale, bias)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn scaled_softmax_rows_avx512(
    data: &mut [f32],
    row_len: usize,
    scale: f32,
    bias: Option<&[f32]>,
) {
    scaled_softmax_rows_portable(data, row_len, scale, bias)
}

/// Whether this CPU runs the AVX-512 builds of these loops.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The same loops compiled for AVX-512F: the crate's default target is baseline x86-64,
/// where they run four lanes at a time at best.
///
/// # Safety
/// The CPU must have AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_rows_avx512(data: &mut [f32], row_len: usize) {
    for row in data.chunks_exact_mut(row_len) {
        softmax_row(row);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn softmax_rows_avx512(data: &mut [f32], row_len: usize) {
    for row in data.chunks_exact_mut(row_len) {
        softmax_row(row);
    }
}

/// See [`softmax_rows_avx512`].
///
/// # Safety
/// As [`softmax_rows_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gelu_avx512(data: &mut [f32]) {
    for v in data.iter_mut() {
        *v = gelu(*v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gelu_avx512(data: &mut [f32]) {
    for v in data.iter_mut() {
        *v = gelu(*v);
    }
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    const LANES: usize = 16;
    let whole = row.len() / LANES * LANES;
    let mut m = [f32::NEG_INFINITY; LANES];
    for c in row[..whole].chunks_exact(LANES) {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in m.iter().chain(&row[whole..]) {
        max = max.max(v);
    }
    let mut s = [0.0f32; LANES];
    for c in row[..whole].chunks_exact_mut(LANES) {
        for l in 0..LANES {
            c[l] = exp(c[l] - max);
            s[l] += c[l];
        }
    }
    let mut sum = 0.0;
    for &v in &s {
        sum += v;
    }
    for v in &mut row[whole..] {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// GELU of every value of `data`, in place.
pub fn gelu_in_place(data: &mut [f32]) {
    let threads = rayon::current_num_threads();
    if threads > 1 && data.len() >= 1 << 16 {
        let per = data.len().div_ceil(threads * 2);
        let chunks: Vec<&mut [f32]> = data.chunks_mut(per).collect();
        super::parallel::for_each(chunks, &|c: &mut [f32]| gelu_on_this_thread(c));
    } else {
        gelu_on_this_thread(data);
    }
}

fn gelu_on_this_thread(data: &mut [f32]) {
    if avx512() {
        // SAFETY: `avx512()` saw AVX-512F and FMA on this CPU, all the function needs.
        unsafe { gelu_avx512(data) }
    } else {
        data.iter_mut().for_each(|v| *v = gelu(*v));
    }
}

/// Mean and `1 / √(biased variance + eps)` of one row (LayerNorm's moments): two passes,
/// each summed in sixteen f32 lanes (so it vectorizes; a lane holds `len / 16` terms) and
/// the lanes in f64. The order of every addition is fixed, so the result is the same on any
/// CPU and thread count.
pub fn row_moments(row: &[f32], eps: f32) -> (f32, f32) {
    if row.is_empty() {
        return (0.0, 0.0);
    }
    let n = row.len() as f64;
    let mean = (lane_sum(row, |v| v) / n) as f32;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var + eps as f64).sqrt()) as f32)
}

#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const LANES: usize = 16;
    let whole = row.len() / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for c in row[..whole].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let tail: f64 = row[whole..].iter().map(|&v| f(v) as f64).sum();
    acc.iter().map(|&v| v as f64).sum::<f64>() + tail
}

/// LayerNorm of every contiguous row of `src` into `dst`: `(x − mean) · inv_std · gamma +
/// beta` with the moments of [`row_moments`], on the calling thread. A trailing partial
/// row is left as it is.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] when `gamma` and `beta` differ in length or `src` and
/// `dst` do.
pub fn layer_norm_rows(
    src: &[f32],
    dst: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> crate::Result<()> {
    if gamma.len() != beta.len() || src.len() != dst.len() {
        return Err(crate::Error::shape(
            "layer_norm_rows",
            None,
            format!("gamma and beta of one length, src and dst of {}", src.len()),
            &[gamma.len(), beta.len(), dst.len()],
        ));
    }
    if gamma.is_empty() {
        return Ok(());
    }
    if avx512() {
        // SAFETY: `avx512()` saw AVX-512F and FMA on this CPU, all the function needs.
        unsafe { layer_norm_rows_avx512(src, dst, gamma, beta, eps) }
    } else {
        layer_norm_rows_portable(src, dst, gamma, beta, eps)
    }
    Ok(())
}

#[inline(always)]
fn layer_norm_rows_portable(src: &[f32], dst: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let m = gamma.len();
    for (row, out) in src.chunks_exact(m).zip(dst.chunks_exact_mut(m)) {
        let (mean, inv_std) = row_moments(row, eps);
        for (((o, &x), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
            *o = (x - mean) * inv_std * g + b;
        }
    }
}

/// See [`softmax_rows_avx512`].
///
/// # Safety
/// As [`softmax_rows_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn layer_norm_rows_avx512(
    src: &[f32],
    dst: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    layer_norm_rows_portable(src, dst, gamma, beta, eps)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn layer_norm_rows_avx512(
    src: &[f32],
    dst: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    layer_norm_rows_portable(src, dst, gamma, beta, eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_saturates_like_it() {
        for x in grid(-87.0, 88.5, 400_000) {
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() <= 2.5e-7,
                "exp({x}) = {got}, libm {want}"
            );
        }
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_is_within_5e_7_of_libm() {
        for x in grid(-6.0, 6.0, 400_000) {
            let (got, want) = (erf(x), libm::erff(x));
            assert!((got - want).abs() <= 5e-7, "erf({x}) = {got}, libm {want}");
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-7.0), -1.0);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() {
        let row_len = 37; // not a multiple of the 16 lanes
        let mut data: Vec<f32> = (0..row_len * 3000)
            .map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0)
            .collect();
        data[5] = f32::MIN; // a masked score
        let want: Vec<f32> = data
            .chunks(row_len)
            .flat_map(|r| {
                let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |v| (v / s) as f32)
            })
            .collect();
        softmax_rows(&mut data, row_len);
        for (i, (&g, &w)) in data.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6, "{i}: {g} vs {w}");
        }
        assert_eq!(data[5], 0.0);
    }

    #[test]
    fn layer_norm_rows_match_a_float64_layer_norm_even_far_from_zero() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Lengths around the 16-lane blocks, and a mean 10⁴ times the spread (a one-pass
        // E[x²] − E[x]² in f32 would lose every digit there).
        for (m, offset) in [(1, 0.0), (15, 0.0), (16, 3.0), (17, -2.0), (384, 1e3)] {
            let rows = 3;
            let src: Vec<f32> = (0..rows * m)
                .map(|_| offset + rng.random_range(-0.1f32..0.1))
                .collect();
            let gamma: Vec<f32> = (0..m).map(|_| rng.random_range(0.5f32..1.5)).collect();
            let beta: Vec<f32> = (0..m).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut dst = vec![0.0f32; src.len()];
            layer_norm_rows(&src, &mut dst, &gamma, &beta, 1e-5).unwrap();
            for (row, out) in src.chunks(m).zip(dst.chunks(m)) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / m as f64;
                for k in 0..m {
                    let want = (row[k] as f64 - mean) / (var + 1e-5).sqrt() * gamma[k] as f64
                        + beta[k] as f64;
                    // Far from zero the mean itself rounds to f32 (half an ulp of 10³ is
                    // 3e-5, 5e-4 of σ), as it does in any f32 LayerNorm.
                    let tol = if offset == 1e3 {
                        2e-3
                    } else {
                        1e-5 * (1.0 + want.abs())
                    };
                    assert!(
                        (out[k] as f64 - want).abs() <= tol,
                        "m {m}: {} vs {want}",
                        out[k]
                    );
                }
            }
        }
        let mut dst = vec![0.0f32; 4];
        assert!(layer_norm_rows(&[0.0; 4], &mut dst, &[1.0; 2], &[0.0; 3], 1e-5).is_err());
        assert!(layer_norm_rows(&[0.0; 4], &mut dst[..2], &[1.0; 2], &[0.0; 2], 1e-5).is_err());
    }
}
