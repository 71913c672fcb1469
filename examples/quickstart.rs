//! The main job: a tour of nncompress on the bundled data, ending with a table of results.
//!
//! Run with `cargo run --release --example quickstart`. Each pillar adds its step here.

mod common;

use ndarray::Array2;
use nncompress::distiller::{Distiller, LogitKd};
use nncompress::kernels::{gemm_u8i8_i32, sgemm, KernelChoice, PackedWeights};
use nncompress::model::zoo;
use nncompress::nas::{
    best as nas_best, CnnSpace, Cost, Objective, ProxyEvaluator, RandomSearch,
    RegularizedEvolution, Search, SearchSpace,
};
use nncompress::pruner::deep_compression::{Compressed, DeepCompressionConfig, SharedWeights};
use nncompress::pruner::{L1Norm, Magnitude, StructuredPruner, UnstructuredPruner};
use nncompress::quantizer::{
    convert, fake_quantize, prepare_qat, KldObserver, MinMaxObserver, Observer, QuantConfig,
    QuantDtype, QuantParams, QuantScheme, QuantizedModel, Quantizer,
};
use nncompress::train::{argmax_rows, Dataset};
use nncompress::train::{evaluate, load_digits, Adam, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::{Duration, Instant};

/// Runs `f` repeatedly for about `budget` and returns the median time of one call.
fn median_time(budget: Duration, mut f: impl FnMut()) -> Duration {
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || times.len() < 5 {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn main() -> nncompress::Result<()> {
    let seed = 2026;
    let start = Instant::now();
    let mut rows = Vec::new();

    // Step 1: a float model, trained by the crate on the UCI digits.
    let digits = load_digits(common::data_dir().join("digits/digits.csv.gz"))?;
    let (train, test) = digits.split(1437, &mut StdRng::seed_from_u64(seed))?;
    println!(
        "Step 1: train a CNN on {} UCI digits (8x8), test on {}",
        train.labels().len(),
        test.labels().len()
    );
    let mut net = zoo::digits_cnn(seed)?;
    println!("{}", net.summary());
    let mut trainer = Trainer::new(TrainConfig::new(15, 32, seed), Adam::new(2e-3))
        .on_progress(common::progress_bar("train"));
    trainer.fit(&mut net, &train, None)?;
    let eval = evaluate(&net, &test, 256)?;
    rows.push(vec![
        "1. train float".to_string(),
        format!("digits_cnn, {} parameters", net.param_count()),
        format!(
            "test accuracy {:.2}% ({} errors of {})",
            100.0 * eval.accuracy,
            eval.errors,
            eval.samples
        ),
    ]);

    // Step 2: the crate's int8 kernels against the f32 GEMM the float model runs on.
    let kernel = KernelChoice::best();
    let n = 256;
    println!("\nStep 2: int8 GEMM on the {kernel} path vs the f32 GEMM, {n}x{n}x{n}");
    let a8 = Array2::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 13) % 251) as u8);
    let w8 = Array2::from_shape_fn((n, n), |(i, j)| ((i * 5 + j * 3) % 255) as i8);
    let (af, wf) = (a8.mapv(f32::from), w8.mapv(f32::from));
    let packed = PackedWeights::new(w8.view())?;
    let mut out_i32 = Array2::<i32>::zeros((n, n));
    let mut out_f32 = Array2::<f32>::zeros((n, n));
    let budget = Duration::from_millis(300);
    let t_i8 = median_time(budget, || {
        let _ = gemm_u8i8_i32(a8.view(), 128, &packed, None, out_i32.view_mut());
    });
    let t_f32 = median_time(budget, || {
        let _ = sgemm(af.view(), wf.t(), out_f32.view_mut(), false);
    });
    let ops = 2.0 * (n * n * n) as f64;
    rows.push(vec![
        "2. int8 kernels".to_string(),
        format!("{kernel} path, {} threads", rayon::current_num_threads()),
        format!(
            "{:.0} GOP/s int8 vs {:.0} GFLOP/s f32: {:.1}x",
            ops / t_i8.as_secs_f64() / 1e9,
            ops / t_f32.as_secs_f64() / 1e9,
            t_f32.as_secs_f64() / t_i8.as_secs_f64()
        ),
    ]);

    // Step 3: calibration. Watch conv2's output on the test digits through an activation tap
    // and compare the ranges two observers propose for u8 quantization.
    println!("\nStep 3: calibrate conv2's output range (min-max vs KLD)");
    let conv2 = net.id("conv2")?;
    let (x, labels) = test.batch(&(0..test.labels().len()).collect::<Vec<_>>())?;
    let mut taps = Vec::new();
    net.forward_with(&x, &mut |id, _, out| {
        if id == conv2 {
            taps.push(out.clone());
        }
    })?;
    let act = &taps[0];
    let mut observers: Vec<(&str, Box<dyn Observer>)> = vec![
        ("min-max", Box::new(MinMaxObserver::new())),
        ("KLD", Box::new(KldObserver::default())),
    ];
    let mut cells = Vec::new();
    for (name, obs) in &mut observers {
        obs.observe(act.view())?;
        let (lo, hi) = obs.range()?;
        let p = QuantParams::from_range(QuantScheme::uint8_activations(), &[lo], &[hi])?;
        let back = fake_quantize(act.view(), &p)?;
        let signal: f64 = act.iter().map(|&v| (v as f64).powi(2)).sum();
        let noise: f64 = act
            .iter()
            .zip(back.iter())
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum();
        cells.push(format!(
            "{name} [{lo:.2}, {hi:.2}] SQNR {:.1} dB",
            10.0 * (signal / noise).log10()
        ));
    }
    rows.push(vec![
        "3. calibrate".to_string(),
        "conv2 output, u8 affine".to_string(),
        cells.join("; "),
    ]);

    // Step 4: post-training quantization to a full-integer model on the int8 kernels.
    println!("\nStep 4: quantize the CNN to int8 (full integer, KLD calibration on 256 images)");
    let calib: Vec<_> = (0..4)
        .map(|b| {
            train
                .batch(&(b * 64..(b + 1) * 64).collect::<Vec<_>>())
                .map(|(x, _)| x)
        })
        .collect::<nncompress::Result<_>>()?;
    let q = Quantizer::new(QuantConfig::int8()).calibrate(&net, &calib)?;
    println!("{}", q.report_table());
    let pred = argmax_rows(&q.forward(&x)?)?;
    let int8_acc =
        pred.iter().zip(&labels).filter(|(a, b)| a == b).count() as f32 / labels.len() as f32;
    let t_f32 = median_time(budget, || {
        let _ = net.forward(&x);
    });
    let t_int8 = median_time(budget, || {
        let _ = q.forward(&x);
    });
    rows.push(vec![
        "4. quantize int8".to_string(),
        format!(
            "{} bytes as .nnq (f32 weights: {})",
            q.to_bytes()?.len(),
            4 * net.param_count()
        ),
        format!(
            "test accuracy {:.2}% (float {:.2}%), {:.1}x faster on {} images",
            100.0 * int8_acc,
            100.0 * eval.accuracy,
            t_f32.as_secs_f64() / t_int8.as_secs_f64(),
            labels.len()
        ),
    ]);

    // Step 5: quantization-aware training with 4-bit weights: fake quantization in the
    // training graph, then conversion to the same integer model.
    println!("\nStep 5: 4-bit weights, 8-bit activations: PTQ vs quantization-aware training");
    let w4 = QuantScheme::int8_weights().with_dtype(QuantDtype::Int4);
    let mut cfg = QuantConfig::int8();
    cfg.weights = w4;
    let accuracy = |q: &QuantizedModel| -> nncompress::Result<f32> {
        let pred = argmax_rows(&q.forward(&x)?)?;
        Ok(pred.iter().zip(&labels).filter(|(a, b)| a == b).count() as f32 / labels.len() as f32)
    };
    let mut ptq_cfg = QuantConfig::int8();
    for layer in ["conv1", "conv2", "fc"] {
        ptq_cfg = ptq_cfg.with_layer_weights(layer, w4);
    }
    let ptq4 = Quantizer::new(ptq_cfg).calibrate(&net, &calib)?;
    let mut qat = prepare_qat(&net, &cfg)?;
    let mut trainer = Trainer::new(TrainConfig::new(5, 32, seed), Adam::new(5e-4))
        .on_progress(common::progress_bar("QAT"));
    trainer.fit(&mut qat, &train, None)?;
    let qat4 = convert(&qat)?;
    rows.push(vec![
        "5. QAT w4 a8".to_string(),
        "5 epochs of fake-quantized training, then convert".to_string(),
        format!(
            "test accuracy {:.2}% (4-bit PTQ: {:.2}%)",
            100.0 * accuracy(&qat4)?,
            100.0 * accuracy(&ptq4)?
        ),
    ]);

    // Step 6: structured pruning: remove half of every conv's channels (and the matching
    // inputs of the next layer), fine-tune briefly, and time the smaller float model.
    println!("\nStep 6: prune half of the CNN's channels (L1), fine-tune 10 epochs");
    let (mut pruned, report) = StructuredPruner::new(L1Norm)
        .with_ratio(0.5)?
        .prune(&net, None)?;
    println!("{}", report.table());
    let mut trainer = Trainer::new(TrainConfig::new(10, 32, seed), Adam::new(1e-3))
        .on_progress(common::progress_bar("fine-tune"));
    trainer.fit(&mut pruned, &train, None)?;
    let pruned_eval = evaluate(&pruned, &test, 256)?;
    let t_pruned = median_time(budget, || {
        let _ = pruned.forward(&x);
    });
    rows.push(vec![
        "6. prune channels".to_string(),
        format!(
            "{} → {} parameters, {:.0} % fewer MACs",
            report.params.0,
            report.params.1,
            100.0 * report.macs_removed()
        ),
        format!(
            "test accuracy {:.2}% (float {:.2}%), float forward {:.1}x faster",
            100.0 * pruned_eval.accuracy,
            100.0 * eval.accuracy,
            t_f32.as_secs_f64() / t_pruned.as_secs_f64()
        ),
    ]);

    // Step 7: deep compression: prune 75 % of the weights (masks kept through retraining),
    // share the survivors' values by k-means, Huffman-code them into a .nndc file, load it.
    println!("\nStep 7: deep compression (prune, share weights, Huffman) into a .nndc file");
    let mut sparse = net.clone();
    let masks = UnstructuredPruner::new(Magnitude, 0.75)?.masks(&sparse, 1.0, None, None)?;
    masks.apply(&mut sparse)?;
    let keep = masks.clone();
    Trainer::new(TrainConfig::new(10, 32, seed), Adam::new(1e-3))
        .on_progress(common::progress_bar("retrain"))
        .after_step(move |g| keep.apply(g))
        .fit(&mut sparse, &train, None)?;
    // A network this small wants small codebooks: 5 bits for the convolutions too.
    let dc = DeepCompressionConfig {
        conv_bits: 5,
        conv_index_bits: 5,
        ..DeepCompressionConfig::default()
    };
    let mut shared = SharedWeights::from_graph(&sparse, &dc)?;
    shared.fine_tune(
        &mut sparse,
        &train,
        TrainConfig::new(2, 32, seed),
        1e-4,
        common::progress_bar("centroids"),
    )?;
    let packed = shared.compress(&sparse, false)?;
    let restored = Compressed::from_bytes(&packed.to_bytes(), None)?.decompress(&net)?;
    rows.push(vec![
        "7. deep compression".to_string(),
        format!(
            "{} bytes as .nndc (f32 parameters: {})",
            packed.file_bytes(),
            packed.float_bytes
        ),
        format!(
            "test accuracy {:.2}% (float {:.2}%), {:.1}x smaller",
            100.0 * evaluate(&restored, &test, 256)?.accuracy,
            100.0 * eval.accuracy,
            packed.ratio()
        ),
    ]);

    // Step 8: knowledge distillation: the CNN teaches a small MLP on the same digits.
    println!("\nStep 8: distill the CNN into a 64-16-10 MLP (KD, T = 4) vs the MLP alone");
    let mlp = |seed: u64| -> nncompress::Result<nncompress::Graph> {
        let mut b = nncompress::GraphBuilder::new(seed);
        b.input("input", &[1, 8, 8])
            .flatten("flatten", "input")
            .linear("fc1", "flatten", 64, 16, true)
            .relu("relu1", "fc1")
            .linear("fc2", "relu1", 16, 10, true);
        b.build("fc2")
    };
    let student_cfg = TrainConfig::new(20, 32, seed);
    let mut alone = mlp(seed)?;
    Trainer::new(student_cfg, Adam::new(2e-3)).fit(&mut alone, &train, None)?;
    let mut taught = mlp(seed)?;
    Distiller::new(&net, student_cfg, Adam::new(2e-3))
        .with_loss(1.0, LogitKd::new("fc2", "fc", 4.0, 1.0)?)?
        .on_progress(common::progress_bar("distill"))
        .fit(&mut taught, &train)?;
    let (e_alone, e_taught) = (
        evaluate(&alone, &test, 256)?.errors,
        evaluate(&taught, &test, 256)?.errors,
    );
    rows.push(vec![
        "8. distill".to_string(),
        format!(
            "CNN teacher ({} errors) → MLP, {} parameters",
            eval.errors,
            taught.param_count()
        ),
        format!(
            "{e_taught} errors distilled vs {e_alone} alone (of {})",
            eval.samples
        ),
    ]);

    // Step 9: architecture search: regularized evolution against random search, proxies
    // trained 2 epochs on the digits, score = held-out accuracy if the int8 model is no
    // slower at batch 1 than the CNN from step 4.
    println!(
        "\nStep 9: search CNN architectures under an int8 latency budget (evolution vs random)"
    );
    let space = CnnSpace {
        widths: vec![8, 16, 32],
        ..CnnSpace::new([1, 8, 8], 10, 2)
    };
    let x1 = x
        .slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..1))
        .to_owned();
    let budget_ms = median_time(Duration::from_millis(100), || {
        let _ = q.forward(&x1);
    })
    .as_secs_f64()
        * 1e3;
    let evaluator = ProxyEvaluator {
        train: &train,
        eval: &test,
        config: TrainConfig::new(2, 32, seed),
        lr: 0.05,
        objective: Objective::UnderBudget {
            cost: Cost::Int8Latency(1),
            budget: budget_ms,
        },
        repeats: 9,
    };
    let mut found = Vec::new();
    for name in ["random", "evolution"] {
        let c = space.choices();
        let trials = if name == "random" {
            Search::new(&space, RandomSearch::new(&c, seed)?, &evaluator, 12).run(|_, _, _| {})?
        } else {
            Search::new(
                &space,
                RegularizedEvolution::new(&c, 6, 3, seed)?,
                &evaluator,
                12,
            )
            .run(|_, _, _| {})?
        };
        let b = nas_best(&trials).and_then(|t| t.score).unwrap_or(f64::NAN);
        found.push(format!("{name} {:.2}%", 100.0 * b));
    }
    rows.push(vec![
        "9. NAS".to_string(),
        format!("12 proxies each, int8 b1 budget {budget_ms:.3} ms"),
        format!("best held-out accuracy: {}", found.join(", ")),
    ]);

    // Step 10: a transformer's Linears in dynamic int8 (activations per token), the rest of
    // the graph in f32. A small BERT encoder with seeded weights stands in for
    // all-MiniLM-L6-v2 (`examples/quantize_minilm.rs` runs the real one).
    println!("\nStep 10: dynamic int8 for a transformer's Linear layers (per-token activations)");
    let config = nncompress::model::zoo::BertConfig {
        vocab_size: 1000,
        hidden_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 512,
        max_position_embeddings: 64,
        example_seq_len: 32,
        ..nncompress::model::zoo::BertConfig::minilm_l6_h384()
    };
    let bert = nncompress::model::zoo::bert_encoder(&config, seed)?;
    let (qbert, report) =
        nncompress::quantizer::dynamic_int8(&bert, &nncompress::quantizer::DynamicInt8::per_row())?;
    let (n, seq) = (8, 32);
    let ids = nncompress::tensor::Value::I64(ndarray::ArrayD::from_shape_fn(
        ndarray::IxDyn(&[n, seq]),
        |i| ((i[0] * 7919 + i[1] * 104_729) % 1000) as i64,
    ));
    let ones = nncompress::tensor::Value::I64(ndarray::ArrayD::ones(ndarray::IxDyn(&[n, seq])));
    let zeros = nncompress::tensor::Value::I64(ndarray::ArrayD::zeros(ndarray::IxDyn(&[n, seq])));
    let feeds = [
        ("input_ids", &ids),
        ("attention_mask", &ones),
        ("token_type_ids", &zeros),
    ];
    let last = |g: &nncompress::model::Graph| -> nncompress::Result<nncompress::tensor::Tensor> {
        let out = g.run(&feeds)?;
        let at = g.output_names().len() - 1; // sentence_embedding
        out[at]
            .as_f32()
            .cloned()
            .ok_or_else(|| nncompress::Error::Unsupported("float embeddings".into()))
    };
    let (ef, eq) = (last(&bert)?, last(&qbert)?);
    let worst = ef
        .outer_iter()
        .zip(eq.outer_iter())
        .map(|(a, b)| a.iter().zip(b.iter()).map(|(x, y)| x * y).sum::<f32>())
        .fold(1.0f32, f32::min);
    rows.push(vec![
        "10. transformer int8".to_string(),
        format!(
            "{} Linears of a 2-layer BERT, weights {:.2}× smaller",
            report.layers.len(),
            report.weight_compression()
        ),
        format!("worst embedding cosine vs f32 {worst:.6} ({n} × {seq} tokens)"),
    ]);

    println!();
    common::print_table(&["step", "what", "result"], &rows);
    println!("\ndone in {:.1} s", start.elapsed().as_secs_f32());
    Ok(())
}
