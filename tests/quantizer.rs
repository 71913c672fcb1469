//! Quantization schemes, parameters, quantize / dequantize and observers.

use ndarray::{Array, ArrayD, IxDyn};
use nncompress::quantizer::{
    dequantize, fake_quantize, pack_i4, quantize, unpack_i4, AciqDistribution, AciqObserver,
    Granularity, Histogram, KldObserver, MinMaxObserver, MovingAverageObserver, MseObserver,
    Observer, PercentileObserver, QData, QTensor, QuantDtype, QuantMode, QuantParams, QuantScheme,
};
use nncompress::Error;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn schemes() -> Vec<QuantScheme> {
    let base = QuantScheme::default();
    vec![
        base,
        base.with_narrow_range(true),
        QuantScheme::uint8_activations(),
        base.with_dtype(QuantDtype::UInt8)
            .with_mode(QuantMode::Symmetric),
        base.with_dtype(QuantDtype::Int4),
        base.with_dtype(QuantDtype::Int4)
            .with_mode(QuantMode::Affine),
        QuantScheme::int8_weights(),
        base.with_granularity(Granularity::PerChannel { axis: 1 }),
        base.with_dtype(QuantDtype::UInt8)
            .with_mode(QuantMode::Affine)
            .with_granularity(Granularity::PerChannel { axis: 2 }),
    ]
}

proptest! {
    #[test]
    fn round_trip_error_is_at_most_half_a_step(
        values in proptest::collection::vec(-50.0f32..50.0, 24),
        scale_by in 0.001f32..10.0,
    ) {
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, 4]), values.iter().map(|v| v * scale_by).collect()).unwrap();
        for scheme in schemes() {
            let p = QuantParams::from_tensor(scheme, x.view()).unwrap();
            let back = fake_quantize(x.view(), &p).unwrap();
            let layout_axis = match scheme.granularity { Granularity::PerChannel { axis } => Some(axis), _ => None };
            for ((idx, &a), &b) in x.indexed_iter().zip(back.iter()) {
                let c = layout_axis.map_or(0, |ax| idx[ax]);
                // Min-max ranges cover every value, so only rounding remains (plus f32 slack).
                let tol = p.scale[c] / 2.0 * (1.0 + 1e-5) + 1e-6 * a.abs();
                prop_assert!((a - b).abs() <= tol, "{scheme:?}: {a} -> {b}, scale {}", p.scale[c]);
            }
        }
    }

    #[test]
    fn int4_packing_round_trips(values in proptest::collection::vec(-8i32..=7, 0..41)) {
        let packed = pack_i4(&values);
        prop_assert_eq!(packed.len(), values.len().div_ceil(2));
        prop_assert_eq!(unpack_i4(&packed, values.len()).unwrap(), values);
    }
}

#[test]
fn ties_round_to_even() {
    // Scale 1 (range ±127): x = 0.5, 1.5, 2.5, −0.5, −1.5 → 0, 2, 2, 0, −2.
    let p = QuantParams::from_range(QuantScheme::default(), &[-127.0], &[127.0]).unwrap();
    assert_eq!(p.scale, [1.0]);
    let x = ndarray::arr1(&[0.5f32, 1.5, 2.5, -0.5, -1.5]).into_dyn();
    assert_eq!(
        quantize(x.view(), &p).unwrap().int_values().unwrap(),
        [0, 2, 2, 0, -2]
    );
}

#[test]
fn per_channel_on_a_middle_axis() {
    // Channel c of axis 1 spans ±(c + 1): each channel's extreme maps to ±127.
    let x = Array::from_shape_fn((2, 3, 4), |(a, c, b)| {
        let v = (c + 1) as f32;
        if (a + b) % 2 == 0 {
            v
        } else {
            -v * 0.5
        }
    })
    .into_dyn();
    let scheme = QuantScheme::default().with_granularity(Granularity::PerChannel { axis: 1 });
    let p = QuantParams::from_tensor(scheme, x.view()).unwrap();
    assert_eq!(p.channels(), 3);
    for c in 0..3 {
        assert!((p.scale[c] - (c + 1) as f32 / 127.0).abs() < 1e-7);
    }
    let q = quantize(x.view(), &p).unwrap().int_values().unwrap();
    assert!(q.iter().all(|&v| v == 127 || v == -64), "{q:?}");
    let bad = QuantScheme::default().with_granularity(Granularity::PerChannel { axis: 3 });
    assert!(matches!(
        QuantParams::from_tensor(bad, x.view()),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        quantize(
            x.view(),
            &QuantParams {
                scheme: bad,
                ..p.clone()
            }
        ),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn zero_ranges_never_give_zero_scales_or_nan() {
    let zeros = ArrayD::<f32>::zeros(IxDyn(&[3, 5]));
    for scheme in schemes() {
        let scheme = match scheme.granularity {
            Granularity::PerChannel { axis } if axis > 1 => {
                scheme.with_granularity(Granularity::PerChannel { axis: 1 })
            }
            _ => scheme,
        };
        let p = QuantParams::from_tensor(scheme, zeros.view()).unwrap();
        assert!(
            p.scale.iter().all(|&s| s > 0.0 && s.is_finite()),
            "{scheme:?}"
        );
        let back = fake_quantize(zeros.view(), &p).unwrap();
        assert!(back.iter().all(|&v| v == 0.0), "{scheme:?}");
    }
    // A constant positive tensor keeps zero exact and its value within half a step.
    let c = ArrayD::from_elem(IxDyn(&[4]), 3.0f32);
    let p = QuantParams::from_tensor(QuantScheme::uint8_activations(), c.view()).unwrap();
    assert_eq!(p.zero_point, [0]);
    let back = fake_quantize(c.view(), &p).unwrap();
    assert!((back[0] - 3.0).abs() <= p.scale[0] / 2.0);
}

#[test]
fn floats_and_errors() {
    let x = ndarray::arr1(&[1.0f32, -2.5, 65504.0, 1e-3]).into_dyn();
    let q = quantize(
        x.view(),
        &QuantParams::from_tensor(QuantScheme::float16(), x.view()).unwrap(),
    )
    .unwrap();
    assert_eq!(q.nbytes(), 8);
    let back = dequantize(&q).unwrap();
    assert_eq!(back[2], 65504.0);
    assert!((back[3] - 1e-3).abs() < 1e-6);
    let bf = QuantScheme::float16().with_dtype(QuantDtype::BFloat16);
    let back = fake_quantize(x.view(), &QuantParams::from_tensor(bf, x.view()).unwrap()).unwrap();
    assert_eq!(back[1], -2.5);
    let nan = ndarray::arr1(&[1.0f32, f32::NAN]).into_dyn();
    assert!(matches!(
        QuantParams::from_tensor(QuantScheme::default(), nan.view()),
        Err(Error::NonFinite(_))
    ));
    assert!(matches!(
        QuantParams::from_range(QuantScheme::default(), &[1.0], &[0.0]),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        QuantParams::from_range(QuantScheme::default(), &[f32::NEG_INFINITY], &[0.0]),
        Err(Error::NonFinite(_))
    ));
    let int4 = QuantParams::from_tensor(
        QuantScheme::default().with_dtype(QuantDtype::Int4),
        x.view(),
    )
    .unwrap();
    assert_eq!(quantize(x.view(), &int4).unwrap().nbytes(), 2);
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            // Box–Muller.
            let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

fn sqnr_db(x: &[f32], range: (f32, f32)) -> f64 {
    let scheme = QuantScheme::default();
    let p = QuantParams::from_range(scheme, &[range.0], &[range.1]).unwrap();
    let a = ArrayD::from_shape_vec(IxDyn(&[x.len()]), x.to_vec()).unwrap();
    let back = fake_quantize(a.view(), &p).unwrap();
    let signal: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = x
        .iter()
        .zip(back.iter())
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    10.0 * (signal / noise).log10()
}

#[test]
fn kld_beats_min_max_on_the_bulk_of_data_with_outliers() {
    let mut data = gaussian(100_000, 1);
    let bulk = data.clone();
    for i in 0..10 {
        data[i * 997] = if i % 2 == 0 { 50.0 } else { -50.0 };
    }
    let x = ArrayD::from_shape_vec(IxDyn(&[data.len()]), data).unwrap();
    let mut kld = KldObserver::default();
    let mut mm = MinMaxObserver::new();
    kld.observe(x.view()).unwrap();
    mm.observe(x.view()).unwrap();
    let (rk, rm) = (kld.range().unwrap(), mm.range().unwrap());
    assert_eq!(rm, (-50.0, 50.0));
    assert!(rk.1 < 10.0 && rk.1 > 2.0, "KLD threshold {rk:?}");
    let (sk, sm) = (sqnr_db(&bulk, rk), sqnr_db(&bulk, rm));
    assert!(
        sk > sm + 10.0,
        "bulk SQNR: KLD {sk:.1} dB vs min-max {sm:.1} dB"
    );
    // Percentile and ACIQ also clip the outliers away. (MSE does not, rightly: ten values
    // clipped from 50 to ~4 cost more squared error than the coarser steps that keep them.)
    for mut obs in [
        Box::new(PercentileObserver::new(99.9).unwrap()) as Box<dyn Observer>,
        Box::new(AciqObserver::new(AciqDistribution::Gaussian, 8).unwrap()),
    ] {
        obs.observe(x.view()).unwrap();
        let r = obs.range().unwrap();
        assert!(r.1 < 10.0 && r.0 > -10.0 && r.1 > 2.0, "{r:?}");
        assert!(sqnr_db(&bulk, r) > sm + 10.0);
    }
}

#[test]
fn mse_search_clips_gaussian_tails_at_low_bit_widths() {
    let data = gaussian(100_000, 7);
    let x = ArrayD::from_shape_vec(IxDyn(&[data.len()]), data.clone()).unwrap();
    let mut mse = MseObserver::new(4).unwrap();
    let mut mm = MinMaxObserver::new();
    mse.observe(x.view()).unwrap();
    mm.observe(x.view()).unwrap();
    let (r, full) = (mse.range().unwrap(), mm.range().unwrap());
    // The 4-bit optimum for a unit Gaussian is near 2.5σ (ACIQ's analysis: 2.55σ).
    assert!(r.1 > 1.8 && r.1 < 3.3, "{r:?} of {full:?}");
    let int4 = QuantScheme::default().with_dtype(QuantDtype::Int4);
    let err = |range: (f32, f32)| {
        let p = QuantParams::from_range(int4, &[range.0], &[range.1]).unwrap();
        let back = fake_quantize(x.view(), &p).unwrap();
        data.iter()
            .zip(back.iter())
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
    };
    assert!(
        err(r) < 0.6 * err(full),
        "MSE {} vs min-max {}",
        err(r),
        err(full)
    );
}

#[test]
fn histogram_growth_keeps_every_count() {
    let mut grown = Histogram::new(64).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut all = Vec::new();
    for scale in [1.0f32, 3.0, 0.5, 20.0] {
        let batch: Vec<f32> = (0..1000).map(|_| rng.random_range(-scale..scale)).collect();
        grown.add(ndarray::aview1(&batch).into_dyn()).unwrap();
        all.extend(batch);
    }
    assert_eq!(grown.total(), 4000);
    assert_eq!(grown.counts().iter().sum::<u64>(), 4000);
    // Same counts as one pass over the final range (the edges line up; a value lying on an
    // edge may land in the neighbouring bin through float rounding).
    let mut once = Histogram::new(64).unwrap();
    let mut seed = vec![grown.upper()];
    seed.extend(&all);
    once.add(ndarray::aview1(&seed).into_dyn()).unwrap();
    let mut counts = once.counts().to_vec();
    counts[63] -= 1; // the seed value
    assert_eq!(once.upper(), grown.upper());
    let moved: u64 = counts
        .iter()
        .zip(grown.counts())
        .map(|(a, b)| a.abs_diff(*b))
        .sum();
    assert!(moved <= 4, "{counts:?} vs {:?}", grown.counts());
}

#[test]
fn observers_refuse_bad_data_and_report_empty() {
    let nan = ndarray::arr1(&[0.0f32, f32::INFINITY]).into_dyn();
    let mut obs: Vec<Box<dyn Observer>> = vec![
        Box::new(MinMaxObserver::new()),
        Box::new(MovingAverageObserver::new(0.01).unwrap()),
        Box::new(PercentileObserver::new(99.9).unwrap()),
        Box::new(KldObserver::default()),
        Box::new(MseObserver::new(8).unwrap()),
        Box::new(AciqObserver::new(AciqDistribution::Laplace, 4).unwrap()),
    ];
    for o in &mut obs {
        assert!(matches!(o.range(), Err(Error::Empty(_))));
        assert!(matches!(o.observe(nan.view()), Err(Error::NonFinite(_))));
        assert!(matches!(o.range(), Err(Error::Empty(_))));
        o.observe(ndarray::arr1(&[-1.0f32, 2.0]).into_dyn().view())
            .unwrap();
        let r = o.range().unwrap();
        assert!(r.0 <= 0.0 && r.1 > 0.0 && r.1 <= 2.0, "{r:?}");
        o.reset();
        assert!(matches!(o.range(), Err(Error::Empty(_))));
    }
    let mut ema = MovingAverageObserver::new(0.5).unwrap();
    ema.observe(ndarray::arr1(&[0.0f32, 2.0]).into_dyn().view())
        .unwrap();
    ema.observe(ndarray::arr1(&[-2.0f32, 4.0]).into_dyn().view())
        .unwrap();
    assert_eq!(ema.range().unwrap(), (-1.0, 3.0));
}

/// The data recipe the ONNX Runtime reference numbers were computed on: three LCG
/// "uniforms" summed per value, divided by `scale` in f32, with some outliers.
fn bell_recipe(n: usize, seed: u64, scale: f32, outliers: &[(usize, f32)]) -> Vec<f32> {
    let mut s = seed;
    let mut v: Vec<f32> = (0..n)
        .map(|_| {
            let mut tot = 0i64;
            for _ in 0..3 {
                s = (s * 1_103_515_245 + 12_345) % (1 << 31);
                tot += ((s >> 8) % 2001) as i64 - 1000;
            }
            tot as f32 / scale
        })
        .collect();
    for &(i, x) in outliers {
        v[i] = x;
    }
    v
}

/// Batches, num_bins, num_quantized_bins, and ORT's (min, max).
type OrtCase = (Vec<Vec<f32>>, usize, usize, (f32, f32));

#[test]
// The expected values are ORT's printouts of f32 numbers, digit for digit.
#[allow(clippy::excessive_precision)]
fn ort_entropy_flavour_reproduces_onnxruntime_thresholds() {
    use nncompress::quantizer::OrtEntropyObserver;
    // Reference: onnxruntime 1.32.0, `HistogramCollector("entropy", False, bins, qbins, ..)`
    // on exactly this data (computed once with `pip install onnxruntime`; ORT is not a
    // dependency). Each case: batches, num_bins, num_quantized_bins, ORT's (min, max).
    let relu: Vec<f32> = bell_recipe(20000, 2, 250.0, &[(9, 30.0)])
        .iter()
        .map(|&v| v.max(0.0))
        .collect();
    let cases: Vec<OrtCase> = vec![
        (
            vec![bell_recipe(20000, 1, 300.0, &[(5, 40.0), (77, -35.0)])],
            512,
            128,
            (-10.15625, 10.3125),
        ),
        (vec![relu], 2048, 128, (0.0, 9.404296875)),
        (
            vec![
                bell_recipe(5000, 3, 400.0, &[]),
                bell_recipe(5000, 4, 150.0, &[(1, 25.0)]),
            ],
            256,
            64,
            (-18.427501678466797, 18.484375),
        ),
        (
            vec![bell_recipe(3000, 5, 300.0, &[(2, 12.0)])],
            128,
            128,
            (-9.256667137145996, 12.0),
        ),
    ];
    for (batches, bins, qbins, want) in cases {
        let mut obs = OrtEntropyObserver::new(bins, qbins)
            .unwrap()
            .with_merge(nncompress::quantizer::OrtMerge::PerBatch);
        for b in &batches {
            obs.observe(ndarray::aview1(b).into_dyn()).unwrap();
        }
        assert_eq!(
            obs.range().unwrap(),
            want,
            "{bins} bins, {qbins} quantized bins"
        );
    }
}

#[test]
fn kld_ignores_the_mass_of_exact_zeros() {
    // 90% exact zeros (ReLU-like) and the rest spread evenly over (0, 1]: zeros are exact at any
    // range, so they must not pull the threshold down.
    let data: Vec<f32> = (0..100_000)
        .map(|i| {
            if i % 10 == 0 {
                ((i / 10) % 1000 + 1) as f32 / 1000.0
            } else {
                0.0
            }
        })
        .collect();
    let mut kld = KldObserver::default();
    kld.observe(ndarray::aview1(&data).into_dyn()).unwrap();
    let (lo, hi) = kld.range().unwrap();
    assert_eq!(lo, 0.0);
    assert!(hi > 0.9, "threshold {hi}");
    assert_eq!(kld.histogram().zeros(), 90_000);
}

/// ONNX rounds the f32 quotient: x = −3.0432498 (bits 0xc042c49b) over s = 0.0235 is exactly
/// −129.5 in f32 (the exact quotient is a hair above), so QuantizeLinear gives −130 + 5 = −125
/// where an f64 division gave −124. Per tensor and per channel, int8 and uint8.
#[test]
fn quantize_decides_ties_on_the_f32_quotient_as_onnx() {
    let x = f32::from_bits(0xc042_c49b);
    assert_eq!(x / 0.0235f32, -129.5);
    let per_tensor = |dtype, z| QuantParams {
        scheme: QuantScheme::default()
            .with_dtype(dtype)
            .with_mode(QuantMode::Affine)
            .with_narrow_range(false),
        scale: vec![0.0235],
        zero_point: vec![z],
    };
    let xs = ndarray::arr1(&[x]).into_dyn();
    let q = quantize(xs.view(), &per_tensor(QuantDtype::Int8, 5)).unwrap();
    assert_eq!(q.int_values().unwrap(), vec![-125]);
    let q = quantize(xs.view(), &per_tensor(QuantDtype::UInt8, 135)).unwrap();
    assert_eq!(q.int_values().unwrap(), vec![5]);
    let per_axis = QuantParams {
        scheme: QuantScheme::default()
            .with_mode(QuantMode::Affine)
            .with_granularity(Granularity::PerChannel { axis: 0 }),
        scale: vec![1.0, 0.0235],
        zero_point: vec![0, 5],
    };
    let xs = ndarray::arr2(&[[0.5f32], [x]]).into_dyn();
    assert_eq!(
        quantize(xs.view(), &per_axis)
            .unwrap()
            .int_values()
            .unwrap(),
        vec![0, -125]
    );
}

/// ±∞ saturates to the grid's ends (as ONNX does); NaN stays an error.
#[test]
fn quantize_saturates_infinities_and_refuses_nan() {
    let p = QuantParams::from_range(
        QuantScheme::default()
            .with_mode(QuantMode::Affine)
            .with_narrow_range(false),
        &[-1.0],
        &[1.0],
    )
    .unwrap();
    let xs = ndarray::arr1(&[f32::INFINITY, f32::NEG_INFINITY, 3e38, -3e38, 1e6]).into_dyn();
    assert_eq!(
        quantize(xs.view(), &p).unwrap().int_values().unwrap(),
        vec![127, -128, 127, -128, 127]
    );
    let nan = ndarray::arr1(&[f32::NAN]).into_dyn();
    assert!(matches!(
        quantize(nan.view(), &p),
        Err(nncompress::Error::NonFinite(_))
    ));
}

/// QuantizeLinear / DequantizeLinear of ONNX Runtime, replayed bit for bit from vectors its
/// Python package generated (`scripts/ort_quantize_vectors.py`): planted ties, saturation
/// (±1e6, ±3e38, ±∞), per tensor and per axis (0, 1, −1), int8 / uint8, int32 dequantize.
#[test]
fn ort_quantize_linear() {
    let text = include_str!("fixtures/ort_quantize_linear.txt");
    let floats = |s: &str| -> Vec<f32> {
        s.split(',')
            .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
            .collect()
    };
    let ints = |s: &str| -> Vec<i64> { s.split(',').map(|v| v.parse().unwrap()).collect() };
    let (mut quantized, mut dequantized, mut ties, mut old_rule_wrong) = (0, 0, 0, 0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(' ').collect();
        let [op, dtype, axis, shape, scales, zps, input, output] = f[..] else {
            panic!("malformed line {line}");
        };
        let shape: Vec<usize> = ints(shape).iter().map(|&d| d as usize).collect();
        let dtype = match dtype {
            "int8" => QuantDtype::Int8,
            "uint8" => QuantDtype::UInt8,
            _ => QuantDtype::Int32,
        };
        // ONNX's axis as given (negative ones included).
        let axis: Option<isize> = (axis != "-").then(|| axis.parse().unwrap());
        let params = QuantParams::per_axis(
            dtype,
            floats(scales),
            ints(zps).iter().map(|&z| z as i32).collect(),
            axis,
            shape.len(),
        )
        .unwrap();
        let granularity = params.scheme.granularity;
        if op == "quantize" {
            let x = ArrayD::from_shape_vec(IxDyn(&shape), floats(input)).unwrap();
            let want: Vec<i32> = ints(output).iter().map(|&v| v as i32).collect();
            let got = quantize(x.view(), &params).unwrap().int_values().unwrap();
            for (i, ((&g, &w), &v)) in got.iter().zip(&want).zip(x.iter()).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{line:.40}…: element {i} = {v:e} ({:08x})",
                    v.to_bits()
                );
            }
            // Count the planted ties actually present (f32 quotient exactly k + 0.5).
            let c = |i: usize| match granularity {
                Granularity::PerTensor => 0,
                Granularity::PerChannel { axis } => {
                    (i / shape[axis + 1..].iter().product::<usize>()) % shape[axis]
                }
            };
            for (i, &v) in x.iter().enumerate() {
                let s = params.scale[c(i)];
                let q = v / s;
                if q.is_finite() && q.fract().abs() == 0.5 {
                    ties += 1;
                    // Where the exact quotient is not the tie, an f64 division rounds the
                    // other way: these are the elements the f32 rule exists for.
                    let exact = (f64::from(v) / f64::from(s)).round_ties_even();
                    old_rule_wrong += usize::from(exact != f64::from(q.round_ties_even()));
                }
            }
            quantized += got.len();
        } else {
            let values: Vec<i64> = ints(input);
            let data = match dtype {
                QuantDtype::Int8 => QData::I8(values.iter().map(|&v| v as i8).collect()),
                QuantDtype::UInt8 => QData::U8(values.iter().map(|&v| v as u8).collect()),
                _ => QData::I32(values.iter().map(|&v| v as i32).collect()),
            };
            let q = QTensor {
                data,
                shape: shape.clone(),
                params,
            };
            let got = dequantize(&q).unwrap();
            for (i, (g, w)) in got.iter().zip(floats(output)).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{line:.40}…: element {i}: {g} vs {w}"
                );
            }
            dequantized += got.len();
        }
    }
    println!(
        "{quantized} quantized ({ties} f32 ties, {old_rule_wrong} of them rounded otherwise \
         in f64), {dequantized} dequantized"
    );
    assert!(quantized > 800 && dequantized > 400 && ties > 150 && old_rule_wrong > 50);
}

/// 20,000 samples of each distribution of issue 14's list (seeded).
fn calibration_cases() -> Vec<(&'static str, Vec<Vec<f32>>)> {
    let mut rng = StdRng::seed_from_u64(14);
    let mut uniform = move || rng.random::<f64>().max(1e-12);
    let mut normal = || {
        let (u, v) = (uniform(), uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let n = 20_000;
    let draw = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f() as f32).collect::<Vec<_>>();
    let minus_one = draw(&mut || -1.0 + 0.1 * normal());
    let two = draw(&mut || 2.0 + 0.5 * normal());
    let relu = draw(&mut || normal().max(0.0));
    let mut uniform2 = {
        let mut r = StdRng::seed_from_u64(15);
        move || r.random::<f64>().max(1e-12)
    };
    // The difference of two unit exponentials is Laplace(0, 1).
    let laplace = draw(&mut || uniform2().ln() - uniform2().ln());
    let mut normal2 = {
        let mut r = StdRng::seed_from_u64(16);
        move || {
            let (u, v) = (r.random::<f64>().max(1e-12), r.random::<f64>());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    };
    // Student's t with 3 degrees of freedom: z / sqrt(χ²₃ / 3).
    let student = draw(&mut || {
        let z = normal2();
        let chi: f64 = (0..3).map(|_| normal2().powi(2)).sum();
        z / (chi / 3.0).sqrt()
    });
    let mut i = 0;
    let sparse = draw(&mut || {
        i += 1;
        if i % 10 == 0 {
            normal2().abs()
        } else {
            0.0
        }
    });
    let mut late: Vec<Vec<f32>> = (0..3).map(|_| draw(&mut || normal2())).collect();
    late.push(vec![1000.0]);
    vec![
        ("N(-1, 0.1)", vec![minus_one]),
        ("N(2, 0.5)", vec![two]),
        ("relu", vec![relu]),
        ("Laplace", vec![laplace]),
        ("Student-t(3)", vec![student]),
        ("90 % sparse relu", vec![sparse]),
        ("late 1000 outlier", late),
    ]
}

/// Neither entropy flavour may collapse or hang on issue 14's cases: the TensorRT flavour's
/// range keeps ≥ 99 % of the samples of every case (it collapsed to [−0.54016, −0.53973]
/// on N(−1, 0.1)); each calibration of 20,000 samples takes under a second at 8001 bins,
/// the ORT flavour's included, whose per-batch histogram stays under its cap (ORT itself
/// widens to 34,120 bins on the late outlier at 128 bins, 2.26 M at 8001).
#[test]
fn kld_keeps_one_sided_data_and_stays_fast() {
    use nncompress::quantizer::{OrtEntropyObserver, OrtMerge, DEFAULT_ORT_MAX_BINS};
    let second = std::time::Duration::from_secs(1);
    for (name, batches) in calibration_cases() {
        let all: Vec<f32> = batches.concat();
        let coverage = |(lo, hi): (f32, f32)| {
            all.iter().filter(|&&v| v >= lo && v <= hi).count() as f64 / all.len() as f64
        };
        for bins in [2048, 8001] {
            let start = std::time::Instant::now();
            let mut guarded = KldObserver::new(bins, 128).unwrap();
            for b in &batches {
                guarded.observe(ndarray::aview1(b).into_dyn()).unwrap();
            }
            let kept = coverage(guarded.range().unwrap());
            let took = start.elapsed();
            let mut plain = KldObserver::new(bins, 128)
                .unwrap()
                .with_min_coverage(0.0)
                .unwrap();
            for b in &batches {
                plain.observe(ndarray::aview1(b).into_dyn()).unwrap();
            }
            println!(
                "{name:>18} {bins:>5} bins: keeps {:7.3} % in {:?} ({:7.3} % unguarded, range {:?})",
                100.0 * kept,
                took,
                100.0 * coverage(plain.range().unwrap()),
                plain.range().unwrap()
            );
            assert!(kept >= 0.99, "{name}, {bins} bins: keeps {kept}");
            assert!(took < second, "{name}: {took:?}");
            assert_eq!(guarded.histogram().counts().len(), bins);
            for merge in [OrtMerge::Stacked, OrtMerge::PerBatch] {
                let start = std::time::Instant::now();
                let mut ort = OrtEntropyObserver::new(bins, 128)
                    .unwrap()
                    .with_merge(merge);
                for b in &batches {
                    ort.observe(ndarray::aview1(b).into_dyn()).unwrap();
                }
                let range = ort.range().unwrap();
                let took = start.elapsed();
                let hist_bins = ort.histogram().unwrap().counts().len();
                println!(
                    "{:>18} {bins:>5} bins, ORT {merge:?}: keeps {:7.3} % in {took:?}, \
                     {hist_bins} bins",
                    "",
                    100.0 * coverage(range)
                );
                assert!(took < second, "{name} ORT {merge:?}: {took:?}");
                assert!(
                    hist_bins <= DEFAULT_ORT_MAX_BINS.max(bins),
                    "{hist_bins} bins"
                );
            }
        }
    }
}

/// Multi-batch entropy calibration as ONNX Runtime 1.32 does it, both ways, from
/// `scripts/ort_entropy_vectors.py`: `OrtMerge::Stacked` equals `quantize_static`
/// (stack, histogram once) on every (case, setting), `OrtMerge::PerBatch` with the bin cap
/// raised to `MAX_HISTOGRAM_BINS` equals `HistogramCollector.collect` per batch where ORT
/// finishes (all but the late outlier); at the default cap the per-batch histograms that
/// widened past it are merged and may differ.
#[test]
fn ort_entropy_multi_batch() {
    use nncompress::quantizer::{
        OrtEntropyObserver, OrtMerge, DEFAULT_ORT_MAX_BINS, MAX_HISTOGRAM_BINS,
    };
    let text = include_str!("fixtures/ort_entropy_ranges.txt");
    let hex = |h: &str| f32::from_bits(u32::from_str_radix(h, 16).unwrap());
    let (mut name, mut batches) = (String::new(), Vec::<Vec<f32>>::new());
    let (mut compared, mut modes_differ, mut capped_differ) = (0, 0, 0);
    let mut stacked_range = None;
    for line in text.lines() {
        let (kind, rest) = line.split_once(' ').unwrap();
        match kind {
            "case" => (name, batches) = (rest.to_string(), Vec::new()),
            "batch" => batches.push(rest.split(',').map(hex).collect()),
            _ => {
                let f: Vec<&str> = rest.split(' ').collect();
                let [mode, bins, qbins, lo, hi] = f[..] else {
                    panic!("malformed {line}");
                };
                let merge = if mode == "stacked" {
                    OrtMerge::Stacked
                } else {
                    OrtMerge::PerBatch
                };
                let (bins, qbins) = (bins.parse().unwrap(), qbins.parse().unwrap());
                let run = |max_bins: usize| {
                    let mut obs = OrtEntropyObserver::new(bins, qbins)
                        .unwrap()
                        .with_merge(merge)
                        .with_max_bins(max_bins)
                        .unwrap();
                    for b in &batches {
                        obs.observe(ndarray::aview1(b).into_dyn()).unwrap();
                    }
                    (
                        obs.range().unwrap(),
                        obs.histogram().unwrap().counts().len(),
                    )
                };
                let want = (hex(lo), hex(hi));
                let (exact, ort_bins) = run(MAX_HISTOGRAM_BINS);
                assert_eq!(exact, want, "{name}, {mode}, {bins}/{qbins}");
                let cap = DEFAULT_ORT_MAX_BINS.max(bins);
                let (capped, capped_bins) = run(cap);
                assert!(capped_bins <= cap);
                if capped != want {
                    // Only a histogram ORT widened past the cap may come out otherwise.
                    assert!(ort_bins > cap, "{name}, {mode}, {bins}/{qbins}");
                    capped_differ += 1;
                }
                compared += 1;
                if merge == OrtMerge::Stacked {
                    stacked_range = Some(want);
                } else if stacked_range != Some(want) {
                    modes_differ += 1;
                }
            }
        }
    }
    println!(
        "{compared} ORT ranges reproduced; per batch ≠ stacked in {modes_differ} settings; \
         {capped_differ} differ at the default cap"
    );
    assert_eq!(compared, 85);
    assert!(capped_differ <= 2);
    assert!(modes_differ > 10);
}

/// Both flavours search a histogram handed to them as they search their own, and say which
/// window they chose.
#[test]
fn entropy_searches_run_on_ready_histograms() {
    use nncompress::quantizer::{OrtEntropyObserver, OrtHistogram, OrtMerge};
    for (name, batches) in calibration_cases() {
        let mut kld = KldObserver::default();
        let mut ort = OrtEntropyObserver::new(2048, 128)
            .unwrap()
            .with_merge(OrtMerge::PerBatch);
        for b in &batches {
            kld.observe(ndarray::aview1(b).into_dyn()).unwrap();
            ort.observe(ndarray::aview1(b).into_dyn()).unwrap();
        }
        let h = kld.histogram();
        let ready =
            Histogram::from_counts(h.counts().to_vec(), h.upper(), h.zeros(), h.min_max()).unwrap();
        let again = KldObserver::from_histogram(ready, 128).unwrap();
        assert_eq!(again.best_bin().unwrap(), kld.best_bin().unwrap(), "{name}");
        assert_eq!(again.range().unwrap(), kld.range().unwrap(), "{name}");
        let (lo, hi) = kld.range().unwrap();
        let edge = (kld.best_bin().unwrap() as f32 + 0.5) * h.bin_width();
        assert!(lo >= -edge && hi <= edge, "{name}");

        let h = ort.histogram().unwrap();
        let ready = OrtHistogram::new(
            h.counts().to_vec(),
            h.edges().to_vec(),
            h.min_max(),
            h.threshold(),
        )
        .unwrap();
        let again = OrtEntropyObserver::from_histogram(ready, 128).unwrap();
        let i = again.best_bin().unwrap();
        assert_eq!(i, ort.best_bin().unwrap(), "{name}");
        assert_eq!(again.range().unwrap(), ort.range().unwrap(), "{name}");
        let zero = h.counts().len() / 2;
        let (lo, hi) = ort.range().unwrap();
        assert_eq!(lo, h.edges()[zero - i].max(h.min_max().0), "{name}");
        let end = (zero + i + 1).min(h.counts().len());
        assert_eq!(hi, h.edges()[end].min(h.min_max().1), "{name}");
    }
    // Inconsistent parts are refused.
    assert!(Histogram::from_counts(vec![1, 2], 1.0, 2, Some((0.0, 1.0))).is_err());
    assert!(Histogram::from_counts(vec![1, 2], 1.0, 0, Some((0.0, 2.0))).is_err());
    assert!(Histogram::from_counts(vec![1, 2], 1.0, 0, None).is_err());
    assert!(Histogram::from_counts(vec![u64::MAX, 1], 1.0, 0, Some((0.0, 1.0))).is_err());
    assert!(OrtHistogram::new(vec![1, 2], vec![-1.0, 1.0], (0.0, 1.0), 1.0).is_err());
    assert!(OrtHistogram::new(vec![1, 2], vec![1.0, 0.0, -1.0], (0.0, 1.0), 1.0).is_err());
    assert!(OrtHistogram::new(vec![1], vec![-1.0, 1.0], (1.0, 0.0), 1.0).is_err());
    assert!(OrtHistogram::new(vec![1], vec![-1.0, 1.0], (0.0, 1.0), f32::NAN).is_err());
}

/// A per-batch ORT histogram keeps every count and a sane range however far a late batch
/// reaches (1000 or 3e38 after Laplace(0, 1) values; ±f32::MAX, whose width overflows f32),
/// and stays under its cap.
#[test]
fn ort_per_batch_survives_absurd_outliers() {
    use nncompress::quantizer::{OrtEntropyObserver, OrtMerge, DEFAULT_ORT_MAX_BINS};
    let normal: Vec<f32> = calibration_cases()[3].1[0].clone();
    for late in [vec![1000.0f32], vec![3e38], vec![f32::MAX, f32::MIN]] {
        for bins in [128, 2048, 8001] {
            let mut ort = OrtEntropyObserver::new(bins, 128)
                .unwrap()
                .with_merge(OrtMerge::PerBatch);
            ort.observe(ndarray::aview1(&normal).into_dyn()).unwrap();
            ort.observe(ndarray::aview1(&late).into_dyn()).unwrap();
            let h = ort.histogram().unwrap();
            let total: u64 = h.counts().iter().sum();
            assert_eq!(total as usize, normal.len() + late.len(), "{late:?} {bins}");
            assert!(h.counts().len() <= DEFAULT_ORT_MAX_BINS.max(bins));
            assert!(h.edges().iter().all(|e| e.is_finite()));
            let (lo, hi) = ort.range().unwrap();
            assert!(
                lo.is_finite() && hi.is_finite() && lo < 0.0 && hi > 0.0,
                "{lo} {hi}"
            );
        }
    }
}
