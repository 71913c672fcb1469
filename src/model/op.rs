//! The ops a graph node can hold, with their parameters.

use super::indexing;
use super::nd;
use super::quantized::DynamicLinear;
use crate::error::{Error, Result};
use crate::tensor::{ConvGeometry, DType, Tensor};
use ndarray::{Array1, Array2, Array4, ArrayViewD, ArrayViewMutD};
use std::fmt::Debug;

pub use super::attention::Attention;
pub use super::decoder::{RmsNorm, Rotary};
pub use super::indexing::Embedding;
pub use super::nd::{Binary, BinaryConst, LayerNorm, Reduction, Unary};
pub use super::qat::{FakeQuant, QatConv2d, QatLinear, WeightFakeQuant};

/// A fully connected layer: `y = x · Wᵀ + b`, weight `[out_features, in_features]`, over the
/// last axis of an input of any rank (PyTorch's `nn.Linear`): `[N, …, in] → [N, …, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Weight `[out_features, in_features]`.
    pub weight: Array2<f32>,
    /// Optional bias `[out_features]`.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }
}

/// A 2-D convolution, weight `[out_channels, in_channels / groups, kh, kw]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    /// Weight `[out_channels, in_channels / groups, kernel_h, kernel_w]`.
    pub weight: Array4<f32>,
    /// Optional bias `[out_channels]`.
    pub bias: Option<Array1<f32>>,
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Zero padding on each side `[h, w]`.
    pub padding: [usize; 2],
    /// Dilation `[h, w]`.
    pub dilation: [usize; 2],
    /// Channel groups (`in_channels` for depthwise).
    pub groups: usize,
}

impl Conv2d {
    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.shape()[0]
    }
    /// Input channels (all groups).
    pub fn in_channels(&self) -> usize {
        self.weight.shape()[1] * self.groups
    }
    /// Kernel `[h, w]`.
    pub fn kernel(&self) -> [usize; 2] {
        [self.weight.shape()[2], self.weight.shape()[3]]
    }
    /// The geometry of this convolution over an input of `in_h × in_w`.
    pub fn geometry(&self, in_h: usize, in_w: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels: self.in_channels(),
            in_h,
            in_w,
            kernel: self.kernel(),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }
}

/// Batch normalization over the channels of an NCHW tensor (PyTorch's `BatchNorm2d`).
///
/// Training mode normalizes with the batch statistics (biased variance) and updates the
/// running statistics as `r ← (1 − momentum)·r + momentum·batch` (unbiased variance for
/// `running_var`, as PyTorch); inference mode uses the running statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm2d {
    /// Scale γ `[channels]` (PyTorch `weight`).
    pub gamma: Array1<f32>,
    /// Shift β `[channels]` (PyTorch `bias`).
    pub beta: Array1<f32>,
    /// Running mean `[channels]`.
    pub running_mean: Array1<f32>,
    /// Running variance `[channels]`.
    pub running_var: Array1<f32>,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Weight of the new batch in the running statistics.
    pub momentum: f32,
}

impl BatchNorm2d {
    /// A BatchNorm with γ = 1, β = 0, mean 0, variance 1, eps 1e-5, momentum 0.1.
    pub fn new(channels: usize) -> Self {
        BatchNorm2d {
            gamma: Array1::ones(channels),
            beta: Array1::zeros(channels),
            running_mean: Array1::zeros(channels),
            running_var: Array1::ones(channels),
            eps: 1e-5,
            momentum: 0.1,
        }
    }
    /// Channels.
    pub fn channels(&self) -> usize {
        self.gamma.len()
    }
}

/// A pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    /// Window `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Padding on each side `[h, w]` (max pooling pads with −∞; average pooling counts
    /// padded zeros in the divisor, as PyTorch's default `count_include_pad=True`).
    pub padding: [usize; 2],
}

impl Pool2d {
    /// A square window `k` with stride `s` and no padding.
    pub fn new(k: usize, s: usize) -> Self {
        Pool2d {
            kernel: [k, k],
            stride: [s, s],
            padding: [0, 0],
        }
    }
    /// The window's geometry over `channels × in_h × in_w` (one group per channel).
    pub fn geometry(&self, channels: usize, in_h: usize, in_w: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels: channels,
            in_h,
            in_w,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// A user-defined op. Compression passes treat it as opaque: it stays in float, and it
/// blocks channel propagation; reports say so.
///
/// Custom ops have no trainable parameters of their own.
pub trait CustomOp: Debug + Send + Sync {
    /// A short type name for reports and errors.
    fn kind(&self) -> &str;
    /// The per-sample output shape (without the batch axis) for the given per-sample input
    /// shapes.
    ///
    /// # Errors
    /// When the inputs do not fit the op.
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>>;
    /// Computes the output for a batch.
    ///
    /// # Errors
    /// When the inputs do not fit the op.
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor>;
    /// Given the inputs, the output and the gradient of the loss with respect to the output,
    /// returns the gradient with respect to each input.
    ///
    /// # Errors
    /// When the op has no gradient ([`Error::Unsupported`]) or shapes do not fit.
    fn backward(&self, inputs: &[&Tensor], output: &Tensor, grad: &Tensor) -> Result<Vec<Tensor>>;
    /// Clones the op behind a box (graphs are `Clone`).
    fn clone_box(&self) -> Box<dyn CustomOp>;
}

impl Clone for Box<dyn CustomOp> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// What a node computes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Op {
    /// A graph input (a graph may have several, each fed by name). Build one with
    /// [`Op::input`] or [`Op::typed_input`].
    Input {
        /// Per-sample shape, e.g. `[1, 28, 28]`; a dynamic axis holds the size the graph is
        /// checked with when it is built.
        shape: Vec<usize>,
        /// The element type fed.
        dtype: DType,
        /// The dynamic axes, as (per-sample axis, symbol): inputs that share a symbol
        /// (`"seq"`) must be fed the same size there.
        dynamic: Vec<(usize, String)>,
    },
    /// Fully connected layer over the last axis: `[N, …, in] → [N, …, out]`.
    Linear(Linear),
    /// A Linear with int8 weights whose input is quantized on the fly (dynamic int8; a
    /// quantized model's node, not trainable).
    DynamicLinear(DynamicLinear),
    /// 2-D convolution on `[N, C, H, W]`.
    Conv2d(Conv2d),
    /// Batch normalization on `[N, C, H, W]`.
    BatchNorm2d(BatchNorm2d),
    /// `max(x, 0)`.
    ReLU,
    /// `min(max(x, 0), 6)`.
    ReLU6,
    /// Max pooling.
    MaxPool2d(Pool2d),
    /// Average pooling.
    AvgPool2d(Pool2d),
    /// Mean over H and W: `[N, C, H, W] → [N, C, 1, 1]`.
    GlobalAvgPool,
    /// `[N, ...] → [N, product]`.
    Flatten,
    /// Elementwise sum of two or more inputs of identical shape.
    Add,
    /// Concatenation of two or more inputs along the channel axis (axis 1).
    Concat,
    /// Concatenation of two or more inputs along any `axis` (the batch is 0 and cannot
    /// be joined; negative counts from the end). [`Op::Concat`] is the channel case, the
    /// one compression passes follow through a network.
    ConcatAxis {
        /// The axis joined.
        axis: isize,
    },
    /// Softmax along `axis` (the batch is axis 0; negative counts from the end).
    Softmax {
        /// The axis, `1..rank` or `−(rank−1)..−1`.
        axis: isize,
    },
    /// An element-wise function: GELU, sigmoid, tanh, SiLU, hard swish, erf, √, exp, −x.
    Unary(Unary),
    /// An element-wise op of two activations, broadcast as NumPy does over the per-sample
    /// shapes (the batch axes must agree). [`Op::Add`] is the n-ary, same-shape sum that
    /// compression passes follow through residual networks.
    Binary(Binary),
    /// An element-wise op between the input and a constant (a scale, a bias, a mask).
    BinaryConst(BinaryConst),
    /// Layer normalization over trailing axes.
    LayerNorm(LayerNorm),
    /// Root-mean-square normalization over the last axis (Llama's): see [`RmsNorm`].
    RmsNorm(RmsNorm),
    /// Rotary position embeddings on a `[N, seq, heads · head_dim]` projection: see
    /// [`Rotary`].
    Rotary(Rotary),
    /// Fused multi-head scaled dot-product attention of q, k, v (and an optional additive
    /// mask): see [`Attention`].
    Attention(Attention),
    /// Batched matrix product of two activations, `[N, …, m, k] @ [N, …, k, n]`, leading
    /// axes broadcast.
    MatMul,
    /// A new per-sample shape with the same elements in the same order.
    Reshape {
        /// The shape of one sample; one entry may be −1 (inferred), 0 copies the input's
        /// dimension at that position (ONNX semantics).
        shape: Vec<isize>,
    },
    /// Reorders the axes (a transpose).
    Permute {
        /// A permutation of the full tensor's axes with the batch, 0, first.
        axes: Vec<usize>,
    },
    /// A sum or mean over some axes.
    Reduce {
        /// Sum or mean.
        how: Reduction,
        /// The axes reduced (the batch is axis 0 and cannot be reduced).
        axes: Vec<isize>,
        /// Whether reduced axes stay as size 1.
        keep_dims: bool,
    },
    /// A lookup of rows by integer ids: `[N, …] (i64) → [N, …, dim]`.
    Embedding(Embedding),
    /// A change of element type (integers to floats; floats to floats).
    Cast {
        /// The element type produced.
        to: DType,
    },
    /// The integer positions `0..len` along `axis` of the input, `[N, len]` (BERT's and
    /// GPT's position ids, for any sequence length).
    Positions {
        /// The axis whose positions are counted (the batch is 0; negative from the end).
        axis: isize,
    },
    /// `cond ? a : b` per element, broadcast as NumPy does; the condition may be integers
    /// or floats (non-zero is true), the branches both floats or both integers.
    Where,
    /// The input unchanged (a named alias: `last_hidden_state`).
    Identity,
    /// The elements `start..end` along `axis` (ONNX's `Slice` with step 1: negative bounds
    /// count from the end, bounds past the axis are clamped to it). A `Split` is one
    /// `Slice` per part.
    Slice {
        /// The axis (the batch is 0 and cannot be sliced).
        axis: isize,
        /// The first index kept.
        start: i64,
        /// One past the last index kept.
        end: i64,
    },
    /// Inserts unit axes at `axes` (of the output; the batch is 0).
    Unsqueeze {
        /// Where the new axes go.
        axes: Vec<isize>,
    },
    /// Removes unit axes.
    Squeeze {
        /// The axes removed (each of size 1; the batch is 0).
        axes: Vec<isize>,
    },
    /// Inverted dropout with drop probability `p` (identity at inference).
    Dropout {
        /// Drop probability in `[0, 1)`.
        p: f32,
    },
    /// A user-defined op.
    Custom(Box<dyn CustomOp>),
    /// Fake quantization of an activation (quantization-aware training).
    FakeQuant(FakeQuant),
    /// A Conv2d (with an optional folded BatchNorm) whose weights are fake-quantized.
    QatConv2d(Box<QatConv2d>),
    /// A Linear layer whose weights are fake-quantized.
    QatLinear(QatLinear),
}

/// The role of a parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParamKind {
    /// Conv / Linear weight, or BatchNorm γ (`.weight`).
    Weight,
    /// Conv / Linear bias, or BatchNorm β (`.bias`).
    Bias,
    /// BatchNorm running mean (a buffer, not trained).
    RunningMean,
    /// BatchNorm running variance (a buffer, not trained).
    RunningVar,
    /// γ of a BatchNorm folded into a [`QatConv2d`] (`.bn.weight`).
    BnWeight,
    /// β of a BatchNorm folded into a [`QatConv2d`] (`.bn.bias`).
    BnBias,
    /// Running mean of a folded BatchNorm (`.bn.running_mean`, a buffer).
    BnRunningMean,
    /// Running variance of a folded BatchNorm (`.bn.running_var`, a buffer).
    BnRunningVar,
    /// Learned weight scales of a QAT layer (LSQ, `.weight_scale`).
    WeightScale,
    /// Learned scale of an activation fake quantizer (LSQ, `.scale`).
    Scale,
    /// Running `[min, max]` of an activation fake quantizer (`.range`, a buffer).
    Range,
}

impl ParamKind {
    /// The suffix after the node name (`weight`, `bias`, `running_mean`, `running_var`),
    /// as PyTorch names them.
    pub fn suffix(self) -> &'static str {
        match self {
            ParamKind::Weight => "weight",
            ParamKind::Bias => "bias",
            ParamKind::RunningMean => "running_mean",
            ParamKind::RunningVar => "running_var",
            ParamKind::BnWeight => "bn.weight",
            ParamKind::BnBias => "bn.bias",
            ParamKind::BnRunningMean => "bn.running_mean",
            ParamKind::BnRunningVar => "bn.running_var",
            ParamKind::WeightScale => "weight_scale",
            ParamKind::Scale => "scale",
            ParamKind::Range => "range",
        }
    }
    /// Whether an optimizer updates it (buffers are not).
    pub fn is_trainable(self) -> bool {
        matches!(
            self,
            ParamKind::Weight
                | ParamKind::Bias
                | ParamKind::BnWeight
                | ParamKind::BnBias
                | ParamKind::WeightScale
                | ParamKind::Scale
        )
    }
}

/// One axis of a typed input: a fixed size, or a dynamic one named by a symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Always this size.
    Fixed(usize),
    /// Any size per run; inputs that share `symbol` must agree. `example` is the size
    /// the graph's shapes are inferred and checked with when it is built.
    Dynamic {
        /// The size's name (`"seq"`).
        symbol: String,
        /// The size shape inference uses at build time.
        example: usize,
    },
}

impl Dim {
    /// A dynamic axis named `symbol`, checked at build time with size `example`.
    pub fn dynamic(symbol: &str, example: usize) -> Self {
        Dim::Dynamic {
            symbol: symbol.to_string(),
            example,
        }
    }
}

impl Op {
    /// A float input with a fixed per-sample shape (`[1, 28, 28]`).
    pub fn input(shape: &[usize]) -> Op {
        Op::Input {
            shape: shape.to_vec(),
            dtype: DType::F32,
            dynamic: Vec::new(),
        }
    }

    /// An input of element type `dtype` whose per-sample axes may be dynamic:
    /// `Op::typed_input(DType::I64, &[Dim::dynamic("seq", 16)])` takes token ids of any
    /// sequence length.
    pub fn typed_input(dtype: DType, dims: &[Dim]) -> Op {
        let mut shape = Vec::with_capacity(dims.len());
        let mut dynamic = Vec::new();
        for (axis, d) in dims.iter().enumerate() {
            match d {
                Dim::Fixed(n) => shape.push(*n),
                Dim::Dynamic { symbol, example } => {
                    shape.push(*example);
                    dynamic.push((axis, symbol.clone()));
                }
            }
        }
        Op::Input {
            shape,
            dtype,
            dynamic,
        }
    }

    /// The element type of the op's output for inputs of element types `inputs`.
    ///
    /// # Errors
    /// [`Error::DtypeMismatch`] when an input has a type the op cannot read (only
    /// `Embedding`, `Cast`, `Positions` and `Where`'s condition read integers).
    pub fn output_dtype(&self, node: &str, inputs: &[DType]) -> Result<DType> {
        let kind = self.kind();
        let all_f32 = |from: usize| -> Result<()> {
            for (k, &d) in inputs.iter().enumerate().skip(from) {
                indexing::expect_dtype(node, kind, k, DType::F32, d)?;
            }
            Ok(())
        };
        match self {
            Op::Input { dtype, .. } => Ok(*dtype),
            Op::Embedding(_) => {
                if let Some(&d) = inputs.first() {
                    indexing::expect_dtype(node, kind, 0, DType::I64, d)?;
                }
                Ok(DType::F32)
            }
            Op::Cast { to } => match (inputs.first(), to) {
                (Some(DType::F32), DType::I64) => Err(Error::Unsupported(format!(
                    "node `{node}`: a cast from floats to integers would truncate silently"
                ))),
                _ => Ok(*to),
            },
            Op::Positions { .. } => Ok(DType::I64),
            // Layout ops move integers as they move floats.
            Op::Identity | Op::Unsqueeze { .. } | Op::Squeeze { .. } | Op::Reshape { .. } => {
                Ok(inputs.first().copied().unwrap_or(DType::F32))
            }
            // Both branches integers (an `Expand` of ids) or both floats.
            Op::Where => match inputs.get(1..) {
                Some([DType::I64, b]) => {
                    indexing::expect_dtype(node, kind, 2, DType::I64, *b)?;
                    Ok(DType::I64)
                }
                _ => all_f32(1).map(|()| DType::F32),
            },
            _ => all_f32(0).map(|()| DType::F32),
        }
    }

    /// A short name of the op kind (`"conv2d"`, `"relu"`, ...).
    pub fn kind(&self) -> &str {
        match self {
            Op::Input { .. } => "input",
            Op::Linear(_) => "linear",
            Op::DynamicLinear(_) => "dynamic_linear",
            Op::Conv2d(_) => "conv2d",
            Op::BatchNorm2d(_) => "batch_norm2d",
            Op::ReLU => "relu",
            Op::ReLU6 => "relu6",
            Op::MaxPool2d(_) => "max_pool2d",
            Op::AvgPool2d(_) => "avg_pool2d",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Add => "add",
            Op::Concat => "concat",
            Op::ConcatAxis { .. } => "concat_axis",
            Op::Softmax { .. } => "softmax",
            Op::Unary(u) => u.kind(),
            Op::Binary(b) => b.kind(),
            Op::BinaryConst(b) => b.op.kind(),
            Op::LayerNorm(_) => "layer_norm",
            Op::RmsNorm(_) => "rms_norm",
            Op::Rotary(_) => "rotary",
            Op::MatMul => "matmul",
            Op::Attention(_) => "attention",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Reduce {
                how: Reduction::Sum,
                ..
            } => "reduce_sum",
            Op::Reduce { .. } => "reduce_mean",
            Op::Embedding(_) => "embedding",
            Op::Cast { .. } => "cast",
            Op::Positions { .. } => "positions",
            Op::Where => "where",
            Op::Unsqueeze { .. } => "unsqueeze",
            Op::Identity => "identity",
            Op::Slice { .. } => "slice",
            Op::Squeeze { .. } => "squeeze",
            Op::Dropout { .. } => "dropout",
            Op::Custom(c) => c.kind(),
            Op::FakeQuant(_) => "fake_quant",
            Op::QatConv2d(_) => "qat_conv2d",
            Op::QatLinear(_) => "qat_linear",
        }
    }

    /// The op's parameters and buffers, in a fixed order.
    pub fn params(&self) -> Vec<(ParamKind, ArrayViewD<'_, f32>)> {
        let mut v = Vec::new();
        let push = &mut v;
        match self {
            Op::Linear(l) => linear_params(l, push),
            Op::Conv2d(c) => conv_params(c, push),
            Op::BatchNorm2d(bn) => bn_params(bn, false, push),
            Op::LayerNorm(ln) => {
                push.push((ParamKind::Weight, ln.gamma.view()));
                push.push((ParamKind::Bias, ln.beta.view()));
            }
            Op::RmsNorm(n) => push.push((ParamKind::Weight, n.weight.view().into_dyn())),
            Op::Embedding(e) => push.push((ParamKind::Weight, e.weight.view().into_dyn())),
            Op::QatConv2d(q) => {
                conv_params(&q.conv, push);
                if let Some(bn) = &q.bn {
                    bn_params(bn, true, push);
                }
                if let Some(s) = &q.weight_quant.learned_scale {
                    push.push((ParamKind::WeightScale, s.view().into_dyn()));
                }
            }
            Op::QatLinear(q) => {
                linear_params(&q.linear, push);
                if let Some(s) = &q.weight_quant.learned_scale {
                    push.push((ParamKind::WeightScale, s.view().into_dyn()));
                }
            }
            Op::FakeQuant(f) => {
                if let Some(s) = &f.learned_scale {
                    push.push((ParamKind::Scale, s.view().into_dyn()));
                }
                push.push((ParamKind::Range, f.range.view().into_dyn()));
            }
            _ => {}
        }
        v
    }

    /// Mutable access to the op's parameters and buffers, in the order of [`Op::params`].
    pub fn params_mut(&mut self) -> Vec<(ParamKind, ArrayViewMutD<'_, f32>)> {
        let mut v = Vec::new();
        let push = &mut v;
        match self {
            Op::Linear(l) => linear_params_mut(l, push),
            Op::Conv2d(c) => conv_params_mut(c, push),
            Op::BatchNorm2d(bn) => bn_params_mut(bn, false, push),
            Op::LayerNorm(ln) => {
                push.push((ParamKind::Weight, ln.gamma.view_mut()));
                push.push((ParamKind::Bias, ln.beta.view_mut()));
            }
            Op::RmsNorm(n) => push.push((ParamKind::Weight, n.weight.view_mut().into_dyn())),
            Op::Embedding(e) => push.push((ParamKind::Weight, e.weight.view_mut().into_dyn())),
            Op::QatConv2d(q) => {
                conv_params_mut(&mut q.conv, push);
                if let Some(bn) = &mut q.bn {
                    bn_params_mut(bn, true, push);
                }
                if let Some(s) = &mut q.weight_quant.learned_scale {
                    push.push((ParamKind::WeightScale, s.view_mut().into_dyn()));
                }
            }
            Op::QatLinear(q) => {
                linear_params_mut(&mut q.linear, push);
                if let Some(s) = &mut q.weight_quant.learned_scale {
                    push.push((ParamKind::WeightScale, s.view_mut().into_dyn()));
                }
            }
            Op::FakeQuant(f) => {
                if let Some(s) = &mut f.learned_scale {
                    push.push((ParamKind::Scale, s.view_mut().into_dyn()));
                }
                push.push((ParamKind::Range, f.range.view_mut().into_dyn()));
            }
            _ => {}
        }
        v
    }

    /// The per-sample output shape for the given per-sample input shapes, after checking
    /// that the op's parameters fit them.
    ///
    /// # Errors
    /// [`Error::Arity`], [`Error::ShapeMismatch`] or [`Error::InvalidConfig`] naming `node`.
    pub fn output_shape(&self, node: &str, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let arity = |expected: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(Error::Arity {
                    node: node.to_string(),
                    op: self.kind().to_string(),
                    expected: expected.to_string(),
                    got: inputs.len(),
                })
            }
        };
        let shape_err = |expected: String, got: &[usize]| {
            Err(Error::shape(self.kind(), Some(node), expected, got))
        };
        match self {
            Op::Input { shape, dynamic, .. } => {
                arity("0", inputs.is_empty())?;
                if let Some((axis, sym)) = dynamic.iter().find(|(a, _)| *a >= shape.len()) {
                    return Err(Error::config(
                        format!("input `{node}`"),
                        format!("dynamic axis {axis} (`{sym}`) is outside its shape {shape:?}"),
                    ));
                }
                Ok(shape.clone())
            }
            Op::Where => {
                arity("3", inputs.len() == 3)?;
                indexing::where_shape(node, inputs)
            }
            Op::ConcatAxis { axis } => {
                arity("2 or more", inputs.len() >= 2)?;
                let first = inputs[0];
                let a = nd::resolve_axis(*axis, first.len() + 1, &format!("node `{node}`"))? - 1;
                let mut out = first.to_vec();
                for s in &inputs[1..] {
                    let fits =
                        s.len() == first.len() && (0..s.len()).all(|d| d == a || s[d] == first[d]);
                    if !fits {
                        return shape_err(format!("{first:?} but along axis {}", a + 1), s);
                    }
                    out[a] = out[a].saturating_add(s[a]);
                }
                Ok(out)
            }
            Op::Attention(a) => {
                arity("3 or 4", matches!(inputs.len(), 3 | 4))?;
                super::attention::attention_shape(node, a, inputs)
            }
            Op::Add | Op::Concat => {
                arity("2 or more", inputs.len() >= 2)?;
                let first = inputs[0];
                if let Op::Add = self {
                    for s in &inputs[1..] {
                        if *s != first {
                            return shape_err(format!("{first:?} (same as the first input)"), s);
                        }
                    }
                    return Ok(first.to_vec());
                }
                let mut out = first.to_vec();
                if out.is_empty() {
                    return shape_err("inputs with a channel axis".into(), first);
                }
                for s in &inputs[1..] {
                    if s.len() != first.len() || s[1..] != first[1..] {
                        return shape_err(
                            format!(
                                "[_, {:?}] (all but channels as the first input)",
                                &first[1..]
                            ),
                            s,
                        );
                    }
                    out[0] += s[0];
                }
                Ok(out)
            }
            Op::Binary(b) => {
                arity("2", inputs.len() == 2)?;
                nd::binary_shape(node, *b, inputs[0], inputs[1])
            }
            Op::MatMul => {
                arity("2", inputs.len() == 2)?;
                nd::matmul_shape(node, inputs[0], inputs[1])
            }
            Op::Custom(c) => c.output_shape(inputs),
            Op::QatConv2d(q) => {
                arity("1", inputs.len() == 1)?;
                if let Some(bn) = &q.bn {
                    let n = q.conv.out_channels();
                    if bn.channels() != n
                        || bn.beta.len() != n
                        || bn.running_mean.len() != n
                        || bn.running_var.len() != n
                    {
                        return Err(Error::config(
                            format!("node `{node}`"),
                            "folded batch norm parameters differ from the conv's out_channels",
                        ));
                    }
                }
                check_learned(node, &q.weight_quant, q.conv.out_channels())?;
                Op::Conv2d(q.conv.clone()).unary_output_shape(node, inputs[0])
            }
            Op::QatLinear(q) => {
                arity("1", inputs.len() == 1)?;
                check_learned(node, &q.weight_quant, q.linear.out_features())?;
                Op::Linear(q.linear.clone()).unary_output_shape(node, inputs[0])
            }
            _ => {
                arity("1", inputs.len() == 1)?;
                let x = inputs[0];
                self.unary_output_shape(node, x)
            }
        }
    }

    fn unary_output_shape(&self, node: &str, x: &[usize]) -> Result<Vec<usize>> {
        let want = |expected: &str| Err(Error::shape(self.kind(), Some(node), expected, x));
        match self {
            Op::DynamicLinear(l) => {
                if x.last() != Some(&l.in_features()) {
                    return want(&format!("[…, {}] per sample", l.in_features()));
                }
                let mut out = x.to_vec();
                out.pop();
                out.push(l.out_features());
                Ok(out)
            }
            Op::Linear(l) => {
                if x.last() != Some(&l.in_features()) {
                    return want(&format!("[…, {}] per sample", l.in_features()));
                }
                if let Some(b) = &l.bias {
                    if b.len() != l.out_features() {
                        return Err(Error::config(
                            format!("node `{node}`"),
                            "linear bias length differs from out_features",
                        ));
                    }
                }
                let mut out = x.to_vec();
                out.pop();
                out.push(l.out_features());
                Ok(out)
            }
            Op::Conv2d(c) => {
                if x.len() != 3 || c.groups == 0 || x[0] != c.in_channels() {
                    return want(&format!("[{}, H, W] per sample", c.in_channels()));
                }
                if c.out_channels() % c.groups != 0 {
                    return Err(Error::config(
                        format!("node `{node}`"),
                        "groups must divide out_channels",
                    ));
                }
                if let Some(b) = &c.bias {
                    if b.len() != c.out_channels() {
                        return Err(Error::config(
                            format!("node `{node}`"),
                            "conv bias length differs from out_channels",
                        ));
                    }
                }
                let [oh, ow] = c.geometry(x[1], x[2]).output_hw()?;
                Ok(vec![c.out_channels(), oh, ow])
            }
            Op::BatchNorm2d(bn) => {
                if x.len() != 3 || x[0] != bn.channels() {
                    return want(&format!("[{}, H, W] per sample", bn.channels()));
                }
                let n = bn.channels();
                if bn.beta.len() != n || bn.running_mean.len() != n || bn.running_var.len() != n {
                    return Err(Error::config(
                        format!("node `{node}`"),
                        "batch norm parameters differ in length",
                    ));
                }
                Ok(x.to_vec())
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                if x.len() != 3 {
                    return want("[C, H, W] per sample");
                }
                if p.padding[0] > p.kernel[0] / 2 || p.padding[1] > p.kernel[1] / 2 {
                    return Err(Error::config(
                        format!("node `{node}`"),
                        "pool padding must be at most half the window",
                    ));
                }
                let [oh, ow] = p.geometry(x[0], x[1], x[2]).output_hw()?;
                Ok(vec![x[0], oh, ow])
            }
            Op::GlobalAvgPool => {
                if x.len() != 3 {
                    return want("[C, H, W] per sample");
                }
                Ok(vec![x[0], 1, 1])
            }
            Op::Flatten => Ok(vec![x.iter().product()]),
            Op::Softmax { axis } => {
                nd::resolve_axis(*axis, x.len() + 1, &format!("node `{node}`"))?;
                Ok(x.to_vec())
            }
            Op::Unary(_) => Ok(x.to_vec()),
            Op::BinaryConst(b) => nd::binary_shape(node, b.op, x, b.constant.shape()),
            Op::LayerNorm(ln) => nd::layer_norm_shape(node, ln, x),
            Op::RmsNorm(n) => super::decoder::rms_norm_shape(node, n, x),
            Op::Rotary(r) => super::decoder::rotary_shape(node, r, x),
            Op::Reshape { shape } => nd::reshape_shape(node, shape, x),
            Op::Permute { axes } => nd::permute_shape(node, axes, x),
            Op::Reduce {
                axes, keep_dims, ..
            } => {
                let axes = nd::reduce_axes(node, axes, x.len())?;
                Ok(nd::reduce_shape(&axes, x, *keep_dims))
            }
            Op::Embedding(e) => Ok(indexing::embedding_shape(e, x)),
            Op::Cast { .. } | Op::Identity => Ok(x.to_vec()),
            Op::Slice { axis, start, end } => {
                let a = nd::resolve_axis(*axis, x.len() + 1, &format!("node `{node}`"))?;
                let (lo, hi) = indexing::slice_bounds(*start, *end, x[a - 1]);
                if lo >= hi {
                    return Err(Error::shape(
                        "slice",
                        Some(node),
                        format!("a non-empty range {start}..{end} of axis {a}"),
                        x,
                    ));
                }
                let mut out = x.to_vec();
                out[a - 1] = hi - lo;
                Ok(out)
            }
            Op::Positions { axis } => {
                let a = nd::resolve_axis(*axis, x.len() + 1, &format!("node `{node}`"))?;
                Ok(vec![x[a - 1]])
            }
            Op::Unsqueeze { axes } => {
                let axes = indexing::unsqueeze_axes(node, axes, x.len())?;
                Ok(indexing::unsqueeze_shape(&axes, x))
            }
            Op::Squeeze { axes } => {
                let axes = indexing::squeeze_axes(node, axes, x)?;
                Ok(indexing::squeeze_shape(&axes, x))
            }
            Op::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    return Err(Error::config(
                        format!("node `{node}`"),
                        format!("dropout probability {p} is outside [0, 1)"),
                    ));
                }
                Ok(x.to_vec())
            }
            Op::ReLU | Op::ReLU6 => Ok(x.to_vec()),
            Op::FakeQuant(f) => {
                if f.range.len() != 2 || f.grid.qmin >= f.grid.qmax {
                    return Err(Error::config(
                        format!("node `{node}`"),
                        "fake quantization needs a [min, max] range and q_min < q_max",
                    ));
                }
                Ok(x.to_vec())
            }
            Op::Input { .. }
            | Op::Add
            | Op::Concat
            | Op::ConcatAxis { .. }
            | Op::Binary(_)
            | Op::MatMul
            | Op::Where
            | Op::Attention(_)
            | Op::Custom(_)
            | Op::QatConv2d(_)
            | Op::QatLinear(_) => Err(Error::Unsupported(format!(
                "`{node}`: {} is not a single-input op",
                self.kind()
            ))),
        }
    }

    /// Multiply-accumulates per sample for this op's output shape (0 for ops without
    /// arithmetic worth counting).
    pub fn macs(&self, output: &[usize]) -> u64 {
        let prod = |s: &[usize]| s.iter().map(|&v| v as u64).product::<u64>();
        match self {
            Op::Linear(l) | Op::QatLinear(QatLinear { linear: l, .. }) => {
                prod(output) * l.in_features() as u64
            }
            Op::Conv2d(c) => {
                let [kh, kw] = c.kernel();
                prod(output) * (c.in_channels() / c.groups * kh * kw) as u64
            }
            Op::QatConv2d(q) => {
                let c = &q.conv;
                let [kh, kw] = c.kernel();
                prod(output) * (c.in_channels() / c.groups * kh * kw) as u64
            }
            _ => 0,
        }
    }
}

fn linear_params<'a>(l: &'a Linear, push: &mut Vec<(ParamKind, ArrayViewD<'a, f32>)>) {
    push.push((ParamKind::Weight, l.weight.view().into_dyn()));
    if let Some(b) = &l.bias {
        push.push((ParamKind::Bias, b.view().into_dyn()));
    }
}

fn conv_params<'a>(c: &'a Conv2d, push: &mut Vec<(ParamKind, ArrayViewD<'a, f32>)>) {
    push.push((ParamKind::Weight, c.weight.view().into_dyn()));
    if let Some(b) = &c.bias {
        push.push((ParamKind::Bias, b.view().into_dyn()));
    }
}

fn bn_params<'a>(
    bn: &'a BatchNorm2d,
    folded: bool,
    push: &mut Vec<(ParamKind, ArrayViewD<'a, f32>)>,
) {
    let kinds = bn_kinds(folded);
    push.push((kinds[0], bn.gamma.view().into_dyn()));
    push.push((kinds[1], bn.beta.view().into_dyn()));
    push.push((kinds[2], bn.running_mean.view().into_dyn()));
    push.push((kinds[3], bn.running_var.view().into_dyn()));
}

fn linear_params_mut<'a>(l: &'a mut Linear, push: &mut Vec<(ParamKind, ArrayViewMutD<'a, f32>)>) {
    push.push((ParamKind::Weight, l.weight.view_mut().into_dyn()));
    if let Some(b) = &mut l.bias {
        push.push((ParamKind::Bias, b.view_mut().into_dyn()));
    }
}

fn conv_params_mut<'a>(c: &'a mut Conv2d, push: &mut Vec<(ParamKind, ArrayViewMutD<'a, f32>)>) {
    push.push((ParamKind::Weight, c.weight.view_mut().into_dyn()));
    if let Some(b) = &mut c.bias {
        push.push((ParamKind::Bias, b.view_mut().into_dyn()));
    }
}

fn bn_params_mut<'a>(
    bn: &'a mut BatchNorm2d,
    folded: bool,
    push: &mut Vec<(ParamKind, ArrayViewMutD<'a, f32>)>,
) {
    let kinds = bn_kinds(folded);
    push.push((kinds[0], bn.gamma.view_mut().into_dyn()));
    push.push((kinds[1], bn.beta.view_mut().into_dyn()));
    push.push((kinds[2], bn.running_mean.view_mut().into_dyn()));
    push.push((kinds[3], bn.running_var.view_mut().into_dyn()));
}

/// γ, β, running mean and running variance: a BatchNorm node's own, or those of one folded
/// into a QAT convolution.
fn bn_kinds(folded: bool) -> [ParamKind; 4] {
    if folded {
        [
            ParamKind::BnWeight,
            ParamKind::BnBias,
            ParamKind::BnRunningMean,
            ParamKind::BnRunningVar,
        ]
    } else {
        [
            ParamKind::Weight,
            ParamKind::Bias,
            ParamKind::RunningMean,
            ParamKind::RunningVar,
        ]
    }
}

/// Learned weight scales must have one value per output channel (or one).
fn check_learned(node: &str, wq: &WeightFakeQuant, channels: usize) -> Result<()> {
    let want = if wq.per_channel { channels } else { 1 };
    match &wq.learned_scale {
        Some(s) if s.len() != want => Err(Error::config(
            format!("node `{node}`"),
            format!("{} learned weight scales for {want} channels", s.len()),
        )),
        _ if wq.grid.qmin >= wq.grid.qmax => Err(Error::config(
            format!("node `{node}`"),
            "weight fake quantization needs q_min < q_max",
        )),
        _ => Ok(()),
    }
}
