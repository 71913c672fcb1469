//! int8 GEMM on every available path beside the f32 GEMM (the `gemm` crate, which the float
//! graph's convolutions use), the packed f32 Linear kernel (what float inference runs for
//! Linear layers on AVX-512F) and ndarray's `dot`, in the same run, on 1 and 2 threads.
//!
//! Throughput is in multiply-accumulates: criterion's "elements/s" is MAC/s, so GOP/s
//! (one multiply and one add per MAC) is twice the reported Gelem/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array2;
use nncompress::kernels::{
    gemm_u8i8_i32, gemm_u8i8_u8, sgemm, KernelChoice, PackedLinear, PackedWeights, Requantize,
};
use std::hint::black_box;
use std::time::Duration;

const SHAPES: [(usize, usize, usize); 6] = [
    (64, 64, 64),
    (256, 256, 256),
    (512, 512, 512),
    (1024, 1024, 1024),
    (64, 784, 300),
    (3136, 576, 64),
];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn gemm_i8(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let pool = pool(threads);
        let mut group = c.benchmark_group(format!("gemm_i8_t{threads}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for &(m, k, n) in &SHAPES {
            let id = format!("{m}x{k}x{n}");
            group.throughput(Throughput::Elements((m * k * n) as u64));
            let a8 = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 13) % 251) as u8);
            let w8 = Array2::from_shape_fn((n, k), |(i, j)| ((i * 5 + j * 3) % 255) as i8);
            let af = a8.mapv(|v| v as f32);
            let wf = w8.mapv(|v| v as f32);
            let mut outf = Array2::<f32>::zeros((m, n));
            group.bench_function(BenchmarkId::new("f32_gemm", &id), |b| {
                pool.install(|| {
                    b.iter(|| sgemm(af.view(), wf.t(), outf.view_mut(), false).expect("shapes"))
                })
            });
            if PackedLinear::is_supported() {
                let packed = PackedLinear::new(wf.view(), None).expect("packs");
                group.bench_function(BenchmarkId::new("f32_packed", &id), |b| {
                    pool.install(|| {
                        b.iter(|| black_box(packed.forward(af.view()).expect("shapes")))
                    })
                });
            }
            if threads == 1 {
                group.bench_function(BenchmarkId::new("f32_ndarray_dot", &id), |b| {
                    pool.install(|| b.iter(|| black_box(af.dot(&wf.t()))))
                });
            }
            let rq = Requantize::from_real(vec![0; n], &vec![1e-4; n], 128).expect("valid");
            for kernel in KernelChoice::available() {
                if kernel == KernelChoice::Reference {
                    continue;
                }
                let packed = PackedWeights::with_kernel(w8.view(), kernel).expect("available");
                let mut out = Array2::<i32>::zeros((m, n));
                group.bench_function(BenchmarkId::new(format!("{kernel}_i32"), &id), |b| {
                    pool.install(|| {
                        b.iter(|| {
                            gemm_u8i8_i32(a8.view(), 3, &packed, None, out.view_mut())
                                .expect("shapes")
                        })
                    })
                });
                let mut out8 = Array2::<u8>::zeros((m, n));
                group.bench_function(BenchmarkId::new(format!("{kernel}_u8"), &id), |b| {
                    pool.install(|| {
                        b.iter(|| {
                            gemm_u8i8_u8(a8.view(), 3, &packed, &rq, out8.view_mut())
                                .expect("shapes")
                        })
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, gemm_i8);
criterion_main!(benches);
