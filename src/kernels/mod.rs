//! Compute kernels: the only module with `unsafe` code.
//!
//! Every function exported here is safe: it checks shapes and returns
//! [`Error`](crate::Error) on a mismatch before any unchecked code runs.
//!
//! ## Float
//! [`sgemm`]: f32 `C = A·B` / `C += A·B` over strided views, through the runtime-dispatched
//! `gemm` crate. Every float Conv2d and Linear uses it; it is the baseline int8 is measured
//! against.
//!
//! ## Int8
//! `out[m, n] = epilogue(n, Σ_k (a[m, k] − z_a) · w[n, k])` with u8 activations `a` (zero
//! point `z_a`) and i8 weights `w` (per-channel scales, zero point 0), weights packed once
//! into [`PackedWeights`]. Epilogues: i32 out ([`gemm_u8i8_i32`]), requantized u8 out with a
//! fused ReLU / ReLU6 clamp ([`gemm_u8i8_u8`], [`Requantize`]), dequantized f32 out
//! ([`gemm_u8i8_f32`], [`Dequantize`]). Convolutions: [`PackedConv`] and
//! `conv2d_u8i8_{u8,i32,f32}` (im2row + GEMM; a direct kernel for depthwise).
//!
//! ## ONNX's integer conventions
//! [`matmul_integer`], [`qlinear_matmul`], [`conv_integer`] and [`qlinear_conv`] take u8 or
//! i8 activations ([`Int8View`]), weights packed from u8 or i8 with zero points per tensor
//! or per output channel ([`PackedWeights::from_int8`], [`PackedConv::from_int8`]), u8 or
//! i8 outputs ([`Requantize::from_scales`]) and asymmetric pads ([`ConvSpec::with_pads`]),
//! on the same micro-kernels through exact identities (see `integer.rs`).
//!
//! | path ([`KernelChoice`]) | CPUs | micro-kernel |
//! |---|---|---|
//! | `reference` | all | naive loops (the oracle; see also [`mod@reference`]) |
//! | `generic` | all | portable 4 × 16 tiles that LLVM vectorises |
//! | `avx2` | x86-64 with AVX2 | 6 × 16, u8/i8 widened to i16, `vpmaddwd` |
//! | `avx512vnni` | x86-64 with AVX-512 F/BW/VNNI | 8 × 32, `vpdpbusd` |
//!
//! The path is detected at run time ([`KernelChoice::best`]), so a default `cargo build`
//! gets the fast path on a CPU that has it; `PackedWeights::with_kernel` forces one.
//! Results are exact integers: identical on every path and for any thread count.

mod conv;
mod dispatch;
mod epilogue;
mod gemm;
mod generic;
mod integer;
pub mod math;
mod pack;
mod packed_f32;
pub(crate) mod parallel;
pub mod reference;
pub mod requant;
mod sgemm;
mod simd;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub(crate) use conv::transpose_block;
pub use conv::{
    conv2d_nhwc_u8i8_f32, conv2d_nhwc_u8i8_i32, conv2d_nhwc_u8i8_u8, conv2d_u8i8_f32,
    conv2d_u8i8_i32, conv2d_u8i8_u8, ConvSpec, PackedConv,
};
pub use dispatch::KernelChoice;
pub use epilogue::{Dequantize, FusedActivation, MultiplierRule, QuantizedOutput, Requantize};
pub use gemm::{gemm_u8i8_f32, gemm_u8i8_f32_per_row, gemm_u8i8_i32, gemm_u8i8_u8};
pub use integer::{
    conv_integer, matmul_integer, qlinear_conv, qlinear_matmul, Int8Array4, Int8Matrix,
    Int8MatrixMut, Int8Tensor4, Int8View,
};
pub use pack::{PackedWeights, MAX_K};
pub use packed_f32::PackedLinear;
pub use sgemm::sgemm;
pub(crate) use simd::{min_max, quantize_u8};
