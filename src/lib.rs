//! # nncompress
//!
//! Neural-network model compression in pure Rust: quantization, pruning, knowledge
//! distillation and neural architecture search, with the crate's own kernels.
//!
//! The model every pass works on is the crate's own [`model::Graph`], which the crate builds,
//! trains ([`train`]), runs and saves ([`io`]).
//!
//! ## Numerics
//! - Layout is NCHW; conv weights are `[out, in/groups, kh, kw]`, linear weights `[out, in]`
//!   (PyTorch's layouts, so PyTorch weights load unchanged).
//! - Float Conv2d and Linear run through a runtime-dispatched f32 GEMM
//!   ([`kernels::sgemm`]); no `-C target-cpu=native` is needed for the fast path.
//! - Int8: u8 activations with zero point `z_a` times i8 per-channel weights (zero point 0):
//!   `out[m, n] = epilogue(n, Σ_k (a[m, k] − z_a)·w[n, k])`; the requantizing epilogue is
//!   `clamp(z_out + MBQM(acc + bias[n], M0[n], shift[n]))` with gemmlowp / TFLite fixed-point
//!   semantics, where `M0[n]·2^shift[n]/2^31 = s_a·s_w[n]/s_out` ([`kernels::requant`]).
//! - Results are deterministic: the same seed gives the same model, bit for bit, whatever the
//!   thread count (parallel loops write disjoint outputs in a fixed order); integer kernels
//!   give identical results on every path.
//!
//! ## Instruction sets
//! Detected at run time, once per process ([`kernels::KernelChoice::best`]):
//!
//! | int8 path | needs | tile |
//! |---|---|---|
//! | `avx512vnni` | x86-64 AVX-512 F + BW + VNNI | 6×64, 12×32, 12×16 (`vpdpbusd`) |
//! | `avx2` | x86-64 AVX2 | 6×16 (`vpmaddwd` on i16-widened operands) |
//! | `generic` | any CPU | 4×16 portable loops |
//! | `reference` | any CPU | naive loops (the test oracle) |
//!
//! ## Cargo features
//! None yet: everything is always built; SIMD paths are selected at run time.
//!
//! ## Quick start
//! ```
//! use nncompress::model::zoo;
//! use nncompress::train::{Sgd, TrainConfig, Trainer, InMemoryDataset};
//! use ndarray::ArrayD;
//!
//! // Two classes told apart by the sign of the mean pixel.
//! let x = ArrayD::from_shape_fn(vec![64, 1, 8, 8], |d| if d[0] % 2 == 0 { 1.0 } else { -1.0 });
//! let y: Vec<usize> = (0..64).map(|i| i % 2).collect();
//! let data = InMemoryDataset::new(x, y, 10)?;
//! let mut net = zoo::digits_cnn(1)?;
//! let mut trainer = Trainer::new(TrainConfig::new(3, 16, 7), Sgd::new(0.05).with_momentum(0.9));
//! let report = trainer.fit(&mut net, &data, None)?;
//! assert!(report.epochs.last().unwrap().train_accuracy > 0.9);
//! # Ok::<(), nncompress::Error>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![doc(test(attr(deny(warnings))))]

pub mod distiller;
pub mod error;
pub mod io;
pub mod kernels;
pub mod limits;
pub mod model;
pub mod nas;
pub mod onnx;
pub mod pruner;
pub mod quantizer;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use model::{Graph, GraphBuilder};

/// The most used items in one import.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::model::{zoo, Conv2dConfig, Graph, GraphBuilder, Mode, Op, Pool2d};
    pub use crate::tensor::Tensor;
    pub use crate::train::{
        evaluate, Adam, Dataset, InMemoryDataset, Optimizer, Sgd, TrainConfig, Trainer,
    };
}
