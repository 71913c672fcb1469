//! Reverse-mode gradients through a [`Trace`].

use super::forward::{Aux, Mode, Trace};
use super::graph::{Graph, NodeId};
use super::indexing;
use super::layers;
use super::nd;
use super::op::{Op, ParamKind};
use super::qat;
use crate::error::{Error, Result};
use crate::tensor::{as_2d, as_4d, DType, Tensor};
use ndarray::{ArrayD, Axis, Slice, Zip};
use std::collections::BTreeMap;

/// Gradients of a scalar loss with respect to the graph's trainable parameters, keyed by
/// dotted parameter name (`conv1.weight`).
#[derive(Clone, Debug, Default)]
pub struct Gradients {
    params: BTreeMap<String, ArrayD<f32>>,
}

impl Gradients {
    /// The gradient of parameter `name`, if it received one.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.params.get(name)
    }
    /// Mutable access to the gradient of parameter `name` (for extra loss terms).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ArrayD<f32>> {
        self.params.get_mut(name)
    }
    /// All gradients in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<f32>)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// The number of parameters with a gradient.
    pub fn len(&self) -> usize {
        self.params.len()
    }
    /// Whether no parameter received a gradient.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    /// Adds `g` to the gradient of `name` (inserting it when absent).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when a gradient of another shape is already stored.
    pub fn accumulate(&mut self, name: &str, g: ArrayD<f32>) -> Result<()> {
        match self.params.get_mut(name) {
            Some(old) if old.shape() == g.shape() => {
                *old += &g;
                Ok(())
            }
            Some(old) => Err(Error::shape(
                "gradient accumulate",
                Some(name),
                format!("{:?}", old.shape()),
                g.shape(),
            )),
            None => {
                self.params.insert(name.to_string(), g);
                Ok(())
            }
        }
    }
    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f32) {
        for g in self.params.values_mut() {
            *g *= factor;
        }
    }
}

fn add_grad(slot: &mut Option<Tensor>, g: Tensor) {
    match slot {
        Some(s) => *s += &g,
        None => *slot = Some(g),
    }
}

impl Graph {
    /// Back-propagates `grad_output` (the loss gradient at the graph output) through `trace`.
    ///
    /// # Errors
    /// As [`Graph::backward_with`].
    pub fn backward(&self, trace: &Trace, grad_output: &Tensor) -> Result<Gradients> {
        self.backward_with(trace, Some(grad_output), &[])
    }

    /// Back-propagates the output gradient (if any) plus extra gradients injected at any
    /// nodes' outputs (distillation hints), in one pass. Gradients of nodes that do not lead
    /// to the loss are never computed. The graph input gets no gradient.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when a gradient does not have its node's output shape,
    /// [`Error::Unsupported`] for a custom op without a gradient, or a trace from another
    /// graph.
    pub fn backward_with(
        &self,
        trace: &Trace,
        grad_output: Option<&Tensor>,
        extra: &[(NodeId, Tensor)],
    ) -> Result<Gradients> {
        Ok(self.backward_impl(trace, grad_output, extra, false)?.0)
    }

    /// As [`Graph::backward`], and also returns the gradient with respect to the graph input
    /// (saliency maps, adversarial examples, gradient checks).
    ///
    /// # Errors
    /// As [`Graph::backward_with`].
    pub fn backward_to_input(
        &self,
        trace: &Trace,
        grad_output: &Tensor,
    ) -> Result<(Gradients, Tensor)> {
        let (g, dx) = self.backward_impl(trace, Some(grad_output), &[], true)?;
        let dx = dx.unwrap_or_else(|| Tensor::zeros(trace.values[self.input_id().0].raw_dim()));
        Ok((g, dx))
    }

    fn backward_impl(
        &self,
        trace: &Trace,
        grad_output: Option<&Tensor>,
        extra: &[(NodeId, Tensor)],
        want_input: bool,
    ) -> Result<(Gradients, Option<Tensor>)> {
        let n = self.nodes().len();
        if trace.values.len() != n {
            return Err(Error::Unsupported("trace comes from another graph".into()));
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; n];
        let inject = |grads: &mut Vec<Option<Tensor>>, id: NodeId, g: &Tensor| -> Result<()> {
            let want = trace.values.get(id.0).ok_or_else(|| {
                Error::Unsupported("gradient injected at a node of another graph".into())
            })?;
            if want.shape() != g.shape() {
                return Err(Error::shape(
                    "backward",
                    Some(&self.node(id).name),
                    format!("{:?} (the node's output)", want.shape()),
                    g.shape(),
                ));
            }
            add_grad(&mut grads[id.0], g.clone());
            Ok(())
        };
        if let Some(g) = grad_output {
            inject(&mut grads, self.output_id(), g)?;
        }
        for (id, g) in extra {
            inject(&mut grads, *id, g)?;
        }
        let mut out = Gradients::default();
        for i in (0..n).rev() {
            if matches!(self.node(NodeId(i)).op, Op::Input { .. }) {
                continue; // its gradient is the result, not something to propagate
            }
            let Some(gy) = grads[i].take() else { continue };
            let node = self.node(NodeId(i));
            let name = node.name.as_str();
            let x = |k: usize| &trace.values[node.inputs[k].0];
            // The input node needs no gradient, so skip work that only produces one.
            let need_dx = |k: usize| {
                node.inputs
                    .get(k)
                    .is_some_and(|&j| self.wants_grad(j, want_input))
            };
            let mut param = |kind: ParamKind, g: ArrayD<f32>| {
                out.accumulate(&format!("{name}.{}", kind.suffix()), g)
            };
            let mut input_grads: Vec<Option<Tensor>> = Vec::new();
            let node_arg = Some(name);
            match &node.op {
                Op::Input { .. } => {}
                Op::Linear(l) => {
                    let layers::LayerGrads { dx, dw, db } = layers::linear_backward(
                        l,
                        rows(x(0), l.in_features(), node_arg)?.view(),
                        rows(&gy, l.out_features(), node_arg)?.view(),
                        need_dx(0),
                    )?;
                    param(ParamKind::Weight, dw.into_dyn())?;
                    if let Some(db) = db {
                        param(ParamKind::Bias, db.into_dyn())?;
                    }
                    let dx = match dx {
                        Some(d) => Some(
                            d.into_shape_with_order(x(0).raw_dim())
                                .map_err(|e| Error::Unsupported(e.to_string()))?,
                        ),
                        None => None,
                    };
                    input_grads.push(dx);
                }
                Op::Conv2d(c) => {
                    let cols: &[_] = match &trace.aux[i] {
                        Aux::Cols(c) => c,
                        _ => &[],
                    };
                    let layers::LayerGrads { dx, dw, db } = layers::conv2d_backward(
                        c,
                        as_4d(x(0), "conv2d", node_arg)?,
                        cols,
                        as_4d(&gy, "conv2d", node_arg)?,
                        need_dx(0),
                    )?;
                    param(ParamKind::Weight, dw.into_dyn())?;
                    if let Some(db) = db {
                        param(ParamKind::Bias, db.into_dyn())?;
                    }
                    input_grads.push(dx.map(|d| d.into_dyn()));
                }
                Op::BatchNorm2d(bn) => {
                    let gy4 = as_4d(&gy, "batch_norm2d", node_arg)?;
                    let (dx, dg, db) = match (&trace.aux[i], trace.mode) {
                        (Aux::BatchNorm(cache), Mode::Training) => {
                            layers::batch_norm_train_backward(bn, cache, gy4)
                        }
                        _ => layers::batch_norm_eval_backward(
                            bn,
                            as_4d(x(0), "batch_norm2d", node_arg)?,
                            gy4,
                        ),
                    };
                    param(ParamKind::Weight, dg.into_dyn())?;
                    param(ParamKind::Bias, db.into_dyn())?;
                    input_grads.push(Some(dx.into_dyn()));
                }
                Op::ReLU => {
                    let mut d = gy;
                    Zip::from(&mut d).and(&trace.values[i]).for_each(|g, &y| {
                        if y <= 0.0 {
                            *g = 0.0
                        }
                    });
                    input_grads.push(Some(d));
                }
                Op::ReLU6 => {
                    let mut d = gy;
                    Zip::from(&mut d).and(x(0)).for_each(|g, &v| {
                        if !(v > 0.0 && v < 6.0) {
                            *g = 0.0
                        }
                    });
                    input_grads.push(Some(d));
                }
                Op::MaxPool2d(_) => {
                    let Aux::MaxPool(arg) = &trace.aux[i] else {
                        return Err(Error::Unsupported(
                            "max pool trace lacks its indices".into(),
                        ));
                    };
                    let xin = as_4d(x(0), "max_pool2d", node_arg)?;
                    let dx = layers::max_pool_backward(
                        arg,
                        as_4d(&gy, "max_pool2d", node_arg)?,
                        xin.dim(),
                    );
                    input_grads.push(Some(dx.into_dyn()));
                }
                Op::AvgPool2d(p) => {
                    let xin = as_4d(x(0), "avg_pool2d", node_arg)?;
                    let dx = layers::avg_pool_backward(
                        p,
                        as_4d(&gy, "avg_pool2d", node_arg)?,
                        xin.dim(),
                    )?;
                    input_grads.push(Some(dx.into_dyn()));
                }
                Op::GlobalAvgPool => {
                    let xin = x(0);
                    let (h, w) = (xin.shape()[2], xin.shape()[3]);
                    let g = gy.mapv(|v| v / (h * w) as f32);
                    let dx = g
                        .broadcast(xin.raw_dim())
                        .ok_or_else(|| {
                            Error::shape("global_avg_pool", node_arg, "[N, C, 1, 1]", gy.shape())
                        })?
                        .to_owned();
                    input_grads.push(Some(dx));
                }
                Op::Flatten => {
                    let dx = gy
                        .into_shape_with_order(x(0).raw_dim())
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    input_grads.push(Some(dx));
                }
                Op::Add => {
                    for _ in 1..node.inputs.len() {
                        input_grads.push(Some(gy.clone()));
                    }
                    input_grads.push(Some(gy));
                }
                Op::Concat | Op::ConcatAxis { .. } => {
                    let a = match &node.op {
                        Op::ConcatAxis { axis } => {
                            nd::resolve_axis(*axis, gy.ndim(), &format!("node `{name}`"))?
                        }
                        _ => 1,
                    };
                    let mut start = 0;
                    for k in 0..node.inputs.len() {
                        let c = x(k).shape()[a];
                        let part = gy
                            .slice_axis(Axis(a), Slice::from(start..start + c))
                            .to_owned();
                        input_grads.push(Some(part));
                        start += c;
                    }
                }
                Op::Softmax { axis } => {
                    let y = &trace.values[i];
                    let axis = nd::resolve_axis(*axis, y.ndim(), &format!("node `{name}`"))?;
                    input_grads.push(Some(nd::softmax_backward(y, &gy, axis)));
                }
                Op::Unary(f) => {
                    let d = nd::unary_backward(*f, x(0), &trace.values[i], &gy);
                    input_grads.push(Some(d));
                }
                Op::Binary(b) => {
                    let (da, db) = nd::binary_backward(*b, x(0).view(), x(1).view(), &gy)?;
                    input_grads.push(Some(da));
                    input_grads.push(Some(db));
                }
                Op::BinaryConst(b) => {
                    let c = nd::constant_view(&b.constant);
                    let d = if b.constant_first {
                        nd::binary_backward(b.op, c, x(0).view(), &gy)?.1
                    } else {
                        nd::binary_backward(b.op, x(0).view(), c, &gy)?.0
                    };
                    input_grads.push(Some(d));
                }
                Op::LayerNorm(ln) => {
                    let (dx, dg, db) = nd::layer_norm_backward(ln, x(0), &gy)?;
                    param(ParamKind::Weight, dg)?;
                    param(ParamKind::Bias, db)?;
                    input_grads.push(Some(dx));
                }
                Op::RmsNorm(n) => {
                    let (dx, dw) = super::decoder::rms_norm_backward(n, x(0), &gy)?;
                    param(ParamKind::Weight, dw)?;
                    input_grads.push(Some(dx));
                }
                Op::Rotary(r) => {
                    input_grads.push(Some(super::decoder::rotary_backward(r, &gy)?));
                }
                Op::Attention(a) => {
                    let (dq, dk, dv, dm) = super::attention::attention_backward(
                        a,
                        name,
                        [0, 1, 2, 3].map(|k| (k < node.inputs.len()).then(|| x(k).view())),
                        &gy,
                    )?;
                    input_grads.extend([Some(dq), Some(dk), Some(dv)]);
                    if let Some(dm) = dm {
                        input_grads.push(Some(dm));
                    }
                }
                Op::MatMul => {
                    let (da, db) = nd::matmul_backward(x(0).view(), x(1).view(), &gy)?;
                    input_grads.push(Some(da));
                    input_grads.push(Some(db));
                }
                Op::Embedding(e) => {
                    let ids = trace.ints[node.inputs[0].0].as_ref().ok_or_else(|| {
                        Error::Unsupported(format!("`{name}`: its ids were not traced"))
                    })?;
                    let dw = indexing::embedding_backward(e, ids.view(), &gy, name)?;
                    param(ParamKind::Weight, dw.into_dyn())?;
                    input_grads.push(None);
                }
                Op::Cast { .. } | Op::Positions { .. } => {
                    // Integers carry no gradient; a float-to-float cast is the identity.
                    let float_in = node
                        .inputs
                        .first()
                        .is_some_and(|&j| self.dtype(j) == DType::F32);
                    input_grads.push(float_in.then_some(gy));
                }
                Op::Where => {
                    let cond = match &trace.ints[node.inputs[0].0] {
                        Some(c) => indexing::Condition::Int(c.view()),
                        None => indexing::Condition::Float(x(0).view()),
                    };
                    let (da, db) =
                        indexing::where_backward(cond, x(1).shape(), x(2).shape(), &gy, name)?;
                    input_grads.extend([None, Some(da), Some(db)]);
                }
                Op::Identity => input_grads.push(Some(gy)),
                Op::Slice { axis, start, end } => {
                    let x0 = x(0);
                    let a = nd::resolve_axis(*axis, x0.ndim(), &format!("node `{name}`"))?;
                    let (lo, hi) = indexing::slice_bounds(*start, *end, x0.shape()[a]);
                    let mut dx = Tensor::zeros(x0.raw_dim());
                    dx.slice_axis_mut(Axis(a), Slice::from(lo..hi.max(lo)))
                        .assign(&gy);
                    input_grads.push(Some(dx));
                }
                Op::Reshape { .. } | Op::Unsqueeze { .. } | Op::Squeeze { .. } => {
                    let dx = gy
                        .to_shape(x(0).raw_dim())
                        .map_err(|e| Error::Unsupported(e.to_string()))?
                        .into_owned();
                    input_grads.push(Some(dx));
                }
                Op::Permute { axes } => {
                    let inverse = nd::inverse_permutation(axes);
                    input_grads.push(Some(nd::permute_forward(gy.view(), &inverse)?));
                }
                Op::Reduce {
                    how,
                    axes,
                    keep_dims,
                } => {
                    let axes = nd::reduce_axes(name, axes, x(0).ndim() - 1)?;
                    let dx = nd::reduce_backward(x(0), &gy, *how, &axes, *keep_dims)?;
                    input_grads.push(Some(dx));
                }
                Op::Dropout { .. } => match &trace.aux[i] {
                    Aux::Mask(m) => input_grads.push(Some(gy * m)),
                    _ => input_grads.push(Some(gy)),
                },
                Op::FakeQuant(fq) => {
                    let Aux::FakeQuant(cache) = &trace.aux[i] else {
                        return Err(Error::Unsupported(
                            "fake quant trace lacks its state".into(),
                        ));
                    };
                    let (dx, ps) = qat::fake_quant_backward(fq, x(0), cache, &gy);
                    for (kind, g) in ps {
                        param(kind, g)?;
                    }
                    input_grads.push(Some(dx));
                }
                Op::QatConv2d(q) => {
                    let Aux::QatConv(cache) = &trace.aux[i] else {
                        return Err(Error::Unsupported("qat conv trace lacks its state".into()));
                    };
                    let (dx, ps) = qat::qat_conv_backward(
                        q,
                        as_4d(x(0), "qat_conv2d", node_arg)?,
                        cache,
                        as_4d(&gy, "qat_conv2d", node_arg)?,
                        need_dx(0),
                    )?;
                    for (kind, g) in ps {
                        param(kind, g)?;
                    }
                    input_grads.push(dx.map(|d| d.into_dyn()));
                }
                Op::QatLinear(q) => {
                    let Aux::QatLinear(cache) = &trace.aux[i] else {
                        return Err(Error::Unsupported(
                            "qat linear trace lacks its state".into(),
                        ));
                    };
                    let (dx, ps) = qat::qat_linear_backward(
                        q,
                        as_2d(x(0), "qat_linear", node_arg)?,
                        cache,
                        as_2d(&gy, "qat_linear", node_arg)?,
                        need_dx(0),
                    )?;
                    for (kind, g) in ps {
                        param(kind, g)?;
                    }
                    input_grads.push(dx.map(|d| d.into_dyn()));
                }
                Op::DynamicLinear(_) => {
                    return Err(Error::Unsupported(format!(
                        "backward through the dynamic int8 layer `{name}` (quantize a trained \
                         graph; fine-tune the float one)"
                    )))
                }
                Op::Custom(c) => {
                    let ins: Vec<&Tensor> = (0..node.inputs.len()).map(x).collect();
                    let gs = c.backward(&ins, &trace.values[i], &gy)?;
                    if gs.len() != ins.len() {
                        return Err(Error::Arity {
                            node: name.to_string(),
                            op: format!("{} backward", c.kind()),
                            expected: ins.len().to_string(),
                            got: gs.len(),
                        });
                    }
                    input_grads.extend(gs.into_iter().map(Some));
                }
            }
            for (k, g) in input_grads.into_iter().enumerate() {
                let Some(g) = g else { continue };
                let j = node.inputs[k];
                if g.shape() != trace.values[j.0].shape() {
                    return Err(Error::shape(
                        "backward",
                        Some(name),
                        format!("{:?} (input {k}'s shape)", trace.values[j.0].shape()),
                        g.shape(),
                    ));
                }
                if self.wants_grad(j, want_input) {
                    add_grad(&mut grads[j.0], g);
                }
            }
        }
        Ok((out, grads[self.input_id().0].take()))
    }
}

impl Graph {
    /// Whether node `j`'s output needs a gradient: a float value, and not a graph input
    /// unless the caller asked for the input's.
    fn wants_grad(&self, j: NodeId, want_input: bool) -> bool {
        self.dtype(j) == DType::F32 && (want_input || !matches!(self.node(j).op, Op::Input { .. }))
    }
}

/// `t` (`[N, …, features]`) as `[rows, features]`, a view when its layout allows.
fn rows<'a>(
    t: &'a Tensor,
    features: usize,
    node: Option<&str>,
) -> Result<ndarray::CowArray<'a, f32, ndarray::Ix2>> {
    if t.ndim() < 2 || t.shape().last() != Some(&features) {
        return Err(Error::shape(
            "linear",
            node,
            format!("[N, …, {features}]"),
            t.shape(),
        ));
    }
    t.to_shape((t.len() / features.max(1), features))
        .map_err(|e| Error::Unsupported(e.to_string()))
}
