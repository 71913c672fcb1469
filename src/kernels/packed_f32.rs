//! Float Linear layers on weights packed once: `y = x · Wᵀ + b` with AVX-512F.
//!
//! [`sgemm`](super::sgemm) (the `gemm` crate) repacks the transposed weight on every call:
//! for LeNet-300-100 at batch 64 that copy cost a third of the forward pass. Inference
//! packs each weight once, as ONNX Runtime's MLAS does at session creation, into panels of
//! [`PANEL`] output columns, `k`-major (the last panel only as wide as its columns rounded
//! up to 16-lane vectors, zero-padded past `n`); the bias is the accumulators' initial
//! value. The micro-kernel (`x86_64::f32_tile`) keeps `R ≤ 6` rows × 64 columns in 24
//! registers (fewer vectors on a narrow last panel) and broadcasts the activations from
//! their rows in place.
//!
//! Every output element is `bias + Σ_k x[k]·w[k]` accumulated by fused multiply-adds in
//! ascending `k`, so results do not depend on the thread count. The path exists where the
//! CPU has AVX-512F ([`PackedLinear::is_supported`]); elsewhere callers keep `sgemm`.

use crate::error::{Error, Result};
use ndarray::{Array2, ArrayView1, ArrayView2};

/// Output columns per packed panel (four 16-lane vectors).
pub(crate) const PANEL: usize = 64;
/// Rows per micro-tile.
pub(crate) const TILE_ROWS: usize = 6;
/// Below this many multiply-adds (~20 µs on one core) one call runs on the calling thread;
/// above it helpers are offered tasks (`parallel::for_each`, which never waits for one).
const PARALLEL_MIN_MACS: usize = 1 << 21;
/// Weights of at least this many values (512 KB) are split across threads even for a few
/// rows: a small batch is bound by streaming the weight from L2, and two cores stream
/// twice as fast (LeNet-300-100's first layer at batch 1 is ~15 µs of it on one core).
const PARALLEL_MIN_WEIGHTS: usize = 1 << 17;
/// `k` values per block (the panel slice of a block is 32 KB, inside L1).
const K_BLOCK: usize = 128;

/// A Linear layer's weight `[n, k]` and bias, packed for [`PackedLinear::forward`].
#[derive(Clone, Debug)]
pub struct PackedLinear {
    n: usize,
    k: usize,
    /// Panel `p` (width [`panel_width`], `PANEL` but for the last), step `kk`, column `j`
    /// holds `w[p·PANEL + j, kk]` at `p·PANEL·k + kk·width + j`.
    panels: Vec<f32>,
    /// The bias, zero past `n` up to the last panel's width.
    bias: Vec<f32>,
}

impl PackedLinear {
    /// Whether this CPU runs the packed path (AVX-512F, detected at run time).
    pub fn is_supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Packs `weight` (`[out_features, in_features]`, PyTorch's Linear layout) and `bias`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `bias` does not have `out_features` entries,
    /// [`Error::Unsupported`] when the CPU lacks AVX-512F ([`PackedLinear::is_supported`]).
    pub fn new(weight: ArrayView2<f32>, bias: Option<ArrayView1<f32>>) -> Result<Self> {
        if !Self::is_supported() {
            return Err(Error::Unsupported(
                "packed f32 Linear needs AVX-512F; use kernels::sgemm".into(),
            ));
        }
        let (n, k) = weight.dim();
        if let Some(b) = &bias {
            if b.len() != n {
                return Err(Error::shape(
                    "packed_linear",
                    None,
                    format!("bias [{n}]"),
                    &[b.len()],
                ));
            }
        }
        let count = n.div_ceil(PANEL);
        let padded_n = match count {
            0 => 0,
            _ => (count - 1) * PANEL + panel_width(n, count - 1),
        };
        let mut panels = vec![0.0f32; padded_n * k];
        for p in 0..count {
            let width = panel_width(n, p);
            let panel = &mut panels[p * PANEL * k..(p * PANEL + width) * k];
            for j in 0..PANEL.min(n - p * PANEL) {
                for (kk, &v) in weight.row(p * PANEL + j).iter().enumerate() {
                    panel[kk * width + j] = v;
                }
            }
        }
        let mut padded = vec![0.0f32; padded_n];
        if let Some(b) = bias {
            for (dst, &v) in padded.iter_mut().zip(b.iter()) {
                *dst = v;
            }
        }
        Ok(PackedLinear {
            n,
            k,
            panels,
            bias: padded,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `x · Wᵀ + b` for `x` of shape `[m, in_features]` (any strides; rows are copied to a
    /// contiguous buffer only when they are not contiguous).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `x` does not have `in_features` columns.
    ///
    /// # Examples
    /// ```
    /// use ndarray::array;
    /// use nncompress::kernels::PackedLinear;
    /// if PackedLinear::is_supported() {
    ///     let w = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
    ///     let b = array![0.5f32, 0.0, -1.0];
    ///     let layer = PackedLinear::new(w.view(), Some(b.view()))?;
    ///     let y = layer.forward(array![[1.0f32, 1.0]].view())?;
    ///     assert_eq!(y, array![[3.5f32, 7.0, 10.0]]);
    /// }
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let (m, k) = x.dim();
        if k != self.k {
            return Err(Error::shape(
                "packed_linear",
                None,
                format!("[m, {}]", self.k),
                &[m, k],
            ));
        }
        let mut y = Array2::<f32>::zeros((m, self.n));
        if m == 0 || self.n == 0 {
            return Ok(y);
        }
        let x = x.as_standard_layout();
        let (Some(a), Some(c)) = (x.as_slice(), y.as_slice_mut()) else {
            return Err(Error::Unsupported(
                "non-contiguous packed_linear buffers".into(),
            ));
        };
        self.run(a, c, m);
        Ok(y)
    }

    /// Fills `c` (`m × n`, row-major) from `a` (`m × k`, row-major).
    fn run(&self, a: &[f32], c: &mut [f32], m: usize) {
        let (n, k) = (self.n, self.k);
        let row_blocks = m.div_ceil(TILE_ROWS);
        let panels = n.div_ceil(PANEL);
        let parallel = (m * n * k >= PARALLEL_MIN_MACS || n * k >= PARALLEL_MIN_WEIGHTS)
            && panels * row_blocks > 1
            && rayon::current_num_threads() > 1;
        // Tasks are (panel, chunk of row blocks); enough chunks for four tasks per thread
        // (LeNet-300-100's five panels split 3 : 2 over two threads otherwise).
        let chunks = if parallel {
            (4 * rayon::current_num_threads())
                .div_ceil(panels)
                .clamp(1, row_blocks)
        } else {
            1
        };
        let per_chunk = row_blocks.div_ceil(chunks);
        // Within a task, `k` in blocks of `K_BLOCK`: the block's slice of the panel
        // (`K_BLOCK × 64` f32 = 32 KB) stays in L1 while every row block of the chunk uses
        // it; accumulators go through `c` between blocks (exact: they are f32 either way).
        // Tasks write disjoint tiles of `c`.
        let task = |t: usize, out: TileSink| {
            let (p, chunk) = (t / chunks, t % chunks);
            let cols = PANEL.min(n - p * PANEL);
            let width = panel_width(n, p);
            let panel = &self.panels[p * PANEL * k..(p * PANEL + width) * k];
            let bias = &self.bias[p * PANEL..p * PANEL + width];
            let blocks = chunk * per_chunk..((chunk + 1) * per_chunk).min(row_blocks);
            let mut k0 = 0;
            loop {
                let kc = K_BLOCK.min(k - k0);
                for rb in blocks.clone() {
                    let r0 = rb * TILE_ROWS;
                    let rows = TILE_ROWS.min(m - r0);
                    let a_rows = &a[r0 * k + k0..(r0 + rows - 1) * k + k0 + kc];
                    let step = Step {
                        a: a_rows,
                        lda: k,
                        kc,
                        panel: &panel[k0 * width..(k0 + kc) * width],
                        bias,
                        accumulate: k0 > 0,
                    };
                    out.tile(r0, p * PANEL, rows, cols, |tile| {
                        tile_dispatch(rows, &step, tile, n, cols)
                    });
                }
                k0 += kc;
                if k0 >= k {
                    break;
                }
            }
        };
        let sink = TileSink::new(c, m, n);
        if parallel {
            super::parallel::for_each((0..panels * chunks).collect(), &|t| task(t, sink));
        } else {
            (0..panels * chunks).for_each(|t| task(t, sink));
        }
    }
}

/// One `k` block of one tile: rows of `a` at stride `lda` (`kc` values each, from the
/// block's start), the block's slice of the panel, the panel's bias, and whether the tile
/// already holds the previous blocks' sums.
pub(crate) struct Step<'a> {
    pub a: &'a [f32],
    pub lda: usize,
    pub kc: usize,
    pub panel: &'a [f32],
    pub bias: &'a [f32],
    pub accumulate: bool,
}

/// Shared write access to `c` for tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct TileSink {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: a `TileSink` only hands out `&mut` slices of tiles that `run` assigns to exactly
// one task each (distinct `(row block, panel)` pairs), so concurrent tasks never alias.
unsafe impl Send for TileSink {}
// SAFETY: as above.
unsafe impl Sync for TileSink {}

impl TileSink {
    fn new(c: &mut [f32], m: usize, n: usize) -> Self {
        assert_eq!(c.len(), m * n, "output buffer is m × n");
        TileSink {
            ptr: c.as_mut_ptr(),
            m,
            n,
        }
    }

    /// Gives `f` a pointer to element `(r0, c0)` of `c` (row stride `n`) after checking
    /// that the tile `rows × cols` there lies inside the buffer; `f` writes only that tile.
    fn tile(self, r0: usize, c0: usize, rows: usize, cols: usize, f: impl FnOnce(*mut f32)) {
        assert!(rows > 0 && cols > 0 && r0 + rows <= self.m && c0 + cols <= self.n);
        // No `&mut` slice is formed: other tasks' tiles sit between this tile's rows.
        // `wrapping_add` stays in bounds by the assertion above.
        f(self.ptr.wrapping_add(r0 * self.n + c0))
    }
}

/// Columns of panel `p` of an `n`-column weight as packed: [`PANEL`], or for the last
/// panel its columns rounded up to whole 16-lane vectors (LeNet-300-100's 300 outputs take
/// 19 vectors, not 20).
fn panel_width(n: usize, p: usize) -> usize {
    n.saturating_sub(p * PANEL).min(PANEL).div_ceil(16).max(1) * 16
}

/// Runs the micro-kernel for a tile of `rows ≤ TILE_ROWS` rows of a panel `width` wide.
fn tile_dispatch(rows: usize, step: &Step<'_>, c: *mut f32, ldc: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::x86_64::f32_tile;
        // A `[R][V]` table of the kernel's instances.
        macro_rules! by_width {
            ($r:literal) => {
                match cols.div_ceil(16) {
                    1 => f32_tile::<$r, 1>,
                    2 => f32_tile::<$r, 2>,
                    3 => f32_tile::<$r, 3>,
                    _ => f32_tile::<$r, 4>,
                }
            };
        }
        let f = match rows {
            1 => by_width!(1),
            2 => by_width!(2),
            3 => by_width!(3),
            4 => by_width!(4),
            5 => by_width!(5),
            _ => by_width!(6),
        };
        assert!(PackedLinear::is_supported(), "AVX-512F checked at packing");
        // SAFETY: AVX-512F is present (asserted); `f32_tile` checks the lengths of the
        // step's slices; `c` addresses a `rows × cols` tile of row stride `ldc` inside the
        // output (checked by `TileSink::tile`) that no other task writes.
        unsafe { f(step, c, ldc, cols) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, step, c, ldc, cols);
        unreachable!("PackedLinear::new refuses CPUs without AVX-512F");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    #[test]
    fn matches_sgemm_bit_for_bit_at_every_tail_and_thread_count() {
        if !PackedLinear::is_supported() {
            eprintln!("SKIP: no AVX-512F");
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 63),
            (6, 13, 64),
            (7, 300, 65),
            (3, 9, 96),
            (64, 784, 300),
        ] {
            let w = Array2::from_shape_fn((n, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
            let b = Array1::from_shape_fn(n, |i| (i % 5) as f32 - 2.0);
            let x = Array2::from_shape_fn((m, k), |(i, j)| ((i * 5 + j) % 9) as f32 - 4.0);
            // Small integers keep every partial sum exact, so equality is the right check.
            let mut want = Array2::<f32>::zeros((m, n));
            super::super::sgemm(x.view(), w.t(), want.view_mut(), false).unwrap();
            want += &b;
            let layer = PackedLinear::new(w.view(), Some(b.view())).unwrap();
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| layer.forward(x.view())).unwrap();
                assert_eq!(got, want, "m {m} k {k} n {n} threads {threads}");
                // A transposed (non-contiguous) input gives the same result.
                let xt = x.t().to_owned();
                assert_eq!(pool.install(|| layer.forward(xt.t())).unwrap(), want);
            }
        }
    }

    #[test]
    fn real_valued_results_do_not_depend_on_threads() {
        if !PackedLinear::is_supported() {
            eprintln!("SKIP: no AVX-512F");
            return;
        }
        let (m, k, n) = (64, 333, 130);
        let w = Array2::from_shape_fn((n, k), |(i, j)| ((i * 31 + j * 17) % 97) as f32 / 97.0);
        let x = Array2::from_shape_fn((m, k), |(i, j)| ((i * 13 + j * 7) % 89) as f32 / 89.0);
        let layer = PackedLinear::new(w.view(), None).unwrap();
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| layer.forward(x.view()))
                .unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(2));
        let mut want = Array2::<f32>::zeros((m, n));
        super::super::sgemm(x.view(), w.t(), want.view_mut(), false).unwrap();
        let worst = (&one - &want).iter().fold(0.0f32, |m, d| m.max(d.abs()));
        assert!(worst < 1e-4, "packed and sgemm differ by {worst}");
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        if !PackedLinear::is_supported() {
            return;
        }
        let w = Array2::<f32>::zeros((3, 4));
        let b = Array1::<f32>::zeros(2);
        assert!(matches!(
            PackedLinear::new(w.view(), Some(b.view())),
            Err(Error::ShapeMismatch { .. })
        ));
        let layer = PackedLinear::new(w.view(), None).unwrap();
        assert!(matches!(
            layer.forward(Array2::<f32>::zeros((2, 5)).view()),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
