//! The float baseline: LeNet-5 inference at batch 1 and 64 on the f32 path.
//!
//! Later issues measure int8 and pruned models against these numbers in the same run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::ArrayD;
use nncompress::model::zoo;
use std::hint::black_box;

fn forward_f32(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_f32");
    for (name, net) in [
        ("lenet5", zoo::lenet5(1).expect("fixed architecture")),
        (
            "lenet_300_100",
            zoo::lenet_300_100(1).expect("fixed architecture"),
        ),
    ] {
        for batch in [1usize, 64] {
            let x = ArrayD::from_shape_fn(vec![batch, 1, 28, 28], |d| {
                ((d[0] * 7 + d[2] * 28 + d[3]) % 255) as f32 / 255.0
            });
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(
                BenchmarkId::new(name, format!("batch{batch}")),
                &x,
                |b, x| b.iter(|| black_box(net.forward(black_box(x)).expect("valid input"))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, forward_f32);
criterion_main!(benches);
