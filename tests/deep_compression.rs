//! Deep compression: Huffman and relative-index coding round trips, k-means, the `.nndc` file
//! (exact round trips, corrupt files), and the compression of LeNet-300-100 on MNIST.

use ndarray::ArrayD;
use nncompress::model::{zoo, Graph};
use nncompress::pruner::deep_compression::{
    decode_relative, encode_relative, kmeans_linear, nearest, Compressed, DeepCompressionConfig,
    HuffmanCode, SharedWeights,
};
use nncompress::pruner::{Magnitude, UnstructuredPruner};
use nncompress::train::{
    evaluate, load_mnist, InMemoryDataset, LrSchedule, MnistSplit, Sgd, TrainConfig, Trainer,
};
use nncompress::Error;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn huffman_round_trips(
        symbols in proptest::collection::vec(0u32..40, 0..400),
        skew in 0u32..4,
    ) {
        // Skewed streams: most symbols collapse to a few values.
        let symbols: Vec<u32> = symbols.iter().map(|&s| if s % (skew + 1) == 0 { s } else { s % 3 }).collect();
        let mut counts = vec![0u64; 40];
        for &s in &symbols {
            counts[s as usize] += 1;
        }
        let code = HuffmanCode::from_counts(&counts).unwrap();
        let (bytes, bits) = code.encode(&symbols).unwrap();
        prop_assert_eq!(code.decode(&bytes, bits, symbols.len()).unwrap(), symbols.clone());
        // Canonical codes are rebuilt from the lengths alone (what the file stores).
        let again = HuffmanCode::from_lengths(code.lengths().to_vec()).unwrap();
        prop_assert_eq!(again.decode(&bytes, bits, symbols.len()).unwrap(), symbols);
    }

    #[test]
    fn relative_index_round_trips(
        gaps in proptest::collection::vec(1u32..3000, 0..200),
        bits in 1u32..9,
        seed in 0u64..1000,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pos = 0u32;
        let positions: Vec<u32> = gaps.iter().map(|g| { pos += g; pos - 1 }).collect();
        let values: Vec<u32> = positions.iter().map(|_| rng.random_range(0..31)).collect();
        let len = pos as usize + 5;
        let rel = encode_relative(&positions, &values, bits, 31).unwrap();
        prop_assert!(rel.gaps.iter().all(|&g| g < 1 << bits));
        let back = decode_relative(&rel, 31, len).unwrap();
        let want: Vec<(u32, u32)> = positions.into_iter().zip(values).collect();
        prop_assert_eq!(back, want);
    }
}

#[test]
fn huffman_edge_cases() {
    // Empty stream, a single symbol, and the length limit on a Fibonacci-skewed alphabet.
    let code = HuffmanCode::from_counts(&[0, 0, 0]).unwrap();
    assert_eq!(code.encode(&[]).unwrap(), (vec![], 0));
    let one = HuffmanCode::from_counts(&[0, 7, 0]).unwrap();
    let (b, n) = one.encode(&[1; 7]).unwrap();
    assert_eq!(n, 7);
    assert_eq!(one.decode(&b, n, 7).unwrap(), vec![1; 7]);
    let mut fib = vec![1u64, 1];
    while fib.len() < 40 {
        let k = fib.len();
        fib.push(fib[k - 1] + fib[k - 2]);
    }
    let deep = HuffmanCode::from_counts(&fib).unwrap();
    assert!(deep.lengths().iter().all(|&l| l <= 24));
    let syms: Vec<u32> = (0..40).collect();
    let (b, n) = deep.encode(&syms).unwrap();
    assert_eq!(deep.decode(&b, n, 40).unwrap(), syms);
    // Symbols without a code and streams that run out are errors.
    assert!(one.encode(&[0]).is_err());
    assert!(one.decode(&b[..0], 0, 1).is_err());
    assert!(HuffmanCode::from_lengths(vec![1, 1, 1]).is_err());
}

#[test]
fn relative_index_fillers_and_bad_input() {
    // A gap of 20 with 3-bit gaps (spans of 8) needs two fillers.
    let rel = encode_relative(&[19], &[4], 3, 7).unwrap();
    assert_eq!(rel.gaps, vec![7, 7, 3]);
    assert_eq!(rel.values, vec![7, 7, 4]);
    assert_eq!(decode_relative(&rel, 7, 20).unwrap(), vec![(19, 4)]);
    assert!(decode_relative(&rel, 7, 19).is_err());
    assert!(encode_relative(&[3, 3], &[0, 0], 3, 7).is_err());
    assert!(encode_relative(&[3], &[7], 3, 7).is_err());
    assert!(encode_relative(&[3], &[0], 0, 7).is_err());
}

#[test]
fn kmeans_linear_init_finds_clusters() {
    let mut rng = StdRng::seed_from_u64(4);
    let values: Vec<f32> = (0..3000)
        .map(|i| [-1.0f32, 0.2, 3.0][i % 3] + rng.random_range(-0.05f32..0.05))
        .collect();
    let k = kmeans_linear(&values, 3, 100);
    assert_eq!(k.centroids.len(), 3);
    for (c, want) in k.centroids.iter().zip([-1.0f32, 0.2, 3.0]) {
        assert!((c - want).abs() < 0.01, "{:?}", k.centroids);
    }
    for (i, &a) in k.assignment.iter().enumerate() {
        assert_eq!(a as usize, i % 3);
    }
    assert_eq!(nearest(&[0.0, 1.0, 2.0], 1.4), 1);
    assert_eq!(nearest(&[0.0, 1.0, 2.0], 9.0), 2);
    // Fewer values than clusters, and none.
    assert_eq!(kmeans_linear(&[1.0, 2.0], 31, 10).centroids.len(), 2);
    assert!(kmeans_linear(&[], 31, 10).assignment.is_empty());
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mnist(split: MnistSplit) -> InMemoryDataset {
    load_mnist(root().join("data/mnist"), split).unwrap()
}

/// A randomly pruned LeNet-300-100 (no training): for format tests.
fn sparse_mlp() -> Graph {
    let mut g = zoo::lenet_300_100(5).unwrap();
    let masks = UnstructuredPruner::new(Magnitude, 0.9)
        .unwrap()
        .masks(&g, 1.0, None, None)
        .unwrap();
    masks.apply(&mut g).unwrap();
    g
}

#[test]
fn compress_save_load_decompress_is_exact() {
    let g = sparse_mlp();
    let mut shared = SharedWeights::from_graph(&g, &DeepCompressionConfig::default()).unwrap();
    let mut quantized = g.clone();
    shared.apply(&mut quantized).unwrap();
    for f16 in [false, true] {
        let c = shared.compress(&quantized, f16).unwrap();
        let path = std::env::temp_dir().join(format!("nncompress_test_{f16}.nndc"));
        c.save(&path).unwrap();
        let back = Compressed::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(back, c);
        let restored = back.decompress(&zoo::lenet_300_100(0).unwrap()).unwrap();
        let x = ArrayD::from_shape_fn(vec![8, 1, 28, 28], |d| {
            ((d[0] + d[2] * d[3]) % 13) as f32 / 13.0
        });
        if f16 {
            // The codebook went through float16: the in-memory model must use it too.
            let mut rounded = shared.clone();
            for l in &mut rounded.layers {
                for c in &mut l.centroids {
                    *c = half::f16::from_f32(*c).to_f32();
                }
            }
            let mut q16 = quantized.clone();
            rounded.apply(&mut q16).unwrap();
            assert_eq!(restored.forward(&x).unwrap(), q16.forward(&x).unwrap());
        } else {
            let mut same = true;
            restored.visit_params(|name, _, v| {
                quantized.visit_params(|n, _, w| {
                    if n == name {
                        same &= v == w;
                    }
                })
            });
            assert!(same, "decompressed weights differ");
            assert_eq!(
                restored.forward(&x).unwrap(),
                quantized.forward(&x).unwrap()
            );
        }
    }
    // 5-bit fc layers share at most 31 values (the 32nd symbol is the filler).
    for l in &shared.layers {
        let w = l.weight().unwrap();
        let mut distinct: Vec<u32> = w
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| v.to_bits())
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            l.centroids.len() <= 31 && distinct.len() <= 31,
            "{}",
            l.name
        );
    }
    // Out-of-range codes are errors, not panics.
    shared.layers[0].codes[0] = 999;
    assert!(shared.layers[0].weight().is_err());
}

#[test]
fn corrupt_truncated_and_wrong_version_files_are_typed_errors() {
    let g = sparse_mlp();
    let shared = SharedWeights::from_graph(&g, &DeepCompressionConfig::default()).unwrap();
    let bytes = shared.compress(&g, false).unwrap().to_bytes();
    let corrupt = |b: &[u8]| {
        matches!(
            Compressed::from_bytes(b, None),
            Err(Error::CorruptFile { .. })
        )
    };
    assert!(corrupt(&bytes[..10]));
    assert!(corrupt(&bytes[..bytes.len() - 1]));
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert!(corrupt(&v2));
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(corrupt(&magic));
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..300 {
        let mut b = bytes.clone();
        let i = rng.random_range(0..b.len());
        b[i] ^= 1 << rng.random_range(0..8);
        assert!(corrupt(&b), "flip at {i} was not caught");
    }
    // A wrong architecture is a typed error too.
    let c = Compressed::from_bytes(&bytes, None).unwrap();
    assert!(c.decompress(&zoo::lenet5(0).unwrap()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random bytes after a valid header (the checksum recomputed, so that the parser itself
    /// is exercised) never panic.
    #[test]
    fn random_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut crc = flate2::Crc::new();
        crc.update(&payload);
        let mut b = b"NNDC".to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc.sum().to_le_bytes());
        b.extend_from_slice(&payload);
        let _ = Compressed::from_bytes(&b, None);
    }
}

#[test]
fn lenet_300_100_is_40x_smaller_and_keeps_its_accuracy() {
    let (train, test) = (mnist(MnistSplit::Train), mnist(MnistSplit::Test));
    let mut net = Graph::from_safetensors(
        root().join("tests/fixtures/lenet_300_100.safetensors"),
        zoo::lenet_300_100(0).unwrap(),
    )
    .unwrap();
    let pruner = UnstructuredPruner::new(Magnitude, 0.925)
        .unwrap()
        .with_layer_sparsity("fc2", 0.92)
        .unwrap()
        .with_layer_sparsity("fc3", 0.75)
        .unwrap();
    pruner
        .iterative(&mut net, 4, |g, m, round| {
            let keep = m.clone();
            Trainer::new(
                TrainConfig::new(3, 64, 1 + round as u64).with_schedule(LrSchedule::Cosine),
                Sgd::new(0.02).with_momentum(0.9).with_weight_decay(5e-4),
            )
            .after_step(move |g| keep.apply(g))
            .fit(g, &train, None)
            .map(|_| ())
        })
        .unwrap();
    let mut shared = SharedWeights::from_graph(&net, &DeepCompressionConfig::default()).unwrap();
    shared
        .fine_tune(
            &mut net,
            &train,
            TrainConfig::new(1, 64, 9).with_schedule(LrSchedule::Cosine),
            1e-4,
            |_| {},
        )
        .unwrap();
    let c = shared.compress(&net, false).unwrap();
    let restored = Compressed::from_bytes(&c.to_bytes(), None)
        .unwrap()
        .decompress(&zoo::lenet_300_100(0).unwrap())
        .unwrap();
    let err = evaluate(&restored, &test, 1000).unwrap().error_percent();
    // Measured: 41.7x (25,548 bytes), 1.57 % test error.
    assert!(c.ratio() >= 40.0, "{:.1}x", c.ratio());
    assert!(err <= 1.7, "test error {err} %");
}

#[test]
fn the_committed_lenet5_file_is_39x_smaller_and_keeps_its_accuracy() {
    // Written by `cargo run --release --example deep_compression_mnist -- --model lenet5
    // --out tests/fixtures` (seed 1).
    let path = root().join("tests/fixtures/lenet5.nndc");
    let bytes = std::fs::read(&path).unwrap();
    let c = Compressed::from_bytes(&bytes, Some(&path)).unwrap();
    assert_eq!(c.to_bytes(), bytes, "re-encoding gives the same file");
    assert!(c.ratio() >= 39.0, "{:.1}x", c.ratio());
    let kept: usize = c.layers.iter().map(|l| l.nonzeros).sum();
    let total: usize = c.layers.iter().map(|l| l.weights()).sum();
    assert!(kept * 100 <= total * 8, "{kept} of {total} weights kept");
    let g = c.decompress(&zoo::lenet5(0).unwrap()).unwrap();
    let err = evaluate(&g, &mnist(MnistSplit::Test), 1000)
        .unwrap()
        .error_percent();
    assert!(err <= 0.9, "test error {err} %");
}
