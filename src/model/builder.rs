//! Building graphs in code, with seeded PyTorch-default initialisation.

use super::graph::{Graph, NodeSpec};
use super::op::{BatchNorm2d, Conv2d, CustomOp, Dim, Embedding, LayerNorm, Linear, Op, Pool2d};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::tensor::DType;
use ndarray::{Array1, Array2, Array4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Configuration of a Conv2d layer for [`GraphBuilder::conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]` (default 1).
    pub stride: [usize; 2],
    /// Padding `[h, w]` (default 0).
    pub padding: [usize; 2],
    /// Dilation `[h, w]` (default 1).
    pub dilation: [usize; 2],
    /// Groups (default 1).
    pub groups: usize,
    /// Whether the layer has a bias (default true).
    pub bias: bool,
}

impl Conv2dConfig {
    /// A square `kernel × kernel` convolution, stride 1, no padding, one group, with bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel: [kernel, kernel],
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            bias: true,
        }
    }
    /// Sets a square stride.
    pub fn with_stride(mut self, s: usize) -> Self {
        self.stride = [s, s];
        self
    }
    /// Sets a square padding.
    pub fn with_padding(mut self, p: usize) -> Self {
        self.padding = [p, p];
        self
    }
    /// Sets a square dilation.
    pub fn with_dilation(mut self, d: usize) -> Self {
        self.dilation = [d, d];
        self
    }
    /// Sets the number of groups.
    pub fn with_groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    /// Sets whether the layer has a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// Builds a [`Graph`] node by node, referring to inputs by name.
///
/// Parameters are initialised as PyTorch does by default (uniform in `±1/√fan_in` for weights
/// and biases) from a generator seeded with the builder's seed, so the same seed and the same
/// sequence of calls give the same weights, bit for bit. Errors (unknown inputs, bad shapes,
/// layers past [`crate::limits::Limits`]) are collected and reported by
/// [`GraphBuilder::build`]; nothing is allocated for a layer that fails.
///
/// # Examples
/// ```
/// use nncompress::model::{Conv2dConfig, GraphBuilder, Pool2d};
/// let mut b = GraphBuilder::new(42);
/// b.input("input", &[1, 8, 8])
///     .conv2d("conv", "input", Conv2dConfig::new(1, 4, 3).with_padding(1))
///     .relu("relu", "conv")
///     .max_pool2d("pool", "relu", Pool2d::new(2, 2))
///     .flatten("flat", "pool")
///     .linear("fc", "flat", 64, 10, true);
/// let net = b.build("fc")?;
/// assert_eq!(net.output_shape(), &[10]);
/// # Ok::<(), nncompress::Error>(())
/// ```
#[derive(Debug)]
pub struct GraphBuilder {
    specs: Vec<NodeSpec>,
    /// `None`: every weight is zero ([`GraphBuilder::zeroed`]).
    rng: Option<StdRng>,
    error: Option<Error>,
}

fn uniform(rng: &mut StdRng, bound: f32) -> f32 {
    rng.random_range(-1.0f32..1.0) * bound
}

impl GraphBuilder {
    /// A new builder whose initialisation draws from `seed`.
    pub fn new(seed: u64) -> Self {
        GraphBuilder {
            specs: Vec::new(),
            rng: Some(StdRng::seed_from_u64(seed)),
            error: None,
        }
    }

    /// A builder whose layers start with every weight and bias zero (LayerNorm γ one): a
    /// graph to load weights into, built without drawing millions of random numbers.
    pub fn zeroed() -> Self {
        GraphBuilder {
            specs: Vec::new(),
            rng: None,
            error: None,
        }
    }

    /// Draws from U(−bound, bound), or gives 0 for a zeroed builder.
    fn uniform_source(&mut self, bound: f32) -> impl FnMut() -> f32 + '_ {
        let mut rng = self.rng.as_mut();
        move || rng.as_mut().map_or(0.0, |r| uniform(r, bound))
    }

    /// Adds a node with an explicit op and input names.
    pub fn node(&mut self, name: &str, op: Op, inputs: &[&str]) -> &mut Self {
        self.specs.push(NodeSpec::new(name, op, inputs));
        self
    }

    fn fail(&mut self, e: Error) -> &mut Self {
        self.error.get_or_insert(e);
        self
    }

    /// The graph input, with one sample's shape (e.g. `[1, 28, 28]`).
    pub fn input(&mut self, name: &str, shape: &[usize]) -> &mut Self {
        self.node(name, Op::input(shape), &[])
    }

    /// A graph input of element type `dtype` whose axes may be dynamic (see
    /// [`Op::typed_input`]); a graph may have several, fed by name to [`Graph::run`].
    pub fn typed_input(&mut self, name: &str, dtype: DType, dims: &[Dim]) -> &mut Self {
        self.node(name, Op::typed_input(dtype, dims), &[])
    }

    /// A fully connected layer.
    pub fn linear(
        &mut self,
        name: &str,
        input: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> &mut Self {
        if let Err(e) = Limits::default().check_elements(
            &[out_features, in_features],
            &format!("linear `{name}` weight"),
        ) {
            return self.fail(e);
        }
        let bound = 1.0 / (in_features.max(1) as f32).sqrt();
        let (weight, bias) = {
            let mut draw = self.uniform_source(bound);
            let weight = Array2::from_shape_simple_fn((out_features, in_features), &mut draw);
            let bias = bias.then(|| Array1::from_shape_simple_fn(out_features, &mut draw));
            (weight, bias)
        };
        self.node(name, Op::Linear(Linear { weight, bias }), &[input])
    }

    /// An embedding table of `num` rows of `dim` values, initialised from N(0, 1) as
    /// PyTorch's `nn.Embedding`; `input` must give integer ids.
    pub fn embedding(&mut self, name: &str, input: &str, num: usize, dim: usize) -> &mut Self {
        if let Err(e) =
            Limits::default().check_elements(&[num, dim], &format!("embedding `{name}` weight"))
        {
            return self.fail(e);
        }
        let weight = match self.rng.as_mut() {
            // Box–Muller from two uniforms, so the builder needs no distribution crate.
            Some(rng) => Array2::from_shape_simple_fn((num, dim), || {
                let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                let u2: f32 = rng.random_range(0.0..1.0);
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            }),
            None => Array2::zeros((num, dim)),
        };
        self.node(name, Op::Embedding(Embedding { weight }), &[input])
    }

    /// Layer normalization over the last axis of width `features` (γ = 1, β = 0, eps
    /// 1e-5, as PyTorch's default).
    pub fn layer_norm(&mut self, name: &str, input: &str, features: usize) -> &mut Self {
        self.node(name, Op::LayerNorm(LayerNorm::new(features)), &[input])
    }

    /// A 2-D convolution.
    pub fn conv2d(&mut self, name: &str, input: &str, cfg: Conv2dConfig) -> &mut Self {
        if cfg.groups == 0
            || !cfg.in_channels.is_multiple_of(cfg.groups)
            || !cfg.out_channels.is_multiple_of(cfg.groups)
        {
            return self.fail(Error::config(
                format!("conv2d `{name}`"),
                format!(
                    "groups ({}) must divide in_channels ({}) and out_channels ({})",
                    cfg.groups, cfg.in_channels, cfg.out_channels
                ),
            ));
        }
        let cin = cfg.in_channels / cfg.groups;
        if let Err(e) = Limits::default().check_elements(
            &[cfg.out_channels, cin, cfg.kernel[0], cfg.kernel[1]],
            &format!("conv2d `{name}` weight"),
        ) {
            return self.fail(e);
        }
        let fan_in = (cin * cfg.kernel[0] * cfg.kernel[1]).max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let (weight, bias) = {
            let mut draw = self.uniform_source(bound);
            let weight = Array4::from_shape_simple_fn(
                (cfg.out_channels, cin, cfg.kernel[0], cfg.kernel[1]),
                &mut draw,
            );
            let bias = cfg
                .bias
                .then(|| Array1::from_shape_simple_fn(cfg.out_channels, &mut draw));
            (weight, bias)
        };
        let op = Op::Conv2d(Conv2d {
            weight,
            bias,
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            groups: cfg.groups,
        });
        self.node(name, op, &[input])
    }

    /// Batch normalization over `channels`.
    pub fn batch_norm2d(&mut self, name: &str, input: &str, channels: usize) -> &mut Self {
        if let Err(e) =
            Limits::default().check_elements(&[channels], &format!("batch norm `{name}`"))
        {
            return self.fail(e);
        }
        self.node(name, Op::BatchNorm2d(BatchNorm2d::new(channels)), &[input])
    }

    /// ReLU.
    pub fn relu(&mut self, name: &str, input: &str) -> &mut Self {
        self.node(name, Op::ReLU, &[input])
    }

    /// ReLU6.
    pub fn relu6(&mut self, name: &str, input: &str) -> &mut Self {
        self.node(name, Op::ReLU6, &[input])
    }

    /// Max pooling.
    pub fn max_pool2d(&mut self, name: &str, input: &str, pool: Pool2d) -> &mut Self {
        self.node(name, Op::MaxPool2d(pool), &[input])
    }

    /// Average pooling.
    pub fn avg_pool2d(&mut self, name: &str, input: &str, pool: Pool2d) -> &mut Self {
        self.node(name, Op::AvgPool2d(pool), &[input])
    }

    /// Global average pooling to `[N, C, 1, 1]`.
    pub fn global_avg_pool(&mut self, name: &str, input: &str) -> &mut Self {
        self.node(name, Op::GlobalAvgPool, &[input])
    }

    /// Flatten to `[N, features]`.
    pub fn flatten(&mut self, name: &str, input: &str) -> &mut Self {
        self.node(name, Op::Flatten, &[input])
    }

    /// Elementwise sum of the inputs.
    pub fn add(&mut self, name: &str, inputs: &[&str]) -> &mut Self {
        self.node(name, Op::Add, inputs)
    }

    /// Channel concatenation of the inputs.
    pub fn concat(&mut self, name: &str, inputs: &[&str]) -> &mut Self {
        self.node(name, Op::Concat, inputs)
    }

    /// Softmax along axis 1.
    pub fn softmax(&mut self, name: &str, input: &str) -> &mut Self {
        self.node(name, Op::Softmax { axis: 1 }, &[input])
    }

    /// Dropout with drop probability `p`.
    pub fn dropout(&mut self, name: &str, input: &str, p: f32) -> &mut Self {
        self.node(name, Op::Dropout { p }, &[input])
    }

    /// A user-defined op.
    pub fn custom(&mut self, name: &str, inputs: &[&str], op: Box<dyn CustomOp>) -> &mut Self {
        self.node(name, Op::Custom(op), inputs)
    }

    /// Checks and orders the nodes and returns the graph with output `output`.
    ///
    /// # Errors
    /// The first error met while adding nodes, then those of [`Graph::from_specs`].
    pub fn build(self, output: &str) -> Result<Graph> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Graph::from_specs(self.specs, output)
    }

    /// Checks and orders the nodes into a graph with several outputs, in the order given.
    ///
    /// # Errors
    /// As [`GraphBuilder::build`].
    pub fn build_with_outputs(self, outputs: &[&str]) -> Result<Graph> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Graph::from_specs_with_outputs(self.specs, outputs)
    }
}
