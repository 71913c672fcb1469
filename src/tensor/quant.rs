//! The arithmetic of one quantization grid, shared by the quantizer (real quantization) and
//! the graph's fake-quantization ops (quantization-aware training), so that both round the
//! same way, bit for bit.

/// An integer grid `[qmin, qmax]` and how its zero point is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantGrid {
    /// Smallest integer.
    pub qmin: i32,
    /// Largest integer.
    pub qmax: i32,
    /// Zero point fixed at the middle of the grid (0 for signed grids, `(qmax + 1) / 2` for
    /// unsigned ones, e.g. 128 for u8); otherwise (affine) the zero point follows the range.
    pub symmetric: bool,
}

impl QuantGrid {
    /// The zero point of a symmetric grid.
    pub fn symmetric_zero(&self) -> i32 {
        if self.qmin < 0 {
            0
        } else {
            ((i64::from(self.qmax) + 1) / 2) as i32
        }
    }

    /// Scale and zero point mapping the finite range `[lo, hi]` (`lo ≤ hi`) onto the grid.
    ///
    /// Affine: the range is widened to include 0, `s = (hi − lo) / (qmax − qmin)`,
    /// `z = qmin − round_half_even(lo / s)`. Symmetric: `s = max(|lo|, |hi|) / (qmax − z)`. A
    /// zero range gives `s = 1`; scales never go below `f32::MIN_POSITIVE`.
    pub fn params(&self, lo: f32, hi: f32) -> (f32, i32) {
        let (qmin, qmax) = (self.qmin, self.qmax);
        let (s, z) = if self.symmetric {
            let z = self.symmetric_zero();
            let amax = lo.abs().max(hi.abs()) as f64;
            let s = amax / (f64::from(qmax) - f64::from(z));
            (if s > 0.0 { s } else { 1.0 }, z)
        } else {
            let (lo, hi) = (lo.min(0.0) as f64, hi.max(0.0) as f64);
            let s = (hi - lo) / (f64::from(qmax) - f64::from(qmin));
            if s > 0.0 {
                let z = (qmin as f64 - lo / s).round_ties_even();
                (s, (z as i32).max(qmin).min(qmax))
            } else {
                (1.0, qmin.max(0).min(qmax))
            }
        };
        ((s as f32).max(f32::MIN_POSITIVE), z)
    }

    /// `round_half_even(x / s)` with the quotient computed in **f32**, as ONNX's
    /// `QuantizeLinear` specifies and ONNX Runtime and NumPy compute it (before the zero point
    /// and the clamp). The tie is decided on the f32 quotient: where `x / s` rounds to exactly
    /// `k + 0.5` in f32, the result is the even neighbour even if the exact quotient is a hair
    /// off (x = −3.0432498, s = 0.0235: the f32 quotient is −129.5, so −130). An infinite
    /// quotient stays infinite (and saturates in [`QuantGrid::quantize`]).
    #[inline(always)]
    pub fn rounded(x: f32, scale: f32) -> f64 {
        let v = x / scale;
        // Adding 1.5·2²³ pushes the fraction out of the f32 mantissa, rounding to the nearest
        // integer with ties to even (the default rounding mode); subtracting it back is exact.
        // Same result as `round_ties_even` for |v| < 2²², without the libm call that baseline
        // x86-64 (no SSE4.1) makes per element; f32 values in [2²², 2²³) still have halves
        // and take the call (they saturate any integer grid of 23 bits or fewer anyway).
        const SHIFT: f32 = 12_582_912.0;
        f64::from(if v.abs() < 4_194_304.0 {
            (v + SHIFT) - SHIFT
        } else {
            v.round_ties_even()
        })
    }

    /// The integer of `x`: `clamp(round_half_even(x / s) + z, qmin, qmax)`.
    #[inline(always)]
    pub fn quantize(&self, x: f32, scale: f32, zero: i32) -> i32 {
        // `max` then `min`, not `clamp`: the fields are public, and `clamp` panics on an
        // inverted grid (which shape inference refuses for graph ops).
        (Self::rounded(x, scale) + zero as f64)
            .max(self.qmin as f64)
            .min(self.qmax as f64) as i32
    }

    /// [`QuantGrid::quantize`] of every value of `xs` into `out`, for a grid within u8
    /// (`qmin ≥ 0`, `qmax ≤ 255`; a wider one is clipped to it), equal to it value for value
    /// but written without branches or libm calls so that it vectorises: the quotient is
    /// rounded by the 1.5·2²³ shift (exact below 2²²; beyond, within one of the quotient,
    /// which the clamp to the grid saturates either way). Returns whether every value was
    /// finite (in the same pass, so a caller that must refuse NaN and ±∞ needs no second
    /// one).
    ///
    /// `FUSED_MULTIPLY_ADD`: the caller is compiled with FMA (`mul_add` is one instruction
    /// rather than a libm call). The quotient is then `x · (1/s)` corrected by one fused
    /// residual step instead of a division, which costs a cycle per lane even on AVX-512
    /// (a third of a LeNet-300-100 int8 call went into it). By Markstein's theorem, with
    /// `y = RN(1/s)` and `q = RN(x·y)` within an ulp of `x/s`, `r = x − q·s` is exact and
    /// `RN(q + r·y) = RN(x/s)`: the correctly rounded quotient, so the same integers, as long
    /// as nothing underflows or overflows. Scales outside `[2⁻¹⁰⁰, 2¹⁰⁰]` therefore divide,
    /// and quotients beyond 2⁴⁰ (saturated either way) skip the correction, which would turn
    /// an infinite one into NaN.
    #[inline(always)]
    pub(crate) fn quantize_u8_into<const FUSED_MULTIPLY_ADD: bool>(
        &self,
        xs: &[f32],
        scale: f32,
        zero: i32,
        out: &mut [u8],
    ) -> bool {
        const SHIFT: f32 = 12_582_912.0;
        let (qmin, qmax) = (self.qmin.max(0), self.qmax.min(255));
        if !(-1024..=1024).contains(&zero) {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = self.quantize(x, scale, zero).clamp(qmin, qmax.max(qmin)) as u8;
            }
            return xs.iter().all(|x| x.is_finite());
        }
        // `(q + 1.5·2²³) − (1.5·2²³ − z)` is `round_half_even(q) + z` for |q| < 2²², and
        // within one of `q + z` beyond (and keeps ±∞), which the clamp saturates either way.
        let (zf, qlo, qhi) = (zero as f32, qmin as f32, qmax as f32);
        let finish = |q: f32| -> u8 {
            let r = (q + SHIFT) - (SHIFT - zf);
            // Comparisons rather than `f32::max` / `min`, whose NaN rules cost extra
            // instructions per lane: `r > qlo` is false for NaN, so NaN saturates to `qmin`,
            // as in `quantize`.
            let y = if r > qlo { r } else { qlo };
            let y = if y < qhi { y } else { qhi };
            // `y` is an integer in 0..=255: adding 2²³ puts it in the low mantissa bits, a
            // conversion that vectorises where `as u8` on a float does not.
            (y + 8_388_608.0).to_bits() as u8
        };
        // The largest magnitude's bits, as an integer: all finite iff below +∞'s.
        let mut magnitude = 0u32;
        let reciprocal = 1.0 / scale;
        if FUSED_MULTIPLY_ADD && (7.9e-31..=1.3e30).contains(&scale.abs()) {
            const BOUND: f32 = 1.1e12;
            for (o, &x) in out.iter_mut().zip(xs) {
                magnitude = magnitude.max(x.to_bits() & 0x7fff_ffff);
                // Bounded first: the correction of an infinite `q` would be NaN. NaN stays
                // NaN (the comparison is false, `-BOUND`, then a NaN residual).
                let q = x * reciprocal;
                let q = if q > -BOUND { q } else { -BOUND };
                let q = if q < BOUND { q } else { BOUND };
                let residual = (-q).mul_add(scale, x);
                *o = finish(residual.mul_add(reciprocal, q));
            }
        } else {
            for (o, &x) in out.iter_mut().zip(xs) {
                magnitude = magnitude.max(x.to_bits() & 0x7fff_ffff);
                *o = finish(x / scale);
            }
        }
        magnitude < f32::INFINITY.to_bits()
    }

    /// Quantize then dequantize: `s·(q − z)`.
    #[inline(always)]
    pub fn fake_quantize(&self, x: f32, scale: f32, zero: i32) -> f32 {
        scale * (self.quantize(x, scale, zero) - zero) as f32
    }
}

/// `(min, max, all finite)` of a slice, in a form LLVM vectorises (plain comparisons: a NaN
/// fails `abs ≤ MAX`; the extremes are then those of the other values).
#[inline(always)]
pub(crate) fn min_max_finite(data: &[f32]) -> (f32, f32, bool) {
    const LANES: usize = 16;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut finite = [true; LANES];
    let (blocks, tail) = data.as_chunks::<LANES>();
    for c in blocks {
        for k in 0..LANES {
            let v = c[k];
            lo[k] = if v < lo[k] { v } else { lo[k] };
            hi[k] = if v > hi[k] { v } else { hi[k] };
            finite[k] &= v.abs() <= f32::MAX;
        }
    }
    for &v in tail {
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

#[cfg(test)]
mod tests {
    use super::QuantGrid;

    /// The vectorisable u8 quantizer equals the scalar one on ties, saturation, NaN, ±∞,
    /// subnormals and random values, for several scales and zero points.
    #[test]
    fn slice_quantizer_equals_the_scalar_one() {
        let grid = QuantGrid {
            qmin: 0,
            qmax: 255,
            symmetric: false,
        };
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            3e38,
            -3e38,
            1e6,
            -1e6,
        ];
        let mut state = 12345u32;
        for _ in 0..20_000 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            xs.push((state as i32) as f32 / 2.0e7);
        }
        for (scale, zero) in [
            (0.0235f32, 5),
            (1.0 / 255.0, 0),
            (0.5, 128),
            (1e-3, 255),
            (7.0, -3),
            // Reciprocals at the edges of f32: a subnormal scale (division throughout), a
            // tiny and a huge normal one.
            (3e-39, 7),
            (1e-30, 128),
            (1e30, 0),
            (0.3, 100),
            (0.007_812_5, 128),
        ] {
            // Planted ties: (k + 0.5)·s and its neighbours.
            let ties: Vec<f32> = (-300..300)
                .flat_map(|k| {
                    let x = (k as f32 + 0.5) * scale;
                    [
                        f32::from_bits(x.to_bits() - 1),
                        x,
                        f32::from_bits(x.to_bits() + 1),
                    ]
                })
                .collect();
            let all: Vec<f32> = xs.iter().chain(&ties).copied().collect();
            // Both loops: by division, and by the fused residual step (here through libm's
            // `fmaf`, the same values as the instruction).
            type Loop = fn(&QuantGrid, &[f32], f32, i32, &mut [u8]) -> bool;
            let loops: [Loop; 2] = [
                |g, x, s, z, o| g.quantize_u8_into::<false>(x, s, z, o),
                |g, x, s, z, o| g.quantize_u8_into::<true>(x, s, z, o),
            ];
            for quantize_into in loops {
                let mut fast = vec![0u8; all.len()];
                assert!(!quantize_into(&grid, &all, scale, zero, &mut fast));
                assert!(quantize_into(
                    &grid,
                    &all[14..],
                    scale,
                    zero,
                    &mut fast[14..]
                ));
                for (&x, &q) in all.iter().zip(&fast) {
                    assert_eq!(
                        q as i32,
                        grid.quantize(x, scale, zero),
                        "x = {x:e}, s = {scale}, z = {zero}"
                    );
                }
            }
        }
    }
}
