//! "No public function panics on user input": hostile calls on every public module —
//! degenerate sizes, NaN and infinity, mismatched lengths, huge dimensions, foreign codes and
//! names — each run under `catch_unwind`. A call may return any `Err` (or `Ok` where the input
//! is merely odd), never panic. The suite runs in debug (`cargo test`, where arithmetic
//! overflow panics) and in release (`cargo test --release`, what CI runs).
//!
//! The named reproducers of the robustness audit are in `tests/hostile_files.rs` (files) and
//! in the `reproducer_*` tests below (calls).

use ndarray::{Array, Array2, Array4, ArrayD, IxDyn};
use nncompress::distiller::{AttentionTransfer, Distiller, FitNet, Fsp, LogitKd};
use nncompress::kernels::{
    self, ConvSpec, Dequantize, KernelChoice, PackedConv, PackedWeights, Requantize,
};
use nncompress::limits::Limits;
use nncompress::model::{Conv2dConfig, Graph, GraphBuilder, Mode, Op, Pool2d};
use nncompress::nas::{
    self, CnnArch, CnnSpace, Controller, RandomSearch, RegularizedEvolution, Reinforce,
    SearchSpace, Stage,
};
use nncompress::pruner::deep_compression::{
    self as dc, Compressed, DeepCompressionConfig, HuffmanCode, SharedLayer, SharedWeights,
};
use nncompress::pruner::{
    self, L1Norm, LassoPruner, Magnitude, Schedule, StructuredPruner, UnstructuredPruner,
};
use nncompress::quantizer::{
    self, Calibration, Granularity, Histogram, KldObserver, MovingAverageObserver, Observer,
    OrtEntropyObserver, PercentileObserver, QData, QTensor, QuantConfig, QuantParams, QuantScheme,
    Quantizer,
};
use nncompress::tensor::{ConvGeometry, QuantGrid};
use nncompress::train::{self, Dataset, InMemoryDataset, Sgd, TrainConfig, Trainer};
use nncompress::Error;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Collects the names of calls that panicked.
#[derive(Default)]
struct Probe {
    calls: usize,
    panics: Vec<String>,
}

impl Probe {
    /// Runs `f`; a panic is recorded, any return value is fine.
    fn call<T>(&mut self, name: &str, f: impl FnOnce() -> T) {
        self.calls += 1;
        if catch_unwind(AssertUnwindSafe(|| drop(f()))).is_err() {
            self.panics.push(name.to_string());
        }
    }

    /// Runs `f` and also requires an `Err`: the input is invalid, so `Ok` would be a silently
    /// wrong result.
    fn refuses<T>(&mut self, name: &str, f: impl FnOnce() -> nncompress::Result<T>) {
        self.calls += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(_) => self.panics.push(name.to_string()),
            Ok(Ok(_)) => self.panics.push(format!("{name} (accepted invalid input)")),
            Ok(Err(_)) => {}
        }
    }

    fn finish(self, module: &str) {
        println!("{module}: {} hostile calls", self.calls);
        // The quiet panic hook would swallow the assertion's message: print it first.
        for name in &self.panics {
            println!("  misbehaved: {name}");
        }
        assert!(
            self.panics.is_empty(),
            "{module}: {} of {} calls misbehaved: {:#?}",
            self.panics.len(),
            self.calls,
            self.panics
        );
    }
}

fn quiet() {
    std::panic::set_hook(Box::new(|_| {}));
}

fn tiny() -> Graph {
    let mut b = GraphBuilder::new(1);
    b.input("input", &[1, 6, 6])
        .conv2d("conv", "input", Conv2dConfig::new(1, 4, 3))
        .batch_norm2d("bn", "conv", 4)
        .relu("relu", "bn")
        .max_pool2d("pool", "relu", Pool2d::new(2, 2))
        .flatten("flat", "pool")
        .linear("fc", "flat", 16, 3, true);
    b.build("fc").unwrap()
}

fn images(n: usize) -> ArrayD<f32> {
    Array::from_shape_fn(IxDyn(&[n, 1, 6, 6]), |i| {
        ((i[0] + i[2] * 3 + i[3]) % 5) as f32 / 5.0
    })
}

fn data(n: usize) -> InMemoryDataset {
    InMemoryDataset::new(images(n), (0..n).map(|i| i % 3).collect(), 3).unwrap()
}

const HUGE: usize = 1 << 40;

#[test]
fn tensor_and_limits() {
    quiet();
    let mut p = Probe::default();
    for padding in [usize::MAX / 2 + 1, usize::MAX, 1 << 62, 1 << 33] {
        let geo = ConvGeometry {
            in_channels: 1,
            in_h: 4,
            in_w: 4,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [padding, 0],
            dilation: [1, 1],
            groups: 1,
        };
        p.refuses("output_hw huge padding", || geo.output_hw());
    }
    for (kernel, dilation) in [([usize::MAX, 1], [2, 1]), ([1 << 40, 1], [1 << 40, 1])] {
        let geo = ConvGeometry {
            in_channels: 1,
            in_h: 4,
            in_w: 4,
            kernel,
            stride: [1, 1],
            padding: [0, 0],
            dilation,
            groups: 1,
        };
        p.refuses("output_hw huge window", || geo.output_hw());
    }
    let zero = ConvGeometry {
        in_channels: 0,
        in_h: 0,
        in_w: 0,
        kernel: [0, 0],
        stride: [0, 0],
        padding: [0, 0],
        dilation: [0, 0],
        groups: 0,
    };
    p.refuses("output_hw zeros", || zero.output_hw());
    p.call("group_channels zero groups", || zero.group_channels());
    let x = Array4::<f32>::zeros((1, 1, 4, 4));
    p.refuses("im2col bad geometry", || kernels_im2col(&x, &zero));
    p.call("valid_outputs extremes", || {
        let g = ConvGeometry {
            padding: [usize::MAX / 4, 0],
            ..zero
        };
        g.valid_outputs(0, 0, usize::MAX / 4, 1)
    });
    let grid = QuantGrid {
        qmin: -128,
        qmax: 127,
        symmetric: true,
    };
    for (x, s) in [
        (f32::NAN, 1.0),
        (f32::INFINITY, 1.0),
        (1.0, 0.0),
        (1.0, f32::NAN),
        (3e38, 1e-38),
    ] {
        p.call("QuantGrid::quantize odd", || grid.quantize(x, s, 0));
    }
    p.call("QuantGrid::params nan", || {
        grid.params(f32::NAN, f32::INFINITY)
    });
    let inverted = QuantGrid {
        qmin: 10,
        qmax: -10,
        symmetric: false,
    };
    p.call("QuantGrid inverted", || inverted.quantize(1.0, 1.0, 0));
    p.refuses("limits overflow", || {
        Limits::default().check_elements(&[HUGE, HUGE], "x")
    });
    p.refuses("as_4d of 2-d", || {
        nncompress::tensor::as_4d(&ArrayD::zeros(IxDyn(&[2, 2])), "op", None).map(|_| ())
    });
    p.refuses("check_finite nan", || {
        nncompress::tensor::check_finite(&ArrayD::from_elem(IxDyn(&[2]), f32::NAN), "x")
    });
    p.finish("tensor");
}

fn kernels_im2col(x: &Array4<f32>, geo: &ConvGeometry) -> nncompress::Result<()> {
    nncompress::tensor::im2col(x.view(), geo, 0).map(|_| ())
}

/// The ONNX-convention entry points: zero points out of range or of the wrong count, a
/// requantization for the other output type, shapes that do not fit, pads past the limits.
fn integer_conventions(p: &mut Probe) {
    use kernels::{
        conv_integer, matmul_integer, qlinear_conv, qlinear_matmul, Int8Matrix, Int8MatrixMut,
        Int8Tensor4, MultiplierRule, QuantizedOutput,
    };
    let w8 = Array2::<u8>::from_elem((4, 8), 200);
    let a8 = Array2::<i8>::from_elem((3, 8), -100);
    p.refuses("from_int8 u8 zero point 256", || {
        PackedWeights::from_int8(Int8Matrix::U8(w8.view()), &[256])
    });
    p.refuses("from_int8 i8 zero point -129", || {
        PackedWeights::from_int8(Int8Matrix::I8(a8.view()), &[-129])
    });
    p.refuses("from_int8 3 zero points for 4 channels", || {
        PackedWeights::from_int8(Int8Matrix::U8(w8.view()), &[1, 2, 3])
    });
    let pw = PackedWeights::from_int8(Int8Matrix::U8(w8.view()), &[7, 8, 9, 10]).unwrap();
    let mut out = Array2::<i32>::zeros((3, 4));
    p.refuses("matmul_integer i8 zero point 128", || {
        matmul_integer(Int8Matrix::I8(a8.view()), 128, &pw, None, out.view_mut())
    });
    p.refuses("matmul_integer u8 zero point -1", || {
        let a = Array2::<u8>::zeros((3, 8));
        matmul_integer(Int8Matrix::U8(a.view()), -1, &pw, None, out.view_mut())
    });
    p.refuses("matmul_integer wrong k", || {
        let a = Array2::<i8>::zeros((3, 7));
        matmul_integer(Int8Matrix::I8(a.view()), 0, &pw, None, out.view_mut())
    });
    p.refuses("matmul_integer short bias", || {
        matmul_integer(
            Int8Matrix::I8(a8.view()),
            0,
            &pw,
            Some(&[1]),
            out.view_mut(),
        )
    });
    let scales =
        |out| Requantize::from_scales(vec![0; 4], 0.1, &[0.01], 0.2, out, MultiplierRule::F32);
    p.refuses("from_scales nan scale", || {
        Requantize::from_scales(
            vec![0; 4],
            f32::NAN,
            &[0.01],
            0.2,
            QuantizedOutput::U8(0),
            MultiplierRule::F64,
        )
    });
    p.refuses("from_scales 2 weight scales for 4", || {
        Requantize::from_scales(
            vec![0; 4],
            0.1,
            &[0.01, 0.02],
            0.2,
            QuantizedOutput::U8(0),
            MultiplierRule::F64,
        )
    });
    p.refuses("from_scales zero output scale", || {
        Requantize::from_scales(
            vec![0; 4],
            0.1,
            &[0.01],
            0.0,
            QuantizedOutput::I8(0),
            MultiplierRule::F64,
        )
    });
    let signed = scales(QuantizedOutput::I8(-3)).unwrap();
    let unsigned = scales(QuantizedOutput::U8(3)).unwrap();
    p.refuses("qlinear_matmul i8 requant into u8", || {
        let mut o = Array2::<u8>::zeros((3, 4));
        qlinear_matmul(
            Int8Matrix::I8(a8.view()),
            0,
            &pw,
            &signed,
            Int8MatrixMut::U8(o.view_mut()),
        )
    });
    p.refuses("qlinear_matmul u8 requant into i8", || {
        let mut o = Array2::<i8>::zeros((3, 4));
        qlinear_matmul(
            Int8Matrix::I8(a8.view()),
            0,
            &pw,
            &unsigned,
            Int8MatrixMut::I8(o.view_mut()),
        )
    });
    p.refuses("gemm_u8i8_u8 with an i8 requant", || {
        let a = Array2::<u8>::zeros((3, 8));
        let mut o = Array2::<u8>::zeros((3, 4));
        kernels::gemm_u8i8_u8(a.view(), 0, &pw, &signed, o.view_mut())
    });
    let w4 = Array4::<i8>::from_elem((4, 2, 3, 3), 5);
    let x4 = Array4::<i8>::from_elem((1, 2, 5, 5), 1);
    p.refuses("PackedConv::from_int8 5 zero points for 4", || {
        PackedConv::from_int8(Int8Tensor4::I8(w4.view()), &[0; 5], ConvSpec::default())
    });
    for pads in [
        [0, 0, 1, 0],
        [usize::MAX, 0, 1, 0],
        [0, 1 << 40, 0, 0],
        [3, 0, 0, 9],
    ] {
        let spec = ConvSpec::default().with_pads(pads);
        let Ok(conv) = PackedConv::from_int8(Int8Tensor4::I8(w4.view()), &[1, 2, 3, 4], spec)
        else {
            continue;
        };
        let name = format!("conv_integer pads {pads:?}");
        if pads[0] == usize::MAX || pads[1] == 1 << 40 {
            p.refuses(&name, || {
                conv_integer(Int8Tensor4::I8(x4.view()), 0, &conv, None)
            });
        } else {
            p.call(&name, || {
                conv_integer(Int8Tensor4::I8(x4.view()), 0, &conv, None)
            });
        }
        p.refuses("qlinear_conv i8 zero point 200", || {
            qlinear_conv(Int8Tensor4::I8(x4.view()), 200, &conv, &signed)
        });
    }
}

#[test]
fn kernels() {
    quiet();
    let mut p = Probe::default();
    let w = Array2::<i8>::from_elem((4, 8), 1);
    let a = Array2::<u8>::from_elem((3, 8), 2);
    for kernel in KernelChoice::ALL {
        p.call("PackedWeights::with_kernel", || {
            PackedWeights::with_kernel(w.view(), kernel)
        });
        let Ok(pw) = PackedWeights::with_kernel(w.view(), kernel) else {
            continue;
        };
        let mut out = Array2::<i32>::zeros((3, 4));
        p.refuses("gemm wrong k", || {
            let a = Array2::<u8>::zeros((3, 7));
            kernels::gemm_u8i8_i32(a.view(), 0, &pw, None, out.view_mut())
        });
        p.refuses("gemm short bias", || {
            kernels::gemm_u8i8_i32(a.view(), 0, &pw, Some(&[1, 2]), out.view_mut())
        });
        p.refuses("gemm wrong out", || {
            let mut o = Array2::<i32>::zeros((2, 4));
            kernels::gemm_u8i8_i32(a.view(), 0, &pw, None, o.view_mut())
        });
        let rq = Requantize::from_real(vec![0; 2], &[0.5, 0.5], 0).unwrap();
        p.refuses("gemm u8 epilogue of another width", || {
            let mut o = Array2::<u8>::zeros((3, 4));
            kernels::gemm_u8i8_u8(a.view(), 0, &pw, &rq, o.view_mut())
        });
        let dq = Dequantize::new(1.0, &[1.0; 3], None).unwrap();
        p.refuses("gemm f32 epilogue of another width", || {
            let mut o = Array2::<f32>::zeros((3, 4));
            kernels::gemm_u8i8_f32(a.view(), 0, &pw, &dq, o.view_mut())
        });
        p.call("gemm empty", || {
            let a = Array2::<u8>::zeros((0, 8));
            let mut o = Array2::<i32>::zeros((0, 4));
            kernels::gemm_u8i8_i32(a.view(), 0, &pw, None, o.view_mut())
        });
    }
    p.refuses("pack k past MAX_K", || {
        PackedWeights::new(Array2::<i8>::zeros((1, kernels::MAX_K + 1)).view())
    });
    p.refuses("requantize mismatched lengths", || {
        Requantize::new(vec![0; 3], vec![1 << 30; 2], vec![0; 3], 0)
    });
    p.refuses("requantize nan multiplier", || {
        Requantize::from_real(vec![0], &[f64::NAN], 0)
    });
    p.refuses("requantize negative multiplier", || {
        Requantize::from_real(vec![0], &[-1.0], 0)
    });
    p.call("requantize huge multiplier", || {
        Requantize::from_real(vec![0], &[1e300], 0)
    });
    p.refuses("dequantize nan scale", || {
        Dequantize::new(f32::NAN, &[1.0], None)
    });
    p.refuses("dequantize bias length", || {
        Dequantize::new(1.0, &[1.0], Some(vec![1.0, 2.0]))
    });
    let rq = Requantize::from_real(vec![0; 2], &[0.5, 0.5], 0).unwrap();
    p.refuses("Requantize::apply past channels", || rq.apply(2, 1));
    p.refuses("Requantize::apply usize::MAX", || {
        rq.apply(usize::MAX, i32::MIN)
    });
    let dq = Dequantize::new(1.0, &[1.0], None).unwrap();
    p.refuses("Dequantize::apply past channels", || dq.apply(5, 1));
    p.refuses("with_clamp inverted", || rq.clone().with_clamp(200, 10));
    for (x, m, s) in [
        (i32::MIN, i32::MIN, 31),
        (i32::MAX, i32::MAX, -31),
        (i32::MIN, -1, 100),
        (1, 1, -100),
        (i32::MIN, i32::MAX, i32::MIN),
    ] {
        p.call("multiply_by_quantized_multiplier extremes", || {
            quantizer::multiply_by_quantized_multiplier(x, m, s)
        });
        p.call("rounding_divide_by_pot extremes", || {
            kernels::requant::rounding_divide_by_pot(x, s)
        });
    }
    for r in [
        0.0,
        f64::MIN_POSITIVE,
        1e-300,
        1e300,
        f64::INFINITY,
        f64::NAN,
        -1.0,
    ] {
        p.call("quantize_multiplier extremes", || {
            quantizer::quantize_multiplier(r)
        });
    }
    let w4 = Array4::<i8>::from_elem((4, 1, 3, 3), 1);
    for spec in [
        ConvSpec::default().with_stride(0),
        ConvSpec::default().with_groups(0),
        ConvSpec::default().with_groups(3),
        ConvSpec::default().with_dilation(0),
        ConvSpec::default().with_padding(usize::MAX / 2),
    ] {
        p.call("PackedConv::new odd spec", || {
            PackedConv::new(w4.view(), spec)
        });
        if let Ok(conv) = PackedConv::new(w4.view(), spec) {
            let x = Array4::<u8>::zeros((1, 1, 5, 5));
            let rq = Requantize::from_real(vec![0; 4], &[0.5; 4], 0).unwrap();
            p.refuses("conv with hostile spec", || {
                kernels::conv2d_u8i8_u8(x.view(), 0, &conv, &rq)
            });
        }
    }
    let conv = PackedConv::new(w4.view(), ConvSpec::default()).unwrap();
    p.refuses("conv wrong channels", || {
        kernels::conv2d_u8i8_i32(Array4::<u8>::zeros((1, 2, 5, 5)).view(), 0, &conv, None)
    });
    p.refuses("conv input smaller than kernel", || {
        kernels::conv2d_u8i8_i32(Array4::<u8>::zeros((1, 1, 2, 2)).view(), 0, &conv, None)
    });
    p.refuses("conv short bias", || {
        kernels::conv2d_nhwc_u8i8_i32(
            Array4::<u8>::zeros((1, 5, 5, 1)).view(),
            0,
            &conv,
            Some(&[1]),
        )
    });
    let dw = Array4::<i8>::from_elem((4, 1, 3, 3), 1);
    let depthwise = PackedConv::new(dw.view(), ConvSpec::default().with_groups(4)).unwrap();
    p.refuses("depthwise wrong channels", || {
        kernels::conv2d_nhwc_u8i8_i32(
            Array4::<u8>::zeros((1, 5, 5, 3)).view(),
            0,
            &depthwise,
            None,
        )
    });
    p.refuses("sgemm mismatched", || {
        kernels::sgemm(
            Array2::<f32>::zeros((2, 3)).view(),
            Array2::<f32>::zeros((4, 2)).view(),
            Array2::<f32>::zeros((2, 2)).view_mut(),
            false,
        )
    });
    p.refuses("reference gemm mismatched", || {
        kernels::reference::gemm_u8i8_i32(
            Array2::<u8>::zeros((2, 3)).view(),
            0,
            Array2::<i8>::zeros((4, 2)).view(),
        )
    });
    p.call("KernelChoice::from_name foreign", || {
        KernelChoice::from_name("sse9")
    });
    integer_conventions(&mut p);
    if kernels::PackedLinear::is_supported() {
        p.refuses("PackedLinear bias of the wrong length", || {
            kernels::PackedLinear::new(
                Array2::<f32>::zeros((4, 3)).view(),
                Some(ndarray::Array1::zeros(5).view()),
            )
        });
        let layer = kernels::PackedLinear::new(Array2::<f32>::zeros((4, 3)).view(), None).unwrap();
        p.refuses("PackedLinear input of the wrong width", || {
            layer.forward(Array2::<f32>::zeros((2, 7)).view())
        });
        p.call("PackedLinear zero rows", || {
            layer.forward(Array2::<f32>::zeros((0, 3)).view())
        });
    }
    let geo = nncompress::tensor::ConvGeometry {
        in_channels: 2,
        in_h: 5,
        in_w: 5,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [0, 0],
        dilation: [1, 1],
        groups: 1,
    };
    p.refuses("Im2colPlan group past the groups", || {
        nncompress::tensor::Im2colPlan::new(&geo, 1)
    });
    let plan = nncompress::tensor::Im2colPlan::new(&geo, 0).unwrap();
    p.refuses("Im2colPlan buffer too short", || {
        plan.fill(
            ndarray::Array4::<f32>::zeros((1, 2, 5, 5)).view(),
            &mut [0.0; 3],
            false,
        )
    });
    p.refuses("Im2colPlan wrong input channels", || {
        let mut buf = vec![0.0; plan.len(1)];
        plan.fill(
            ndarray::Array4::<f32>::zeros((1, 3, 5, 5)).view(),
            &mut buf,
            false,
        )
    });
    p.finish("kernels");
}

#[test]
fn model() {
    quiet();
    let mut p = Probe::default();
    p.refuses("linear 2^33 x 2^33", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[4])
            .linear("fc", "input", 1 << 33, 1 << 33, true);
        b.build("fc")
    });
    p.refuses("conv huge", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[1, 4, 4])
            .conv2d("c", "input", Conv2dConfig::new(1, 1 << 20, 1 << 12));
        b.build("c")
    });
    p.refuses("batch norm huge", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[4, 2, 2])
            .batch_norm2d("bn", "input", HUGE);
        b.build("bn")
    });
    p.refuses("input of 2^80 elements", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[HUGE, HUGE]).flatten("f", "input");
        b.build("f")
    });
    p.refuses("pool padding 2^63", || {
        let mut b = GraphBuilder::new(0);
        let pool = Pool2d {
            padding: [1 << 63, 1 << 63],
            ..Pool2d::new(2, 2)
        };
        b.input("input", &[1, 4, 4]).max_pool2d("p", "input", pool);
        b.build("p")
    });
    p.refuses("conv padding 2^63", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[1, 4, 4]).conv2d(
            "c",
            "input",
            Conv2dConfig::new(1, 1, 3).with_padding(1 << 63),
        );
        b.build("c")
    });
    p.refuses("conv stride 0", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[1, 4, 4]).conv2d(
            "c",
            "input",
            Conv2dConfig::new(1, 1, 3).with_stride(0),
        );
        b.build("c")
    });
    p.refuses("dropout nan", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[4]).dropout("d", "input", f32::NAN);
        b.build("d")
    });
    p.refuses("unknown input", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[4]).relu("r", "nowhere");
        b.build("r")
    });
    p.refuses("no input", || GraphBuilder::new(0).build("x"));
    p.refuses("add of different shapes", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[4])
            .linear("a", "input", 4, 3, false)
            .add("s", &["a", "input"]);
        b.build("s")
    });
    p.refuses("concat of one", || {
        let mut b = GraphBuilder::new(0);
        b.input("input", &[1, 2, 2]).concat("c", &["input"]);
        b.build("c")
    });
    let g = tiny();
    for shape in [
        vec![0, 1, 6, 6],
        vec![2, 1, 6],
        vec![2, 2, 6, 6],
        vec![2, 1, 5, 6],
        vec![1],
    ] {
        p.refuses("forward wrong shape", || {
            g.forward(&ArrayD::zeros(IxDyn(&shape)))
        });
    }
    p.call("forward nan", || {
        g.forward(&ArrayD::from_elem(IxDyn(&[1, 1, 6, 6]), f32::NAN))
    });
    p.call("forward inf", || {
        g.forward(&ArrayD::from_elem(IxDyn(&[1, 1, 6, 6]), f32::INFINITY))
    });
    p.refuses("id unknown", || g.id("nope"));
    let mut g2 = g.clone();
    p.refuses("set_output unknown", || g2.set_output("nope"));
    p.refuses("replace_op unknown", || g2.replace_op("nope", Op::ReLU));
    p.refuses("replace_op wrong shape", || {
        g2.replace_op(
            "fc",
            Op::Linear(nncompress::model::Linear {
                weight: Array2::zeros((3, 5)),
                bias: None,
            }),
        )
    });
    p.refuses("insert_after unknown", || {
        g2.insert_after("nope", "x", Op::ReLU)
    });
    p.refuses("insert_after duplicate", || {
        g2.insert_after("relu", "fc", Op::ReLU)
    });
    p.refuses("params_of_mut unknown", || {
        g2.params_of_mut("nope").map(|_| ())
    });
    let mut rng = StdRng::seed_from_u64(0);
    p.refuses("trace wrong shape", || {
        g2.trace(
            &ArrayD::zeros(IxDyn(&[1, 2, 6, 6])),
            Mode::Training,
            &mut rng,
        )
        .map(|_| ())
    });
    if let Ok(trace) = g2.trace(&images(2), Mode::Training, &mut rng) {
        p.refuses("backward wrong gradient shape", || {
            g2.backward(&trace, &ArrayD::zeros(IxDyn(&[2, 4])))
        });
        p.refuses("backward nan gradient", || {
            g2.backward(&trace, &ArrayD::from_elem(IxDyn(&[2, 3]), f32::NAN))
                .and_then(|gr| {
                    if gr.iter().any(|(_, v)| v.iter().any(|x| !x.is_finite())) {
                        Err(Error::NonFinite("gradient".into()))
                    } else {
                        Ok(gr)
                    }
                })
        });
        let other = tiny();
        let id = other.id("fc").unwrap();
        p.refuses("backward_with extra of wrong shape", || {
            g2.backward_with(&trace, None, &[(id, ArrayD::zeros(IxDyn(&[7])))])
        });
    }
    p.call("summary", || g.summary());
    p.call("cost", || g.cost());
    p.refuses("from_specs empty", || Graph::from_specs(vec![], "x"));
    p.finish("model");
}

#[test]
fn train() {
    quiet();
    let mut p = Probe::default();
    p.refuses("dataset label out of range", || {
        InMemoryDataset::new(images(2), vec![0, 9], 3)
    });
    p.refuses("dataset labels short", || {
        InMemoryDataset::new(images(2), vec![0], 3)
    });
    p.refuses("dataset zero classes", || {
        InMemoryDataset::new(images(2), vec![0, 0], 0)
    });
    p.refuses("dataset nan", || {
        InMemoryDataset::new(
            ArrayD::from_elem(IxDyn(&[2, 1, 6, 6]), f32::NAN),
            vec![0, 0],
            3,
        )
    });
    let d = data(4);
    p.refuses("batch index out of range", || d.batch(&[0, 99]));
    p.refuses("subset out of range", || d.subset(&[usize::MAX]));
    p.call("take more than len", || d.take(HUGE));
    let mut rng = StdRng::seed_from_u64(0);
    p.refuses("split past len", || d.split(99, &mut rng));
    p.call("batch_indices size 0", || train::batch_indices(10, 0, None));
    p.call("batch_indices huge", || {
        train::batch_indices(3, usize::MAX, None)
    });
    p.refuses("softmax_ce label out of range", || {
        train::softmax_cross_entropy(&ArrayD::zeros(IxDyn(&[2, 3])), &[0, 3])
    });
    p.refuses("softmax_ce labels short", || {
        train::softmax_cross_entropy(&ArrayD::zeros(IxDyn(&[2, 3])), &[0])
    });
    p.refuses("softmax_ce rank 1", || {
        train::softmax_cross_entropy(&ArrayD::zeros(IxDyn(&[3])), &[0])
    });
    p.call("softmax_ce nan", || {
        train::softmax_cross_entropy(&ArrayD::from_elem(IxDyn(&[1, 3]), f32::NAN), &[0])
    });
    p.refuses("argmax rank 3", || {
        train::argmax_rows(&ArrayD::zeros(IxDyn(&[1, 2, 3])))
    });
    let g = tiny();
    p.refuses("evaluate batch 0", || train::evaluate(&g, &d, 0));
    p.refuses("evaluate wrong classes", || {
        let wide = InMemoryDataset::new(images(2), vec![0, 5], 6).unwrap();
        let mut b = GraphBuilder::new(0);
        b.input("input", &[1, 6, 6])
            .flatten("f", "input")
            .linear("fc", "f", 36, 2, true);
        train::evaluate(&b.build("fc").unwrap(), &wide, 2)
    });
    for (epochs, batch, lr) in [
        (1, 0, 0.1),
        (1, 2, f32::NAN),
        (1, 2, f32::INFINITY),
        (1, 2, -1.0),
        (0, 2, 0.1),
    ] {
        let mut g = tiny();
        p.call("fit odd config", || {
            Trainer::new(TrainConfig::new(epochs, batch, 0), Sgd::new(lr)).fit(&mut g, &d, None)
        });
    }
    let mut g = tiny();
    p.refuses("fit wrong input shape", || {
        let other =
            InMemoryDataset::new(ArrayD::zeros(IxDyn(&[2, 1, 5, 5])), vec![0, 1], 3).unwrap();
        Trainer::new(TrainConfig::new(1, 2, 0), Sgd::new(0.1)).fit(&mut g, &other, None)
    });
    p.refuses("fit empty", || {
        let empty = InMemoryDataset::new(ArrayD::zeros(IxDyn(&[0, 1, 6, 6])), vec![], 3)?;
        Trainer::new(TrainConfig::new(1, 2, 0), Sgd::new(0.1)).fit(&mut g, &empty, None)
    });
    p.refuses("parse_idx_images lying header", || {
        train::parse_idx_images(
            &[
                0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
            ],
            None,
        )
    });
    p.refuses("parse_idx_labels short", || {
        train::parse_idx_labels(&[0, 0, 8, 1, 0, 0, 0, 9, 1], None)
    });
    p.refuses("parse_digits_csv garbage", || {
        train::parse_digits_csv("1,2,x\n", None)
    });
    p.refuses("parse_digits_csv huge number", || {
        train::parse_digits_csv(
            &format!("{}\n", vec!["99999999999999999999"; 65].join(",")),
            None,
        )
    });
    p.refuses("load_mnist missing", || {
        train::load_mnist("/nonexistent", train::MnistSplit::Test)
    });
    p.refuses("load_digits missing", || {
        train::load_digits("/nonexistent.csv.gz")
    });
    p.finish("train");
}

#[test]
fn quantizer() {
    quiet();
    let mut p = Probe::default();
    let x = Array::from_shape_fn(IxDyn(&[4, 3]), |i| i[0] as f32 - i[1] as f32);
    let per_channel = QuantScheme {
        granularity: Granularity::PerChannel { axis: 0 },
        ..QuantScheme::default()
    };
    let good = QuantParams::from_tensor(per_channel, x.view()).unwrap();
    // Public fields, hostile values.
    let mut fewer_zero_points = good.clone();
    fewer_zero_points.zero_point.truncate(1);
    p.refuses("quantize fewer zero points than scales", || {
        quantizer::quantize(x.view(), &fewer_zero_points)
    });
    let mut fewer_scales = good.clone();
    fewer_scales.scale.truncate(2);
    fewer_scales.zero_point.truncate(2);
    p.refuses("quantize fewer scales than channels", || {
        quantizer::quantize(x.view(), &fewer_scales)
    });
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut bad = good.clone();
        bad.scale[0] = s;
        p.refuses("quantize bad scale", || quantizer::quantize(x.view(), &bad));
    }
    let mut bad_zp = good.clone();
    bad_zp.zero_point[0] = 1000;
    p.refuses("quantize zero point out of range", || {
        quantizer::quantize(x.view(), &bad_zp)
    });
    let axis9 = QuantScheme {
        granularity: Granularity::PerChannel { axis: 9 },
        ..QuantScheme::default()
    };
    p.refuses("from_tensor axis out of range", || {
        QuantParams::from_tensor(axis9, x.view())
    });
    p.refuses("from_range nan", || {
        QuantParams::from_range(QuantScheme::default(), &[f32::NAN], &[1.0])
    });
    p.refuses("from_range inverted", || {
        QuantParams::from_range(QuantScheme::default(), &[1.0], &[-1.0])
    });
    p.refuses("from_range mismatched", || {
        QuantParams::from_range(QuantScheme::default(), &[0.0], &[1.0, 2.0])
    });
    p.refuses("from_range empty", || {
        QuantParams::from_range(QuantScheme::default(), &[], &[])
    });
    p.refuses("quantize nan", || {
        quantizer::quantize(
            ArrayD::from_elem(IxDyn(&[2]), f32::NAN).view(),
            &QuantParams::from_range(QuantScheme::default(), &[0.0], &[1.0]).unwrap(),
        )
    });
    let q = quantizer::quantize(x.view(), &good).unwrap();
    let mut short = q.clone();
    short.data = QData::I8(vec![1, 2]);
    p.refuses("dequantize data shorter than shape", || {
        quantizer::dequantize(&short)
    });
    let int4 = QuantScheme {
        dtype: quantizer::QuantDtype::Int4,
        ..QuantScheme::default()
    };
    let p4 = QuantParams::from_tensor(int4, x.view()).unwrap();
    let mut q4 = quantizer::quantize(x.view(), &p4).unwrap();
    q4.data = QData::I4Packed(vec![0x12]);
    p.refuses("int4 dequantize short", || quantizer::dequantize(&q4));
    p.refuses("int4 int_values short", || q4.int_values());
    let mut huge_shape = q.clone();
    huge_shape.shape = vec![HUGE, HUGE];
    p.refuses("dequantize huge shape", || {
        quantizer::dequantize(&huge_shape)
    });
    p.refuses("int_values huge shape", || huge_shape.int_values());
    let mut wrong_params = q.clone();
    wrong_params.params.scale.clear();
    p.refuses("dequantize without scales", || {
        quantizer::dequantize(&wrong_params)
    });
    let f16 = QTensor {
        data: QData::F16(vec![]),
        shape: vec![2],
        params: good.clone(),
    };
    p.refuses("dequantize f16 short", || quantizer::dequantize(&f16));
    use quantizer::QuantDtype;
    p.refuses("per_axis axis past rank", || {
        QuantParams::per_axis(QuantDtype::Int8, vec![1.0], vec![0], Some(3), 3)
    });
    p.refuses("per_axis axis below -rank", || {
        QuantParams::per_axis(QuantDtype::Int8, vec![1.0], vec![0], Some(isize::MIN), 3)
    });
    p.refuses("per_axis float dtype", || {
        QuantParams::per_axis(QuantDtype::Float16, vec![1.0], vec![0], None, 1)
    });
    p.refuses("per_axis lengths", || {
        QuantParams::per_axis(QuantDtype::UInt8, vec![1.0, 2.0], vec![0], Some(0), 1)
    });
    p.refuses("per_axis two pairs per tensor", || {
        QuantParams::per_axis(QuantDtype::UInt8, vec![1.0, 2.0], vec![0, 0], None, 1)
    });
    p.refuses("per_axis zero point", || {
        QuantParams::per_axis(QuantDtype::UInt8, vec![1.0], vec![-1], None, 1)
    });
    p.refuses("per_axis nan scale", || {
        QuantParams::per_axis(QuantDtype::Int32, vec![f32::NAN], vec![0], None, 1)
    });
    p.refuses("per_axis wrong channel count at use", || {
        let params =
            QuantParams::per_axis(QuantDtype::Int8, vec![1.0; 2], vec![0; 2], Some(-1), 2)?;
        quantizer::quantize(x.view(), &params)
    });
    p.refuses("unpack_i4 n > 2 len", || quantizer::unpack_i4(&[0xff], 3));
    p.refuses("unpack_i4 usize::MAX", || {
        quantizer::unpack_i4(&[], usize::MAX)
    });
    p.call("pack_i4 out of range values", || {
        quantizer::pack_i4(&[i32::MAX, i32::MIN, 99])
    });
    // Observers refuse numbers they cannot use instead of clamping them.
    p.refuses("percentile nan", || PercentileObserver::new(f64::NAN));
    p.refuses("percentile 500", || PercentileObserver::new(500.0));
    p.refuses("percentile -1", || PercentileObserver::new(-1.0));
    p.refuses("moving average nan", || {
        MovingAverageObserver::new(f32::NAN)
    });
    p.refuses("moving average 2", || MovingAverageObserver::new(2.0));
    p.refuses("kld 0 bins", || KldObserver::new(0, 128));
    p.refuses("kld usize::MAX bins", || KldObserver::new(usize::MAX, 128));
    p.refuses("kld target past bins", || KldObserver::new(64, 128));
    p.refuses("kld coverage nan", || {
        KldObserver::default().with_min_coverage(f64::NAN)
    });
    p.refuses("kld coverage 2", || {
        KldObserver::default().with_min_coverage(2.0)
    });
    p.refuses("ort entropy 0 bins", || OrtEntropyObserver::new(0, 128));
    p.refuses("ort entropy 0 quantized bins", || {
        OrtEntropyObserver::new(128, 0)
    });
    p.refuses("ort entropy huge bins", || {
        OrtEntropyObserver::new(HUGE, 128)
    });
    p.refuses("histogram 0 bins", || Histogram::new(0));
    p.refuses("histogram huge", || Histogram::new(HUGE));
    p.refuses("mse 0 bits", || quantizer::MseObserver::new(0));
    p.refuses("aciq 40 bits", || {
        quantizer::AciqObserver::new(quantizer::AciqDistribution::Gaussian, 40)
    });
    let mut kld = KldObserver::default();
    p.refuses("kld range before data", || kld.range());
    p.refuses("kld nan data", || {
        kld.observe(ArrayD::from_elem(IxDyn(&[3]), f32::NAN).view())
    });
    p.call("kld empty data", || {
        kld.observe(ArrayD::zeros(IxDyn(&[0])).view())
    });
    p.call("kld extreme data", || {
        kld.observe(ndarray::arr1(&[3e38f32, -3e38, 1e-38]).into_dyn().view())
    });
    p.call("kld range after extremes", || kld.range());
    for merge in [quantizer::OrtMerge::Stacked, quantizer::OrtMerge::PerBatch] {
        let mut ort = OrtEntropyObserver::default().with_merge(merge);
        p.call("ort small batch", || {
            ort.observe(ndarray::arr1(&[1.0f32, -0.5]).into_dyn().view())
        });
        p.call("ort late 1000 outlier", || {
            ort.observe(ndarray::arr1(&[1000.0f32]).into_dyn().view())
        });
        p.call("ort late 3e38 outlier", || {
            ort.observe(ndarray::arr1(&[3e38f32]).into_dyn().view())
        });
        p.call("ort range after outliers", || ort.range());
        let mut ort = OrtEntropyObserver::default().with_merge(merge);
        p.call("ort extreme data", || {
            ort.observe(ndarray::arr1(&[f32::MAX, f32::MIN]).into_dyn().view())
        });
        p.call("ort range after extremes", || ort.range());
        p.call("ort best bin after extremes", || ort.best_bin());
        p.refuses("ort cap below the bins", || {
            OrtEntropyObserver::new(512, 128)
                .unwrap()
                .with_max_bins(100)
        });
    }
    p.refuses("ort histogram nan edge", || {
        quantizer::OrtHistogram::new(vec![1], vec![f32::NAN, 1.0], (0.0, 1.0), 1.0)
    });
    p.refuses("kld from histogram, target past bins", || {
        KldObserver::from_histogram(Histogram::new(8).unwrap(), 9)
    });
    // Calibration and the quantized model.
    let g = tiny();
    p.refuses("calibrate without batches", || {
        Quantizer::new(QuantConfig::int8()).calibrate(&g, &[])
    });
    p.refuses("calibrate wrong shape", || {
        Quantizer::new(QuantConfig::int8()).calibrate(&g, &[ArrayD::zeros(IxDyn(&[1, 2, 6, 6]))])
    });
    p.refuses("calibrate nan", || {
        Quantizer::new(QuantConfig::int8())
            .calibrate(&g, &[ArrayD::from_elem(IxDyn(&[1, 1, 6, 6]), f32::NAN)])
    });
    p.refuses("calibrate percentile nan", || {
        Quantizer::new(QuantConfig::int8().calibration(Calibration::Percentile(f64::NAN)))
            .calibrate(&g, &[images(2)])
    });
    p.refuses("calibrate ort 0 bins", || {
        Quantizer::new(QuantConfig::int8().calibration(Calibration::OrtEntropy {
            bins: 0,
            quantized_bins: 0,
            merge: quantizer::OrtMerge::Stacked,
        }))
        .calibrate(&g, &[images(2)])
    });
    p.refuses("keep_float unknown", || {
        Quantizer::new(QuantConfig::int8().keep_float("nope")).calibrate(&g, &[images(2)])
    });
    let qm = Quantizer::new(QuantConfig::int8())
        .calibrate(&g, &[images(2)])
        .unwrap();
    p.refuses("qmodel forward wrong shape", || {
        qm.forward(&ArrayD::zeros(IxDyn(&[1, 1, 5, 5])))
    });
    p.refuses("qmodel forward nan", || {
        qm.forward(&ArrayD::from_elem(IxDyn(&[1, 1, 6, 6]), f32::NAN))
    });
    p.call("qmodel forward huge values", || {
        qm.forward(&ArrayD::from_elem(IxDyn(&[1, 1, 6, 6]), 3e38))
    });
    p.refuses("qmodel from_bytes of another architecture", || {
        let bytes = qm.to_bytes()?;
        QuantizedModel::from_bytes(&bytes, &nncompress::model::zoo::lenet5(0)?, None)
    });
    p.refuses("nnq garbage", || {
        QuantizedModel::from_bytes(b"NNQM\x01\x00\x00\x00", &g, None)
    });
    p.refuses("nnq load missing", || {
        QuantizedModel::load("/nonexistent.nnq", &g)
    });
    p.refuses("prepare_qat dynamic", || {
        quantizer::prepare_qat(&g, &QuantConfig::dynamic_int8())
    });
    p.refuses("convert float graph", || quantizer::convert(&g));
    p.call("fold_batch_norms", || quantizer::fold_batch_norms(&g));
    p.finish("quantizer");
}

use nncompress::quantizer::QuantizedModel;

#[test]
fn pruner() {
    quiet();
    let mut p = Probe::default();
    let g = tiny();
    for r in [f32::NAN, -0.5, 1.0, 5.0] {
        p.refuses("unstructured sparsity", || {
            UnstructuredPruner::new(Magnitude, r)
        });
        p.refuses("structured ratio", || {
            StructuredPruner::new(L1Norm).with_ratio(r)
        });
        p.refuses("lasso ratio", || LassoPruner::new(r));
    }
    let up = UnstructuredPruner::new(Magnitude, 0.5).unwrap();
    for f in [f32::NAN, -1.0, 5.0, f32::INFINITY] {
        p.refuses("masks fraction", || up.masks(&g, f, None, None));
    }
    p.refuses("unstructured unknown layer", || {
        up.clone_only(&["nope"]).masks(&g, 1.0, None, None)
    });
    p.refuses("layer sparsity unknown", || {
        UnstructuredPruner::new(Magnitude, 0.5)?
            .with_layer_sparsity("nope", 0.5)?
            .masks(&g, 1.0, None, None)
    });
    p.call("schedule odd", || {
        (
            Schedule::Iterative { rounds: 0 }.fraction(usize::MAX),
            Schedule::Agp {
                start: 10,
                end: 5,
                every: 0,
            }
            .fraction(7),
        )
    });
    p.refuses("structured unknown layer", || {
        StructuredPruner::new(L1Norm)
            .with_layer_ratio("nope", 0.5)?
            .prune(&g, None)
    });
    p.refuses("structured every channel", || {
        StructuredPruner::new(L1Norm)
            .with_layer_ratio("conv", 0.999)?
            .min_keep(0.0)?
            .prune(&g, None)
            .and_then(|(pg, _)| {
                if pg.shape(pg.id("conv")?)[0] == 0 {
                    Ok(())
                } else {
                    Err(Error::Empty("kept".into()))
                }
            })
    });
    p.refuses("min_keep nan", || {
        StructuredPruner::new(L1Norm).min_keep(f32::NAN)
    });
    p.call("round_to 0", || {
        StructuredPruner::new(L1Norm)
            .round_to(0)
            .with_ratio(0.5)?
            .prune(&g, None)
    });
    p.call("round_to huge", || {
        StructuredPruner::new(L1Norm)
            .round_to(usize::MAX)
            .with_ratio(0.5)?
            .prune(&g, None)
    });
    p.refuses("slimming negative", || {
        pruner::slimming_penalty(-1.0).map(|_| ())
    });
    p.refuses("slimming nan", || {
        pruner::slimming_penalty(f32::NAN).map(|_| ())
    });
    let deps = pruner::dependency_groups(&g).unwrap();
    p.refuses("group_of unknown", || deps.group_of("nope").map(|_| ()));
    p.refuses("accumulate_gradients empty", || {
        pruner::accumulate_gradients(
            &g,
            &InMemoryDataset::new(ArrayD::zeros(IxDyn(&[0, 1, 6, 6])), vec![], 3)?,
            1,
            2,
            0,
        )
    });
    p.call("accumulate_gradients batch 0", || {
        pruner::accumulate_gradients(&g, &data(4), 1, 0, 0)
    });
    p.refuses("sensitivity bad ratio", || {
        pruner::sensitivity(&g, L1Norm, &[f32::NAN], &data(4), 2, |_, _| {})
    });
    p.call("sensitivity batch 0", || {
        pruner::sensitivity(&g, L1Norm, &[0.5], &data(4), 0, |_, _| {})
    });
    p.refuses("lasso unknown producer", || {
        LassoPruner::new(0.5)?.prune_group(&g, &g, "nope", &[images(2)], true)
    });
    p.refuses("lasso no batches", || {
        LassoPruner::new(0.5)?.prune_model(&g, &[], |_, _, _| {})
    });
    p.call("lasso samples 0", || {
        LassoPruner::new(0.5)?
            .samples_per_image(0)
            .prune_model(&g, &[images(2)], |_, _, _| {})
    });
    p.finish("pruner");
}

trait CloneOnly {
    fn clone_only(&self, layers: &[&str]) -> UnstructuredPruner;
}

impl CloneOnly for UnstructuredPruner {
    fn clone_only(&self, layers: &[&str]) -> UnstructuredPruner {
        UnstructuredPruner::new(Magnitude, 0.5)
            .unwrap()
            .only(layers)
    }
}

#[test]
fn deep_compression() {
    quiet();
    let mut p = Probe::default();
    let g = tiny();
    let layer = SharedLayer {
        name: "fc".into(),
        shape: vec![3, 16],
        conv: false,
        positions: vec![0, 5],
        codes: vec![0, 1],
        centroids: vec![0.5, -0.5],
        cluster_bits: 2,
        index_bits: 4,
    };
    for (field, bad) in [
        (
            "cluster_bits 32",
            SharedLayer {
                cluster_bits: 32,
                ..layer.clone()
            },
        ),
        (
            "cluster_bits 0",
            SharedLayer {
                cluster_bits: 0,
                ..layer.clone()
            },
        ),
        (
            "index_bits 64",
            SharedLayer {
                index_bits: 64,
                ..layer.clone()
            },
        ),
        (
            "position past the weight",
            SharedLayer {
                positions: vec![0, 48],
                ..layer.clone()
            },
        ),
        (
            "code past the codebook",
            SharedLayer {
                codes: vec![0, 9],
                ..layer.clone()
            },
        ),
        (
            "codes shorter",
            SharedLayer {
                codes: vec![0],
                ..layer.clone()
            },
        ),
        (
            "huge shape",
            SharedLayer {
                shape: vec![HUGE, HUGE],
                ..layer.clone()
            },
        ),
        (
            "nan centroid",
            SharedLayer {
                centroids: vec![f32::NAN, 1.0],
                ..layer.clone()
            },
        ),
        (
            "positions not increasing",
            SharedLayer {
                positions: vec![5, 0],
                ..layer.clone()
            },
        ),
    ] {
        let sw = SharedWeights {
            layers: vec![bad.clone()],
        };
        p.refuses(&format!("compress {field}"), || sw.compress(&g, false));
        if field != "cluster_bits 32"
            && field != "cluster_bits 0"
            && field != "index_bits 64"
            && field != "nan centroid"
            && field != "positions not increasing"
        {
            p.refuses(&format!("weight {field}"), || bad.weight());
            let mut g2 = g.clone();
            p.refuses(&format!("apply {field}"), || sw.apply(&mut g2));
        }
    }
    p.refuses("huge shape applied", || {
        SharedWeights {
            layers: vec![SharedLayer {
                shape: vec![1 << 20, 1 << 20, 1 << 20],
                ..layer.clone()
            }],
        }
        .apply(&mut g.clone())
    });
    p.refuses("from_graph bits 0", || {
        SharedWeights::from_graph(
            &g,
            &DeepCompressionConfig {
                fc_bits: 0,
                ..Default::default()
            },
        )
    });
    p.refuses("from_graph bits 40", || {
        SharedWeights::from_graph(
            &g,
            &DeepCompressionConfig {
                conv_bits: 40,
                ..Default::default()
            },
        )
    });
    p.refuses("from_graph unknown layer", || {
        SharedWeights::from_graph(
            &g,
            &DeepCompressionConfig {
                layer_bits: vec![("nope".into(), 4)],
                ..Default::default()
            },
        )
    });
    // Relative indices and Huffman coding.
    p.refuses("encode_relative u32::MAX", || {
        dc::encode_relative(&[u32::MAX], &[0], 1, 1)
    });
    p.refuses("encode_relative bits 0", || {
        dc::encode_relative(&[1], &[0], 0, 1)
    });
    p.refuses("encode_relative bits 33", || {
        dc::encode_relative(&[1], &[0], 33, 1)
    });
    p.refuses("encode_relative lengths", || {
        dc::encode_relative(&[1, 2], &[0], 4, 7)
    });
    p.refuses("encode_relative filler value", || {
        dc::encode_relative(&[1], &[7], 4, 7)
    });
    p.refuses("decode_relative past the layer", || {
        dc::decode_relative(
            &dc::RelativeIndex {
                gaps: vec![u32::MAX, u32::MAX],
                values: vec![0, 0],
            },
            9,
            10,
        )
    });
    p.refuses("decode_relative mismatched", || {
        dc::decode_relative(
            &dc::RelativeIndex {
                gaps: vec![1],
                values: vec![],
            },
            9,
            10,
        )
    });
    p.call("huffman from_counts u64::MAX", || {
        HuffmanCode::from_counts(&[u64::MAX, u64::MAX, u64::MAX, 1])
    });
    p.call(
        "huffman from_counts empty",
        || HuffmanCode::from_counts(&[]),
    );
    p.refuses("huffman lengths past 24", || {
        HuffmanCode::from_lengths(vec![25, 1])
    });
    p.refuses("huffman over-subscribed", || {
        HuffmanCode::from_lengths(vec![1, 1, 1])
    });
    p.refuses("huffman from_counts 2^24 + 1 symbols (hung)", || {
        HuffmanCode::from_counts(&vec![1u64; (1 << 24) + 1])
    });
    let code = HuffmanCode::from_counts(&[3, 1, 1]).unwrap();
    p.refuses("huffman decode count 2^40", || {
        code.decode(&[0xff; 4], 32, HUGE)
    });
    p.refuses("huffman decode count usize::MAX", || {
        code.decode(&[0xff; 4], 32, usize::MAX)
    });
    p.refuses("huffman decode bits past data", || {
        code.decode(&[0xff], 64, 1)
    });
    p.refuses("huffman encode unknown symbol", || code.encode(&[7]));
    p.call("kmeans empty", || dc::kmeans_linear(&[], 4, 10));
    p.call("kmeans k 0", || dc::kmeans_linear(&[1.0, 2.0], 0, 10));
    p.call("kmeans nan", || dc::kmeans_linear(&[f32::NAN, 1.0], 2, 10));
    p.call("kmeans huge k", || {
        dc::kmeans_linear(&[1.0, 2.0], 1 << 20, 2)
    });
    p.call("nearest empty", || dc::nearest(&[], 1.0));
    // A loaded file whose public fields are changed afterwards.
    let sw = SharedWeights::from_graph(&g, &DeepCompressionConfig::default()).unwrap();
    let c = sw.compress(&g, false).unwrap();
    let mut tampered = c.clone();
    tampered.layers[0].cluster_bits = 40;
    p.refuses("shared of tampered bits", || tampered.shared());
    let mut tampered = c.clone();
    tampered.layers[0].entries = usize::MAX;
    p.refuses("shared of tampered entries", || tampered.shared());
    p.call("report of tampered entries", || tampered.report_table());
    let mut tampered = c.clone();
    tampered.layers[0].shape = vec![HUGE, HUGE];
    p.refuses("decompress of tampered shape", || tampered.decompress(&g));
    p.call("report of tampered shape", || tampered.report_table());
    let mut tampered = c.clone();
    tampered.others[0].2.clear();
    p.refuses("decompress of tampered others", || tampered.decompress(&g));
    p.refuses("decompress into another architecture", || {
        c.decompress(&nncompress::model::zoo::lenet5(0)?)
    });
    p.refuses("nndc load missing", || {
        Compressed::load("/nonexistent.nndc")
    });
    p.finish("deep_compression");
}

#[test]
fn distiller() {
    quiet();
    let mut p = Probe::default();
    for (t, a) in [
        (0.0, 0.5),
        (-1.0, 0.5),
        (f32::NAN, 0.5),
        (2.0, f32::NAN),
        (2.0, 5.0),
        (f32::INFINITY, 0.5),
    ] {
        p.refuses("LogitKd odd", || LogitKd::new("fc", "fc", t, a));
    }
    let teacher = tiny();
    let mut student = tiny();
    let cfg = TrainConfig::new(1, 2, 0);
    p.refuses("distill without losses", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1)).fit(&mut student, &data(4))
    });
    p.refuses("distill unknown student node", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, FitNet::identity("nope", "relu"))?
            .fit(&mut student, &data(4))
    });
    p.refuses("distill unknown teacher node", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, LogitKd::new("fc", "nope", 2.0, 0.5)?)?
            .fit(&mut student, &data(4))
    });
    p.refuses("distill mismatched hint without regressor", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, FitNet::identity("relu", "fc"))?
            .fit(&mut student, &data(4))
    });
    p.refuses("distill fsp across sizes", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, Fsp::new(("relu", "pool"), ("relu", "pool")))?
            .fit(&mut student, &data(4))
    });
    p.refuses("distill attention on vectors", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, AttentionTransfer::new("fc", "fc", 1.0))?
            .fit(&mut student, &data(4))
    });
    for w in [f32::NAN, -1.0, f32::INFINITY] {
        p.refuses("distill loss weight", || {
            Distiller::new(&teacher, cfg, Sgd::new(0.1))
                .with_loss(w, LogitKd::new("fc", "fc", 2.0, 0.5)?)?
                .fit(&mut student, &data(4))
        });
    }
    p.call("distill batch 0", || {
        Distiller::new(&teacher, TrainConfig::new(1, 0, 0), Sgd::new(0.1))
            .with_loss(1.0, LogitKd::new("fc", "fc", 2.0, 0.5)?)?
            .fit(&mut student, &data(4))
    });
    p.call("attention beta nan", || {
        Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, AttentionTransfer::new("relu", "relu", f32::NAN))?
            .fit(&mut student, &data(4))
    });
    // A FitNet regressor on activations with a zero-size spatial axis (the channels-last
    // reshape used to claim one row per sample and panic).
    p.call("fitnet regressor on a zero-size spatial axis", || {
        let fit = FitNet::with_regressor("s", "t", 2, 3, 0);
        let (s, t) = (
            ArrayD::zeros(IxDyn(&[2, 2, 0, 4])),
            ArrayD::zeros(IxDyn(&[2, 3, 0, 4])),
        );
        nncompress::distiller::DistillationLoss::compute(&fit, &[&s], &[&t], &[0, 1])
    });
    p.finish("distiller");
}

#[test]
fn nas() {
    quiet();
    let mut p = Probe::default();
    let space = CnnSpace::new([1, 8, 8], 10, 2);
    let foreign = CnnArch {
        stages: vec![
            Stage {
                depth: 1,
                width: 16,
                kernel: 3,
                stride: 0,
                residual: false
            };
            2
        ],
    };
    let mut rng = StdRng::seed_from_u64(0);
    p.call("encode stride 0", || space.encode(&foreign));
    p.refuses("mutate stride 0", || space.mutate(&foreign, &mut rng));
    let odd_width = CnnArch {
        stages: vec![
            Stage {
                depth: 1,
                width: 12345,
                kernel: 3,
                stride: 1,
                residual: false
            };
            2
        ],
    };
    p.refuses("mutate unknown width", || {
        space.mutate(&odd_width, &mut rng)
    });
    let short = CnnArch { stages: vec![] };
    p.refuses("mutate short code", || space.mutate(&short, &mut rng));
    p.refuses("decode short code", || space.decode(&[0]));
    p.refuses("decode out of range", || space.decode(&[usize::MAX; 10]));
    p.refuses("build zero stages", || {
        CnnSpace::new([1, 8, 8], 10, 0).sample(&mut rng).map(|_| ())
    });
    p.call("build huge stages", || {
        CnnSpace::new([1, 8, 8], 10, 64)
            .sample(&mut rng)
            .and_then(|a| CnnSpace::new([1, 8, 8], 10, 64).build(&a))
    });
    p.call("build tiny input", || {
        let s = CnnSpace::new([1, 1, 1], 0, 3);
        s.sample(&mut rng).and_then(|a| s.build(&a))
    });
    p.refuses("code_from_string garbage", || {
        nas::code_from_string("1-x-3")
    });
    p.refuses("code_from_string overflow", || {
        nas::code_from_string("99999999999999999999999")
    });
    p.refuses("random search empty", || RandomSearch::new(&[], 0));
    p.refuses("random search zero option", || {
        RandomSearch::new(&[2, 0], 0)
    });
    p.refuses("evolution zero population", || {
        RegularizedEvolution::new(&[2, 2], 0, 1, 0)
    });
    p.refuses("evolution sample 0", || {
        RegularizedEvolution::new(&[2, 2], 4, 0, 0)
    });
    p.refuses("evolution foreign initial", || {
        RegularizedEvolution::new(&[2, 2], 4, 2, 0)?.with_initial(&[vec![5, 5]])
    });
    p.refuses("reinforce nan lr", || Reinforce::new(&[2, 2], f64::NAN, 0));
    let mut evo = RegularizedEvolution::new(&[2, 3], 2, 2, 0).unwrap();
    for code in [vec![], vec![9, 9], vec![usize::MAX, usize::MAX], vec![1]] {
        let c = nas::Candidate { id: 99, code };
        p.call("evolution tell foreign code", || evo.tell(&c, Some(1.0)));
    }
    for _ in 0..8 {
        p.call("evolution ask after foreign tells", || evo.ask());
    }
    let mut rf = Reinforce::new(&[2, 3], 0.1, 0).unwrap();
    for code in [vec![], vec![9, 9], vec![1]] {
        let c = nas::Candidate { id: 99, code };
        p.call("reinforce tell foreign code", || {
            rf.tell(&c, Some(f64::INFINITY))
        });
    }
    p.call("reinforce ask after foreign tells", || rf.ask());
    p.call("best of none", || nas::best(&[]).is_none());
    p.call("pareto of none", || {
        nas::pareto_front(&[], &[("nope", true)]).len()
    });
    let g = tiny();
    p.refuses("policy space bad ratios", || {
        nas::CompressionPolicySpace::new(&g, &[f32::NAN], &[8]).map(|_| ())
    });
    p.refuses("policy space bad bits", || {
        nas::CompressionPolicySpace::new(&g, &[0.5], &[0]).map(|_| ())
    });
    p.refuses("policy space bits 40", || {
        nas::CompressionPolicySpace::new(&g, &[0.5], &[40]).map(|_| ())
    });
    if let Ok(ps) = nas::CompressionPolicySpace::new(&g, &[0.0, 0.5], &[4, 8]) {
        p.refuses("policy of foreign code", || {
            ps.policy(&[9, 9, 9, 9, 9, 9, 9])
        });
        p.refuses("policy decode short", || ps.decode(&[]));
        p.call("uniform past options", || ps.uniform(99, 99));
        p.refuses("policy mutate foreign", || {
            ps.mutate(&vec![99; 3], &mut rng)
        });
    }
    p.finish("nas");
}

#[test]
fn io() {
    quiet();
    let mut p = Probe::default();
    let mut g = tiny();
    p.refuses("safetensors empty", || {
        nncompress::io::from_safetensors_bytes(&mut g, &[], None)
    });
    p.refuses("safetensors header 2^63", || {
        let mut b = (1u64 << 63).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        nncompress::io::from_safetensors_bytes(&mut g, &b, None)
    });
    p.refuses("safetensors lying offsets", || {
        let header = br#"{"fc.weight":{"dtype":"F32","shape":[3,16],"data_offsets":[0,99999999]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        nncompress::io::from_safetensors_bytes(&mut g, &b, None)
    });
    p.refuses("safetensors huge shape", || {
        let header = br#"{"fc.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        nncompress::io::from_safetensors_bytes(&mut g, &b, None)
    });
    p.refuses("safetensors missing file", || {
        nncompress::io::load_safetensors(&mut g, "/nonexistent")
    });
    p.refuses("save to a directory", || {
        nncompress::io::save_safetensors(&g, "/")
    });
    p.finish("io");
}

/// The audit's reproducers, one by one, each now a typed error.
#[test]
fn reproducer_lying_huffman_count_is_refused_before_reserving() {
    let code = HuffmanCode::from_counts(&[5, 3, 1, 1]).unwrap();
    let (bytes, bits) = code.encode(&[0, 1, 2, 3]).unwrap();
    assert_eq!(code.decode(&bytes, bits, 4).unwrap(), vec![0, 1, 2, 3]);
    assert!(matches!(
        code.decode(&bytes, bits, 1 << 40),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn reproducer_nndc_layer_shape_changed_is_refused_before_allocating() {
    let g = tiny();
    let sw = SharedWeights::from_graph(&g, &DeepCompressionConfig::default()).unwrap();
    let mut c = sw.compress(&g, false).unwrap();
    // A shape of 5.6 PB as the audit planted it (the file's CRC is valid: `to_bytes`).
    c.layers[0].shape = vec![1 << 26, 1 << 26, 4, 4];
    let bytes = c.to_bytes();
    match Compressed::from_bytes(&bytes, None) {
        Err(Error::LimitExceeded { .. } | Error::CorruptFile { .. }) => {}
        other => panic!("expected a limit or corrupt-file error, got {other:?}"),
    }
    // A shape within the limits but not the architecture's: refused at decompress, before
    // the dense weight is built.
    c.layers[0].shape = vec![4, 1, 3, 3 * 1024];
    if let Ok(loaded) = Compressed::from_bytes(&c.to_bytes(), None) {
        assert!(matches!(
            loaded.decompress(&g),
            Err(Error::TensorShape { .. })
        ));
    }
}

#[test]
fn reproducer_gzip_bomb_is_refused_at_the_limit() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("nncompress-bomb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 64 MiB of zeros compress to ~64 KiB.
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        z.write_all(&zeros).unwrap();
    }
    let bomb = z.finish().unwrap();
    let path = dir.join("digits.csv.gz");
    std::fs::write(&path, &bomb).unwrap();
    let small = Limits {
        max_decompressed_bytes: 1 << 20,
        ..Limits::default()
    };
    assert!(matches!(
        train::load_digits_with_limits(&path, &small),
        Err(Error::LimitExceeded { limit, .. }) if limit == 1 << 20
    ));
    // A valid IDX header that asks for 2^32 pixels: refused from the header, before the body.
    let mut header = vec![0u8, 0, 8, 3];
    for d in [1u32 << 16, 1 << 8, 1 << 8] {
        header.extend_from_slice(&d.to_be_bytes());
    }
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&header).unwrap();
    z.write_all(&zeros).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), z.finish().unwrap()).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), &bomb).unwrap();
    assert!(matches!(
        train::load_mnist(&dir, train::MnistSplit::Test),
        Err(Error::LimitExceeded { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reproducer_public_fields_are_checked_at_use() {
    let x = ndarray::arr1(&[1.0f32, -2.0, 3.0]).into_dyn();
    let mut params = QuantParams::from_tensor(QuantScheme::default(), x.view()).unwrap();
    params.zero_point.clear();
    assert!(matches!(
        quantizer::quantize(x.view(), &params),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        quantizer::unpack_i4(&[0x21], 3),
        Err(Error::ShapeMismatch { .. })
    ));
    let layer = SharedLayer {
        name: "fc".into(),
        shape: vec![3, 16],
        conv: false,
        positions: vec![],
        codes: vec![],
        centroids: vec![0.5],
        cluster_bits: 32,
        index_bits: 4,
    };
    let sw = SharedWeights {
        layers: vec![layer],
    };
    assert!(matches!(
        sw.compress(&tiny(), false),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn reproducer_geometry_overflow_is_a_config_error() {
    let mut b = GraphBuilder::new(0);
    b.input("input", &[1, 4, 4]).conv2d(
        "c",
        "input",
        Conv2dConfig::new(1, 1, 3).with_padding(1 << 63),
    );
    assert!(matches!(b.build("c"), Err(Error::InvalidConfig { .. })));
    let mut b = GraphBuilder::new(0);
    b.input("input", &[4])
        .linear("fc", "input", 1 << 33, 1 << 33, true);
    assert!(matches!(b.build("fc"), Err(Error::LimitExceeded { .. })));
}

#[test]
fn reproducer_relative_index_work_is_bounded() {
    let start = std::time::Instant::now();
    assert!(matches!(
        dc::encode_relative(&[u32::MAX], &[0], 1, 1),
        Err(Error::LimitExceeded { .. })
    ));
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
}
