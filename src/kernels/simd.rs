//! Element-wise loops of the integer path compiled for the widest vectors this CPU has.

use crate::tensor::QuantGrid;

/// `QuantGrid::quantize_u8_into` (round half to even of the f32 quotient, saturated; the
/// result says whether every value was finite), on AVX-512 where the CPU has it: 16 lanes
/// instead of the baseline target's 4, the same values bit for bit.
pub(crate) fn quantize_u8(
    grid: &QuantGrid,
    xs: &[f32],
    scale: f32,
    zero: i32,
    out: &mut [u8],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = super::dispatch::VnniCpu::detect() {
        return super::x86_64::quantize_u8_avx512(cpu, grid, xs, scale, zero, out);
    }
    grid.quantize_u8_into::<false>(xs, scale, zero, out)
}

/// `(min, max, all finite)` of `xs` (NaN is skipped by the extremes and makes the flag
/// false), on AVX-512 where the CPU has it.
pub(crate) fn min_max(xs: &[f32]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = super::dispatch::VnniCpu::detect() {
        return super::x86_64::min_max_avx512(cpu, xs);
    }
    crate::tensor::min_max_finite(xs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched (AVX-512 where present) loop against the scalar definition, on random
    /// scales and on values planted at and beside every rounding boundary.
    #[test]
    fn wide_quantization_equals_the_division_everywhere() {
        let grid = QuantGrid {
            qmin: 0,
            qmax: 255,
            symmetric: false,
        };
        let mut state = 99u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        // Values where rounding `x · (1/s)` would have given another integer: the test
        // must meet some, or it would not test the fallback.
        let mut reciprocal_differs = 0;
        for _ in 0..300 {
            let scale = f32::from_bits(0x0d00_0000 + next() % 0x6400_0000);
            let zero = (next() % 256) as i32;
            let mut xs: Vec<f32> = (0..2_000)
                .map(|_| (next() as i32 as f32) * scale / 1e7)
                .collect();
            for k in -300..300 {
                let x = (k as f32 + 0.5) * scale;
                xs.extend([
                    f32::from_bits(x.to_bits().wrapping_sub(1)),
                    x,
                    f32::from_bits(x.to_bits().wrapping_add(1)),
                ]);
            }
            let mut out = vec![0u8; xs.len()];
            let finite = xs.iter().all(|x| x.is_finite());
            assert_eq!(quantize_u8(&grid, &xs, scale, zero, &mut out), finite);
            for (&x, &q) in xs.iter().zip(&out) {
                assert_eq!(
                    q as i32,
                    grid.quantize(x, scale, zero),
                    "x = {x:e}, s = {scale:e}"
                );
                reciprocal_differs +=
                    usize::from(grid.quantize(x * (1.0 / scale), 1.0, zero) != q as i32);
            }
        }
        assert!(reciprocal_differs > 0);
    }
}
