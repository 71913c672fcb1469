//! int8 convolution (every available path) beside the float graph's convolution (batched
//! im2col + the f32 GEMM) in the same run, on 1 and 2 threads.
//!
//! Throughput is in multiply-accumulates (criterion's "elements/s" = MAC/s).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array4, ArrayD};
use nncompress::kernels::{
    conv2d_nhwc_u8i8_u8, conv2d_u8i8_u8, ConvSpec, KernelChoice, PackedConv, Requantize,
};
use nncompress::model::{Conv2dConfig, GraphBuilder};
use std::hint::black_box;
use std::time::Duration;

struct Case {
    name: &'static str,
    batch: usize,
    cin: usize,
    cout: usize,
    size: usize,
    k: usize,
    pad: usize,
    groups: usize,
}

const CASES: [Case; 5] = [
    Case {
        name: "3x3_64to64_56x56",
        batch: 1,
        cin: 64,
        cout: 64,
        size: 56,
        k: 3,
        pad: 1,
        groups: 1,
    },
    Case {
        name: "lenet5_conv1_b64",
        batch: 64,
        cin: 1,
        cout: 20,
        size: 28,
        k: 5,
        pad: 0,
        groups: 1,
    },
    Case {
        name: "lenet5_conv2_b64",
        batch: 64,
        cin: 20,
        cout: 50,
        size: 12,
        k: 5,
        pad: 0,
        groups: 1,
    },
    Case {
        name: "lenet5_conv2_b1",
        batch: 1,
        cin: 20,
        cout: 50,
        size: 12,
        k: 5,
        pad: 0,
        groups: 1,
    },
    Case {
        name: "dw3x3_64_56x56",
        batch: 1,
        cin: 64,
        cout: 64,
        size: 56,
        k: 3,
        pad: 1,
        groups: 64,
    },
];

fn conv_i8(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut group = c.benchmark_group(format!("conv_i8_t{threads}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for case in &CASES {
            let out = case.size + 2 * case.pad - case.k + 1;
            let macs =
                case.batch * case.cout * out * out * (case.cin / case.groups) * case.k * case.k;
            group.throughput(Throughput::Elements(macs as u64));
            let cfg = Conv2dConfig::new(case.cin, case.cout, case.k)
                .with_padding(case.pad)
                .with_groups(case.groups);
            let mut b = GraphBuilder::new(1);
            b.input("x", &[case.cin, case.size, case.size])
                .conv2d("conv", "x", cfg);
            let net = b.build("conv").expect("valid conv");
            let xf = ArrayD::from_shape_fn(vec![case.batch, case.cin, case.size, case.size], |d| {
                ((d[1] * 7 + d[2] * 3 + d[3]) % 17) as f32 / 17.0
            });
            group.bench_function(BenchmarkId::new("f32_conv", case.name), |bch| {
                pool.install(|| bch.iter(|| black_box(net.forward(&xf).expect("shapes"))))
            });
            let x8 = Array4::from_shape_fn(
                (case.batch, case.cin, case.size, case.size),
                |(_, c, y, x)| ((c * 7 + y * 3 + x) % 251) as u8,
            );
            let w8 = Array4::from_shape_fn(
                (case.cout, case.cin / case.groups, case.k, case.k),
                |(o, c, y, x)| ((o * 5 + c * 3 + y + x) % 255) as i8,
            );
            let spec = ConvSpec::default()
                .with_padding(case.pad)
                .with_groups(case.groups);
            let rq = Requantize::from_real(vec![0; case.cout], &vec![1e-3; case.cout], 128)
                .expect("valid");
            let kernels: Vec<KernelChoice> = if case.groups > 1 {
                vec![KernelChoice::best()] // depthwise has one direct kernel
            } else {
                KernelChoice::available()
                    .into_iter()
                    .filter(|&k| k != KernelChoice::Reference)
                    .collect()
            };
            for kernel in kernels {
                let conv = PackedConv::with_kernel(w8.view(), spec, kernel).expect("available");
                let label = if conv.is_depthwise() {
                    "depthwise_u8".to_string()
                } else {
                    format!("{kernel}_u8")
                };
                group.bench_function(
                    BenchmarkId::new(format!("{label}_nchw"), case.name),
                    |bch| {
                        pool.install(|| {
                            bch.iter(|| {
                                black_box(
                                    conv2d_u8i8_u8(x8.view(), 128, &conv, &rq).expect("shapes"),
                                )
                            })
                        })
                    },
                );
                let x_nhwc = x8
                    .view()
                    .permuted_axes([0, 2, 3, 1])
                    .as_standard_layout()
                    .into_owned();
                group.bench_function(
                    BenchmarkId::new(format!("{label}_nhwc"), case.name),
                    |bch| {
                        pool.install(|| {
                            bch.iter(|| {
                                black_box(
                                    conv2d_nhwc_u8i8_u8(x_nhwc.view(), 128, &conv, &rq)
                                        .expect("shapes"),
                                )
                            })
                        })
                    },
                );
            }
        }
        group.finish();
    }
}

criterion_group!(benches, conv_i8);
criterion_main!(benches);
