//! Fixed-point requantization with gemmlowp / TFLite reference semantics.
//!
//! A real multiplier `M > 0` (for a layer, `M = s_in·s_w / s_out`) is written
//! `M = M0 · 2^shift` with `M0` a Q31 integer in `[2^30, 2^31)`. An i32 accumulator `x` is
//! then scaled by
//!
//! ```text
//! multiply_by_quantized_multiplier(x, M0, shift)
//!   = rounding_divide_by_pot(srdhm(x · 2^max(shift, 0), M0), max(−shift, 0))
//! ```
//!
//! where `srdhm` is gemmlowp's `SaturatingRoundingDoublingHighMul` (ARM's `VQRDMULH`: the
//! high 32 bits of `2·x·M0`, ties rounded toward +∞ — gemmlowp adds `2^30` or `1 − 2^30` and
//! divides truncating, so −1.5 → −1 — saturating the single overflow case
//! `i32::MIN · i32::MIN`) and `rounding_divide_by_pot` is gemmlowp's `RoundingDivideByPOT`
//! (an arithmetic right shift rounding half away from zero). The only departure from the
//! reference: for multipliers of 1 and above (a positive `shift`) the product is computed
//! wide and saturated, where the C++ reference overflows.

/// gemmlowp's `SaturatingRoundingDoublingHighMul`: `round(a·b / 2^31)` with ties toward +∞
/// (the nudge-and-truncate of the reference), `i32::MIN · i32::MIN` saturating to `i32::MAX`.
#[inline(always)]
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // Division truncates toward zero, as the C++ reference does.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp's `RoundingDivideByPOT`: `x / 2^exponent` rounded to nearest, ties away from
/// zero. `exponent` is clamped to `0..=31`.
#[inline(always)]
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    let e = exponent.clamp(0, 31) as u32;
    let mask = ((1i64 << e) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> e) + i32::from(remainder > threshold)
}

/// TFLite's `MultiplyByQuantizedMultiplier`: `x · (M0 / 2^31) · 2^shift` in fixed point (see
/// the module docs); saturating where the reference would overflow.
#[inline(always)]
pub fn multiply_by_quantized_multiplier(x: i32, multiplier: i32, shift: i32) -> i32 {
    if shift <= 0 {
        return rounding_divide_by_pot(
            saturating_rounding_doubling_high_mul(x, multiplier),
            // Saturating: `-i32::MIN` overflows (any shift below −31 divides by 2^31).
            shift.saturating_neg(),
        );
    }
    let ab = ((x as i128) << shift.min(31)) * multiplier as i128;
    let nudge: i128 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    ((ab + nudge) / (1i128 << 31)).clamp(i32::MIN as i128, i32::MAX as i128) as i32
}

/// Splits a real multiplier into a Q31 `M0` in `[2^30, 2^31)` and a power-of-two `shift`
/// with `M ≈ (M0 / 2^31) · 2^shift`, as TFLite's
/// `QuantizeMultiplier` does: `frexp`, round half away from zero, renormalise when rounding
/// reaches 2^31. Multipliers below 2^-31·2^-1 flush to `(0, 0)`; those of 2^31 and above
/// saturate to `(2^31 − 1, 31)`.
///
/// Returns `None` for a negative, NaN or infinite multiplier.
pub fn quantize_multiplier(real: f64) -> Option<(i32, i32)> {
    if !real.is_finite() || real < 0.0 {
        return None;
    }
    if real == 0.0 {
        return Some((0, 0));
    }
    let (q, mut shift) = frexp(real);
    let mut q_fixed = (q * (1u64 << 31) as f64).round() as i64;
    if q_fixed == 1i64 << 31 {
        q_fixed /= 2;
        shift += 1;
    }
    if shift < -31 {
        return Some((0, 0));
    }
    if shift > 31 {
        return Some((i32::MAX, 31));
    }
    Some((q_fixed as i32, shift))
}

/// `x = q · 2^e` with `q` in `[0.5, 1)` for positive finite `x`.
fn frexp(x: f64) -> (f64, i32) {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    if exp == 0 {
        // Subnormal: scale into the normal range first.
        let (q, e) = frexp(x * (1u64 << 54) as f64);
        return (q, e - 54);
    }
    let q = f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52));
    (q, exp - 1022)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srdhm_hand_checked() {
        // 2^30 · 2^30 / 2^31 = 2^29 exactly.
        assert_eq!(
            saturating_rounding_doubling_high_mul(1 << 30, 1 << 30),
            1 << 29
        );
        // Ties go toward +∞ (VQRDMULH): 1.5 → 2, −1.5 → −1, 0.5 → 1, −0.5 → 0.
        assert_eq!(saturating_rounding_doubling_high_mul(3, 1 << 30), 2);
        assert_eq!(saturating_rounding_doubling_high_mul(-3, 1 << 30), -1);
        assert_eq!(saturating_rounding_doubling_high_mul(1, 1 << 30), 1);
        assert_eq!(saturating_rounding_doubling_high_mul(-1, 1 << 30), 0);
        // Non-ties round to nearest either way: −2.5000…5 → −3.
        assert_eq!(saturating_rounding_doubling_high_mul(-5, (1 << 30) + 1), -3);
        // 5 · (2^30 − 1) / 2^31 = 2.4999… → 2
        assert_eq!(saturating_rounding_doubling_high_mul(5, (1 << 30) - 1), 2);
        // The one overflow case saturates.
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MAX),
            -i32::MAX
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MAX, i32::MAX),
            i32::MAX - 1
        );
    }

    #[test]
    fn rounding_divide_by_pot_hand_checked() {
        assert_eq!(rounding_divide_by_pot(5, 1), 3); // 2.5 → 3
        assert_eq!(rounding_divide_by_pot(-5, 1), -3); // −2.5 → −3
        assert_eq!(rounding_divide_by_pot(7, 2), 2); // 1.75 → 2
        assert_eq!(rounding_divide_by_pot(-7, 2), -2);
        assert_eq!(rounding_divide_by_pot(6, 2), 2); // 1.5 → 2
        assert_eq!(rounding_divide_by_pot(-6, 2), -2); // −1.5 → −2
        assert_eq!(rounding_divide_by_pot(-5, 2), -1); // −1.25 → −1
        assert_eq!(rounding_divide_by_pot(123, 0), 123);
        assert_eq!(rounding_divide_by_pot(i32::MAX, 31), 1);
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(-(1 << 30), 31), -1); // −0.5 → −1
        assert_eq!(rounding_divide_by_pot((1 << 30) - 1, 31), 0);
    }

    #[test]
    fn quantize_multiplier_hand_checked() {
        assert_eq!(quantize_multiplier(0.5), Some((1 << 30, 0)));
        assert_eq!(quantize_multiplier(1.0), Some((1 << 30, 1)));
        assert_eq!(quantize_multiplier(0.25), Some((1 << 30, -1)));
        // 0.75 = 0.75 · 2^0 → M0 = 0.75 · 2^31
        assert_eq!(quantize_multiplier(0.75), Some((3 << 29, 0)));
        // Just below 1: rounds up to 2^31 and renormalises.
        assert_eq!(quantize_multiplier(1.0 - 1e-12), Some((1 << 30, 1)));
        // Near 2^-31: 2^-31 = 0.5 · 2^-30.
        assert_eq!(quantize_multiplier(2f64.powi(-31)), Some((1 << 30, -30)));
        assert_eq!(quantize_multiplier(2f64.powi(-33)), Some((0, 0)));
        assert_eq!(quantize_multiplier(0.0), Some((0, 0)));
        assert_eq!(quantize_multiplier(-1.0), None);
        assert_eq!(quantize_multiplier(f64::NAN), None);
        assert_eq!(quantize_multiplier(1e-310).map(|m| m.0), Some(0));
    }

    #[test]
    fn multiply_by_quantized_multiplier_hand_checked() {
        let (m, s) = quantize_multiplier(0.5).unwrap();
        assert_eq!(multiply_by_quantized_multiplier(10, m, s), 5);
        // With shift 0 the only rounding is srdhm's: 5.5 → 6, −5.5 → −5.
        assert_eq!(multiply_by_quantized_multiplier(11, m, s), 6);
        assert_eq!(multiply_by_quantized_multiplier(-11, m, s), -5);
        let (m, s) = quantize_multiplier(0.25).unwrap();
        // Here srdhm is exact and the shift rounds the −1.5 tie away from zero.
        assert_eq!(multiply_by_quantized_multiplier(-6, m, s), -2);
        assert_eq!(multiply_by_quantized_multiplier(-5, m, s), -1); // −1.25 → −1
                                                                    // Multiplier near 1 (M0 = 2^31 − 1, shift 0): x · (1 − 2^-31) rounds back to x.
        assert_eq!(multiply_by_quantized_multiplier(1000, i32::MAX, 0), 1000);
        assert_eq!(multiply_by_quantized_multiplier(-1000, i32::MAX, 0), -1000);
        // Multiplier near 2^-31: only the largest accumulators survive.
        let (m, s) = quantize_multiplier(2f64.powi(-31)).unwrap();
        assert_eq!(multiply_by_quantized_multiplier(i32::MAX, m, s), 1);
        assert_eq!(multiply_by_quantized_multiplier(1 << 29, m, s), 0);
        assert_eq!(multiply_by_quantized_multiplier(-(1 << 30), m, s), -1); // −0.5 → −1
                                                                            // A multiplier above 1 shifts left, saturating.
        let (m, s) = quantize_multiplier(0.3).unwrap();
        assert_eq!(multiply_by_quantized_multiplier(-1, m, s), -1);
        let (m, s) = quantize_multiplier(3.0).unwrap();
        assert_eq!(multiply_by_quantized_multiplier(7, m, s), 21);
        assert_eq!(multiply_by_quantized_multiplier(1 << 30, m, s), i32::MAX);
        // Against exact real arithmetic: the reference rounds twice (srdhm, then the shift),
        // so it can land up to one unit from the exact product (−1 · 0.3 gives −1).
        for &real in &[0.0123f64, 0.3, 0.9999, 1.7e-5, 0.5 + 1e-9] {
            let (m, s) = quantize_multiplier(real).unwrap();
            for x in [-100_000i32, -12_345, -1, 0, 1, 777, 99_999] {
                let exact = x as f64 * real;
                let got = multiply_by_quantized_multiplier(x, m, s) as f64;
                assert!((got - exact).abs() <= 1.0, "{x}·{real}");
            }
        }
    }
}
