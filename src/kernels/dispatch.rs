//! Which int8 kernel runs: detected once at run time, or forced by the caller.

use std::sync::OnceLock;

/// An int8 GEMM implementation.
///
/// [`KernelChoice::best`] picks the fastest one this CPU supports, once per process; tests and
/// benchmarks force others through [`crate::kernels::PackedWeights::with_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelChoice {
    /// Naive loops over unpacked weights: the oracle every other path is checked against.
    Reference,
    /// Portable tiled loops over packed panels (any CPU; LLVM vectorises them).
    Generic,
    /// x86-64 AVX2: u8 and i8 widened to i16, `vpmaddwd` into i32 (no i16 saturation).
    Avx2,
    /// x86-64 AVX-512 VNNI: `vpdpbusd`, u8 × i8 into i32, 64 multiply-adds per instruction.
    Avx512Vnni,
    /// x86-64 AMX-INT8 (Sapphire Rapids and later): `tdpbusd` multiplies 16 × 64 u8 by
    /// 64 × 16 i8 tiles, 16,384 multiply-adds per instruction; AVX-512 for the rest.
    Amx,
}

impl KernelChoice {
    /// All paths, slowest first.
    pub const ALL: [KernelChoice; 5] = [
        KernelChoice::Reference,
        KernelChoice::Generic,
        KernelChoice::Avx2,
        KernelChoice::Avx512Vnni,
        KernelChoice::Amx,
    ];

    /// A short name (`reference`, `generic`, `avx2`, `avx512vnni`, `amx`).
    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Reference => "reference",
            KernelChoice::Generic => "generic",
            KernelChoice::Avx2 => "avx2",
            KernelChoice::Avx512Vnni => "avx512vnni",
            KernelChoice::Amx => "amx",
        }
    }

    /// The path with this [`KernelChoice::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU can run the path (detected at run time, not at compile time).
    pub fn is_available(self) -> bool {
        match self {
            KernelChoice::Reference | KernelChoice::Generic => true,
            KernelChoice::Avx2 => has_avx2(),
            KernelChoice::Avx512Vnni => has_avx512vnni(),
            KernelChoice::Amx => has_amx(),
        }
    }

    /// The paths this CPU can run, slowest first.
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest available path, detected once per process.
    pub fn best() -> Self {
        static BEST: OnceLock<KernelChoice> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::available()
                .last()
                .copied()
                .unwrap_or(KernelChoice::Generic)
        })
    }
}

impl KernelChoice {
    /// The path [`PackedConv::new`](crate::kernels::PackedConv::new) uses: [`Self::best`],
    /// except that AMX CPUs run convolutions on the VNNI path, whose implicit im2row reads
    /// patches in place; AMX would need the patch matrix built first, which made LeNet-5's
    /// int8 convolutions about 2× slower (measured with `scripts/ort_bench.py`).
    pub fn best_for_conv() -> Self {
        match Self::best() {
            KernelChoice::Amx => KernelChoice::Avx512Vnni,
            k => k,
        }
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Proof that this CPU runs the AVX2 path. Only [`Avx2Cpu::detect`] makes one (the field is
/// private to this module), so holding a value *is* the capability check (rten's
/// `Kernel::new() -> Option<Self>`): the safe wrappers of the AVX2 entry points take one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Avx2Cpu(());

impl Avx2Cpu {
    /// A token if the CPU supports AVX2.
    pub(crate) fn detect() -> Option<Self> {
        has_avx2().then_some(Avx2Cpu(()))
    }
}

/// Proof that this CPU runs AVX-512F, AVX-512BW and AVX-512 VNNI (see [`Avx2Cpu`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VnniCpu(());

impl VnniCpu {
    /// A token if the CPU supports the VNNI path.
    pub(crate) fn detect() -> Option<Self> {
        has_avx512vnni().then_some(VnniCpu(()))
    }
}

/// Proof that this CPU runs the AMX path: AMX-TILE and AMX-INT8, the VNNI path's AVX-512
/// (its epilogues), and the kernel's permission to use the tile registers (see [`Avx2Cpu`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AmxCpu(());

impl AmxCpu {
    /// A token if the CPU and the operating system allow the AMX path.
    pub(crate) fn detect() -> Option<Self> {
        has_amx().then_some(AmxCpu(()))
    }

    /// The VNNI token an AMX CPU also holds.
    pub(crate) fn vnni(self) -> VnniCpu {
        VnniCpu(())
    }
}

#[cfg(target_arch = "x86_64")]
fn has_amx() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        // Linux keeps the tile data state disabled until a process asks for it; without the
        // permission the first tile instruction faults.
        has_avx512vnni()
            && super::x86_64::cpu_has_amx_int8()
            && super::x86_64::request_amx_permission()
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn has_amx() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
        // Every AVX-512 CPU has FMA; checked anyway, since the AVX-512 element-wise loops
        // are compiled with it.
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512vnni() -> bool {
    false
}
