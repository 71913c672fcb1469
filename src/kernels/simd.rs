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
        return super::x86_64::with_avx512(cpu, || grid.quantize_u8_into(xs, scale, zero, out));
    }
    grid.quantize_u8_into(xs, scale, zero, out)
}
