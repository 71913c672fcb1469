//! The integer model: u8 NHWC activations between quantize at the input and dequantize at
//! the output, Conv2d and Linear on the int8 kernels.

use super::params::QuantParams;
use super::ptq::QuantConfig;
use super::scheme::QuantScheme;
use crate::error::{Error, Result};
use crate::kernels::{
    conv2d_nhwc_u8i8_u8, gemm_u8i8_u8, ConvSpec, FusedActivation, PackedConv, PackedWeights,
    Requantize,
};
use crate::model::{Graph, GraphBuilder, NodeId, Op, Pool2d};
use crate::tensor::{ConvGeometry, Tensor};
use ndarray::{Array2, Array4, ArrayD, ArrayView4, Axis, Ix2, Ix4, IxDyn};

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
    },
    Linear {
        w: PackedWeights,
        rq: Requantize,
    },
    MaxPool(Pool2d),
    AvgPool(Pool2d),
    GlobalAvgPool,
    /// Flatten of an NHWC value; a following Linear has its columns permuted to match.
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
/// follows a convolution or linear layer is fused into its requantization clamp. Max and
/// average pooling run on u8 directly; Add and Concat requantize their inputs in f32
/// arithmetic; any other op (or a node kept in float) runs in f32 between dequantize and
/// quantize.
#[derive(Debug)]
pub struct QuantizedModel {
    nodes: Vec<QNode>,
    input_shape: Vec<usize>,
    output: usize,
}

fn act_params(cfg: &QuantConfig, range: (f32, f32)) -> Result<(f32, u8)> {
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

/// i8 per-channel weights of `w` (`[out, ...]`), their scales.
fn quantize_weights(w: ArrayD<f32>) -> Result<(ArrayD<i8>, Vec<f32>)> {
    let p = QuantParams::from_tensor(QuantScheme::int8_weights(), w.view())?;
    let q = super::params::quantize(w.view(), &p)?;
    let values: Vec<i8> = q
        .int_values()
        .unwrap_or_default()
        .into_iter()
        .map(|v| v as i8)
        .collect();
    let arr = ArrayD::from_shape_vec(IxDyn(w.shape()), values)
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    Ok((arr, p.scale))
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
        .map(|(c, &s)| {
            let b = bias.map_or(0.0, |b| b[c] as f64);
            (b / s)
                .round_ties_even()
                .clamp(i32::MIN as f64, i32::MAX as f64) as i32
        })
        .collect();
    let mult: Vec<f64> = acc_scale.iter().map(|&s| s / s_out as f64).collect();
    Requantize::from_real(bias_q, &mult, z_out)?.with_activation(act, s_out)
}

impl QuantizedModel {
    /// Builds the integer model from a BatchNorm-folded graph and each node's output range.
    pub(crate) fn build(g: &Graph, ranges: &[(f32, f32)], cfg: &QuantConfig) -> Result<Self> {
        let n = g.nodes().len();
        let mut map = vec![usize::MAX; n];
        let mut nodes: Vec<QNode> = Vec::new();
        let keep = |name: &str| cfg.keep_float.iter().any(|k| k == name);
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
            let own = act_params(cfg, ranges[i])?;
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
                Some((c, a)) => (act_params(cfg, ranges[c.index()])?, a),
                None => (own, FusedActivation::None),
            };
            let same = in0.map(|(s, z, _)| (s, z)).unwrap_or(own);
            let (kind, (scale, zero)) = match (&node.op, in0) {
                (Op::Input { .. }, _) => (QKind::Input, own),
                (Op::Conv2d(c), Some((s_in, _, _))) if !keep(&node.name) => {
                    let (wq, s_w) = quantize_weights(c.weight.clone().into_dyn())?;
                    let wq = wq
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let spec = ConvSpec {
                        stride: c.stride,
                        padding: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                    };
                    let conv = PackedConv::new(wq.view(), spec)?;
                    let rq = requant(c.bias.as_ref(), s_in, &s_w, out_params, act)?;
                    (QKind::Conv { conv, rq }, out_params)
                }
                (Op::Linear(l), Some((s_in, _, lay))) if !keep(&node.name) => {
                    let mut w = l.weight.clone();
                    // After an NHWC flatten, features come in (h, w, c) order.
                    if let (Some(&k), Layout::Flat { .. }) = (ins.first(), lay) {
                        if let (QKind::Flatten, Some(&src)) =
                            (&nodes[k].kind, nodes[k].inputs.first())
                        {
                            if let Layout::Nhwc { c, h, w: wd } = nodes[src].layout {
                                let orig = l.weight.clone();
                                for y in 0..h {
                                    for x in 0..wd {
                                        for ch in 0..c {
                                            w.column_mut((y * wd + x) * c + ch)
                                                .assign(&orig.column((ch * h + y) * wd + x));
                                        }
                                    }
                                }
                            }
                        }
                    }
                    let (wq, s_w) = quantize_weights(w.into_dyn())?;
                    let wq = wq
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let packed = PackedWeights::new(wq.view())?;
                    let rq = requant(l.bias.as_ref(), s_in, &s_w, out_params, act)?;
                    (QKind::Linear { w: packed, rq }, out_params)
                }
                (Op::ReLU, Some((s, z, _))) if !keep(&node.name) => {
                    let _ = s;
                    (QKind::Clamp { lo: z, hi: 255 }, same)
                }
                (Op::ReLU6, Some((s, z, _))) if !keep(&node.name) => {
                    let six = (z as f32 + (6.0 / s).round_ties_even()).min(255.0) as u8;
                    (QKind::Clamp { lo: z, hi: six }, same)
                }
                (Op::MaxPool2d(p), Some(_)) if !keep(&node.name) => (QKind::MaxPool(*p), same),
                (Op::AvgPool2d(p), Some(_)) if !keep(&node.name) => (QKind::AvgPool(*p), same),
                (Op::GlobalAvgPool, Some(_)) if !keep(&node.name) => (QKind::GlobalAvgPool, same),
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
            nodes.push(QNode {
                name: node.name.clone(),
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
            nodes,
            input_shape: g.input_shape().to_vec(),
            output: map[g.output_id().index()],
        })
    }

    /// Runs the model on an f32 batch `[N, ...input_shape]` (NCHW), returning f32 outputs.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `x` does not fit the input, [`Error::NonFinite`] for NaN
    /// or infinite inputs, [`Error::Empty`] for a batch of zero samples.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.ndim() != self.input_shape.len() + 1 || x.shape()[1..] != self.input_shape[..] {
            return Err(Error::shape(
                "quantized forward",
                None,
                format!("[N, {:?}]", self.input_shape),
                x.shape(),
            ));
        }
        let batch = x.shape()[0];
        if batch == 0 {
            return Err(Error::Empty("quantized forward batch".into()));
        }
        crate::tensor::check_finite(x, "quantized model input")?;
        let mut values: Vec<ArrayD<u8>> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let v = {
                let input = |k: usize| &values[node.inputs[k]];
                let src = |k: usize| &self.nodes[node.inputs[k]];
                match &node.kind {
                    QKind::Input => to_nhwc(&quantize_u8(x, node.scale, node.zero))?,
                    QKind::Conv { conv, rq } => {
                        conv2d_nhwc_u8i8_u8(view4(input(0))?, src(0).zero, conv, rq)?.into_dyn()
                    }
                    QKind::Linear { w, rq } => {
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
                        pool_u8(view4(input(0))?, p, Some(src(0).zero))?.into_dyn()
                    }
                    QKind::GlobalAvgPool => {
                        let v = view4(input(0))?;
                        let (_, h, w, _) = v.dim();
                        let p = Pool2d {
                            kernel: [h, w],
                            stride: [1, 1],
                            padding: [0, 0],
                        };
                        pool_u8(v, &p, Some(src(0).zero))?.into_dyn()
                    }
                    QKind::Flatten => {
                        let v = input(0);
                        let f = v.len() / batch;
                        v.to_shape(IxDyn(&[batch, f]))
                            .map_err(|e| Error::Unsupported(e.to_string()))?
                            .into_owned()
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
                        to_nhwc(&quantize_u8(&y, node.scale, node.zero))?
                    }
                }
            };
            values.push(v);
        }
        let out = &self.nodes[self.output];
        to_nchw(&dequantize_u8(&values[self.output], out.scale, out.zero))
    }

    /// The node names and what each runs as, in order (a first view of the report).
    pub fn summary(&self) -> Vec<(String, &'static str)> {
        self.nodes
            .iter()
            .map(|n| {
                let what = match &n.kind {
                    QKind::Input => "quantize",
                    QKind::Conv { .. } => "int8 conv",
                    QKind::Linear { .. } => "int8 linear",
                    QKind::MaxPool(_) | QKind::AvgPool(_) | QKind::GlobalAvgPool => "u8 pooling",
                    QKind::Flatten | QKind::Identity => "u8 reshape",
                    QKind::Clamp { .. } => "u8 clamp",
                    QKind::Add | QKind::Concat => "requantize (f32 arithmetic)",
                    QKind::Float(_) => "float fallback",
                };
                (n.name.clone(), what)
            })
            .collect()
    }

    /// Bytes of packed weights and requantization parameters.
    pub fn weight_bytes(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| match &n.kind {
                QKind::Linear { w, rq } => w.packed_bytes() + 12 * rq.len(),
                QKind::Conv { rq, .. } => 12 * rq.len(),
                _ => 0,
            })
            .sum()
    }
}

fn view4(v: &ArrayD<u8>) -> Result<ArrayView4<'_, u8>> {
    v.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| Error::shape("quantized op", None, "a 4-D NHWC value", v.shape()))
}

#[inline]
fn requantize_value(v: f32, scale: f32, zero: u8) -> u8 {
    ((v / scale).round_ties_even() + zero as f32).clamp(0.0, 255.0) as u8
}

fn quantize_u8(x: &Tensor, scale: f32, zero: u8) -> ArrayD<u8> {
    x.mapv(|v| requantize_value(v, scale, zero))
}

fn dequantize_u8(q: &ArrayD<u8>, scale: f32, zero: u8) -> Tensor {
    q.mapv(|v| scale * (v as f32 - zero as f32))
}

fn to_nhwc<T: Clone>(x: &ArrayD<T>) -> Result<ArrayD<T>> {
    Ok(if x.ndim() == 4 {
        x.view()
            .permuted_axes(IxDyn(&[0, 2, 3, 1]))
            .as_standard_layout()
            .into_owned()
    } else {
        x.clone()
    })
}

fn to_nchw<T: Clone>(x: &ArrayD<T>) -> Result<ArrayD<T>> {
    Ok(if x.ndim() == 4 {
        x.view()
            .permuted_axes(IxDyn(&[0, 3, 1, 2]))
            .as_standard_layout()
            .into_owned()
    } else {
        x.clone()
    })
}

/// Max pooling (`zero = None`) or average pooling counting padding as the zero point (real 0,
/// PyTorch's `count_include_pad`) on u8 NHWC values with unchanged parameters.
fn pool_u8(x: ArrayView4<u8>, p: &Pool2d, zero: Option<u8>) -> Result<Array4<u8>> {
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
                        match zero {
                            None => best.iter_mut().zip(px).for_each(|(m, &v)| *m = (*m).max(v)),
                            Some(_) => acc.iter_mut().zip(px).for_each(|(a, &v)| *a += v as u32),
                        }
                    }
                }
                let at = ((b * oh + oy) * ow + ox) * c;
                let dst = &mut os[at..at + c];
                match zero {
                    None => dst.copy_from_slice(&best),
                    Some(z) => {
                        for (d, &a) in dst.iter_mut().zip(&acc) {
                            let sum = a + padded * z as u32;
                            *d = ((sum + area / 2) / area).min(255) as u8;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
