//! x86-64 micro-kernels, selected at run time.
//!
//! Each path has one `#[target_feature]` entry point that monomorphises the shared driver
//! (`gemm::drive`) with its micro-kernel, so the whole tile loop, the micro-kernel and the
//! epilogue are compiled for exactly the instructions the path uses (matrixmultiply's
//! pattern). The target features named here are exactly those the intrinsics need.

use super::conv::{depthwise_row, DepthwiseRow};
use super::dispatch::{AmxCpu, Avx2Cpu, VnniCpu};
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

/// The operand items of the kernels that multiply raw u8 by raw i8 and read activation
/// rows in place (VNNI and AMX).
macro_rules! raw_u8_i8_operands {
    () => {
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
    };
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
    raw_u8_i8_operands!();

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

/// One `k` block of a packed f32 Linear tile: `c[r, j] = start + Σ_kk a[r·lda + kk] ·
/// panel[kk·16V + j]` over the step's `kc` values for `R` rows and the first `cols ≤ 16V`
/// columns of a panel `16V` wide, where `start` is `bias[j]`, or `c[r, j]` itself when the
/// step accumulates: `V·R` zmm accumulators, `V` panel loads and `R` broadcasts per `k`.
///
/// # Safety
/// The CPU has AVX-512F, and `c` addresses `R` rows (stride `ldc`) of `cols` readable and
/// writable f32 that nothing else accesses during the call. The step's slice lengths are
/// checked here.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn f32_tile<const R: usize, const V: usize>(
    step: &super::packed_f32::Step<'_>,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    let (a, lda, kc, panel) = (step.a, step.lda, step.kc, step.panel);
    let width = 16 * V;
    assert!(R >= 1 && (1..=4).contains(&V));
    assert!((kc == 0 || a.len() >= (R - 1) * lda + kc) && panel.len() >= kc * width);
    assert!(step.bias.len() >= width && (1..=width).contains(&cols) && (R == 1 || ldc >= cols));
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        (((1u32 << cols.saturating_sub(16 * v).min(16)) - 1) & 0xFFFF) as __mmask16
    });
    // SAFETY: AVX-512F is enabled for this function (caller's contract). Reads: row `r` of
    // `a` is `a[r·lda .. r·lda + kc]` and step `kk` of the panel is `panel[kk·width ..
    // kk·width + width]`, both inside the slices (asserted), as is `bias[..width]`. `c` is
    // touched only by masked loads and stores of columns `0..cols` of rows `0..R` of the
    // caller's tile.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let bp = step.bias.as_ptr();
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, lane) in row.iter_mut().enumerate() {
                *lane = if step.accumulate {
                    _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + 16 * v))
                } else {
                    _mm512_loadu_ps(bp.add(16 * v))
                };
            }
        }
        let ap = a.as_ptr();
        let mut wp = panel.as_ptr();
        for kk in 0..kc {
            let w: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(wp.add(16 * v)));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ap.add(r * lda + kk));
                for (lane, &wv) in row.iter_mut().zip(&w) {
                    *lane = _mm512_fmadd_ps(x, wv, *lane);
                }
            }
            wp = wp.add(width);
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &lane) in row.iter().enumerate() {
                if masks[v] != 0 {
                    _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], lane);
                }
            }
        }
    }
}

/// CPUID.(EAX=7, ECX=0):EDX bit 24 (AMX-TILE) and bit 25 (AMX-INT8).
pub(crate) fn cpu_has_amx_int8() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is present on every x86-64 CPU, and leaf 7 on every CPU with AVX-512
    // (the caller checks that first); reading it has no side effects.
    let edx = unsafe { __cpuid_count(7, 0) }.edx;
    edx >> 24 & 1 == 1 && edx >> 25 & 1 == 1
}

/// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`), once per process; other systems answer no.
pub(crate) fn request_amx_permission() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain Linux system call with integer arguments; it only changes which
        // extended states this process may use. `syscall` clobbers rcx and r11.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The AMX tile configuration: palette 1; tmm0 and tmm1 A tiles (16 rows × 64 u8), tmm2
/// and tmm3 B tiles (16 `k` quads × 16 columns × 4 i8), tmm4–tmm7 the i32 accumulators
/// (16 × 16); every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static AMX_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

/// AMX-INT8 tiles of 32 rows × 32 columns over `k` in blocks of 64: two A tiles times two
/// B tiles per block, four `tdpbusd` (16 × 16 outputs of 64 u8·i8 products each). B is the
/// VNNI panel layout with 32 columns, exactly two B tiles side by side (row stride 128
/// bytes, `k` zero-padded to whole blocks); A rows are read in place with stride `lda`.
///
/// Tiles with few valid rows (the end of a batch, or batch 1) run on the VNNI kernels of
/// the same 32-column panel layout instead: a 16-row AMX tile costs the same for 1 row as
/// for 16, and `vpdpbusd` is cheaper below about a dozen rows.
///
/// The tile configuration is loaded once per task by [`run_amx`], not per tile.
pub(crate) struct Amx;

impl Amx {
    /// `acc` (32 × 32, row-major) = A · B for `row_tiles` (1 or 2) tiles of 16 rows.
    ///
    /// The weight panel holds `kgroups` rounded up to 16 groups, zero past `kgroups`, so a
    /// last partial block may read A bytes past each row's `k` (the next row's, or the
    /// caller's padding): they meet zero weights and add nothing, exactly. Only where those
    /// bytes would lie past the end of `a` is the block copied into a scratch tile.
    ///
    /// # Safety
    /// The CPU supports AMX-TILE and AMX-INT8, the process holds the tile permission and
    /// [`AMX_CONFIG`] is loaded on this thread; `a[..a_len]` is readable and holds
    /// `16·row_tiles` rows of `kgroups·4` bytes at stride `lda`; `b` holds
    /// `kgroups.next_multiple_of(16)` groups of 128 bytes.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles(
        a: *const u8,
        a_len: usize,
        lda: usize,
        kgroups: usize,
        b: *const i8,
        acc: &mut [i32; MAX_TILE],
        row_tiles: usize,
    ) {
        use std::arch::asm;
        let blocks = kgroups.div_ceil(16);
        let rows = 16 * row_tiles;
        // SAFETY: the caller's contract. Block `blk` reads A bytes `blk·64 .. blk·64 + 64`
        // of each row, inside `a[..a_len]` (checked per block; otherwise from the scratch
        // copy of the bytes that exist) and B groups `blk·16 .. blk·16 + 16`, inside the
        // padded panel. The stores write 16 or 32 rows of 32 i32 (`MAX_TILE` = 1024) at a
        // 128-byte stride.
        unsafe {
            asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            );
            let block = |ap: *const u8, lda: usize, bp: *const i8| {
                if row_tiles == 2 {
                    asm!(
                        "tileloadd tmm2, [{b} + {ldb}*1]",
                        "tileloadd tmm3, [{b2} + {ldb}*1]",
                        "tileloadd tmm0, [{a} + {lda}*1]",
                        "tdpbusd tmm4, tmm0, tmm2",
                        "tdpbusd tmm5, tmm0, tmm3",
                        "tileloadd tmm1, [{a1} + {lda}*1]",
                        "tdpbusd tmm6, tmm1, tmm2",
                        "tdpbusd tmm7, tmm1, tmm3",
                        a = in(reg) ap,
                        a1 = in(reg) ap.add(16 * lda),
                        lda = in(reg) lda,
                        b = in(reg) bp,
                        b2 = in(reg) bp.add(64),
                        ldb = in(reg) 128usize,
                        options(nostack, readonly),
                    );
                } else {
                    asm!(
                        "tileloadd tmm2, [{b} + {ldb}*1]",
                        "tileloadd tmm3, [{b2} + {ldb}*1]",
                        "tileloadd tmm0, [{a} + {lda}*1]",
                        "tdpbusd tmm4, tmm0, tmm2",
                        "tdpbusd tmm5, tmm0, tmm3",
                        a = in(reg) ap,
                        lda = in(reg) lda,
                        b = in(reg) bp,
                        b2 = in(reg) bp.add(64),
                        ldb = in(reg) 128usize,
                        options(nostack, readonly),
                    );
                }
            };
            for blk in 0..blocks {
                let bp = b.add(blk * 16 * 128);
                if (rows - 1) * lda + blk * 64 + 64 <= a_len {
                    block(a.add(blk * 64), lda, bp);
                } else {
                    #[repr(C, align(64))]
                    struct Scratch([u8; 32 * 64]);
                    let mut sa = Scratch([0u8; 32 * 64]);
                    let have = kgroups * 4 - blk * 64;
                    for r in 0..rows {
                        std::ptr::copy_nonoverlapping(
                            a.add(r * lda + blk * 64),
                            sa.0.as_mut_ptr().add(r * 64),
                            have.min(64),
                        );
                    }
                    block(sa.0.as_ptr(), 64, bp);
                }
            }
            let c = acc.as_mut_ptr();
            asm!(
                "tilestored [{c} + {ldc}*1], tmm4",
                "tilestored [{c2} + {ldc}*1], tmm5",
                c = in(reg) c,
                c2 = in(reg) c.add(16),
                ldc = in(reg) 128usize,
                options(nostack),
            );
            if row_tiles == 2 {
                asm!(
                    "tilestored [{c} + {ldc}*1], tmm6",
                    "tilestored [{c2} + {ldc}*1], tmm7",
                    c = in(reg) c.add(16 * 32),
                    c2 = in(reg) c.add(16 * 32 + 16),
                    ldc = in(reg) 128usize,
                    options(nostack),
                );
            }
        }
    }
}

impl Micro for Amx {
    const MR: usize = 32;
    const NR: usize = 32;
    const KG: usize = 4;
    raw_u8_i8_operands!();
    const B_GROUP_ALIGN: usize = 16;

    #[inline(always)]
    unsafe fn tile_rows(
        kgroups: usize,
        rows: &[u8],
        lda: usize,
        b: &[i8],
        acc: &mut [i32; MAX_TILE],
    ) {
        // SAFETY: forwarded.
        unsafe { Self::tile_rows_valid(32, kgroups, rows, lda, b, acc) }
    }

    #[inline(always)]
    unsafe fn tile_rows_valid(
        valid: usize,
        kgroups: usize,
        rows: &[u8],
        lda: usize,
        b: &[i8],
        acc: &mut [i32; MAX_TILE],
    ) {
        assert!(rows.len() >= 31 * lda + kgroups * 4 && lda >= kgroups * 4);
        assert!(b.len() >= kgroups.next_multiple_of(16) * 128);
        let (a, a_len) = (rows.as_ptr(), rows.len());
        // SAFETY: forwarded CPU, permission and configuration (the VNNI kernels need only
        // AVX-512F/BW/VNNI, which an AMX CPU token implies); the lengths are checked above,
        // and every VNNI tile reads at most 12 of the 32 rows. Both write rows of 32 i32.
        unsafe {
            match valid {
                0 => {}
                1 => Vnni::<1, 2>::tile_rows(kgroups, rows, lda, b, acc),
                2..=4 => Vnni::<4, 2>::tile_rows(kgroups, rows, lda, b, acc),
                5..=12 => Vnni::<12, 2>::tile_rows(kgroups, rows, lda, b, acc),
                13..=16 => Self::tiles(a, a_len, lda, kgroups, b.as_ptr(), acc, 1),
                _ => Self::tiles(a, a_len, lda, kgroups, b.as_ptr(), acc, 2),
            }
        }
    }

    /// Direct kernels are never handed packed tiles; this unpacks one into rows anyway so
    /// the contract holds for any caller.
    #[inline(always)]
    unsafe fn tile(kgroups: usize, a: &[u8], b: &[i8], acc: &mut [i32; MAX_TILE]) {
        assert!(a.len() >= kgroups * 32 * 4);
        let lda = kgroups * 4;
        let mut rows = vec![0u8; 32 * lda];
        for g in 0..kgroups {
            for r in 0..32 {
                rows[r * lda + 4 * g..r * lda + 4 * g + 4]
                    .copy_from_slice(&a[(g * 32 + r) * 4..(g * 32 + r) * 4 + 4]);
            }
        }
        // SAFETY: forwarded; `rows` holds 32 rows of `kgroups·4` bytes.
        unsafe { Self::tile_rows(kgroups, &rows, lda, b, acc) }
    }
}

/// The AMX path, for a caller holding the token that proves the CPU and permission check.
pub(crate) fn run_amx<E: Epilogue>(_cpu: AmxCpu, task: Task<'_, '_, E>, b: &[i8]) {
    // SAFETY: an `AmxCpu` exists only where run-time detection found AMX-TILE, AMX-INT8 and
    // the VNNI path's AVX-512, and Linux granted the tile permission. The configuration is
    // loaded on this thread before the tiles run and released after (tile state is per
    // thread; the system saves it across preemption).
    unsafe {
        std::arch::asm!(
            "ldtilecfg [{cfg}]",
            cfg = in(reg) AMX_CONFIG.0.as_ptr(),
            options(nostack, readonly)
        );
        drive_amx(task, b);
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
}

/// # Safety
/// As [`Amx::tiles`]: AMX-TILE/INT8 with permission and the configuration loaded, and
/// AVX-512F/BW/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn drive_amx<E: Epilogue>(task: Task<'_, '_, E>, b: &[i8]) {
    // SAFETY: forwarded.
    unsafe { drive::<Amx, E>(task, b) }
}

/// [`QuantGrid::quantize_u8_into`] compiled with AVX-512F/BW: 16 lanes instead of the
/// baseline target's four. A named function rather than a closure trampoline, so that the
/// `#[inline(always)]` loop is certainly inlined into the AVX-512 body (a closure call was
/// left out of line once the loop grew, and ran at SSE width).
pub(crate) fn quantize_u8_avx512(
    _cpu: VnniCpu,
    grid: &crate::tensor::QuantGrid,
    xs: &[f32],
    scale: f32,
    zero: i32,
    out: &mut [u8],
) -> bool {
    /// # Safety
    /// The CPU supports AVX-512F, AVX-512BW and FMA.
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    unsafe fn wide(
        grid: &crate::tensor::QuantGrid,
        xs: &[f32],
        scale: f32,
        zero: i32,
        out: &mut [u8],
    ) -> bool {
        grid.quantize_u8_into::<true>(xs, scale, zero, out)
    }
    // SAFETY: a `VnniCpu` exists only where run-time detection found AVX-512F, AVX-512BW,
    // AVX-512 VNNI and FMA.
    unsafe { wide(grid, xs, scale, zero, out) }
}

/// [`crate::tensor::min_max_finite`] compiled with AVX-512F (16 lanes per comparison).
pub(crate) fn min_max_avx512(_cpu: VnniCpu, xs: &[f32]) -> (f32, f32, bool) {
    /// # Safety
    /// The CPU supports AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn wide(xs: &[f32]) -> (f32, f32, bool) {
        crate::tensor::min_max_finite(xs)
    }
    // SAFETY: a `VnniCpu` exists only where run-time detection found AVX-512F.
    unsafe { wide(xs) }
}
