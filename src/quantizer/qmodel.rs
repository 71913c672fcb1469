//! The integer model: u8 NHWC activations between quantize at the input and dequantize at
//! the output, Conv2d and Linear on the int8 kernels.

use super::params::QuantParams;
use super::ptq::QuantConfig;
use super::scheme::QuantScheme;
use crate::error::{Error, Result};
use crate::kernels::{
    conv2d_nhwc_u8i8_f32, conv2d_nhwc_u8i8_u8, gemm_u8i8_f32, gemm_u8i8_u8, ConvSpec, Dequantize,
    FusedActivation, PackedConv, PackedWeights, Requantize,
};
use crate::model::{flatten_in_place, gather_slots, input_view, Slot};
use crate::model::{Graph, GraphBuilder, NodeId, Op, Pool2d};
use crate::tensor::{ConvGeometry, QuantGrid, Tensor};
use ndarray::{Array2, Array4, ArrayD, ArrayView4, ArrayViewD, Axis, Ix2, Ix4, IxDyn};

/// Receives `(float node name, its output as f32 NCHW)` while a model runs (for the report).
type Tap<'a> = Option<&'a mut dyn FnMut(&str, &Tensor)>;

/// Per-sample shape of a quantized value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `[H, W, C]` (the NCHW tensor `[C, H, W]` stored channels-last).
    Nhwc { c: usize, h: usize, w: usize },
    /// `[F]`.
    Flat { f: usize },
}

#[derive(Debug)]
enum QKind {
    Input,
    Conv {
        conv: PackedConv,
        rq: Requantize,
        wq: ArrayD<i8>,
        scales: Vec<f32>,
    },
    Linear {
        w: PackedWeights,
        rq: Requantize,
        wq: ArrayD<i8>,
        scales: Vec<f32>,
    },
    MaxPool(Pool2d),
    AvgPool(Pool2d),
    GlobalAvgPool,
    /// Flatten, in NCHW feature order.
    Flatten,
    Identity,
    Clamp {
        lo: u8,
        hi: u8,
    },
    Add,
    Concat,
    /// A one-input op run in f32 between dequantize and quantize.
    Float(Graph),
}

#[derive(Debug)]
struct QNode {
    name: String,
    /// The float node whose output this value stands for (a fused ReLU's, for a fused layer).
    reports_as: String,
    kind: QKind,
    inputs: Vec<usize>,
    scale: f32,
    zero: u8,
    layout: Layout,
}

/// A model whose Conv2d and Linear layers run on the crate's int8 kernels.
///
/// Activations are u8 (affine, per tensor) in NHWC between a quantize step at the input and a
/// dequantize step at the output; weights are i8 per output channel; biases i32 with scale
/// `s_in·s_w`; BatchNorm is folded into the preceding convolution and a ReLU / ReLU6 that
/// follows a convolution or linear layer is fused into its requantization clamp. Max pooling
/// runs on u8 directly; average pooling sums u8 values and requantizes the mean to its own
/// range; Add and Concat requantize their inputs in f32 arithmetic; any other op (or a node kept in float) runs in f32 between dequantize and
/// quantize.
#[derive(Debug)]
pub struct QuantizedModel {
    body: Body,
    input_shape: Vec<usize>,
    layers: Vec<LayerReport>,
    /// The BatchNorm-folded float graph (structure, and the parameters of float nodes).
    folded: Graph,
    /// Output (scale, zero point) of every folded node (full-integer mode).
    acts: Vec<(f32, u8)>,
    config: QuantConfig,
}

#[derive(Debug)]
enum Body {
    Integer {
        nodes: Vec<QNode>,
        output: usize,
    },
    Dynamic {
        graph: Graph,
        layers: Vec<Option<DynLayer>>,
    },
    Float16 {
        graph: Graph,
    },
}

/// A Conv2d or Linear of a dynamic-range model: i8 weights, f32 epilogue.
#[derive(Debug)]
struct DynLayer {
    kernel: DynKernel,
    /// The layer's only consumer is a ReLU, applied in the epilogue when no tap watches.
    relu_follows: bool,
    wq: ArrayD<i8>,
    weight_scales: Vec<f32>,
    bias: Option<Vec<f32>>,
}

#[derive(Debug)]
enum DynKernel {
    Conv(PackedConv),
    Linear(PackedWeights),
}

/// One row of [`QuantizedModel::report`].
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// Layer (node) name.
    pub name: String,
    /// Op kind.
    pub op: String,
    /// How it is stored and run.
    pub scheme: String,
    /// The kernel path that runs it (`avx512vnni`, ...), or `float`.
    pub path: String,
    /// Bytes of its parameters in f32.
    pub float_bytes: usize,
    /// Bytes of its parameters as stored by this model.
    pub stored_bytes: usize,
    /// Signal-to-quantization-noise ratio of its output against the float model on the
    /// calibration data, in dB (`None` when it was not measured).
    pub sqnr_db: Option<f32>,
}

/// u8 activation parameters `(scale, zero point)` for a range.
pub(crate) fn act_params(cfg: &QuantConfig, range: (f32, f32)) -> Result<(f32, u8)> {
    let p = QuantParams::from_range(cfg.activations, &[range.0], &[range.1])?;
    Ok((p.scale[0], p.zero_point[0].clamp(0, 255) as u8))
}

fn layout_of(shape: &[usize]) -> Result<Layout> {
    match *shape {
        [c, h, w] => Ok(Layout::Nhwc { c, h, w }),
        [f] => Ok(Layout::Flat { f }),
        _ => Err(Error::Unsupported(format!(
            "quantized values of per-sample shape {shape:?}"
        ))),
    }
}

/// `int8 per-channel weights` and the like, for the report.
fn describe(s: QuantScheme) -> String {
    let dtype = match s.dtype {
        super::scheme::QuantDtype::Int4 => "int4",
        _ => "int8",
    };
    let gran = match s.granularity {
        super::scheme::Granularity::PerTensor => "per-tensor",
        super::scheme::Granularity::PerChannel { .. } => "per-channel",
    };
    format!("{dtype} {gran} weights")
}

/// i8 per-channel weights of `w` (`[out, ...]`), their scales.
fn quantize_weights(w: ArrayD<f32>, scheme: QuantScheme) -> Result<(ArrayD<i8>, Vec<f32>)> {
    let p = QuantParams::from_tensor(scheme, w.view())?;
    let q = super::params::quantize(w.view(), &p)?;
    let values: Vec<i8> = q
        .int_values()
        .map_err(|_| Error::config("weights", "weight schemes must be integer"))?
        .into_iter()
        .map(|v| v as i8)
        .collect();
    let arr = ArrayD::from_shape_vec(IxDyn(w.shape()), values)
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    // A per-tensor scale serves every output channel.
    let channels = w.shape().first().copied().unwrap_or(1);
    let scales = if p.scale.len() == 1 {
        vec![p.scale[0]; channels]
    } else {
        p.scale
    };
    Ok((arr, scales))
}

/// Quantized weights loaded from a file, by layer name: i8 values in the layer's own layout
/// and per-channel scales.
pub(crate) type StoredWeights = std::collections::HashMap<String, (ArrayD<i8>, Vec<f32>)>;

fn layer_weights(
    name: &str,
    w: ArrayD<f32>,
    stored: &StoredWeights,
    cfg: &QuantConfig,
) -> Result<(ArrayD<i8>, Vec<f32>)> {
    match stored.get(name) {
        Some((q, s)) if q.shape() == w.shape() => Ok((q.clone(), s.clone())),
        Some((q, _)) => Err(Error::TensorShape {
            name: format!("{name}.weight_q"),
            expected: w.shape().to_vec(),
            got: q.shape().to_vec(),
        }),
        None => quantize_weights(w, cfg.weights_for(name)),
    }
}

/// A float bias as the i32 the accumulator at scale `acc_scale` adds: rounded half to
/// even, saturated (the QDQ export writes the same integers).
pub(crate) fn bias_to_i32(bias: f32, acc_scale: f64) -> i32 {
    (f64::from(bias) / acc_scale)
        .round_ties_even()
        .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
}

/// The requantization of a layer: i32 bias with scale `s_in·s_w[c]`, multipliers
/// `s_in·s_w[c] / s_out`, the fused activation's clamp.
fn requant(
    bias: Option<&ndarray::Array1<f32>>,
    s_in: f32,
    s_w: &[f32],
    (s_out, z_out): (f32, u8),
    act: FusedActivation,
) -> Result<Requantize> {
    let acc_scale: Vec<f64> = s_w.iter().map(|&s| s_in as f64 * s as f64).collect();
    let bias_q = acc_scale
        .iter()
        .enumerate()
        .map(|(c, &s)| bias_to_i32(bias.map_or(0.0, |b| b[c]), s))
        .collect();
    let mult: Vec<f64> = acc_scale.iter().map(|&s| s / s_out as f64).collect();
    Requantize::from_real(bias_q, &mult, z_out)?.with_activation(act, s_out)
}

/// One quantized value of a full-integer model, as a QDQ export writes it.
pub(crate) struct QdqValue<'a> {
    /// The float node that produces it (a fused layer's conv or linear).
    pub(crate) name: &'a str,
    /// The float node whose output it stands for (the fused ReLU, else `name`).
    pub(crate) reports_as: &'a str,
    /// u8 activation scale and zero point.
    pub(crate) scale: f32,
    pub(crate) zero: u8,
    /// For an integer conv / linear: i8 weights, per-channel scales, the input's scale.
    pub(crate) weights: Option<(&'a ArrayD<i8>, &'a [f32], f32)>,
    /// The weights' bits (8, or 4 for an int4 layer).
    pub(crate) weight_bits: u32,
}

impl QuantizedModel {
    /// The BatchNorm-folded float graph and every quantized value of a full-integer model
    /// (for the QDQ export).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for dynamic-range and float16 models.
    pub(crate) fn qdq_values(&self) -> Result<(&Graph, Vec<QdqValue<'_>>)> {
        let Body::Integer { nodes, .. } = &self.body else {
            return Err(Error::Unsupported(
                "a QDQ export of a dynamic-range or float16 model (full-integer only)".into(),
            ));
        };
        let values = nodes
            .iter()
            .map(|n| QdqValue {
                name: &n.name,
                reports_as: &n.reports_as,
                scale: n.scale,
                zero: n.zero,
                weights: match &n.kind {
                    QKind::Conv { wq, scales, .. } | QKind::Linear { wq, scales, .. } => {
                        Some((wq, scales.as_slice(), nodes[n.inputs[0]].scale))
                    }
                    _ => None,
                },
                weight_bits: self.config.weights_for(&n.name).dtype.bits(),
            })
            .collect();
        Ok((&self.folded, values))
    }

    /// Builds the integer model from a BatchNorm-folded graph and each node's output range.
    pub(crate) fn build(
        g: &Graph,
        acts: &[(f32, u8)],
        cfg: &QuantConfig,
        stored: &StoredWeights,
    ) -> Result<Self> {
        let n = g.nodes().len();
        let mut map = vec![usize::MAX; n];
        let mut nodes: Vec<QNode> = Vec::new();
        let keep =
            |name: &str| cfg.keep_float.iter().any(|k| k == name) || super::float_only(g, name);
        for i in 0..n {
            if map[i] != usize::MAX {
                continue; // fused into its producer
            }
            let node = &g.nodes()[i];
            let id = NodeId::from_index(i);
            let ins: Vec<usize> = node.inputs.iter().map(|j| map[j.index()]).collect();
            let in0 = ins
                .first()
                .map(|&k| (nodes[k].scale, nodes[k].zero, nodes[k].layout));
            let own = acts[i];
            let layout = layout_of(g.shape(id))?;
            // A ReLU / ReLU6 that is the only consumer of a conv or linear is fused.
            let fusable =
                |op: &Op| matches!(op, Op::Conv2d(_) | Op::Linear(_)) && !keep(&node.name);
            let fused = if fusable(&node.op) && g.output_id() != id {
                match g.consumers(id).as_slice() {
                    [c] if !keep(&g.node(*c).name) => match g.node(*c).op {
                        Op::ReLU => Some((*c, FusedActivation::Relu)),
                        Op::ReLU6 => Some((*c, FusedActivation::Relu6)),
                        _ => None,
                    },
                    _ => None,
                }
            } else {
                None
            };
            let (out_params, act) = match fused {
                Some((c, a)) => (acts[c.index()], a),
                None => (own, FusedActivation::None),
            };
            let same = in0.map(|(s, z, _)| (s, z)).unwrap_or(own);
            let (kind, (scale, zero)) = match (&node.op, in0) {
                (Op::Input { .. }, _) => (QKind::Input, own),
                (Op::Conv2d(c), Some((s_in, _, _))) if !keep(&node.name) => {
                    let (wq_dyn, s_w) =
                        layer_weights(&node.name, c.weight.clone().into_dyn(), stored, cfg)?;
                    let wq = wq_dyn
                        .clone()
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let spec = ConvSpec {
                        stride: c.stride,
                        padding: c.padding,
                        padding_end: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                    };
                    let conv = PackedConv::new(wq.view(), spec)?;
                    let rq = requant(c.bias.as_ref(), s_in, &s_w, out_params, act)?;
                    (
                        QKind::Conv {
                            conv,
                            rq,
                            wq: wq_dyn,
                            scales: s_w,
                        },
                        out_params,
                    )
                }
                (Op::Linear(l), Some((s_in, _, _))) if !keep(&node.name) => {
                    let w = l.weight.clone();
                    let (wq_dyn, s_w) = layer_weights(&node.name, w.into_dyn(), stored, cfg)?;
                    let wq = wq_dyn
                        .clone()
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let packed = PackedWeights::new(wq.view())?;
                    let rq = requant(l.bias.as_ref(), s_in, &s_w, out_params, act)?;
                    (
                        QKind::Linear {
                            w: packed,
                            rq,
                            wq: wq_dyn,
                            scales: s_w,
                        },
                        out_params,
                    )
                }
                (Op::ReLU, Some((_, z, _))) if !keep(&node.name) => {
                    (QKind::Clamp { lo: z, hi: 255 }, same)
                }
                (Op::ReLU6, Some((s, z, _))) if !keep(&node.name) => {
                    let six = (z as f32 + (6.0 / s).round_ties_even()).min(255.0) as u8;
                    (QKind::Clamp { lo: z, hi: six }, same)
                }
                (Op::MaxPool2d(p), Some(_)) if !keep(&node.name) => (QKind::MaxPool(*p), same),
                (Op::AvgPool2d(p), Some(_)) if !keep(&node.name) => (QKind::AvgPool(*p), own),
                (Op::GlobalAvgPool, Some(_)) if !keep(&node.name) => (QKind::GlobalAvgPool, own),
                (Op::Flatten, Some(_)) => (QKind::Flatten, same),
                (Op::Dropout { .. }, Some(_)) => (QKind::Identity, same),
                (Op::Add, Some(_)) => (QKind::Add, own),
                (Op::Concat, Some(_)) => (QKind::Concat, own),
                (op, Some(_)) if ins.len() == 1 => {
                    let in_shape = g.shape(node.inputs[0]).to_vec();
                    let mut b = GraphBuilder::new(0);
                    b.input("input", &in_shape)
                        .node(&node.name, op.clone(), &["input"]);
                    (QKind::Float(b.build(&node.name)?), own)
                }
                (op, _) => {
                    return Err(Error::Unsupported(format!(
                        "`{}` ({}) has no quantized form with {} inputs",
                        node.name,
                        op.kind(),
                        ins.len()
                    )))
                }
            };
            let out_layout = match fused {
                Some((c, _)) => layout_of(g.shape(c))?,
                None => layout,
            };
            let reports_as = match fused {
                Some((c, _)) => g.node(c).name.clone(),
                None => node.name.clone(),
            };
            nodes.push(QNode {
                name: node.name.clone(),
                reports_as,
                kind,
                inputs: ins,
                scale,
                zero,
                layout: out_layout,
            });
            map[i] = nodes.len() - 1;
            if let Some((c, _)) = fused {
                map[c.index()] = nodes.len() - 1;
            }
        }
        Ok(QuantizedModel {
            body: Body::Integer {
                nodes,
                output: map[g.output_id().index()],
            },
            input_shape: g.input_shape().to_vec(),
            layers: Vec::new(),
            folded: g.clone(),
            acts: acts.to_vec(),
            config: cfg.clone(),
        })
    }

    /// A dynamic-range model over a BatchNorm-folded graph.
    pub(crate) fn dynamic(g: &Graph, cfg: &QuantConfig, stored: &StoredWeights) -> Result<Self> {
        let keep =
            |name: &str| cfg.keep_float.iter().any(|k| k == name) || super::float_only(g, name);
        let mut layers = Vec::with_capacity(g.nodes().len());
        for (i, node) in g.nodes().iter().enumerate() {
            let id = NodeId::from_index(i);
            let consumers = g.consumers(id);
            let relu_follows = id != g.output_id()
                && matches!(consumers[..], [c] if matches!(g.nodes()[c.index()].op, Op::ReLU));
            let layer = match &node.op {
                Op::Conv2d(c) if !keep(&node.name) => {
                    let (wq_dyn, s_w) =
                        layer_weights(&node.name, c.weight.clone().into_dyn(), stored, cfg)?;
                    let wq = wq_dyn
                        .clone()
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let spec = ConvSpec {
                        stride: c.stride,
                        padding: c.padding,
                        padding_end: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                    };
                    Some(DynLayer {
                        kernel: DynKernel::Conv(PackedConv::new(wq.view(), spec)?),
                        relu_follows,
                        wq: wq_dyn,
                        weight_scales: s_w,
                        bias: c.bias.as_ref().map(|b| b.to_vec()),
                    })
                }
                Op::Linear(l) if !keep(&node.name) => {
                    let (wq_dyn, s_w) =
                        layer_weights(&node.name, l.weight.clone().into_dyn(), stored, cfg)?;
                    let wq = wq_dyn
                        .clone()
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    Some(DynLayer {
                        kernel: DynKernel::Linear(PackedWeights::new(wq.view())?),
                        relu_follows,
                        wq: wq_dyn,
                        weight_scales: s_w,
                        bias: l.bias.as_ref().map(|b| b.to_vec()),
                    })
                }
                _ => None,
            };
            layers.push(layer);
        }
        Ok(QuantizedModel {
            body: Body::Dynamic {
                graph: g.clone(),
                layers,
            },
            input_shape: g.input_shape().to_vec(),
            layers: Vec::new(),
            folded: g.clone(),
            acts: Vec::new(),
            config: cfg.clone(),
        })
    }

    /// A model whose weights are rounded to float16.
    pub(crate) fn float16(g: &Graph, cfg: &QuantConfig) -> Result<Self> {
        let mut graph = g.clone();
        graph.map_params(|_, _, mut p| p.mapv_inplace(|v| half::f16::from_f32(v).to_f32()));
        Ok(QuantizedModel {
            folded: graph.clone(),
            body: Body::Float16 { graph },
            input_shape: g.input_shape().to_vec(),
            layers: Vec::new(),
            acts: Vec::new(),
            config: cfg.clone(),
        })
    }

    /// Fills the report: each layer's sizes, path, and output SQNR against `float` over
    /// `batches`.
    pub(crate) fn measure(&mut self, float: &Graph, batches: &[Tensor]) -> Result<()> {
        let mut signal = std::collections::HashMap::<String, (f64, f64)>::new();
        for b in batches {
            let mut reference = std::collections::HashMap::new();
            float.forward_with(b, &mut |_, node, out| {
                reference.insert(node.name.clone(), out.clone());
            })?;
            self.run(
                b,
                Some(&mut |name: &str, out: &Tensor| {
                    if let Some(r) = reference.get(name) {
                        if r.shape() == out.shape() {
                            let e = signal.entry(name.to_string()).or_insert((0.0, 0.0));
                            for (a, q) in r.iter().zip(out.iter()) {
                                e.0 += (*a as f64).powi(2);
                                e.1 += (*a as f64 - *q as f64).powi(2);
                            }
                        }
                    }
                }),
            )?;
        }
        let sqnr = |name: &str| {
            signal.get(name).map(|&(s, n)| {
                if n == 0.0 {
                    f32::INFINITY
                } else {
                    (10.0 * (s / n).log10()) as f32
                }
            })
        };
        let (gemm_path, conv_path) = (
            crate::kernels::KernelChoice::best().name().to_string(),
            crate::kernels::KernelChoice::best_for_conv()
                .name()
                .to_string(),
        );
        let mut rows = Vec::new();
        for node in float.nodes() {
            let params: usize = node.op.params().iter().map(|(_, v)| v.len()).sum();
            if params == 0 {
                continue;
            }
            let out_ch = match &node.op {
                Op::Conv2d(c) => c.out_channels(),
                Op::Linear(l) => l.out_features(),
                _ => 0,
            };
            let weights = node.op.params().first().map_or(0, |(_, v)| v.len());
            // Whether the layer runs on the int8 kernels (and how its activations are
            // quantized), and which float node its output stands for.
            let int8 = match &self.body {
                Body::Integer { nodes, .. } => nodes
                    .iter()
                    .find(|q| {
                        q.name == node.name
                            && matches!(q.kind, QKind::Conv { .. } | QKind::Linear { .. })
                    })
                    .map(|q| ("u8 activations", q.reports_as.clone())),
                Body::Dynamic { graph, layers } => graph
                    .find(&node.name)
                    .and_then(|id| layers[id.index()].as_ref())
                    .map(|_| ("dynamic u8 activations", node.name.clone())),
                Body::Float16 { .. } => None,
            };
            let (scheme, run_path, stored, reports_as) = match (int8, &self.body) {
                (Some((acts, reports_as)), _) => (
                    format!("{}, {acts}", describe(self.config.weights_for(&node.name))),
                    if matches!(node.op, Op::Conv2d(_)) {
                        conv_path.clone()
                    } else {
                        gemm_path.clone()
                    },
                    weights + 8 * out_ch,
                    reports_as,
                ),
                (None, Body::Float16 { .. }) => (
                    "float16 weights".to_string(),
                    "float".to_string(),
                    2 * params,
                    node.name.clone(),
                ),
                (None, _) => (
                    "float".to_string(),
                    "float".to_string(),
                    4 * params,
                    node.name.clone(),
                ),
            };
            rows.push(LayerReport {
                name: node.name.clone(),
                op: node.op.kind().to_string(),
                scheme,
                path: run_path,
                float_bytes: 4 * params,
                stored_bytes: stored,
                sqnr_db: sqnr(&reports_as),
            });
        }
        self.layers = rows;
        Ok(())
    }

    /// The tensors of the `.nnq` payload (see `format.rs`), the mode and the float-kept nodes.
    pub(crate) fn entries(&self) -> (Vec<super::format::Entry>, super::ptq::PtqMode, Vec<String>) {
        use super::format::f32_entry;
        let mut quant: std::collections::HashMap<&str, (&ArrayD<i8>, &Vec<f32>)> =
            std::collections::HashMap::new();
        match &self.body {
            Body::Integer { nodes, .. } => {
                for n in nodes {
                    if let QKind::Conv { wq, scales, .. } | QKind::Linear { wq, scales, .. } =
                        &n.kind
                    {
                        quant.insert(&n.name, (wq, scales));
                    }
                }
            }
            Body::Dynamic { graph, layers } => {
                for (node, layer) in graph.nodes().iter().zip(layers) {
                    if let Some(l) = layer {
                        quant.insert(&node.name, (&l.wq, &l.weight_scales));
                    }
                }
            }
            Body::Float16 { .. } => {}
        }
        let f16 = matches!(self.body, Body::Float16 { .. });
        let mut out = Vec::new();
        self.folded.visit_params(|name, kind, v| {
            let node = &name[..name.len() - kind.suffix().len() - 1];
            match quant.get(node) {
                Some((wq, scales)) if kind == crate::model::ParamKind::Weight => {
                    out.push((
                        format!("{node}.weight_q"),
                        safetensors::Dtype::I8,
                        wq.shape().to_vec(),
                        wq.iter().map(|&q| q as u8).collect(),
                    ));
                    out.push(f32_entry(
                        format!("{node}.weight_scale"),
                        &[scales.len()],
                        scales.iter().copied(),
                    ));
                }
                _ if f16 => out.push((
                    name.to_string(),
                    safetensors::Dtype::F16,
                    v.shape().to_vec(),
                    v.iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                )),
                _ => out.push(f32_entry(name.to_string(), v.shape(), v.iter().copied())),
            }
        });
        if matches!(self.body, Body::Integer { .. }) {
            for (node, &(scale, zero)) in self.folded.nodes().iter().zip(&self.acts) {
                out.push(f32_entry(
                    format!("{}.act", node.name),
                    &[2],
                    [scale, zero as f32].into_iter(),
                ));
            }
        }
        (out, self.config.mode, self.config.keep_float.clone())
    }

    /// Per-layer scheme, kernel path, sizes and output SQNR (measured on the calibration
    /// data): the sensitivity table that shows which layer hurts.
    pub fn report(&self) -> &[LayerReport] {
        &self.layers
    }

    /// The report as a plain-text table.
    pub fn report_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "{:<12} {:<8} {:<44} {:<11} {:>10} {:>10} {:>9}\n",
            "layer", "op", "scheme", "path", "f32 bytes", "stored", "SQNR dB"
        );
        for r in &self.layers {
            let _ = writeln!(
                s,
                "{:<12} {:<8} {:<44} {:<11} {:>10} {:>10} {:>9}",
                r.name,
                r.op,
                r.scheme,
                r.path,
                r.float_bytes,
                r.stored_bytes,
                r.sqnr_db.map_or("-".to_string(), |v| format!("{v:.1}"))
            );
        }
        let (f, q): (usize, usize) = self
            .layers
            .iter()
            .fold((0, 0), |a, r| (a.0 + r.float_bytes, a.1 + r.stored_bytes));
        let _ = writeln!(
            s,
            "total: {f} bytes in f32, {q} stored ({:.2}x smaller)",
            f as f64 / q.max(1) as f64
        );
        s
    }

    /// Parameter bytes as stored (the report's total).
    pub fn stored_bytes(&self) -> usize {
        self.layers.iter().map(|r| r.stored_bytes).sum()
    }

    /// Runs the model on an f32 batch `[N, ...input_shape]` (NCHW), returning f32 outputs.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `x` does not fit the input, [`Error::NonFinite`] for NaN
    /// or infinite inputs, [`Error::Empty`] for a batch of zero samples.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }

    fn run(&self, x: &Tensor, tap: Tap<'_>) -> Result<Tensor> {
        if x.ndim() != self.input_shape.len() + 1 || x.shape()[1..] != self.input_shape[..] {
            return Err(Error::shape(
                "quantized forward",
                None,
                format!("[N, {:?}]", self.input_shape),
                x.shape(),
            ));
        }
        if x.shape()[0] == 0 {
            return Err(Error::Empty("quantized forward batch".into()));
        }
        if !matches!(self.body, Body::Integer { .. }) {
            // The integer body checks while it quantizes the input.
            let standard = x.as_standard_layout();
            let finite = match standard.as_slice() {
                Some(data) => crate::kernels::min_max(data).2,
                None => x.iter().all(|v| v.is_finite()),
            };
            if !finite {
                return Err(Error::NonFinite("quantized model input".into()));
            }
        }
        let macs = (self.folded.macs_per_sample()).saturating_mul(x.shape()[0] as u64);
        crate::kernels::parallel::session(macs, || match &self.body {
            Body::Integer { nodes, output } => run_integer(nodes, *output, x, tap),
            Body::Float16 { graph } => match tap {
                Some(t) => graph.forward_with(x, &mut |_, n, out| t(&n.name, out)),
                None => graph.forward(x),
            },
            Body::Dynamic { graph, layers } => run_dynamic(graph, layers, x, tap),
        })
    }

    /// The node names and what each runs as, in order (a first view of the report).
    pub fn summary(&self) -> Vec<(String, &'static str)> {
        let Body::Integer { nodes, .. } = &self.body else {
            return self
                .layers
                .iter()
                .map(|r| {
                    (
                        r.name.clone(),
                        if r.path == "float" {
                            "float"
                        } else {
                            "int8 dynamic"
                        },
                    )
                })
                .collect();
        };
        nodes
            .iter()
            .map(|n| {
                let what = match &n.kind {
                    QKind::Input => "quantize",
                    QKind::Conv { .. } => "int8 conv",
                    QKind::Linear { .. } => "int8 linear",
                    QKind::MaxPool(_) => "u8 pooling",
                    QKind::AvgPool(_) | QKind::GlobalAvgPool => "u8 pooling, requantized",
                    QKind::Flatten | QKind::Identity => "u8 reshape",
                    QKind::Clamp { .. } => "u8 clamp",
                    QKind::Add | QKind::Concat => "requantize (f32 arithmetic)",
                    QKind::Float(_) => "float fallback",
                };
                (n.name.clone(), what)
            })
            .collect()
    }
}

fn run_integer(nodes: &[QNode], output: usize, x: &Tensor, tap: Tap<'_>) -> Result<Tensor> {
    let batch = x.shape()[0];
    let mut tap = tap;
    let mut values: Vec<ArrayD<u8>> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let v = {
            let input = |k: usize| &values[node.inputs[k]];
            let src = |k: usize| &nodes[node.inputs[k]];
            match &node.kind {
                QKind::Input => {
                    let (q, finite) = quantize_u8_checked(x.view(), node.scale, node.zero);
                    if !finite {
                        return Err(Error::NonFinite("quantized model input".into()));
                    }
                    to_nhwc(&q)?
                }
                QKind::Conv { conv, rq, .. } => {
                    conv2d_nhwc_u8i8_u8(view4(input(0))?, src(0).zero, conv, rq)?.into_dyn()
                }
                QKind::Linear { w, rq, .. } => {
                    let a = input(0)
                        .view()
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let mut out = Array2::<u8>::zeros((batch, w.out_channels()));
                    gemm_u8i8_u8(a, src(0).zero, w, rq, out.view_mut())?;
                    out.into_dyn()
                }
                QKind::MaxPool(p) => pool_u8(view4(input(0))?, p, None)?.into_dyn(),
                QKind::AvgPool(p) => {
                    pool_u8(view4(input(0))?, p, Some(requant_pair(src(0), node)))?.into_dyn()
                }
                QKind::GlobalAvgPool => {
                    let v = view4(input(0))?;
                    let (_, h, w, _) = v.dim();
                    let p = Pool2d {
                        kernel: [h, w],
                        stride: [1, 1],
                        padding: [0, 0],
                    };
                    pool_u8(v, &p, Some(requant_pair(src(0), node)))?.into_dyn()
                }
                QKind::Flatten => {
                    // Back to NCHW order first, so flattened features are in the order every
                    // consumer was trained with (a Linear, or anything else).
                    let v = to_nchw(input(0))?;
                    let f = v.len() / batch;
                    v.into_shape_with_order(IxDyn(&[batch, f]))
                        .map_err(|e| Error::Unsupported(e.to_string()))?
                }
                QKind::Identity => input(0).clone(),
                QKind::Clamp { lo, hi } => input(0).mapv(|q| q.clamp(*lo, *hi)),
                QKind::Add => {
                    let mut acc = ArrayD::<f32>::zeros(input(0).raw_dim());
                    for k in 0..node.inputs.len() {
                        let (s, z) = (src(k).scale, src(k).zero as f32);
                        ndarray::Zip::from(&mut acc)
                            .and(input(k))
                            .for_each(|a, &q| *a += s * (q as f32 - z));
                    }
                    acc.mapv(|v| requantize_value(v, node.scale, node.zero))
                }
                QKind::Concat => {
                    let parts: Vec<ArrayD<u8>> = (0..node.inputs.len())
                        .map(|k| {
                            let (s, z) = (src(k).scale, src(k).zero as f32);
                            input(k).mapv(|q| {
                                requantize_value(s * (q as f32 - z), node.scale, node.zero)
                            })
                        })
                        .collect();
                    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                    // Channels are the last axis in NHWC.
                    let axis = Axis(parts[0].ndim() - 1);
                    ndarray::concatenate(axis, &views)
                        .map_err(|e| Error::Unsupported(e.to_string()))?
                }
                QKind::Float(graph) => {
                    let (s, z) = (src(0).scale, src(0).zero);
                    let xf = to_nchw(&dequantize_u8(input(0), s, z))?;
                    let y = graph.forward(&xf)?;
                    to_nhwc(&quantize_u8(y.view(), node.scale, node.zero))?
                }
            }
        };
        if let Some(t) = tap.as_mut() {
            t(
                &node.reports_as,
                &to_nchw(&dequantize_u8(&v, node.scale, node.zero))?,
            );
        }
        values.push(v);
    }
    let out = &nodes[output];
    to_nchw(&dequantize_u8(&values[output], out.scale, out.zero))
}

fn run_dynamic(
    graph: &Graph,
    layers: &[Option<DynLayer>],
    x: &Tensor,
    mut tap: Tap<'_>,
) -> Result<Tensor> {
    // A fused ReLU's layer hands its (already clamped) output on: the tap would see it
    // under the layer's name, so fusion is off while one watches.
    let fuse = tap.is_none();
    // Each value is dropped after its last consumer: holding every value to the end grew
    // the heap by the whole pass each call, which glibc then trimmed (a TLB shootdown
    // across threads, and page faults on the next call's fresh pages).
    let n = graph.nodes().len();
    let last_use = graph.last_uses();
    // The input is read in place, and a Flatten reshapes without a copy where it can.
    let mut values: Vec<Slot<'_>> = (0..n).map(|_| Slot::Dropped).collect();
    let missing = || Error::Unsupported("a dynamic model's value was not computed".into());
    for (i, node) in graph.nodes().iter().enumerate() {
        let fused_input = |j: NodeId| {
            fuse && matches!(node.op, Op::ReLU)
                && layers[j.index()].as_ref().is_some_and(|l| l.relu_follows)
        };
        let v = match (&node.op, &layers[i]) {
            (Op::Input { .. }, _) => Slot::Fed(x),
            (_, _) if node.inputs.len() == 1 && fused_input(node.inputs[0]) => {
                match std::mem::replace(&mut values[node.inputs[0].index()], Slot::Dropped) {
                    Slot::Dropped => return Err(missing()),
                    fused => fused,
                }
            }
            (Op::Flatten, None) => match flatten_in_place(&mut values, node, i, &last_use)? {
                Some(slot) => slot,
                None => {
                    let ins = gather_slots(&mut values, node)?;
                    Slot::Owned(graph.eval_node(NodeId::from_index(i), &ins)?)
                }
            },
            (_, Some(layer)) => {
                let xin = input_view(&values, node)?;
                let standard = xin.as_standard_layout();
                let data = standard
                    .as_slice()
                    .ok_or_else(|| Error::Unsupported("non-contiguous tensor".into()))?;
                let (lo, hi, finite) = crate::kernels::min_max(data);
                if !finite {
                    return Err(Error::NonFinite(format!(
                        "input of dynamic layer {}",
                        node.name
                    )));
                }
                // The range always holds zero, so that zero (padding, ReLU's floor) is exact.
                let (lo, hi) = (lo.min(0.0), hi.max(0.0));
                let p = QuantParams::from_range(QuantScheme::uint8_activations(), &[lo], &[hi])?;
                let (s, z) = (p.scale[0], p.zero_point[0].clamp(0, 255) as u8);
                let dq = Dequantize::new(s, &layer.weight_scales, layer.bias.clone())?;
                let dq = if fuse && layer.relu_follows {
                    dq.with_relu()
                } else {
                    dq
                };
                match &layer.kernel {
                    DynKernel::Linear(w) => {
                        let q = quantize_u8(xin.view(), s, z)
                            .into_dimensionality::<Ix2>()
                            .map_err(|e| Error::Unsupported(e.to_string()))?;
                        let mut out = Array2::<f32>::zeros((q.nrows(), w.out_channels()));
                        gemm_u8i8_f32(q.view(), z, w, &dq, out.view_mut())?;
                        Slot::Owned(out.into_dyn())
                    }
                    DynKernel::Conv(conv) => {
                        let q = to_nhwc(&quantize_u8(xin.view(), s, z))?;
                        let y = conv2d_nhwc_u8i8_f32(view4(&q)?, z, conv, &dq)?;
                        Slot::Owned(to_nchw(&y.into_dyn())?)
                    }
                }
            }
            (_, None) => {
                let ins = gather_slots(&mut values, node)?;
                Slot::Owned(graph.eval_node(NodeId::from_index(i), &ins)?)
            }
        };
        if let Some(t) = tap.as_mut() {
            if let Some(value) = v.tensor() {
                t(&node.name, &value);
            }
        }
        values[i] = v;
        for j in &node.inputs {
            if last_use[j.index()] == i {
                values[j.index()] = Slot::Dropped;
            }
        }
    }
    std::mem::replace(&mut values[graph.output_id().index()], Slot::Dropped)
        .into_tensor()
        .ok_or_else(missing)
}

fn view4(v: &ArrayD<u8>) -> Result<ArrayView4<'_, u8>> {
    v.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| Error::shape("quantized op", None, "a 4-D NHWC value", v.shape()))
}

/// Quantizes one f32 to u8 with the quantizer's own rounding (ONNX's: f32 division, ties to
/// even), so that the integer model and a fake-quantized graph agree on every value.
const U8: QuantGrid = QuantGrid {
    qmin: 0,
    qmax: 255,
    symmetric: false,
};

#[inline]
fn requantize_value(v: f32, scale: f32, zero: u8) -> u8 {
    U8.quantize(v, scale, zero as i32) as u8
}

fn quantize_u8(x: ArrayViewD<'_, f32>, scale: f32, zero: u8) -> ArrayD<u8> {
    quantize_u8_checked(x, scale, zero).0
}

/// [`quantize_u8`] and whether every value was finite, in one pass.
fn quantize_u8_checked(x: ArrayViewD<'_, f32>, scale: f32, zero: u8) -> (ArrayD<u8>, bool) {
    let x = x.as_standard_layout();
    let mut out = ArrayD::<u8>::zeros(x.raw_dim());
    let finite = match (x.as_slice(), out.as_slice_mut()) {
        (Some(src), Some(dst)) => crate::kernels::quantize_u8(&U8, src, scale, zero as i32, dst),
        _ => {
            out.zip_mut_with(&x, |o, &v| *o = requantize_value(v, scale, zero));
            x.iter().all(|v| v.is_finite())
        }
    };
    (out, finite)
}

fn dequantize_u8(q: &ArrayD<u8>, scale: f32, zero: u8) -> Tensor {
    q.mapv(|v| scale * (v as f32 - zero as f32))
}

/// Per image, moves axis 1 of a 4-D tensor to the end (`to_channels_last`) or the last axis
/// to position 1: a per-image matrix transpose in 16 × 16 tiles over contiguous slices
/// (ndarray's generic permuted copy cost ~8 ns per element here, 0.4 ms per LeNet-5 batch;
/// a row-by-row transpose was 9 % of dynamic LeNet-5 at batch 64).
fn permute_4d<T: Copy + Default>(x: &ArrayD<T>, to_channels_last: bool) -> Result<ArrayD<T>> {
    if x.ndim() != 4 {
        return Ok(x.clone());
    }
    let s = x.shape();
    let (n, a, b, c) = (s[0], s[1], s[2], s[3]);
    // Rows × cols of each image's matrix, and the output shape.
    let (rows, cols, shape) = if to_channels_last {
        (a, b * c, [n, b, c, a])
    } else {
        (a * b, c, [n, c, a, b])
    };
    let xs = x.as_standard_layout();
    let src = xs
        .as_slice()
        .ok_or_else(|| Error::Unsupported("non-contiguous tensor".into()))?;
    if rows == 1 || cols == 1 {
        // One channel (or one pixel): both layouts are the same bytes.
        return ArrayD::from_shape_vec(IxDyn(&shape), src.to_vec())
            .map_err(|e| Error::Unsupported(e.to_string()));
    }
    let mut out = vec![T::default(); src.len()];
    for (img, dst) in src.chunks(rows * cols).zip(out.chunks_mut(rows * cols)) {
        crate::kernels::transpose_block(img, dst, rows, cols);
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| Error::Unsupported(e.to_string()))
}

fn to_nhwc<T: Copy + Default>(x: &ArrayD<T>) -> Result<ArrayD<T>> {
    permute_4d(x, true)
}

fn to_nchw<T: Copy + Default>(x: &ArrayD<T>) -> Result<ArrayD<T>> {
    permute_4d(x, false)
}

/// (input, output) scale and zero point of an average pool, which requantizes its mean.
type AvgRequant = ((f32, u8), (f32, u8));

fn requant_pair(input: &QNode, output: &QNode) -> AvgRequant {
    ((input.scale, input.zero), (output.scale, output.zero))
}

/// Max pooling (`avg: None`) on u8 values, or average pooling whose mean (padding counted as
/// real zeros) is requantized from the input's to the output's parameters: its range is
/// narrower than its input's, and the fake-quantized graph of QAT can simulate it exactly.
/// NHWC u8 max pooling: each output pixel's channels start as the window's first valid
/// pixel and take the others' maxima in place (a run of `c` bytes per step, which
/// vectorises; the general loop below kept two scratch rows and cost 11 % of int8 LeNet-5).
/// A window entirely in the padding gives 0, as the general loop did.
fn max_pool_nhwc_u8(
    xs: &[u8],
    [n, h, w, c]: [usize; 4],
    p: &Pool2d,
    [oh, ow]: [usize; 2],
    os: &mut [u8],
) {
    let window = |o: usize, axis: usize, size: usize| {
        let start = (o * p.stride[axis]) as isize - p.padding[axis] as isize;
        let end = (start + p.kernel[axis] as isize).min(size as isize);
        (start.max(0) as usize, end.max(0) as usize)
    };
    for b in 0..n {
        for oy in 0..oh {
            let (y0, y1) = window(oy, 0, h);
            for ox in 0..ow {
                let (x0, x1) = window(ox, 1, w);
                let at = ((b * oh + oy) * ow + ox) * c;
                let dst = &mut os[at..at + c];
                let mut first = true;
                for sy in y0..y1 {
                    for sx in x0..x1 {
                        let from = ((b * h + sy) * w + sx) * c;
                        let px = &xs[from..from + c];
                        if first {
                            dst.copy_from_slice(px);
                            first = false;
                        } else {
                            dst.iter_mut().zip(px).for_each(|(m, &v)| *m = (*m).max(v));
                        }
                    }
                }
            }
        }
    }
}

fn pool_u8(x: ArrayView4<u8>, p: &Pool2d, avg: Option<AvgRequant>) -> Result<Array4<u8>> {
    let (n, h, w, c) = x.dim();
    let geo = ConvGeometry {
        in_channels: c,
        in_h: h,
        in_w: w,
        kernel: p.kernel,
        stride: p.stride,
        padding: p.padding,
        dilation: [1, 1],
        groups: 1,
    };
    let [oh, ow] = geo.output_hw()?;
    let x = x.as_standard_layout();
    let xs = x
        .as_slice()
        .ok_or_else(|| Error::Unsupported("non-contiguous input".into()))?;
    let mut out = Array4::<u8>::zeros((n, oh, ow, c));
    if avg.is_none() {
        let os = out
            .as_slice_mut()
            .ok_or_else(|| Error::Unsupported("non-contiguous output".into()))?;
        max_pool_nhwc_u8(xs, [n, h, w, c], p, [oh, ow], os);
        return Ok(out);
    }
    let area = (p.kernel[0] * p.kernel[1]) as u32;
    let mut acc = vec![0u32; c];
    let mut best = vec![0u8; c];
    let os = out
        .as_slice_mut()
        .ok_or_else(|| Error::Unsupported("non-contiguous output".into()))?;
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                acc.fill(0);
                best.fill(0);
                let mut padded = 0u32;
                for i in 0..p.kernel[0] {
                    let sy = (oy * p.stride[0] + i) as isize - p.padding[0] as isize;
                    for j in 0..p.kernel[1] {
                        let sx = (ox * p.stride[1] + j) as isize - p.padding[1] as isize;
                        if sy < 0 || sx < 0 || sy as usize >= h || sx as usize >= w {
                            padded += 1;
                            continue;
                        }
                        let at = ((b * h + sy as usize) * w + sx as usize) * c;
                        let px = &xs[at..at + c];
                        match avg {
                            None => best.iter_mut().zip(px).for_each(|(m, &v)| *m = (*m).max(v)),
                            Some(_) => acc.iter_mut().zip(px).for_each(|(a, &v)| *a += v as u32),
                        }
                    }
                }
                let at = ((b * oh + oy) * ow + ox) * c;
                let dst = &mut os[at..at + c];
                match avg {
                    None => dst.copy_from_slice(&best),
                    Some(((s_in, z_in), (s_out, z_out))) => {
                        for (d, &a) in dst.iter_mut().zip(&acc) {
                            let sum = a + padded * z_in as u32;
                            let mean = s_in * (sum as f32 / area as f32 - z_in as f32);
                            *d = requantize_value(mean, s_out, z_out);
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::zoo;
    use crate::quantizer::{QuantConfig, Quantizer};

    /// The fused ReLU (no tap) and the separate one (a tap watching) give the same model
    /// output, bit for bit, on a dense and a convolutional network.
    #[test]
    fn dynamic_fused_relu_equals_the_separate_op() {
        for (net, side, relus) in [
            (zoo::lenet_300_100(3).unwrap(), 28, 2),
            (zoo::digits_cnn(4).unwrap(), 8, 2),
        ] {
            let x = Tensor::from_shape_fn(IxDyn(&[5, 1, side, side]), |d| {
                ((d[0] * 131 + d[2] * 29 + d[3] * 7) % 53) as f32 / 26.0 - 0.8
            });
            let q = Quantizer::new(QuantConfig::dynamic_int8())
                .calibrate(&net, std::slice::from_ref(&x))
                .unwrap();
            let Body::Dynamic { layers, .. } = &q.body else {
                panic!("not a dynamic model")
            };
            let fused = layers.iter().flatten().filter(|l| l.relu_follows).count();
            assert_eq!(fused, relus);
            let mut seen = 0;
            let watched = q
                .run(&x, Some(&mut |_: &str, _: &Tensor| seen += 1))
                .unwrap();
            assert_eq!(seen, net.nodes().len());
            assert_eq!(q.forward(&x).unwrap(), watched);
        }
    }
}
