//! Quantization-aware training: put fake quantization where the integer model quantizes,
//! train, and convert to the same [`QuantizedModel`] post-training quantization builds.

use super::ptq::{PtqMode, QuantConfig};
use super::qmodel::{QuantizedModel, StoredWeights};
use super::scheme::{Granularity, QuantDtype, QuantMode, QuantScheme};
use crate::error::{Error, Result};
use crate::model::{
    Conv2d, FakeQuant, Graph, Linear, NodeId, NodeSpec, Op, QatConv2d, QatLinear, WeightFakeQuant,
};
use crate::tensor::QuantGrid;
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;

/// Options of quantization-aware training (part of [`QuantConfig`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QatOptions {
    /// Learn the scales of weights and activations (LSQ, Esser et al. 2020) instead of taking
    /// them from ranges.
    pub learned_scales: bool,
    /// Weight of a new batch in the activation ranges' moving average (PyTorch: 0.01).
    pub averaging_constant: f32,
    /// Stop updating activation ranges after this many training steps.
    pub freeze_observers_after: Option<u64>,
    /// Fold BatchNorm with the running instead of the batch statistics after this many
    /// training steps (Jacob et al. 2018 freeze them late in training).
    pub freeze_bn_after: Option<u64>,
}

impl Default for QatOptions {
    /// Ranges by moving average (0.01), nothing frozen, no learned scales.
    fn default() -> Self {
        QatOptions {
            learned_scales: false,
            averaging_constant: 0.01,
            freeze_observers_after: None,
            freeze_bn_after: None,
        }
    }
}

/// How [`prepare_qat`] treated one node of the float graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QatNodeReport {
    /// Node name in the float graph.
    pub name: String,
    /// Op kind in the float graph.
    pub op: String,
    /// What the prepared graph does with it.
    pub treatment: String,
}

fn grid_of(scheme: QuantScheme, what: &str) -> Result<QuantGrid> {
    let (qmin, qmax) = scheme.qrange().ok_or_else(|| {
        Error::config(
            what.to_string(),
            "quantization-aware training needs an integer scheme (not float16 / bfloat16)",
        )
    })?;
    Ok(QuantGrid {
        qmin,
        qmax,
        symmetric: scheme.mode == QuantMode::Symmetric,
    })
}

fn weight_quant(scheme: QuantScheme, name: &str) -> Result<WeightFakeQuant> {
    let what = format!("weights of `{name}`");
    let per_channel = match scheme.granularity {
        Granularity::PerTensor => false,
        Granularity::PerChannel { axis: 0 } => true,
        Granularity::PerChannel { axis } => {
            return Err(Error::config(
                what,
                format!(
                "per-channel weights are quantized per output channel (axis 0), not axis {axis}"
            ),
            ))
        }
    };
    Ok(WeightFakeQuant::new(grid_of(scheme, &what)?, per_channel))
}

/// Whether the integer model runs `op` on u8 values with its input's scale (no
/// requantization of its own).
fn keeps_input_scale(op: &Op) -> bool {
    matches!(
        op,
        Op::ReLU | Op::ReLU6 | Op::MaxPool2d(_) | Op::Flatten | Op::Dropout { .. }
    )
}

/// Builds the trainable QAT graph: every Conv2d and Linear becomes a [`QatConv2d`] /
/// [`QatLinear`] with fake-quantized weights (a BatchNorm that is a convolution's only consumer
/// is folded into it), and a [`FakeQuant`] goes wherever the integer model quantizes: after
/// the input, after each layer (after its ReLU / ReLU6 when that is fused), after Add, Concat
/// and every op that runs in float. Ops the integer model runs on u8 with their input's scale
/// (pooling, Flatten, Dropout, ReLU) get none. Fake quantizers are named `{node}.fake_quant`.
///
/// Ops that cannot be fake-quantized (custom ops, Softmax, a BatchNorm with no convolution
/// before it, nodes listed in `keep_float`) stay in float; [`qat_report`] says which.
///
/// # Errors
/// [`Error::InvalidConfig`] for a mode other than full integer, float or per-channel (other
/// than axis 0) schemes, activations that are not per tensor, learned scales with affine
/// weights; [`Error::UnknownNode`] for names in `keep_float` or `layer_weights` that are not
/// in the graph; [`Error::DuplicateNode`] if a `{node}.fake_quant` name is taken.
///
/// # Examples
/// ```
/// use nncompress::model::zoo;
/// use nncompress::quantizer::{convert, prepare_qat, QuantConfig};
/// use nncompress::model::Mode;
/// use rand::SeedableRng;
/// let net = zoo::lenet5(1)?;
/// let mut qat = prepare_qat(&net, &QuantConfig::int8())?;
/// let x = ndarray::ArrayD::from_shape_fn(vec![2, 1, 28, 28], |d| (d[2] * d[3] % 7) as f32 / 7.0);
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// qat.trace(&x, Mode::Training, &mut rng)?; // one step: the ranges see data
/// let int8 = convert(&qat)?;
/// assert_eq!(int8.forward(&x)?.shape(), &[2, 10]);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn prepare_qat(graph: &Graph, config: &QuantConfig) -> Result<Graph> {
    if config.mode != PtqMode::FullInteger {
        return Err(Error::config(
            "quantization-aware training",
            "converts to the full-integer model; use a full-integer config (QuantConfig::int8())",
        ));
    }
    if config.activations.granularity != Granularity::PerTensor {
        return Err(Error::config(
            "activations",
            "activation fake quantization is per tensor",
        ));
    }
    let act_grid = grid_of(config.activations, "activations")?;
    for name in config
        .keep_float
        .iter()
        .chain(config.layer_weights.iter().map(|(n, _)| n))
    {
        graph.id(name)?;
    }
    let opts = config.qat;
    let keep =
        |name: &str| config.keep_float.iter().any(|k| k == name) || super::float_only(graph, name);
    let new_fq = || {
        let mut fq = FakeQuant::new(act_grid, opts.averaging_constant);
        fq.freeze_after = opts.freeze_observers_after;
        if opts.learned_scales {
            fq = fq.with_learned_scale();
        }
        fq
    };
    let n = graph.nodes().len();
    // Where each float node's output lives in the new graph.
    let mut carried: Vec<String> = vec![String::new(); n];
    let mut absorbed = vec![false; n];
    let mut fq_after = vec![false; n];
    let mut specs: Vec<NodeSpec> = Vec::new();
    let single_consumer = |id: NodeId| -> Option<NodeId> {
        match graph.consumers(id).as_slice() {
            [c] if graph.output_id() != id => Some(*c),
            _ => None,
        }
    };
    for i in 0..n {
        let id = NodeId::from_index(i);
        let node = graph.node(id);
        if absorbed[i] {
            continue;
        }
        let inputs: Vec<&str> = node
            .inputs
            .iter()
            .map(|j| carried[j.index()].as_str())
            .collect();
        let layer_out = |id: NodeId| -> NodeId {
            // The node whose output the layer's requantization produces: a fused ReLU's.
            match single_consumer(id) {
                Some(c)
                    if matches!(graph.node(c).op, Op::ReLU | Op::ReLU6)
                        && !keep(&graph.node(c).name) =>
                {
                    c
                }
                _ => id,
            }
        };
        // A BatchNorm folded into this node hands its consumers to it.
        let mut folded_bn = None;
        let op = match &node.op {
            Op::Conv2d(c) if !keep(&node.name) => {
                let bn = match single_consumer(id) {
                    Some(b) if !keep(&graph.node(b).name) => match &graph.node(b).op {
                        Op::BatchNorm2d(bn) => Some((b, bn.clone())),
                        _ => None,
                    },
                    _ => None,
                };
                let post = bn.as_ref().map_or(id, |(b, _)| *b);
                fq_after[layer_out(post).index()] = true;
                if let Some((b, _)) = &bn {
                    absorbed[b.index()] = true;
                    folded_bn = Some(*b);
                }
                let mut q = QatConv2d {
                    conv: c.clone(),
                    bn: bn.map(|(_, bn)| bn),
                    weight_quant: weight_quant(config.weights_for(&node.name), &node.name)?,
                    steps: 0,
                    freeze_bn_after: opts.freeze_bn_after,
                };
                if opts.learned_scales {
                    let folded = q.folded().0.into_dyn();
                    q.weight_quant = q.weight_quant.with_learned_scale(folded.view())?;
                }
                Op::QatConv2d(Box::new(q))
            }
            Op::Linear(l) if !keep(&node.name) => {
                fq_after[layer_out(id).index()] = true;
                let mut wq = weight_quant(config.weights_for(&node.name), &node.name)?;
                if opts.learned_scales {
                    wq = wq.with_learned_scale(l.weight.view().into_dyn())?;
                }
                Op::QatLinear(QatLinear {
                    linear: l.clone(),
                    weight_quant: wq,
                })
            }
            op => {
                if !keeps_input_scale(op) || keep(&node.name) {
                    fq_after[i] = true;
                }
                op.clone()
            }
        };
        specs.push(NodeSpec::new(node.name.clone(), op, &inputs));
        let mut out_name = node.name.clone();
        if fq_after[i] || folded_bn.is_some_and(|b| fq_after[b.index()]) {
            out_name = format!("{}.fake_quant", node.name);
            specs.push(NodeSpec::new(
                out_name.clone(),
                Op::FakeQuant(new_fq()),
                &[node.name.as_str()],
            ));
        }
        carried[i] = out_name.clone();
        if let Some(b) = folded_bn {
            carried[b.index()] = out_name;
        }
    }
    let outs: Vec<&str> = graph
        .output_ids()
        .iter()
        .map(|o| carried[o.index()].as_str())
        .collect();
    Graph::from_specs_with_outputs(specs, &outs)
}

/// How each node of a prepared graph is trained and converted: fake-quantized weights and
/// scheme, a fake quantizer on the output, or kept in float (and why).
pub fn qat_report(qat: &Graph) -> Vec<QatNodeReport> {
    let mut rows = Vec::new();
    for (i, node) in qat.nodes().iter().enumerate() {
        let id = NodeId::from_index(i);
        let output_fq = qat
            .consumers(id)
            .iter()
            .any(|c| matches!(qat.node(*c).op, Op::FakeQuant(_)));
        let out = if output_fq {
            "; output fake-quantized"
        } else {
            ""
        };
        let weights = |wq: &WeightFakeQuant| {
            format!(
                "weights fake-quantized to [{}, {}] {}{}",
                wq.grid.qmin,
                wq.grid.qmax,
                if wq.per_channel {
                    "per channel"
                } else {
                    "per tensor"
                },
                if wq.learned_scale.is_some() {
                    ", learned scales"
                } else {
                    ""
                }
            )
        };
        let treatment = match &node.op {
            Op::FakeQuant(_) => continue,
            Op::QatConv2d(q) => format!(
                "{}{}{out}",
                weights(&q.weight_quant),
                if q.bn.is_some() {
                    ", BatchNorm folded"
                } else {
                    ""
                }
            ),
            Op::QatLinear(q) => format!("{}{out}", weights(&q.weight_quant)),
            Op::Input { .. } => format!("input{out}"),
            Op::ReLU | Op::ReLU6 if fused_into_layer(qat, id) => format!(
                "fused into `{}`'s requantization{out}",
                qat.node(node.inputs[0]).name
            ),
            Op::Custom(c) => format!(
                "kept in float: custom op `{}` cannot be fake-quantized{out}",
                c.kind()
            ),
            op if keeps_input_scale(op) && !output_fq => {
                "runs on u8 with its input's scale".to_string()
            }
            Op::Add | Op::Concat => format!("requantized{out}"),
            _ => format!("kept in float{out}"),
        };
        rows.push(QatNodeReport {
            name: node.name.clone(),
            op: node.op.kind().to_string(),
            treatment,
        });
    }
    rows
}

/// Whether node `id` is a ReLU / ReLU6 that the integer model fuses into the QAT layer before
/// it (that layer's only consumer).
fn fused_into_layer(qat: &Graph, id: NodeId) -> bool {
    let node = qat.node(id);
    matches!(node.op, Op::ReLU | Op::ReLU6)
        && node.inputs.len() == 1
        && matches!(
            qat.node(node.inputs[0]).op,
            Op::QatConv2d(_) | Op::QatLinear(_)
        )
        && qat.consumers(node.inputs[0]).len() == 1
        && qat.output_id() != node.inputs[0]
}

/// Stops every activation range of a prepared graph from moving (from the next step on).
pub fn freeze_observers(qat: &mut Graph) {
    for node in qat.nodes_mut() {
        if let Op::FakeQuant(fq) = &mut node.op {
            fq.freeze_after = Some(fq.steps);
        }
    }
}

/// Switches every folded BatchNorm of a prepared graph to its running statistics (from the
/// next step on).
pub fn freeze_batch_norms(qat: &mut Graph) {
    for node in qat.nodes_mut() {
        if let Op::QatConv2d(q) = &mut node.op {
            q.freeze_bn_after = Some(q.steps);
        }
    }
}

/// Turns a graph from [`prepare_qat`] (after training) into the integer model: BatchNorms
/// folded with their running statistics, weights quantized with exactly the scales their
/// fake quantizers use, each activation's scale and zero point taken from its fake quantizer.
/// The result runs on the same kernels and saves to the same `.nnq` format as post-training
/// quantization (load it with the float architecture).
///
/// # Errors
/// [`Error::InvalidConfig`] for a graph that was never prepared (no fake-quant op), a fake
/// quantizer that has seen no data, activation grids that are not 8-bit, or weight grids the
/// int8 kernels cannot run (affine, or wider than i8); [`Error::Unsupported`] for a node
/// whose output the integer model would requantize but has no fake quantizer.
pub fn convert(qat: &Graph) -> Result<QuantizedModel> {
    let prepared = qat
        .nodes()
        .iter()
        .any(|n| matches!(n.op, Op::FakeQuant(_) | Op::QatConv2d(_) | Op::QatLinear(_)));
    if !prepared {
        return Err(Error::config(
            "convert",
            "the graph has no fake-quant ops: prepare it with prepare_qat (and train it) first",
        ));
    }
    let n = qat.nodes().len();
    // Each node's output (scale, u8 zero point) from the fake quantizer that reads it.
    let mut act: Vec<Option<(f32, u8)>> = vec![None; n];
    let mut specs: Vec<NodeSpec> = Vec::new();
    let mut rename: HashMap<String, String> = HashMap::new();
    let mut stored = StoredWeights::new();
    let mut config = QuantConfig::int8();
    for (i, node) in qat.nodes().iter().enumerate() {
        let inputs: Vec<String> = node
            .inputs
            .iter()
            .map(|j| {
                let name = &qat.node(*j).name;
                rename.get(name).unwrap_or(name).clone()
            })
            .collect();
        let op = match &node.op {
            Op::FakeQuant(fq) => {
                let producer = node.inputs[0].index();
                act[producer] = Some(u8_params(fq, &node.name)?);
                rename.insert(node.name.clone(), inputs[0].clone());
                continue;
            }
            Op::QatConv2d(q) => {
                let (weight, bias) = q.folded();
                let wq = quantized_weights(&q.weight_quant, weight.view().into_dyn(), &node.name)?;
                note_scheme(&mut config, &q.weight_quant, &node.name);
                stored.insert(node.name.clone(), wq);
                Op::Conv2d(Conv2d {
                    weight,
                    bias,
                    ..q.conv.clone()
                })
            }
            Op::QatLinear(q) => {
                let weight = q.linear.weight.clone();
                let wq = quantized_weights(&q.weight_quant, weight.view().into_dyn(), &node.name)?;
                note_scheme(&mut config, &q.weight_quant, &node.name);
                stored.insert(node.name.clone(), wq);
                Op::Linear(Linear {
                    weight,
                    bias: q.linear.bias.clone(),
                })
            }
            op => {
                let kept_float = match op {
                    Op::Conv2d(_) | Op::Linear(_) => true,
                    op if keeps_input_scale(op) => {
                        // Pooling or a ReLU with its own fake quantizer ran in float (a ReLU
                        // fused into the layer before it has one too, but is not float).
                        !fused_into_layer(qat, NodeId::from_index(i))
                            && qat
                                .consumers(NodeId::from_index(i))
                                .iter()
                                .any(|c| matches!(qat.node(*c).op, Op::FakeQuant(_)))
                    }
                    _ => false,
                };
                if kept_float {
                    config.keep_float.push(node.name.clone());
                }
                op.clone()
            }
        };
        specs.push(NodeSpec {
            name: node.name.clone(),
            op,
            inputs,
        });
    }
    let outs: Vec<&str> = qat
        .output_names()
        .into_iter()
        .map(|o| rename.get(o).map_or(o, String::as_str))
        .collect();
    let folded = Graph::from_specs_with_outputs(specs, &outs)?;
    // Activation parameters per folded node: its fake quantizer's, or its input's for ops
    // that keep their input's scale (and layers whose fused ReLU carries the quantizer).
    let mut acts: Vec<(f32, u8)> = Vec::with_capacity(folded.nodes().len());
    for (k, node) in folded.nodes().iter().enumerate() {
        let src = qat.id(&node.name)?;
        let own = act[src.index()];
        let inherited = node.inputs.first().map(|j| acts[j.index()]);
        let fused_layer = matches!(node.op, Op::Conv2d(_) | Op::Linear(_))
            && !config.keep_float.contains(&node.name)
            && !super::float_only(&folded, &node.name)
            && match folded.consumers(NodeId::from_index(k)).as_slice() {
                [c] => {
                    matches!(folded.node(*c).op, Op::ReLU | Op::ReLU6)
                        && act[qat.id(&folded.node(*c).name)?.index()].is_some()
                }
                _ => false,
            };
        let value = match (own, inherited) {
            (Some(a), _) => a,
            (None, Some(a))
                if fused_layer
                    || (keeps_input_scale(&node.op) && !config.keep_float.contains(&node.name)) =>
            {
                a
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "`{}` ({}) has no fake quantizer on its output, but the integer model requantizes it",
                    node.name,
                    node.op.kind()
                )))
            }
        };
        acts.push(value);
    }
    let mut model = QuantizedModel::build(&folded, &acts, &config, &stored)?;
    model.measure(&folded, &[])?;
    Ok(model)
}

/// The (scale, u8 zero point) of an activation fake quantizer.
fn u8_params(fq: &FakeQuant, name: &str) -> Result<(f32, u8)> {
    if fq.grid.qmax - fq.grid.qmin != 255 {
        return Err(Error::config(
            format!("fake quantizer `{name}`"),
            format!(
                "the integer model takes 8-bit activations; this one has {} levels",
                fq.grid.qmax - fq.grid.qmin + 1
            ),
        ));
    }
    if !fq.observed() {
        return Err(Error::config(
            format!("fake quantizer `{name}`"),
            "has seen no data: train (or run training-mode passes) before converting",
        ));
    }
    let (scale, zero) = fq.qparams();
    Ok((scale, (zero - fq.grid.qmin).clamp(0, 255) as u8))
}

/// i8 weights and per-output-channel scales, quantized exactly as the fake quantizer does.
fn quantized_weights(
    wq: &WeightFakeQuant,
    w: ndarray::ArrayViewD<f32>,
    name: &str,
) -> Result<(ArrayD<i8>, Vec<f32>)> {
    if !wq.grid.symmetric || wq.grid.qmin < -128 || wq.grid.qmax > 127 || wq.grid.qmin >= 0 {
        return Err(Error::config(
            format!("weights of `{name}`"),
            "the int8 kernels take signed symmetric weights of at most 8 bits",
        ));
    }
    let params = wq.qparams(w.view())?;
    let channels = w.shape()[0];
    let inner = w.len() / channels.max(1);
    let ws = w.as_standard_layout();
    let values: Vec<i8> = ws
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (s, z) = params[(i / inner.max(1)).min(params.len() - 1)];
            wq.grid.quantize(v, s, z) as i8
        })
        .collect();
    let scales = (0..channels)
        .map(|c| params[c.min(params.len() - 1)].0)
        .collect();
    let q = ArrayD::from_shape_vec(IxDyn(w.shape()), values)
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    Ok((q, scales))
}

/// Records a non-default weight scheme for the report.
fn note_scheme(config: &mut QuantConfig, wq: &WeightFakeQuant, name: &str) {
    let dtype = if wq.grid.qmin >= -8 && wq.grid.qmax <= 7 {
        QuantDtype::Int4
    } else {
        QuantDtype::Int8
    };
    let scheme = QuantScheme::int8_weights()
        .with_dtype(dtype)
        .with_narrow_range(wq.grid.qmin == -wq.grid.qmax)
        .with_granularity(if wq.per_channel {
            Granularity::PerChannel { axis: 0 }
        } else {
            Granularity::PerTensor
        });
    if scheme != config.weights {
        config.layer_weights.push((name.to_string(), scheme));
    }
}
