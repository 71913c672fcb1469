//! Weight-only int4 per group (issue 17): GPTQ and round-to-nearest against a direct NumPy
//! float64 port of the reference implementation (`scripts/gptq_reference.py`), and the
//! typed errors of bad input.

mod fetched;

use ndarray::{Array2, ArrayD};
use nncompress::io::{load_npy, npy_to_bytes};
use nncompress::limits::Limits;
use nncompress::quantizer::{quantize_gptq, quantize_rtn, GptqConfig, GroupScheme, Hessian};
use nncompress::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Calibration inputs with correlated features (as a layer's inputs are), and weights.
fn layer(out: usize, inp: usize, tokens: usize, seed: u64) -> (Array2<f32>, Array2<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let basis = Array2::from_shape_simple_fn((8, inp), || rng.random_range(-1.0f32..1.0));
    let x = Array2::from_shape_fn((tokens, inp), |(t, c)| {
        let mix: f32 = (0..8)
            .map(|b| basis[[b, c]] * ((t * 7 + b * 3) % 11) as f32 / 11.0)
            .sum();
        mix + 0.3 * rng.random_range(-1.0f32..1.0) * (1 + c % 3) as f32
    });
    let w = Array2::from_shape_simple_fn((out, inp), || rng.random_range(-0.5f32..0.5));
    (w, x)
}

#[test]
fn gptq_and_rtn_equal_the_numpy_reference() {
    let Some(py) = fetched::python_with("numpy") else {
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/gptq-reference");
    std::fs::create_dir_all(&dir).unwrap();
    let (w, x) = layer(24, 64, 300, 5);
    std::fs::write(dir.join("w.npy"), npy_to_bytes(&w.clone().into_dyn())).unwrap();
    std::fs::write(dir.join("x.npy"), npy_to_bytes(&x.clone().into_dyn())).unwrap();
    let mut h = Hessian::new(64);
    // In two batches, as calibration arrives.
    h.add_rows(x.slice(ndarray::s![..120, ..])).unwrap();
    h.add_rows(x.slice(ndarray::s![120.., ..])).unwrap();
    for (act_order, symmetric) in [(false, false), (true, false), (false, true), (true, true)] {
        let scheme = GroupScheme {
            bits: 4,
            group: 16,
            symmetric,
        };
        let config = GptqConfig {
            damp: 0.01,
            block: 32,
            act_order,
        };
        let out = dir.join(format!("q_{act_order}_{symmetric}"));
        let mut cmd = std::process::Command::new(&py);
        cmd.arg(root.join("scripts/gptq_reference.py"))
            .arg(dir.join("w.npy"))
            .arg(dir.join("x.npy"))
            .arg(&out)
            .args([
                "--bits", "4", "--group", "16", "--block", "32", "--damp", "0.01",
            ]);
        if act_order {
            cmd.arg("--act-order");
        }
        if symmetric {
            cmd.arg("--sym");
        }
        let status = cmd.output().unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let read = |suffix: &str| -> ArrayD<f32> {
            load_npy(
                format!("{}.{suffix}.npy", out.display()),
                &Limits::default(),
            )
            .unwrap()
        };
        let ours = quantize_gptq(&w, &h, scheme, &config).unwrap().dequantize();
        let want = read("deq");
        let worst = ours
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "gptq act_order={act_order} sym={symmetric}: {worst}"
        );
        let rtn = quantize_rtn(&w, scheme).unwrap().dequantize();
        let worst = rtn
            .iter()
            .zip(read("rtn").iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "rtn sym={symmetric}: {worst}");
        // GPTQ's point: a smaller output error on the calibration inputs than rounding.
        let err = |q: &Array2<f32>| {
            let d = x.dot(&(&w - q).t());
            d.iter().map(|v| f64::from(v * v)).sum::<f64>()
        };
        assert!(
            err(&ours) < err(&rtn),
            "act_order={act_order} sym={symmetric}"
        );
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let (w, x) = layer(4, 48, 40, 1);
    let mut h = Hessian::new(48);
    // A group that does not divide the width; unsupported bits.
    for scheme in [
        GroupScheme::int4(32),
        GroupScheme {
            bits: 9,
            ..GroupScheme::int4(16)
        },
    ] {
        assert!(matches!(
            quantize_rtn(&w, scheme),
            Err(Error::InvalidConfig { .. })
        ));
    }
    // GPTQ without calibration rows for the layer.
    let r = quantize_gptq(&w, &h, GroupScheme::int4(16), &GptqConfig::default());
    assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    // Calibration rows of another width, NaN activations, a Hessian of another layer.
    assert!(matches!(
        h.add_rows(Array2::<f32>::zeros((3, 47)).view()),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan = x.clone();
    nan[[2, 3]] = f32::NAN;
    assert!(matches!(h.add_rows(nan.view()), Err(Error::NonFinite(_))));
    h.add_rows(x.view()).unwrap();
    let other = Hessian::new(32);
    let r = quantize_gptq(&w, &other, GroupScheme::int4(16), &GptqConfig::default());
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
    // NaN weights; a zero block; negative damping.
    let mut bad = w.clone();
    bad[[0, 0]] = f32::INFINITY;
    assert!(matches!(
        quantize_rtn(&bad, GroupScheme::int4(16)),
        Err(Error::NonFinite(_))
    ));
    for config in [
        GptqConfig {
            block: 0,
            ..GptqConfig::default()
        },
        GptqConfig {
            damp: -1.0,
            ..GptqConfig::default()
        },
    ] {
        let r = quantize_gptq(&w, &h, GroupScheme::int4(16), &config);
        assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    }
    // The stored size of 4-bit codes: two a byte, plus the scales and zero points.
    let q = quantize_gptq(&w, &h, GroupScheme::int4(16), &GptqConfig::default()).unwrap();
    assert_eq!(q.stored_bytes(), 4 * 48 / 2 + 4 * 4 * 3 + 4 * 3);
}
