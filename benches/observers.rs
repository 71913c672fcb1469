//! Calibration cost: a 2048-bin histogram of 10M floats, and the KLD threshold search.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{ArrayD, IxDyn};
use nncompress::quantizer::{Histogram, KldObserver, Observer};
use std::hint::black_box;
use std::time::Duration;

fn observers(c: &mut Criterion) {
    let n = 10_000_000;
    // A deterministic bell-ish spread (sum of three uniforms) with a few outliers.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut data: Vec<f32> = (0..n).map(|_| uniform() + uniform() + uniform()).collect();
    for i in 0..100 {
        data[i * 99_991] = 40.0;
    }
    let x = ArrayD::from_shape_vec(IxDyn(&[n]), data).expect("shape");
    let mut group = c.benchmark_group("observers");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("histogram_2048_bins_10M", |b| {
        b.iter(|| {
            let mut h = Histogram::new(2048).unwrap();
            h.add(black_box(x.view())).expect("finite");
            black_box(h.total())
        })
    });
    group.throughput(Throughput::Elements(1));
    let mut kld = KldObserver::default();
    kld.observe(x.view()).expect("finite");
    group.bench_function("kld_threshold_search_2048_to_128", |b| {
        b.iter(|| black_box(kld.range().expect("observed")))
    });
    group.finish();
}

criterion_group!(benches, observers);
criterion_main!(benches);
