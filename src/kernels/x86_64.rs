//! x86-64 micro-kernels, selected at run time.
//!
//! Each path has one `#[target_feature]` entry point that monomorphises the shared driver
//! (`gemm::drive`) with its micro-kernel, so the whole tile loop, the micro-kernel and the
//! epilogue are compiled for exactly the instructions the path uses (matrixmultiply's
//! pattern). The target features named here are exactly those the intrinsics need.

use super::conv::{depthwise_row, DepthwiseRow};
use super::dispatch::{Avx2Cpu, VnniCpu};
use super::epilogue::Epilogue;
use super::gemm::{drive, Task};
use super::pack::{Micro, MAX_MR, MAX_TILE};
use std::arch::x86_64::*;

/// AVX2, 6 × 16 tiles over `k` pairs.
///
/// `vpmaddubsw` (u8 × i8 → i16 pairs) would saturate: 255·127 + 255·127 > 2^15 − 1. Both
/// operands are therefore widened to i16 when packed, and `vpmaddwd` (i16 × i16 → i32 pair
/// sums, at most 2·255·128 = 65,280) cannot overflow.
pub(crate) struct Avx2;

impl Micro for Avx2 {
    const MR: usize = 6;
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
        // A violated length would be an out-of-bounds read: checked in release too.
        assert!(a.len() >= kgroups * Self::MR * 2 && b.len() >= kgroups * Self::NR * 2);
        let mut ap = a.as_ptr();
        let mut bp = b.as_ptr();
        // SAFETY: the caller guarantees AVX2 and the operand lengths; every load below stays
        // within `kgroups` groups of `MR·2` (a) and `NR·2` (b) elements, and the stores write
        // `MR·NR ≤ MAX_TILE` i32 into `acc`.
        unsafe {
            let mut c = [[_mm256_setzero_si256(); 2]; 6];
            for _ in 0..kgroups {
                let b0 = _mm256_loadu_si256(bp as *const __m256i);
                let b1 = _mm256_loadu_si256(bp.add(16) as *const __m256i);
                for (r, cr) in c.iter_mut().enumerate() {
                    let pair = (ap.add(2 * r) as *const i32).read_unaligned();
                    let av = _mm256_set1_epi32(pair);
                    cr[0] = _mm256_add_epi32(cr[0], _mm256_madd_epi16(av, b0));
                    cr[1] = _mm256_add_epi32(cr[1], _mm256_madd_epi16(av, b1));
                }
                ap = ap.add(Self::MR * 2);
                bp = bp.add(Self::NR * 2);
            }
            let out = acc.as_mut_ptr();
            for (r, cr) in c.iter().enumerate() {
                _mm256_storeu_si256(out.add(r * 16) as *mut __m256i, cr[0]);
                _mm256_storeu_si256(out.add(r * 16 + 8) as *mut __m256i, cr[1]);
            }
        }
    }
}

/// AVX-512 VNNI tiles of `MR` rows × `16·NV` columns over `k` quads: one `vpdpbusd` does
/// 16 lanes × 4 u8·i8 products into i32. Three shapes share the code: 6 × 64 for wide
/// layers, 12 × 32 and 12 × 16 for layers with few output channels (so a 20-channel
/// convolution does not compute 64 columns).
pub(crate) struct Vnni<const MR: usize, const NV: usize>;

/// The VNNI tile shapes, by the widest output they are chosen for.
pub(crate) type VnniWide = Vnni<6, 4>;
pub(crate) type VnniMid = Vnni<12, 2>;
pub(crate) type VnniNarrow = Vnni<12, 1>;

impl<const MR: usize, const NV: usize> Micro for Vnni<MR, NV> {
    const MR: usize = MR;
    const NR: usize = 16 * NV;
    const KG: usize = 4;
    type A = u8;
    type B = i8;

    #[inline(always)]
    fn a_elem(v: u8) -> u8 {
        v
    }

    #[inline(always)]
    fn widen(src: &[u8], dst: &mut [u8]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn b_elem(v: i8) -> i8 {
        v
    }

    const DIRECT_A: bool = true;

    /// Reads each row's 4-byte groups in place: no packing pass over the activations.
    #[inline(always)]
    unsafe fn tile_rows(
        kgroups: usize,
        rows: &[u8],
        lda: usize,
        b: &[i8],
        acc: &mut [i32; MAX_TILE],
    ) {
        assert!(rows.len() >= (MR - 1) * lda + kgroups * 4);
        // SAFETY: forwarded; each row pointer addresses `kgroups·4` readable bytes.
        unsafe {
            let base = rows.as_ptr();
            let row: [*const u8; MR] = std::array::from_fn(|r| base.add(r * lda));
            vnni_segments::<MR, NV>(row, 1, kgroups, 0, b, acc)
        }
    }

    /// Reads implicit-im2row segments in place: no im2row buffer at all.
    #[inline(always)]
    unsafe fn tile_windows(
        seg_groups: usize,
        segs: usize,
        data: &[u8],
        bases: &[usize; MAX_MR],
        seg_stride: usize,
        b: &[i8],
        acc: &mut [i32; MAX_TILE],
    ) {
        assert!(bases[..MR]
            .iter()
            .all(|&base| base + (segs.max(1) - 1) * seg_stride + seg_groups * 4 <= data.len()));
        // SAFETY: forwarded; every segment of every row lies inside `data`.
        unsafe {
            let p = data.as_ptr();
            let row: [*const u8; MR] = std::array::from_fn(|r| p.add(bases[r]));
            vnni_segments::<MR, NV>(row, segs, seg_groups, seg_stride, b, acc)
        }
    }

    #[inline(always)]
    unsafe fn tile(kgroups: usize, a: &[u8], b: &[i8], acc: &mut [i32; MAX_TILE]) {
        assert!(a.len() >= kgroups * MR * 4);
        // SAFETY: a packed tile is `MR` rows of 4-byte groups interleaved: row `r` of group
        // `g` at `4·(g·MR + r)`, i.e. one segment per group with stride `MR·4`.
        unsafe {
            let p = a.as_ptr();
            let row: [*const u8; MR] = std::array::from_fn(|r| p.add(4 * r));
            vnni_segments::<MR, NV>(row, kgroups, 1, MR * 4, b, acc)
        }
    }
}

/// The VNNI tile over `MR` rows, each `segs` segments of `seg_groups` 4-byte groups at
/// `row[r] + s·seg_stride`; weights advance through `b` one `NR·4`-byte group at a time.
///
/// # Safety
/// The CPU supports AVX-512F/BW/VNNI; every segment is readable; `b` holds
/// `segs·seg_groups` groups.
#[inline(always)]
unsafe fn vnni_segments<const MR: usize, const NV: usize>(
    row: [*const u8; MR],
    segs: usize,
    seg_groups: usize,
    seg_stride: usize,
    b: &[i8],
    acc: &mut [i32; MAX_TILE],
) {
    assert!(b.len() >= segs * seg_groups * NV * 64);
    // SAFETY: the caller guarantees the CPU features and that every address read is inside
    // the rows' segments or `b`.
    unsafe {
        let mut bp = b.as_ptr();
        let mut c = [[_mm512_setzero_si512(); NV]; MR];
        for s in 0..segs {
            let off = s * seg_stride;
            for g in 0..seg_groups {
                let mut bv = [_mm512_setzero_si512(); NV];
                for (v, bvv) in bv.iter_mut().enumerate() {
                    *bvv = _mm512_loadu_si512(bp.add(64 * v) as *const __m512i);
                }
                for (cr, rp) in c.iter_mut().zip(&row) {
                    let quad = (rp.add(off + 4 * g) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(quad);
                    for (cv, &bvv) in cr.iter_mut().zip(&bv) {
                        *cv = _mm512_dpbusd_epi32(*cv, av, bvv);
                    }
                }
                bp = bp.add(NV * 64);
            }
        }
        const { assert!(MR * 16 * NV <= MAX_TILE && MR <= MAX_MR) };
        let out = acc.as_mut_ptr();
        for (r, cr) in c.iter().enumerate() {
            for (v, cv) in cr.iter().enumerate() {
                // r·NR + 16·v + 16 ≤ MR·NR ≤ MAX_TILE (asserted above).
                _mm512_storeu_si512(out.add(r * 16 * NV + 16 * v) as *mut __m512i, *cv);
            }
        }
    }
}

/// The AVX2 path, for a caller holding the token that proves the CPU check.
pub(crate) fn run_avx2<E: Epilogue>(_cpu: Avx2Cpu, task: Task<'_, '_, E>, b: &[i16]) {
    // SAFETY: an `Avx2Cpu` exists only where run-time detection found AVX2.
    unsafe { drive_avx2(task, b) }
}

/// The AVX-512 VNNI path, for a caller holding the token that proves the CPU check.
pub(crate) fn run_vnni<E: Epilogue>(_cpu: VnniCpu, task: Task<'_, '_, E>, b: &[i8], nv: usize) {
    // SAFETY: a `VnniCpu` exists only where run-time detection found AVX-512F, AVX-512BW
    // and AVX-512 VNNI.
    unsafe { drive_vnni(task, b, nv) }
}

/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
unsafe fn drive_avx2<E: Epilogue>(task: Task<'_, '_, E>, b: &[i16]) {
    // SAFETY: forwarded: the CPU supports AVX2, all `Avx2` uses.
    unsafe { drive::<Avx2, E>(task, b) }
}

/// # Safety
/// The CPU supports AVX-512F, AVX-512BW and AVX-512 VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn drive_vnni<E: Epilogue>(task: Task<'_, '_, E>, b: &[i8], nv: usize) {
    // SAFETY: forwarded: the CPU supports every instruction the VNNI tiles use.
    unsafe {
        match nv {
            1 => drive::<VnniNarrow, E>(task, b),
            2 => drive::<VnniMid, E>(task, b),
            _ => drive::<VnniWide, E>(task, b),
        }
    }
}

/// The VNNI tile width (in 16-lane vectors) for `n` output channels.
pub(crate) fn vnni_vectors(n: usize) -> usize {
    match n {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    }
}

/// `(MR, NR)` of the VNNI tile with `nv` vectors.
pub(crate) fn vnni_tile(nv: usize) -> (usize, usize) {
    match nv {
        1 => (VnniNarrow::MR, VnniNarrow::NR),
        2 => (VnniMid::MR, VnniMid::NR),
        _ => (VnniWide::MR, VnniWide::NR),
    }
}

/// The SIMD compilation of the depthwise row kernel to run, with the token of its CPU check.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SimdCpu {
    Avx2(Avx2Cpu),
    /// The VNNI token implies AVX-512F and AVX-512BW, all this compilation uses.
    Avx512(VnniCpu),
}

/// The depthwise row kernel (`conv::depthwise_row`) compiled for the token's instructions.
pub(crate) fn depthwise_row_simd<E: Epilogue>(
    cpu: SimdCpu,
    row: &DepthwiseRow<'_, E>,
    y: usize,
    out: &mut [E::Out],
) {
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<E: Epilogue>(row: &DepthwiseRow<'_, E>, y: usize, out: &mut [E::Out]) {
        depthwise_row(row, y, out)
    }
    /// # Safety
    /// The CPU supports AVX-512F and AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn avx512<E: Epilogue>(row: &DepthwiseRow<'_, E>, y: usize, out: &mut [E::Out]) {
        depthwise_row(row, y, out)
    }
    match cpu {
        // SAFETY: an `Avx2Cpu` exists only where run-time detection found AVX2.
        SimdCpu::Avx2(_) => unsafe { avx2(row, y, out) },
        // SAFETY: a `VnniCpu` exists only where run-time detection found AVX-512F, AVX-512BW
        // and AVX-512 VNNI.
        SimdCpu::Avx512(_) => unsafe { avx512(row, y, out) },
    }
}
