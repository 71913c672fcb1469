//! Whole models: the float graph beside its full-integer and dynamic-range quantized forms,
//! in the same run (LeNet-5 and LeNet-300-100 from the committed MNIST fixtures; a small
//! VGG-style CNN and a small residual CNN).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::ArrayD;
use nncompress::model::{zoo, Graph};
use nncompress::quantizer::{Calibration, QuantConfig, Quantizer};
use std::hint::black_box;
use std::time::Duration;

fn batch(shape: &[usize], seed: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(shape.to_vec(), |d| {
        (((d[0] + seed) * 31 + d[1] * 7 + d[2] * 3 + d[3]) % 97) as f32 / 97.0
    })
}

fn models(c: &mut Criterion) {
    let lenet = Graph::from_safetensors(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/lenet5.safetensors"
        ),
        zoo::lenet5(0).expect("architecture"),
    )
    .expect("fixture");
    let mlp = Graph::from_safetensors(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/lenet_300_100.safetensors"
        ),
        zoo::lenet_300_100(0).expect("architecture"),
    )
    .expect("fixture");
    let vgg = zoo::vgg_small([3, 32, 32], &[32, 64, 128], 10, 1).expect("architecture");
    let resnet = zoo::resnet_small([3, 32, 32], 16, 3, 10, 1).expect("architecture");
    let mut group = c.benchmark_group("quantized_models");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, net, input) in [
        ("lenet5", &lenet, vec![1, 28, 28]),
        ("lenet_300_100", &mlp, vec![1, 28, 28]),
        ("vgg_small", &vgg, vec![3, 32, 32]),
        ("resnet_small", &resnet, vec![3, 32, 32]),
    ] {
        let calib: Vec<_> = (0..4)
            .map(|s| {
                let mut shape = vec![64];
                shape.extend(&input);
                batch(&shape, s)
            })
            .collect();
        let int8 = Quantizer::new(QuantConfig::int8().calibration(Calibration::MinMax))
            .calibrate(net, &calib)
            .expect("calibrates");
        let dynamic = Quantizer::new(QuantConfig::dynamic_int8())
            .calibrate(net, &calib)
            .expect("calibrates");
        for n in [1usize, 64] {
            let mut shape = vec![n];
            shape.extend(&input);
            let x = batch(&shape, 9);
            let id = format!("{name}_b{n}");
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new("f32", &id), |b| {
                b.iter(|| black_box(net.forward(&x).expect("runs")))
            });
            group.bench_function(BenchmarkId::new("int8", &id), |b| {
                b.iter(|| black_box(int8.forward(&x).expect("runs")))
            });
            group.bench_function(BenchmarkId::new("dynamic_int8", &id), |b| {
                b.iter(|| black_box(dynamic.forward(&x).expect("runs")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, models);
criterion_main!(benches);
