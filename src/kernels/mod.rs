//! Compute kernels: the only module with `unsafe` code.
//!
//! Every function exported here is safe: it checks shapes and returns
//! [`Error`](crate::Error) on a mismatch before any unchecked code runs.
//!
//! | kernel | what | implementation |
//! |---|---|---|
//! | [`sgemm`] | f32 `C = A·B` / `C += A·B` over strided views | the `gemm` crate, runtime-dispatched (AVX2/FMA, AVX-512, NEON, scalar), multithreaded on rayon |

mod sgemm;

pub use sgemm::sgemm;
