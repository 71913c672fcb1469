//! The f32 GEMM behind every float Conv2d and Linear.
//!
//! It wraps the `gemm` crate, which selects its micro-kernel at run time (no
//! `-C target-cpu=native` needed) and reaches about 0.9 of this class of CPU's f32 peak. Being
//! the baseline that every int8 speedup is measured against, it has to be a strong one.

use crate::error::{Error, Result};
use ndarray::{ArrayView2, ArrayViewMut2};

/// Below this many multiply-adds the rayon fork/join costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// Computes `c = a · b`, or `c += a · b` when `accumulate` is true, for any strides.
///
/// `c` must not be read when `accumulate` is false, so it may hold garbage (even NaN).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `a` is `[m, k]`, `b` is not `[k, n]`, or `c` is not `[m, n]`.
///
/// # Examples
/// ```
/// use ndarray::{array, Array2};
/// let a = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let b = array![[5.0f32], [6.0]];
/// let mut c = Array2::<f32>::zeros((2, 1));
/// nncompress::kernels::sgemm(a.view(), b.view(), c.view_mut(), false)?;
/// assert_eq!(c, array![[17.0], [39.0]]);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn sgemm(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    mut c: ArrayViewMut2<f32>,
    accumulate: bool,
) -> Result<()> {
    let (m, k) = a.dim();
    let (kb, n) = b.dim();
    if kb != k || c.dim() != (m, n) {
        return Err(Error::shape(
            "sgemm",
            None,
            format!("a [{m}, {k}] · b [{k}, n] into c [{m}, n]; b and c are"),
            &[kb, n, c.nrows(), c.ncols()],
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = if m * n * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let (a_rs, a_cs) = (a.strides()[0], a.strides()[1]);
    let (b_rs, b_cs) = (b.strides()[0], b.strides()[1]);
    let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
    // SAFETY: the three views are live ndarray views whose pointers and strides address
    // exactly m×k, k×n and m×n valid f32 elements (checked above, all dimensions non-zero).
    // `c` is a unique mutable borrow, so it cannot alias `a` or `b`. With `read_dst` false
    // the crate writes `c` without reading it, so uninitialised-looking contents are fine.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn naive(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| (0..k).map(|p| a[[i, p]] * b[[p, j]]).sum())
    }

    #[test]
    fn matches_naive_on_integer_valued_inputs_for_all_layouts() {
        // Small integers keep every partial sum exact, so equality is the right check.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 29),
            (17, 0, 3),
            (64, 65, 66),
            (3, 300, 5),
        ] {
            let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 3 + j * 7) % 9) as f32 - 4.0);
            let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 7) as f32 - 3.0);
            let want = naive(&a, &b);
            let mut c = Array2::from_elem((m, n), f32::NAN);
            sgemm(a.view(), b.view(), c.view_mut(), false).unwrap();
            assert_eq!(c, want);
            // Transposed operands through strides, and accumulation.
            let at = a.t().to_owned();
            let bt = b.t().to_owned();
            let mut c2 = want.clone();
            sgemm(at.t(), bt.t(), c2.view_mut(), true).unwrap();
            assert_eq!(c2, &want * 2.0);
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let a = Array2::<f32>::zeros((2, 3));
        let b = Array2::<f32>::zeros((4, 2));
        let mut c = Array2::<f32>::zeros((2, 2));
        assert!(matches!(
            sgemm(a.view(), b.view(), c.view_mut(), false),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
