//! The portable micro-kernel: safe loops over packed panels that LLVM vectorises for whatever
//! the target is. It is the fallback on every CPU.

use super::pack::{Micro, MAX_TILE};

/// 4 × 16 tiles over `k` pairs, both operands widened to i16 when packed.
///
/// The inner step `a0·b0 + a1·b1` on i16 pairs is the shape of `pmaddwd` (SSE2, so every
/// x86-64 has it) and of NEON's widening multiply-accumulate; LLVM vectorises it into those.
/// The pair sum is at most 2 · 255 · 128, so it cannot overflow.
pub(crate) struct Generic;

impl Micro for Generic {
    const MR: usize = 4;
    const NR: usize = 16;
    const KG: usize = 2;
    type A = i16;
    type B = i16;

    #[inline(always)]
    fn a_elem(v: u8) -> i16 {
        v as i16
    }

    #[inline(always)]
    fn b_elem(v: i8) -> i16 {
        v as i16
    }

    #[inline(always)]
    unsafe fn tile(kgroups: usize, a: &[i16], b: &[i16], acc: &mut [i32; MAX_TILE]) {
        const MR: usize = Generic::MR;
        const NR: usize = Generic::NR;
        let mut t = [[0i32; NR]; MR];
        for (ag, bg) in a
            .chunks_exact(MR * 2)
            .zip(b.chunks_exact(NR * 2))
            .take(kgroups)
        {
            for (tr, ap) in t.iter_mut().zip(ag.chunks_exact(2)) {
                let (a0, a1) = (ap[0] as i32, ap[1] as i32);
                for (tc, bp) in tr.iter_mut().zip(bg.chunks_exact(2)) {
                    *tc += a0 * bp[0] as i32 + a1 * bp[1] as i32;
                }
            }
        }
        for (r, tr) in t.iter().enumerate() {
            acc[r * NR..(r + 1) * NR].copy_from_slice(tr);
        }
    }
}
