//! Reference models used across the crate's examples, tests and benchmarks.
//!
//! Every constructor takes a seed; the same seed gives the same initial weights.

use super::builder::{Conv2dConfig, GraphBuilder};
use super::graph::Graph;
use super::op::Pool2d;
use crate::error::Result;

pub use super::bert::{
    bert_encoder, bert_encoder_zeroed, names as bert_names, BertConfig, HF_BERT_BUFFERS,
};
pub use super::llama::{llama_decoder, names as llama_names, LlamaConfig};

/// LeNet-300-100: the 784-300-100-10 MLP of LeCun et al. (1998) and Han et al. (2015), on
/// `[1, 28, 28]` inputs.
///
/// # Errors
/// Never for this fixed architecture; the `Result` is the builder's.
pub fn lenet_300_100(seed: u64) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &[1, 28, 28])
        .flatten("flatten", "input")
        .linear("fc1", "flatten", 784, 300, true)
        .relu("relu1", "fc1")
        .linear("fc2", "relu1", 300, 100, true)
        .relu("relu2", "fc2")
        .linear("fc3", "relu2", 100, 10, true);
    b.build("fc3")
}

/// LeNet-5 as Caffe defines it (`examples/mnist/lenet_train_test.prototxt`): conv 20@5×5,
/// max-pool 2, conv 50@5×5, max-pool 2, fc 500 + ReLU, fc 10; on `[1, 28, 28]` inputs.
///
/// # Errors
/// Never for this fixed architecture; the `Result` is the builder's.
pub fn lenet5(seed: u64) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &[1, 28, 28])
        .conv2d("conv1", "input", Conv2dConfig::new(1, 20, 5))
        .max_pool2d("pool1", "conv1", Pool2d::new(2, 2))
        .conv2d("conv2", "pool1", Conv2dConfig::new(20, 50, 5))
        .max_pool2d("pool2", "conv2", Pool2d::new(2, 2))
        .flatten("flatten", "pool2")
        .linear("fc1", "flatten", 800, 500, true)
        .relu("relu1", "fc1")
        .linear("fc2", "relu1", 500, 10, true);
    b.build("fc2")
}

/// A small CNN for the 8×8 UCI digits (`[1, 8, 8]` inputs, 10 classes): two 3×3 conv + ReLU
/// + max-pool stages (16 and 32 channels), then a linear classifier.
///
/// # Errors
/// Never for this fixed architecture; the `Result` is the builder's.
pub fn digits_cnn(seed: u64) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &[1, 8, 8])
        .conv2d(
            "conv1",
            "input",
            Conv2dConfig::new(1, 16, 3).with_padding(1),
        )
        .relu("relu1", "conv1")
        .max_pool2d("pool1", "relu1", Pool2d::new(2, 2))
        .conv2d(
            "conv2",
            "pool1",
            Conv2dConfig::new(16, 32, 3).with_padding(1),
        )
        .relu("relu2", "conv2")
        .max_pool2d("pool2", "relu2", Pool2d::new(2, 2))
        .flatten("flatten", "pool2")
        .linear("fc", "flatten", 128, 10, true);
    b.build("fc")
}

/// A small VGG-style CNN with BatchNorm (the network-slimming target): for each width in
/// `widths`, a stage `features.{i}.conv` (3×3, pad 1, no bias) → `features.{i}.bn` →
/// `features.{i}.relu` → `features.{i}.pool` (2×2), then global average pooling and a
/// linear classifier `classifier`.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] when the input is too small for the number of stages.
pub fn vgg_small(
    input_shape: [usize; 3],
    widths: &[usize],
    classes: usize,
    seed: u64,
) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &input_shape);
    let mut prev = "input".to_string();
    let mut channels = input_shape[0];
    for (i, &w) in widths.iter().enumerate() {
        let p = format!("features.{i}");
        b.conv2d(
            &format!("{p}.conv"),
            &prev,
            Conv2dConfig::new(channels, w, 3)
                .with_padding(1)
                .with_bias(false),
        )
        .batch_norm2d(&format!("{p}.bn"), &format!("{p}.conv"), w)
        .relu(&format!("{p}.relu"), &format!("{p}.bn"))
        .max_pool2d(
            &format!("{p}.pool"),
            &format!("{p}.relu"),
            Pool2d::new(2, 2),
        );
        prev = format!("{p}.pool");
        channels = w;
    }
    b.global_avg_pool("gap", &prev)
        .flatten("flatten", "gap")
        .linear("classifier", "flatten", channels, classes, true);
    b.build("classifier")
}

/// A small residual CNN (the dependency-aware pruning target): a 3×3 stem of `width`
/// channels, then two basic blocks per stage (`layer{s}.{b}.conv1/bn1/relu1/conv2/bn2/add/relu`)
/// with identity shortcuts, except the first block of each later stage, which doubles the
/// width, strides by 2 and projects its shortcut with a 1×1 conv + BN
/// (`layer{s}.0.downsample.conv/bn`); then global average pooling and `fc`.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] when the input is too small for the number of stages.
pub fn resnet_small(
    input_shape: [usize; 3],
    width: usize,
    stages: usize,
    classes: usize,
    seed: u64,
) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &input_shape)
        .conv2d(
            "stem.conv",
            "input",
            Conv2dConfig::new(input_shape[0], width, 3)
                .with_padding(1)
                .with_bias(false),
        )
        .batch_norm2d("stem.bn", "stem.conv", width)
        .relu("stem.relu", "stem.bn");
    let mut prev = "stem.relu".to_string();
    let mut channels = width;
    for s in 0..stages {
        let out = width << s;
        for blk in 0..2 {
            let p = format!("layer{}.{blk}", s + 1);
            let stride = if s > 0 && blk == 0 { 2 } else { 1 };
            let n = |x: &str| format!("{p}.{x}");
            b.conv2d(
                &n("conv1"),
                &prev,
                Conv2dConfig::new(channels, out, 3)
                    .with_stride(stride)
                    .with_padding(1)
                    .with_bias(false),
            )
            .batch_norm2d(&n("bn1"), &n("conv1"), out)
            .relu(&n("relu1"), &n("bn1"))
            .conv2d(
                &n("conv2"),
                &n("relu1"),
                Conv2dConfig::new(out, out, 3)
                    .with_padding(1)
                    .with_bias(false),
            )
            .batch_norm2d(&n("bn2"), &n("conv2"), out);
            let shortcut = if stride != 1 || channels != out {
                b.conv2d(
                    &n("downsample.conv"),
                    &prev,
                    Conv2dConfig::new(channels, out, 1)
                        .with_stride(stride)
                        .with_bias(false),
                )
                .batch_norm2d(&n("downsample.bn"), &n("downsample.conv"), out);
                n("downsample.bn")
            } else {
                prev.clone()
            };
            b.add(&n("add"), &[&n("bn2"), &shortcut])
                .relu(&n("relu"), &n("add"));
            prev = n("relu");
            channels = out;
        }
    }
    b.global_avg_pool("gap", &prev)
        .flatten("flatten", "gap")
        .linear("fc", "flatten", channels, classes, true);
    b.build("fc")
}
