//! Structured pruning's speed-up: the float forward pass of the MNIST VGG (`vgg_small([1, 28,
//! 28], [32, 64, 128])`, the committed fixture) beside the same network after L1 pruning of
//! half of every conv's channels, and beside the widths network slimming produced in
//! `prune_mnist` (seed 1), in the same run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::ArrayD;
use nncompress::model::{zoo, Graph};
use nncompress::pruner::{L1Norm, StructuredPruner};
use std::hint::black_box;
use std::time::Duration;

/// Conv widths the network-slimming run of `cargo run --release --example prune_mnist`
/// (seed 1, global 50 % by BatchNorm |γ|) kept; the speed depends only on them.
const SLIMMED: [usize; 3] = [10, 20, 82];

fn batch(n: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(vec![n, 1, 28, 28], |d| {
        ((d[0] * 31 + d[2] * 3 + d[3]) % 97) as f32 / 97.0
    })
}

fn pruned(c: &mut Criterion) {
    let vgg = Graph::from_safetensors(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vgg_small.safetensors"
        ),
        zoo::vgg_small([1, 28, 28], &[32, 64, 128], 10, 0).expect("architecture"),
    )
    .expect("fixture");
    let (l1, _) = StructuredPruner::new(L1Norm)
        .with_ratio(0.5)
        .expect("ratio")
        .prune(&vgg, None)
        .expect("prunes");
    let slim = zoo::vgg_small([1, 28, 28], &SLIMMED, 10, 0).expect("architecture");
    let mut group = c.benchmark_group("pruned_vgg");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [1usize, 64] {
        let x = batch(n);
        group.throughput(Throughput::Elements(n as u64));
        for (name, g) in [("dense", &vgg), ("l1_50", &l1), ("slimmed_50", &slim)] {
            group.bench_function(BenchmarkId::new(name, format!("b{n}")), |b| {
                b.iter(|| black_box(g.forward(&x).expect("runs")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pruned);
criterion_main!(benches);
