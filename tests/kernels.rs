//! Every int8 path against the naive reference, exactly.
//!
//! One macro instantiates the suite per path. A path the CPU cannot run is skipped with a
//! message on stderr; `NNCOMPRESS_REQUIRE_ISA=avx512vnni` (comma-separated names, or `all`)
//! turns that skip into a failure, so CI on a capable machine cannot pass by skipping.

use ndarray::{Array2, Array4};
use nncompress::kernels::{
    conv2d_nhwc_u8i8_f32, conv2d_nhwc_u8i8_i32, conv2d_nhwc_u8i8_u8, conv2d_u8i8_f32,
    conv2d_u8i8_i32, conv2d_u8i8_u8, gemm_u8i8_f32, gemm_u8i8_f32_per_row, gemm_u8i8_i32,
    gemm_u8i8_u8, reference, ConvSpec, Dequantize, FusedActivation, KernelChoice, PackedConv,
    PackedWeights, Requantize, MAX_K,
};
use nncompress::kernels::{
    conv_integer, matmul_integer, qlinear_conv, qlinear_matmul, Int8Array4, Int8Matrix,
    Int8MatrixMut, Int8View, MultiplierRule, QuantizedOutput,
};
use nncompress::tensor::ConvGeometry;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether `kernel` runs here; if not, says so, and fails when the environment requires it.
fn runnable(kernel: KernelChoice) -> bool {
    if kernel.is_available() {
        return true;
    }
    let required = std::env::var("NNCOMPRESS_REQUIRE_ISA").unwrap_or_default();
    let named = required
        .split(',')
        .any(|r| r.trim() == kernel.name() || r.trim() == "all");
    assert!(
        !named,
        "NNCOMPRESS_REQUIRE_ISA={required} but this CPU cannot run the {kernel} kernel"
    );
    eprintln!("SKIPPED: the {kernel} int8 kernel needs CPU features this machine lacks");
    false
}

#[test]
fn required_isas_are_present() {
    let required = std::env::var("NNCOMPRESS_REQUIRE_ISA").unwrap_or_default();
    for name in required
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "all")
    {
        let k = KernelChoice::from_name(name)
            .unwrap_or_else(|| panic!("NNCOMPRESS_REQUIRE_ISA names unknown kernel `{name}`"));
        assert!(k.is_available(), "required kernel {k} is not available");
    }
    assert!(KernelChoice::best().is_available());
}

fn random_u8(shape: (usize, usize), rng: &mut StdRng) -> Array2<u8> {
    Array2::from_shape_simple_fn(shape, || rng.random())
}

fn random_i8(shape: (usize, usize), rng: &mut StdRng) -> Array2<i8> {
    Array2::from_shape_simple_fn(shape, || rng.random())
}

/// Prints the cells where two results differ (at most 20) before failing.
fn assert_same<T: PartialEq + std::fmt::Debug>(got: &Array2<T>, want: &Array2<T>, what: &str) {
    if got != want {
        let mut diffs = Vec::new();
        for ((i, j), g) in got.indexed_iter() {
            if *g != want[[i, j]] && diffs.len() < 20 {
                diffs.push(format!("  [{i}, {j}]: got {g:?}, want {:?}", want[[i, j]]));
            }
        }
        panic!(
            "{what}: {} × {} results differ\n{}",
            got.nrows(),
            got.ncols(),
            diffs.join("\n")
        );
    }
}

fn random_requant(n: usize, rng: &mut StdRng) -> Requantize {
    let bias: Vec<i32> = (0..n).map(|_| rng.random_range(-50_000..50_000)).collect();
    let mult: Vec<f64> = (0..n)
        .map(|_| 2f64.powf(rng.random_range(-20.0..0.5)))
        .collect();
    let zp: u8 = rng.random();
    let act = [
        FusedActivation::None,
        FusedActivation::Relu,
        FusedActivation::Relu6,
    ][rng.random_range(0..3)];
    Requantize::from_real(bias, &mult, zp)
        .unwrap()
        .with_activation(act, rng.random_range(0.01f32..0.5))
        .unwrap()
}

/// Checks all three epilogues of one GEMM problem against the reference.
fn check_gemm(kernel: KernelChoice, a: &Array2<u8>, za: u8, w: &Array2<i8>, rng: &mut StdRng) {
    let (m, _) = a.dim();
    let n = w.nrows();
    let packed = PackedWeights::with_kernel(w.view(), kernel).unwrap();
    let acc = reference::gemm_u8i8_i32(a.view(), za, w.view()).unwrap();
    let bias: Vec<i32> = (0..n).map(|_| rng.random_range(-1000..1000)).collect();

    let mut got = Array2::from_elem((m, n), i32::MIN);
    gemm_u8i8_i32(a.view(), za, &packed, Some(&bias), got.view_mut()).unwrap();
    let want = Array2::from_shape_fn((m, n), |(i, j)| acc[[i, j]] + bias[j]);
    assert_same(&got, &want, &format!("{kernel} i32 out"));

    let rq = random_requant(n, rng);
    let mut got = Array2::from_elem((m, n), 77u8);
    gemm_u8i8_u8(a.view(), za, &packed, &rq, got.view_mut()).unwrap();
    let want = Array2::from_shape_fn((m, n), |(i, j)| rq.apply(j, acc[[i, j]]).unwrap());
    assert_same(&got, &want, &format!("{kernel} u8 out"));

    let scales: Vec<f32> = (0..n).map(|_| rng.random_range(1e-4f32..1e-2)).collect();
    let fbias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let dq = Dequantize::new(0.02, &scales, Some(fbias)).unwrap();
    let mut got = Array2::from_elem((m, n), f32::NAN);
    gemm_u8i8_f32(a.view(), za, &packed, &dq, got.view_mut()).unwrap();
    let want = Array2::from_shape_fn((m, n), |(i, j)| dq.apply(j, acc[[i, j]]).unwrap());
    assert_same(&got, &want, &format!("{kernel} f32 out"));

    // Activations quantized per row (dynamic int8 per token): a zero point and a scale per
    // row, the correction exact in integers, the scales in the epilogue.
    let zeros: Vec<u8> = (0..m).map(|_| rng.random()).collect();
    let rows: Vec<f32> = (0..m).map(|_| rng.random_range(1e-3f32..1.0)).collect();
    let fbias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut got = Array2::from_elem((m, n), f32::NAN);
    gemm_u8i8_f32_per_row(
        a.view(),
        &zeros,
        &rows,
        &packed,
        &scales,
        Some(&fbias),
        got.view_mut(),
    )
    .unwrap();
    let want = Array2::from_shape_fn((m, n), |(i, j)| {
        let acc: i32 = (0..a.ncols())
            .map(|c| (i32::from(a[[i, c]]) - i32::from(zeros[i])) * i32::from(w[[j, c]]))
            .sum();
        acc as f32 * (rows[i] * scales[j]) + fbias[j]
    });
    assert_same(
        &got,
        &want,
        &format!("{kernel} f32 out, per-row activations"),
    );
}

fn check_conv(kernel: KernelChoice, x: &Array4<u8>, zx: u8, w: &Array4<i8>, spec: ConvSpec) {
    let (_, c, h, wd) = x.dim();
    let geo = ConvGeometry {
        in_channels: c,
        in_h: h,
        in_w: wd,
        kernel: [w.dim().2, w.dim().3],
        stride: spec.stride,
        padding: spec.padding,
        dilation: spec.dilation,
        groups: spec.groups,
    };
    let want = reference::conv2d_u8i8_i32(x.view(), zx, w.view(), &geo).unwrap();
    let conv = PackedConv::with_kernel(w.view(), spec, kernel).unwrap();
    let got = conv2d_u8i8_i32(x.view(), zx, &conv, None).unwrap();
    assert_eq!(got, want, "{kernel} conv {spec:?} on {:?}", x.dim());
    let o = w.dim().0;
    let mut rng = StdRng::seed_from_u64(o as u64);
    let rq = random_requant(o, &mut rng);
    let got = conv2d_u8i8_u8(x.view(), zx, &conv, &rq).unwrap();
    assert_eq!(
        got,
        want.mapv(|_| 0u8).indexed_map_u8(&want, &rq),
        "{kernel} conv u8 out"
    );
    let dq = Dequantize::new(0.5, &vec![0.25; o], None).unwrap();
    let got = conv2d_u8i8_f32(x.view(), zx, &conv, &dq).unwrap();
    let want_f = Array4::from_shape_fn(want.dim(), |(b, oc, y, xo)| {
        dq.apply(oc, want[[b, oc, y, xo]]).unwrap()
    });
    assert_eq!(got, want_f, "{kernel} conv f32 out");
    // The NHWC entry points: same numbers, channels last.
    let x_nhwc = x.view().permuted_axes([0, 2, 3, 1]);
    let nhwc = |t: Array4<i32>| {
        t.permuted_axes([0, 2, 3, 1])
            .as_standard_layout()
            .into_owned()
    };
    let got = conv2d_nhwc_u8i8_i32(x_nhwc, zx, &conv, None).unwrap();
    assert_eq!(got, nhwc(want.clone()), "{kernel} NHWC conv");
    let got = conv2d_nhwc_u8i8_u8(x_nhwc, zx, &conv, &rq).unwrap();
    assert_eq!(
        got,
        nhwc(want.clone())
            .mapv(|_| 0u8)
            .indexed_map_nhwc(&nhwc(want.clone()), &rq)
    );
    let got = conv2d_nhwc_u8i8_f32(x_nhwc, zx, &conv, &dq).unwrap();
    assert_eq!(got, want_f.permuted_axes([0, 2, 3, 1]));
}

/// Requantizes a reference accumulator tensor channel by channel.
trait IndexedMapU8 {
    fn indexed_map_u8(&self, acc: &Array4<i32>, rq: &Requantize) -> Array4<u8>;
}

impl IndexedMapU8 for Array4<u8> {
    fn indexed_map_u8(&self, acc: &Array4<i32>, rq: &Requantize) -> Array4<u8> {
        Array4::from_shape_fn(acc.dim(), |(b, oc, y, x)| {
            rq.apply(oc, acc[[b, oc, y, x]]).unwrap()
        })
    }
}

/// As [`IndexedMapU8`] for NHWC accumulators (channel last).
trait IndexedMapNhwc {
    fn indexed_map_nhwc(&self, acc: &Array4<i32>, rq: &Requantize) -> Array4<u8>;
}

impl IndexedMapNhwc for Array4<u8> {
    fn indexed_map_nhwc(&self, acc: &Array4<i32>, rq: &Requantize) -> Array4<u8> {
        Array4::from_shape_fn(acc.dim(), |(b, y, x, oc)| {
            rq.apply(oc, acc[[b, y, x, oc]]).unwrap()
        })
    }
}

fn conv_configs() -> Vec<(usize, usize, usize, ConvSpec, usize)> {
    // (in channels, out channels, kernel, spec, input size)
    vec![
        (3, 8, 3, ConvSpec::default(), 7),
        (
            4,
            6,
            3,
            ConvSpec::default().with_stride(2).with_padding(1),
            9,
        ),
        (
            5,
            7,
            3,
            ConvSpec::default().with_dilation(2).with_padding(2),
            8,
        ),
        (
            6,
            4,
            3,
            ConvSpec::default().with_groups(2).with_padding(1),
            6,
        ),
        (
            8,
            8,
            3,
            ConvSpec::default().with_groups(8).with_padding(1),
            7,
        ),
        (
            4,
            8,
            5,
            ConvSpec::default()
                .with_groups(4)
                .with_stride(2)
                .with_padding(2),
            9,
        ),
        (16, 33, 1, ConvSpec::default(), 5),
        (1, 20, 5, ConvSpec::default(), 12),
        (20, 50, 5, ConvSpec::default(), 12),
    ]
}

macro_rules! kernel_suite {
    ($name:ident, $kernel:expr) => {
        mod $name {
            use super::*;

            const KERNEL: KernelChoice = $kernel;

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(64))]
                #[test]
                fn gemm_equals_reference(
                    m in 1usize..=70, n in 1usize..=96, k in 0usize..=300,
                    za in any::<u8>(), seed in any::<u64>(),
                ) {
                    if runnable(KERNEL) {
                        let mut rng = StdRng::seed_from_u64(seed);
                        let a = random_u8((m, k), &mut rng);
                        let w = random_i8((n, k), &mut rng);
                        check_gemm(KERNEL, &a, za, &w, &mut rng);
                    }
                }
            }

            #[test]
            fn odd_sizes_and_k_zero() {
                if !runnable(KERNEL) {
                    return;
                }
                let mut rng = StdRng::seed_from_u64(7);
                for (m, k, n) in [
                    (7, 13, 29),
                    (1, 1, 1),
                    (3, 0, 5),
                    (8, 4, 32),
                    (9, 5, 33),
                    (17, 63, 257),
                    // Whole 32-row AMX tiles: blocks read in place, a last partial `k`
                    // block read past the row (zero weights) or copied at the matrix end.
                    (64, 784, 300),
                    (96, 65, 33),
                    (33, 1000, 64),
                    // Enough work to split by rows over two threads: each task's epilogue
                    // must read the per-row scales of its own rows.
                    (1024, 256, 64),
                ] {
                    let a = random_u8((m, k), &mut rng);
                    let w = random_i8((n, k), &mut rng);
                    check_gemm(KERNEL, &a, 3, &w, &mut rng);
                }
            }

            #[test]
            fn extremes_that_would_overflow_i16() {
                if !runnable(KERNEL) {
                    return;
                }
                let mut rng = StdRng::seed_from_u64(8);
                for &k in &[64, 1023, 4096, MAX_K] {
                    // 255 · (−128) and 255 · 127 in every term: i16 pair sums would saturate,
                    // and at MAX_K the i32 sum is within a hair of its limit.
                    for (av, za, wv) in [
                        (255u8, 0u8, -128i8),
                        (255, 0, 127),
                        (0, 255, -128),
                        (0, 255, 127),
                    ] {
                        let a = Array2::from_elem((3, k), av);
                        let w = Array2::from_elem((33, k), wv);
                        check_gemm(KERNEL, &a, za, &w, &mut rng);
                    }
                }
                // Alternating extremes.
                let k = 777;
                let a =
                    Array2::from_shape_fn((5, k), |(i, j)| if (i + j) % 2 == 0 { 255 } else { 0 });
                let w =
                    Array2::from_shape_fn(
                        (40, k),
                        |(i, j)| if (i * 3 + j) % 3 == 0 { -128 } else { 127 },
                    );
                check_gemm(KERNEL, &a, 128, &w, &mut rng);
            }

            #[test]
            fn results_do_not_depend_on_thread_count() {
                if !runnable(KERNEL) {
                    return;
                }
                let mut rng = StdRng::seed_from_u64(9);
                // Tall (split by rows) and short-wide (split by columns) problems.
                for (m, k, n) in [(300, 200, 40), (3, 300, 400)] {
                    let a = random_u8((m, k), &mut rng);
                    let w = random_i8((n, k), &mut rng);
                    let packed = PackedWeights::with_kernel(w.view(), KERNEL).unwrap();
                    let run = |threads: usize| {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        pool.install(|| {
                            let mut out = Array2::<i32>::zeros((m, n));
                            gemm_u8i8_i32(a.view(), 17, &packed, None, out.view_mut()).unwrap();
                            out
                        })
                    };
                    let one = run(1);
                    assert_eq!(one, run(2));
                    assert_eq!(one, run(3));
                    assert_eq!(
                        one,
                        reference::gemm_u8i8_i32(a.view(), 17, w.view()).unwrap()
                    );
                }
            }

            #[test]
            fn conv_equals_reference() {
                if !runnable(KERNEL) {
                    return;
                }
                let mut rng = StdRng::seed_from_u64(10);
                for (c, o, kk, spec, size) in conv_configs() {
                    let x =
                        Array4::from_shape_simple_fn((2, c, size, size + 1), || rng.random::<u8>());
                    let w = Array4::from_shape_simple_fn((o, c / spec.groups, kk, kk), || {
                        rng.random::<i8>()
                    });
                    check_conv(KERNEL, &x, rng.random(), &w, spec);
                }
                // Depthwise with a channel multiplier of 2, strided, dilated.
                let x = Array4::from_shape_simple_fn((1, 4, 9, 8), || rng.random::<u8>());
                let w = Array4::from_shape_simple_fn((8, 1, 3, 3), || rng.random::<i8>());
                let spec = ConvSpec::default()
                    .with_groups(4)
                    .with_stride(2)
                    .with_dilation(2)
                    .with_padding(1);
                check_conv(KERNEL, &x, 200, &w, spec);
            }
        }
    };
}

kernel_suite!(reference_path, KernelChoice::Reference);
kernel_suite!(generic_path, KernelChoice::Generic);
kernel_suite!(avx2_path, KernelChoice::Avx2);
kernel_suite!(avx512vnni_path, KernelChoice::Avx512Vnni);
kernel_suite!(amx_path, KernelChoice::Amx);

#[test]
fn shape_errors_not_panics() {
    let w = PackedWeights::new(Array2::<i8>::zeros((4, 3)).view()).unwrap();
    let a = Array2::<u8>::zeros((2, 5));
    let mut out = Array2::<i32>::zeros((2, 4));
    assert!(gemm_u8i8_i32(a.view(), 0, &w, None, out.view_mut()).is_err());
    let a = Array2::<u8>::zeros((2, 3));
    let mut bad = Array2::<i32>::zeros((3, 4));
    assert!(gemm_u8i8_i32(a.view(), 0, &w, None, bad.view_mut()).is_err());
    assert!(gemm_u8i8_i32(a.view(), 0, &w, Some(&[1, 2]), out.view_mut()).is_err());
    let rq = Requantize::from_real(vec![0; 3], &[0.1; 3], 0).unwrap();
    let mut o8 = Array2::<u8>::zeros((2, 4));
    assert!(gemm_u8i8_u8(a.view(), 0, &w, &rq, o8.view_mut()).is_err());
    assert!(Requantize::from_real(vec![0; 2], &[0.1], 0).is_err());
    assert!(Requantize::from_real(vec![0], &[-0.1], 0).is_err());
    assert!(Requantize::from_real(vec![0], &[f64::NAN], 0).is_err());
    assert!(PackedWeights::new(Array2::<i8>::zeros((1, MAX_K + 1)).view()).is_err());
    let conv = PackedConv::new(
        Array4::<i8>::zeros((4, 2, 3, 3)).view(),
        ConvSpec::default(),
    )
    .unwrap();
    assert!(conv2d_u8i8_i32(Array4::<u8>::zeros((1, 3, 5, 5)).view(), 0, &conv, None).is_err());
    assert!(conv2d_u8i8_i32(Array4::<u8>::zeros((1, 2, 2, 2)).view(), 0, &conv, None).is_err());
    assert!(PackedConv::new(
        Array4::<i8>::zeros((4, 2, 3, 3)).view(),
        ConvSpec::default().with_groups(3)
    )
    .is_err());
}

#[test]
fn fused_relu6_clamps_at_quantized_six() {
    // Output scale 0.05, zero point 10: real 0 → 10, real 6 → 130.
    let rq = Requantize::from_real(vec![0], &[1.0], 10)
        .unwrap()
        .with_activation(FusedActivation::Relu6, 0.05)
        .unwrap();
    assert_eq!(rq.apply(0, -100).unwrap(), 10);
    assert_eq!(rq.apply(0, 50).unwrap(), 60);
    assert_eq!(rq.apply(0, 1000).unwrap(), 130);
    let relu = Requantize::from_real(vec![0], &[1.0], 10)
        .unwrap()
        .with_activation(FusedActivation::Relu, 0.05)
        .unwrap();
    assert_eq!(relu.apply(0, -100).unwrap(), 10);
    assert_eq!(relu.apply(0, 1000).unwrap(), 255);
}

/// The LCG of `scripts/ort_integer_vectors.py`: `x ← 1664525·x + 1013904223 mod 2³²`, byte
/// `x >> 24`.
fn lcg_bytes(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// The same bytes as ONNX type `ty` (`int8` or `uint8`).
fn int8_view<'a, D: ndarray::Dimension>(
    ty: &str,
    bytes: &'a ndarray::Array<u8, D>,
    signed: &'a ndarray::Array<i8, D>,
) -> Int8View<'a, D> {
    if ty == "int8" {
        Int8View::I8(signed.view())
    } else {
        Int8View::U8(bytes.view())
    }
}

/// `qlinear_matmul` into an `m × n` output of `rq`'s type, as i32 values.
fn qlinear_values(
    a: Int8Matrix,
    za: i32,
    w: &PackedWeights,
    rq: &Requantize,
    (m, n): (usize, usize),
) -> Vec<i32> {
    if rq.is_signed() {
        let mut o = Array2::<i8>::zeros((m, n));
        qlinear_matmul(a, za, w, rq, Int8MatrixMut::I8(o.view_mut())).unwrap();
        o.iter().map(|&v| v as i32).collect()
    } else {
        let mut o = Array2::<u8>::zeros((m, n));
        qlinear_matmul(a, za, w, rq, Int8MatrixMut::U8(o.view_mut())).unwrap();
        o.iter().map(|&v| v as i32).collect()
    }
}

/// ONNX Runtime 1.32's `MatMulInteger` and `QLinearMatMul` (from
/// `scripts/ort_integer_vectors.py`): u8 / i8 activations × u8 / i8 weights, weight zero
/// points per tensor and per column, u8 / i8 outputs, on every kernel path. `MatMulInteger`
/// must be exact; `QLinearMatMul` within one LSB (ORT requantizes in f32 floating point,
/// the kernels in Q31 fixed point). Every convention ORT does not implement for
/// `QLinearMatMul` is checked against the kernels' own `MatMulInteger` and the scalar
/// requantization.
#[test]
fn ort_integer_matmul() {
    let text = include_str!("fixtures/ort_integer_matmul.txt");
    let ints = |s: &str| -> Vec<i32> { s.split(',').map(|v| v.parse().unwrap()).collect() };
    let floats = |s: &str| -> Vec<f32> {
        s.split(',')
            .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
            .collect()
    };
    let (mut exact_cases, mut qlinear_count, mut qlinear_exact, mut own_conventions) =
        (0, 0usize, [0usize; 2], 0);
    for kernel in KernelChoice::available() {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(' ').collect();
            let qlinear = f[0] == "qlinear_matmul";
            let (at, bt) = (f[1], f[2]);
            let dims = if qlinear { &f[4..8] } else { &f[3..7] };
            let [m, k, n, seed]: [usize; 4] =
                std::array::from_fn(|i| dims[i].parse::<usize>().unwrap());
            let bytes = lcg_bytes(seed as u32, m * k + k * n);
            let a8 = Array2::from_shape_vec((m, k), bytes[..m * k].to_vec()).unwrap();
            let b8 = Array2::from_shape_vec((k, n), bytes[m * k..].to_vec()).unwrap();
            let (a_s, b_s) = (a8.mapv(|v| v as i8), b8.mapv(|v| v as i8));
            let a = int8_view(at, &a8, &a_s);
            let bt8 = b8.t().to_owned();
            let bt_s = b_s.t().to_owned();
            let b = int8_view(bt, &bt8, &bt_s);
            if !qlinear {
                let (za, zb, want) = (f[7].parse().unwrap(), ints(f[8]), ints(f[9]));
                let w = PackedWeights::from_int8_with_kernel(b, &zb, kernel).unwrap();
                let mut out = Array2::<i32>::zeros((m, n));
                matmul_integer(a, za, &w, None, out.view_mut()).unwrap();
                assert_eq!(
                    out.iter().copied().collect::<Vec<_>>(),
                    want,
                    "{kernel}: {line:.60}"
                );
                exact_cases += 1;
                // The conventions ORT lacks for QLinearMatMul: against MatMulInteger.
                for signed_out in [false, true] {
                    let output = if signed_out {
                        QuantizedOutput::I8(-7)
                    } else {
                        QuantizedOutput::U8(121)
                    };
                    let rq = Requantize::from_scales(
                        vec![0; n],
                        0.02,
                        &[0.01],
                        0.02 * 0.01 * (k as f32).sqrt() * 6.0,
                        output,
                        MultiplierRule::F32,
                    )
                    .unwrap();
                    let expect = |n: usize, acc: i32| -> i32 {
                        let u = rq.apply(n, acc).unwrap();
                        if signed_out {
                            ((u ^ 0x80) as i8) as i32
                        } else {
                            u as i32
                        }
                    };
                    let got = qlinear_values(a, za, &w, &rq, (m, n));
                    let want: Vec<i32> = out
                        .indexed_iter()
                        .map(|((_, c), &acc)| expect(c, acc))
                        .collect();
                    assert_eq!(got, want, "{kernel} own {signed_out}: {line:.60}");
                    own_conventions += 1;
                }
            } else {
                let yt = f[3];
                let (sa, za) = (floats(f[8])[0], f[9].parse().unwrap());
                let (sb, zb) = (floats(f[10]), ints(f[11]));
                let (sy, zy) = (floats(f[12])[0], f[13].parse::<i32>().unwrap());
                let want = ints(f[14]);
                let w = PackedWeights::from_int8_with_kernel(b, &zb, kernel).unwrap();
                for (r, rule) in [MultiplierRule::F64, MultiplierRule::F32]
                    .into_iter()
                    .enumerate()
                {
                    let output = if yt == "int8" {
                        QuantizedOutput::I8(zy as i8)
                    } else {
                        QuantizedOutput::U8(zy as u8)
                    };
                    let rq =
                        Requantize::from_scales(vec![0; n], sa, &sb, sy, output, rule).unwrap();
                    let got = qlinear_values(a, za, &w, &rq, (m, n));
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1,
                            "{kernel} {rule:?}: {g} vs ORT {w}: {line:.60}"
                        );
                        qlinear_exact[r] += usize::from(g == w);
                    }
                    if r == 0 {
                        qlinear_count += want.len();
                    }
                }
            }
        }
    }
    println!(
        "MatMulInteger: {exact_cases} cases exact; QLinearMatMul: {qlinear_count} values within \
         1 LSB, equal to ORT's: {} (f64 multiplier), {} (f32 multiplier); {own_conventions} \
         other conventions checked",
        qlinear_exact[0], qlinear_exact[1]
    );
    assert!(exact_cases >= 48 && qlinear_count > 10_000);
}

/// Problems large enough to be split over threads, by rows and by columns, in every
/// convention: equal to the definition in i64.
#[test]
fn integer_conventions_split_over_threads() {
    let mut rng = StdRng::seed_from_u64(5);
    for (m, k, n) in [(300, 200, 100), (4, 300, 2000)] {
        let a8 = random_u8((m, k), &mut rng);
        let w8 = random_u8((n, k), &mut rng);
        let (a_s, w_s) = (a8.mapv(|v| v as i8), w8.mapv(|v| v as i8));
        for kernel in KernelChoice::available() {
            for (at, wt) in [
                ("uint8", "int8"),
                ("int8", "int8"),
                ("uint8", "uint8"),
                ("int8", "uint8"),
            ] {
                let a = int8_view(at, &a8, &a_s);
                let w = int8_view(wt, &w8, &w_s);
                let (za, lo_w) = (
                    if at == "int8" { -5 } else { 133 },
                    if wt == "int8" { -128 } else { 0 },
                );
                let zw: Vec<i32> = (0..n).map(|c| lo_w + (c * 37 % 256) as i32).collect();
                let packed = PackedWeights::from_int8_with_kernel(w, &zw, kernel).unwrap();
                let mut out = Array2::<i32>::zeros((m, n));
                matmul_integer(a, za, &packed, None, out.view_mut()).unwrap();
                let value = |x: &Int8Matrix, r: usize, c: usize| -> i64 {
                    match x {
                        Int8Matrix::U8(v) => v[[r, c]] as i64,
                        Int8Matrix::I8(v) => v[[r, c]] as i64,
                    }
                };
                for r in (0..m).step_by(7) {
                    for c in (0..n).step_by(3) {
                        let want: i64 = (0..k)
                            .map(|j| {
                                (value(&a, r, j) - za as i64) * (value(&w, c, j) - zw[c] as i64)
                            })
                            .sum();
                        assert_eq!(
                            out[[r, c]] as i64,
                            want,
                            "{kernel} {at}x{wt} {m}x{k}x{n} [{r},{c}]"
                        );
                    }
                }
            }
        }
    }
}

/// ONNX Runtime 1.32's `ConvInteger` and `QLinearConv` (from `scripts/ort_conv_vectors.py`):
/// u8 / i8 inputs × u8 / i8 weights, weight zero points per tensor and per channel,
/// symmetric and asymmetric pads `[t, l, b, r]`, strides, dilation, groups, depthwise and
/// pointwise, u8 / i8 outputs with an i32 bias, on every kernel path. `ConvInteger` must
/// be exact, `QLinearConv` within one LSB.
#[test]
fn ort_integer_conv() {
    let text = include_str!("fixtures/ort_integer_conv.txt");
    let ints = |s: &str| -> Vec<i32> { s.split(',').map(|v| v.parse().unwrap()).collect() };
    let dims = |s: &str| -> Vec<usize> { s.split(',').map(|v| v.parse().unwrap()).collect() };
    let floats = |s: &str| -> Vec<f32> {
        s.split(',')
            .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
            .collect()
    };
    let (mut exact_cases, mut qlinear_values, mut qlinear_exact) = (0, 0usize, 0usize);
    for kernel in KernelChoice::available() {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(' ').collect();
            let qlinear = f[0] == "qlinear_conv";
            let (xt, wt) = (f[1], f[2]);
            let g = if qlinear { &f[4..] } else { &f[3..] };
            let (shape, wshape) = (dims(g[0]), dims(g[1]));
            let (stride, dilation, groups, pads) =
                (dims(g[2]), dims(g[3]), g[4].parse().unwrap(), dims(g[5]));
            let seed: u32 = g[6].parse().unwrap();
            let (nx, nw) = (
                shape.iter().product::<usize>(),
                wshape.iter().product::<usize>(),
            );
            let bytes = lcg_bytes(seed, nx + nw);
            let x8 = Array4::from_shape_vec(
                (shape[0], shape[1], shape[2], shape[3]),
                bytes[..nx].to_vec(),
            )
            .unwrap();
            let w8 = Array4::from_shape_vec(
                (wshape[0], wshape[1], wshape[2], wshape[3]),
                bytes[nx..].to_vec(),
            )
            .unwrap();
            let (x_s, w_s) = (x8.mapv(|v| v as i8), w8.mapv(|v| v as i8));
            let x = int8_view(xt, &x8, &x_s);
            let w = int8_view(wt, &w8, &w_s);
            let spec = ConvSpec {
                stride: [stride[0], stride[1]],
                dilation: [dilation[0], dilation[1]],
                groups,
                ..ConvSpec::default()
            }
            .with_pads([pads[0], pads[1], pads[2], pads[3]]);
            if !qlinear {
                let (zx, zw, want) = (g[7].parse().unwrap(), ints(g[8]), ints(g[9]));
                let conv = PackedConv::from_int8_with_kernel(w, &zw, spec, kernel).unwrap();
                let y = conv_integer(x, zx, &conv, None).unwrap();
                assert_eq!(
                    y.iter().copied().collect::<Vec<_>>(),
                    want,
                    "{kernel}: {line:.90}"
                );
                exact_cases += 1;
            } else {
                let yt = f[3];
                let (sx, zx) = (floats(g[7])[0], g[8].parse().unwrap());
                let (sw, zw) = (floats(g[9]), ints(g[10]));
                let (sy, zy) = (floats(g[11])[0], g[12].parse::<i32>().unwrap());
                let (bias, want) = (ints(g[13]), ints(g[14]));
                let conv = PackedConv::from_int8_with_kernel(w, &zw, spec, kernel).unwrap();
                let output = if yt == "int8" {
                    QuantizedOutput::I8(zy as i8)
                } else {
                    QuantizedOutput::U8(zy as u8)
                };
                let rq = Requantize::from_scales(bias, sx, &sw, sy, output, MultiplierRule::F32)
                    .unwrap();
                let got: Vec<i32> = match qlinear_conv(x, zx, &conv, &rq).unwrap() {
                    Int8Array4::U8(y) => y.iter().map(|&v| v as i32).collect(),
                    Int8Array4::I8(y) => y.iter().map(|&v| v as i32).collect(),
                };
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1, "{kernel}: {g} vs ORT {w}: {line:.90}");
                    qlinear_exact += usize::from(g == w);
                }
                qlinear_values += want.len();
            }
        }
    }
    println!(
        "ConvInteger: {exact_cases} cases exact; QLinearConv: {qlinear_values} values within 1 LSB, \
         {qlinear_exact} equal to ORT's"
    );
    assert!(exact_cases >= 64 && qlinear_values > 10_000);
}
