//! Forward passes: plain inference, inference with activation taps, and traced passes that
//! keep what backward needs.

use super::graph::{Graph, Node, NodeId};
use super::indexing;
use super::layers::{self, BnCache};
use super::nd;
use super::op::Op;
use super::qat;
use crate::error::{Error, Result};
use crate::tensor::{as_2d, as_4d, view_4d, DType, Tensor, Value};
use ndarray::{Array4, ArrayD, ArrayViewD, Axis, IxDyn};
use rand::{Rng, RngCore};

/// How BatchNorm and Dropout behave in a traced pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// BatchNorm uses the running statistics, Dropout is the identity.
    Inference,
    /// BatchNorm uses (and updates) batch statistics, Dropout drops.
    Training,
}

/// What an op kept from its forward pass for the backward pass.
#[derive(Clone, Debug)]
pub(crate) enum Aux {
    None,
    Cols(Vec<ndarray::Array2<f32>>),
    BatchNorm(BnCache),
    MaxPool(Array4<u32>),
    Mask(Tensor),
    FakeQuant(qat::FakeQuantCache),
    QatConv(Box<qat::QatConvCache>),
    QatLinear(Box<qat::QatLinearCache>),
}

/// Every node's output of one forward pass, plus what the backward pass needs.
#[derive(Clone, Debug)]
pub struct Trace {
    /// Every float node's output (an empty tensor for an integer node).
    pub(crate) values: Vec<Tensor>,
    /// Every integer node's output.
    pub(crate) ints: Vec<Option<ArrayD<i64>>>,
    pub(crate) aux: Vec<Aux>,
    pub(crate) mode: Mode,
}

impl Trace {
    /// The output of float node `id` (an empty tensor for a node that makes integers: see
    /// [`Trace::int_value`]).
    ///
    /// # Panics
    /// If `id` does not come from the traced graph (ids are only handed out by a graph).
    pub fn value(&self, id: NodeId) -> &Tensor {
        &self.values[id.0]
    }

    /// The output of integer node `id`, `None` for a float node.
    ///
    /// # Panics
    /// As [`Trace::value`].
    pub fn int_value(&self, id: NodeId) -> Option<&ArrayD<i64>> {
        self.ints[id.0].as_ref()
    }
    /// The mode the pass ran in.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// A value fed to a graph input, borrowed for the pass.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fed<'x> {
    F32(&'x Tensor),
    I64(&'x ArrayD<i64>),
}

impl<'x> Fed<'x> {
    fn of(v: &'x Value) -> Self {
        match v {
            Value::F32(t) => Fed::F32(t),
            Value::I64(t) => Fed::I64(t),
        }
    }

    fn shape(&self) -> &'x [usize] {
        match self {
            Fed::F32(t) => t.shape(),
            Fed::I64(t) => t.shape(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Fed::F32(_) => DType::F32,
            Fed::I64(_) => DType::I64,
        }
    }
}

impl Graph {
    /// The one float input of a single-input graph (the APIs that take one tensor).
    fn single_input<'x>(&self, x: &'x Tensor) -> Result<[Fed<'x>; 1]> {
        let ids = self.input_ids();
        if ids.len() != 1 {
            return Err(Error::InputCount { found: ids.len() });
        }
        if self.dtype(ids[0]) != DType::F32 {
            return Err(Error::BadInput {
                input: self.node(ids[0]).name.clone(),
                reason: format!(
                    "takes {}, call `Graph::run` with a typed value",
                    self.dtype(ids[0])
                ),
            });
        }
        Ok([Fed::F32(x)])
    }

    /// The values of `inputs` in [`Graph::input_ids`] order, after checking that every input
    /// is fed once, by name, with its element type.
    fn feeds<'x>(&self, inputs: &[(&str, &'x Value)]) -> Result<Vec<Fed<'x>>> {
        for (k, (name, _)) in inputs.iter().enumerate() {
            let known = self
                .input_ids()
                .iter()
                .any(|&id| self.node(id).name == *name);
            if !known {
                return Err(Error::BadInput {
                    input: name.to_string(),
                    reason: format!(
                        "the graph has no such input (its inputs: {})",
                        self.input_names().join(", ")
                    ),
                });
            }
            if inputs[..k].iter().any(|(n, _)| n == name) {
                return Err(Error::BadInput {
                    input: name.to_string(),
                    reason: "fed twice".into(),
                });
            }
        }
        self.input_ids()
            .iter()
            .map(|&id| {
                let node = self.node(id);
                let (_, v) = inputs
                    .iter()
                    .find(|(n, _)| *n == node.name)
                    .ok_or_else(|| Error::BadInput {
                        input: node.name.clone(),
                        reason: "not fed".into(),
                    })?;
                let fed = Fed::of(v);
                if fed.dtype() != self.dtype(id) {
                    return Err(Error::BadInput {
                        input: node.name.clone(),
                        reason: format!("takes {}, got {}", self.dtype(id), fed.dtype()),
                    });
                }
                Ok(fed)
            })
            .collect()
    }

    /// The names of the graph inputs, in [`Graph::input_ids`] order.
    pub fn input_names(&self) -> Vec<&str> {
        self.input_ids()
            .iter()
            .map(|&id| self.node(id).name.as_str())
            .collect()
    }

    /// The names of the graph outputs, in [`Graph::output_ids`] order.
    pub fn output_names(&self) -> Vec<&str> {
        self.output_ids()
            .iter()
            .map(|&id| self.node(id).name.as_str())
            .collect()
    }

    /// Checks the fed shapes against the inputs; returns the per-node shapes of this run
    /// when they differ from the build-time ones (a dynamic size).
    fn check_feeds(&self, feeds: &[Fed<'_>]) -> Result<Option<Vec<Vec<usize>>>> {
        let shapes: Vec<&[usize]> = feeds.iter().map(Fed::shape).collect();
        self.run_shapes(&shapes)
    }

    /// Runs the graph in inference mode on a batch `x` of shape `[N, ...input_shape]`.
    ///
    /// # Errors
    /// [`Error::BadInput`] when `x` does not fit the input or is an empty batch,
    /// [`Error::InputCount`] for a graph with several inputs (use [`Graph::run`]), or an
    /// error from a custom op.
    ///
    /// # Examples
    /// ```
    /// use nncompress::model::zoo;
    /// let net = zoo::lenet_300_100(7)?;
    /// let logits = net.forward(&ndarray::ArrayD::zeros(vec![2, 1, 28, 28]))?;
    /// assert_eq!(logits.shape(), &[2, 10]);
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let feeds = self.single_input(x)?;
        first_f32(self, self.infer(&feeds, None)?)
    }

    /// Runs the graph in inference mode on named inputs (`input_ids`, `attention_mask`)
    /// and returns every output, in [`Graph::output_ids`] order.
    ///
    /// # Errors
    /// [`Error::BadInput`] for a missing, unknown or twice-fed input name, a wrong element
    /// type or shape, batches or dynamic sizes that differ between inputs;
    /// [`Error::IndexOutOfRange`] for a token id outside its embedding table; the shape
    /// errors of an op that cannot take this run's sizes.
    ///
    /// # Examples
    /// ```
    /// use nncompress::model::{Dim, GraphBuilder};
    /// use nncompress::tensor::{DType, Value};
    /// let mut b = GraphBuilder::new(1);
    /// b.typed_input("ids", DType::I64, &[Dim::dynamic("seq", 4)])
    ///     .embedding("emb", "ids", 100, 8)
    ///     .layer_norm("ln", "emb", 8);
    /// let net = b.build("ln")?;
    /// let ids = Value::I64(ndarray::ArrayD::from_elem(vec![2, 7], 5));
    /// let out = net.run(&[("ids", &ids)])?;
    /// assert_eq!(out[0].shape(), &[2, 7, 8]);
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn run(&self, inputs: &[(&str, &Value)]) -> Result<Vec<Value>> {
        let feeds = self.feeds(inputs)?;
        self.infer(&feeds, None)
    }

    /// As [`Graph::run`], calling `tap(id, node, output)` with every float value as it is
    /// produced (integer values are not shown to the tap).
    ///
    /// # Errors
    /// As [`Graph::run`].
    pub fn run_with(
        &self,
        inputs: &[(&str, &Value)],
        tap: &mut dyn FnMut(NodeId, &Node, &Tensor),
    ) -> Result<Vec<Value>> {
        let feeds = self.feeds(inputs)?;
        self.infer(&feeds, Some(tap))
    }

    /// For each node, the index of the last node that reads its value (`usize::MAX` for a
    /// graph output, 0 for a value nobody reads): an inference pass may drop a value once
    /// that node has run.
    pub(crate) fn last_uses(&self) -> Vec<usize> {
        let mut last_use = vec![0usize; self.nodes().len()];
        for (i, node) in self.nodes().iter().enumerate() {
            for inp in &node.inputs {
                last_use[inp.0] = i;
            }
        }
        for o in self.output_ids() {
            last_use[o.0] = usize::MAX;
        }
        last_use
    }

    /// Runs the graph in inference mode and calls `tap(id, node, output)` with every node's
    /// output as it is produced. Nothing is copied for the tap; intermediate outputs are
    /// dropped as soon as their last consumer has run.
    ///
    /// # Errors
    /// As [`Graph::forward`].
    pub fn forward_with(
        &self,
        x: &Tensor,
        tap: &mut dyn FnMut(NodeId, &Node, &Tensor),
    ) -> Result<Tensor> {
        let feeds = self.single_input(x)?;
        first_f32(self, self.infer(&feeds, Some(tap))?)
    }

    /// The inference pass behind [`Graph::forward`] and [`Graph::run`]. Inputs are never
    /// copied: Linear and Conv2d read them in place and Flatten reshapes them as a view.
    /// An element-wise op (ReLU, ReLU6, inference Dropout) or a Flatten that is the last
    /// reader of a value the pass owns reuses that value's buffer.
    fn infer(&self, feeds: &[Fed<'_>], tap: Option<&mut Tap<'_>>) -> Result<Vec<Value>> {
        let shapes = self.check_feeds(feeds)?;
        let per_sample = match &shapes {
            Some(s) => self.macs_with(s),
            None => self.macs_per_sample(),
        };
        let batch = feeds.first().map_or(1, |f| f.shape()[0]) as u64;
        let macs = per_sample.saturating_mul(batch);
        crate::kernels::parallel::session(macs, || self.infer_checked(feeds, tap))
    }

    fn infer_checked(
        &self,
        feeds: &[Fed<'_>],
        mut tap: Option<&mut Tap<'_>>,
    ) -> Result<Vec<Value>> {
        let n = self.nodes().len();
        let last_use = self.last_uses();
        let mut values: Vec<Slot<'_>> = (0..n).map(|_| Slot::Dropped).collect();
        let packed = self.packed_linears();
        let mut next_input = 0;
        for (i, node) in self.nodes().iter().enumerate() {
            let name = Some(node.name.as_str());
            let int_input = node
                .inputs
                .first()
                .is_some_and(|j| matches!(values[j.0], Slot::Int(_) | Slot::FedInt(_)));
            let out = match (&node.op, packed.and_then(|p| p[i].as_ref())) {
                (op, _) if int_input && is_layout(op) => {
                    let ins = typed_slots(&mut values, node)?;
                    match eval_typed(op, &node.name, &ins)? {
                        Value::F32(t) => Slot::Owned(t),
                        Value::I64(t) => Slot::Int(t),
                    }
                }
                (Op::Input { .. }, _) => {
                    let fed = feeds
                        .get(next_input)
                        .copied()
                        .ok_or_else(|| dropped(node))?;
                    next_input += 1;
                    match fed {
                        Fed::F32(t) => Slot::Fed(t),
                        Fed::I64(t) => Slot::FedInt(t),
                    }
                }
                (Op::Linear(l), Some(p)) => {
                    let v = input_view(&values, node)?;
                    Slot::Owned(layers::over_rows(v, l.in_features(), name, |rows| {
                        p.forward(rows)
                    })?)
                }
                (Op::Conv2d(c), _) => {
                    let v = input_view(&values, node)?;
                    Slot::Owned(layers::conv2d_infer(c, view_4d(v, "conv2d", name)?)?.into_dyn())
                }
                (Op::BatchNorm2d(bn), _) => {
                    let v = input_view(&values, node)?;
                    Slot::Owned(
                        layers::batch_norm_eval(bn, view_4d(v, "batch_norm2d", name)?).into_dyn(),
                    )
                }
                (Op::Flatten, _) => match flatten_in_place(&mut values, node, i, &last_use)? {
                    Some(slot) => slot,
                    None => Slot::Owned(generic(&mut values, node)?),
                },
                (
                    Op::ReLU | Op::ReLU6 | Op::Dropout { .. } | Op::Unary(_) | Op::Softmax { .. },
                    _,
                ) => {
                    let standard = |t: &Tensor| t.is_standard_layout();
                    match take_last_read(&mut values, node, i, &last_use, standard) {
                        Some(mut t) => {
                            match &node.op {
                                Op::ReLU => t.mapv_inplace(|v| v.max(0.0)),
                                Op::ReLU6 => t.mapv_inplace(|v| v.clamp(0.0, 6.0)),
                                Op::Unary(f) => nd::unary_in_place(*f, &mut t),
                                Op::Softmax { axis } => {
                                    let what = format!("node `{}`", node.name);
                                    let axis = nd::resolve_axis(*axis, t.ndim(), &what)?;
                                    nd::softmax_in_place(&mut t, axis);
                                }
                                _ => {}
                            }
                            Slot::Owned(t)
                        }
                        None => Slot::Owned(generic(&mut values, node)?),
                    }
                }
                (Op::Binary(op), _) => match binary_in_place(&mut values, node, i, &last_use, *op)?
                {
                    Some(t) => Slot::Owned(t),
                    None => Slot::Owned(generic(&mut values, node)?),
                },
                (op, _) if is_typed(op) => {
                    let ins = typed_slots(&mut values, node)?;
                    match eval_typed(op, &node.name, &ins)? {
                        Value::F32(t) => Slot::Owned(t),
                        Value::I64(t) => Slot::Int(t),
                    }
                }
                _ => Slot::Owned(generic(&mut values, node)?),
            };
            if let Some(tap) = tap.as_mut() {
                if let Some(t) = out.tensor() {
                    tap(NodeId(i), node, &t);
                }
            }
            values[i] = out;
            for inp in &node.inputs {
                if last_use[inp.0] == i {
                    values[inp.0] = Slot::Dropped;
                }
            }
        }
        let outputs = self.output_ids();
        let mut result = Vec::with_capacity(outputs.len());
        for (k, o) in outputs.iter().enumerate() {
            // An output listed twice is copied for its earlier places.
            let again = outputs[k + 1..].contains(o);
            let slot = if again {
                values[o.0].clone_value()
            } else {
                std::mem::replace(&mut values[o.0], Slot::Dropped).into_value()
            };
            result.push(
                slot.ok_or_else(|| Error::Unsupported("graph output was not computed".into()))?,
            );
        }
        Ok(result)
    }

    /// Runs the graph and keeps every node's output and backward state in a [`Trace`].
    /// In [`Mode::Training`], BatchNorm uses batch statistics and updates its running
    /// statistics in the graph, and Dropout draws its masks from `rng`.
    ///
    /// # Errors
    /// As [`Graph::forward`]; also [`Error::InvalidConfig`] for training-mode BatchNorm on a
    /// batch with a single value per channel.
    pub fn trace(&mut self, x: &Tensor, mode: Mode, rng: &mut dyn RngCore) -> Result<Trace> {
        let feeds = self.single_input(x)?;
        self.trace_feeds(&feeds, mode, rng)
    }

    /// As [`Graph::trace`], on named inputs (see [`Graph::run`]).
    ///
    /// # Errors
    /// As [`Graph::run`] and [`Graph::trace`].
    pub fn trace_inputs(
        &mut self,
        inputs: &[(&str, &Value)],
        mode: Mode,
        rng: &mut dyn RngCore,
    ) -> Result<Trace> {
        let feeds = self.feeds(inputs)?;
        self.trace_feeds(&feeds, mode, rng)
    }

    fn trace_feeds(
        &mut self,
        feeds: &[Fed<'_>],
        mode: Mode,
        rng: &mut dyn RngCore,
    ) -> Result<Trace> {
        self.check_feeds(feeds)?;
        let n = self.nodes().len();
        let mut values: Vec<Tensor> = Vec::with_capacity(n);
        let mut ints: Vec<Option<ArrayD<i64>>> = Vec::with_capacity(n);
        let mut aux = Vec::with_capacity(n);
        let mut next_input = 0;
        for i in 0..n {
            let (out, a) = {
                let node = &self.nodes()[i];
                match (&node.op, mode) {
                    (Op::Input { .. }, _) => {
                        let fed = feeds
                            .get(next_input)
                            .copied()
                            .ok_or_else(|| dropped(node))?;
                        next_input += 1;
                        match fed {
                            Fed::F32(t) => (Value::F32(t.clone()), Aux::None),
                            Fed::I64(t) => (Value::I64(t.clone()), Aux::None),
                        }
                    }
                    (op, _)
                        if is_typed(op)
                            || (is_layout(op)
                                && node.inputs.first().is_some_and(|j| ints[j.0].is_some())) =>
                    {
                        let ins = node
                            .inputs
                            .iter()
                            .map(|j| match &ints[j.0] {
                                Some(t) => Ok(In::I64(t.view())),
                                None => Ok(In::F32(&values[j.0])),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        (eval_typed(op, &node.name, &ins)?, Aux::None)
                    }
                    _ => {
                        let ins: Vec<&Tensor> = node.inputs.iter().map(|j| &values[j.0]).collect();
                        let (t, a) = self.trace_float(i, &ins, mode, rng)?;
                        (Value::F32(t), a)
                    }
                }
            };
            match out {
                Value::F32(t) => {
                    values.push(t);
                    ints.push(None);
                }
                Value::I64(t) => {
                    // Integer nodes carry no gradient; their float slot stays empty.
                    values.push(Tensor::zeros(IxDyn(&[0])));
                    ints.push(Some(t));
                }
            }
            aux.push(a);
        }
        Ok(Trace {
            values,
            ints,
            aux,
            mode,
        })
    }

    /// One float node of a traced pass.
    fn trace_float(
        &mut self,
        i: usize,
        ins: &[&Tensor],
        mode: Mode,
        rng: &mut dyn RngCore,
    ) -> Result<(Tensor, Aux)> {
        let node = &self.nodes()[i];
        Ok(match (&node.op, mode) {
            (Op::BatchNorm2d(_), Mode::Training) => {
                let name = node.name.clone();
                let xin = as_4d(ins[0], "batch_norm2d", Some(&name))?;
                let Op::BatchNorm2d(ref mut bn) = self.nodes_mut()[i].op else {
                    return Err(Error::Unsupported("node changed during trace".into()));
                };
                let (y, cache) = layers::batch_norm_train(bn, xin)?;
                (y.into_dyn(), Aux::BatchNorm(cache))
            }
            (Op::BatchNorm2d(bn), Mode::Inference) => (
                layers::batch_norm_eval(bn, as_4d(ins[0], "batch_norm2d", Some(&node.name))?)
                    .into_dyn(),
                Aux::None,
            ),
            (Op::FakeQuant(_), Mode::Training) => {
                let Op::FakeQuant(ref mut fq) = self.nodes_mut()[i].op else {
                    return Err(Error::Unsupported("node changed during trace".into()));
                };
                let (y, cache) = qat::fake_quant_forward(fq, ins[0], true)?;
                (y, Aux::FakeQuant(cache))
            }
            (Op::QatConv2d(_), Mode::Training) => {
                let name = node.name.clone();
                let xin = as_4d(ins[0], "qat_conv2d", Some(&name))?;
                let Op::QatConv2d(ref mut q) = self.nodes_mut()[i].op else {
                    return Err(Error::Unsupported("node changed during trace".into()));
                };
                let (y, cache) = qat::qat_conv_train(q, xin)?;
                (y.into_dyn(), Aux::QatConv(Box::new(cache)))
            }
            (Op::Dropout { p }, Mode::Training) if *p > 0.0 => {
                let keep = 1.0 - *p;
                let mask = ArrayD::from_shape_simple_fn(ins[0].raw_dim(), || {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                });
                (ins[0] * &mask, Aux::Mask(mask))
            }
            (op, _) => eval(op, &node.name, ins, Some(()))?,
        })
    }
}

/// The first output of a pass, as floats.
fn first_f32(g: &Graph, outputs: Vec<Value>) -> Result<Tensor> {
    match outputs.into_iter().next() {
        Some(Value::F32(t)) => Ok(t),
        Some(Value::I64(_)) => Err(Error::Unsupported(format!(
            "output `{}` holds integers: call `Graph::run`",
            g.node(g.output_id()).name
        ))),
        None => Err(Error::Unsupported("graph output was not computed".into())),
    }
}

/// Whether `op` reads or makes integer values (evaluated by [`eval_typed`]).
fn is_typed(op: &Op) -> bool {
    matches!(
        op,
        Op::Embedding(_) | Op::Cast { .. } | Op::Positions { .. } | Op::Where
    )
}

/// An input of a typed op.
#[derive(Clone, Debug)]
enum In<'a> {
    F32(&'a Tensor),
    I64(ArrayViewD<'a, i64>),
}

impl In<'_> {
    fn shape(&self) -> &[usize] {
        match self {
            In::F32(t) => t.shape(),
            In::I64(t) => t.shape(),
        }
    }
}

/// Whether `op` only reshapes its one input (row-major order kept), so it moves integers
/// as it moves floats.
fn is_layout(op: &Op) -> bool {
    matches!(
        op,
        Op::Identity | Op::Unsqueeze { .. } | Op::Squeeze { .. } | Op::Reshape { .. }
    )
}

/// `node`'s inputs for [`eval_typed`] (reshaped views among them are copied first).
fn typed_slots<'v>(values: &'v mut [Slot<'_>], node: &Node) -> Result<Vec<In<'v>>> {
    for j in &node.inputs {
        if let Slot::Reshaped(v) = &values[j.0] {
            values[j.0] = Slot::Owned(v.to_owned());
        }
    }
    let values: &'v [Slot<'_>] = values;
    node.inputs
        .iter()
        .map(|j| match &values[j.0] {
            Slot::Owned(t) => Ok(In::F32(t)),
            Slot::Fed(t) => Ok(In::F32(t)),
            Slot::Int(t) => Ok(In::I64(t.view())),
            Slot::FedInt(t) => Ok(In::I64(t.view())),
            _ => Err(dropped(node)),
        })
        .collect()
}

/// Evaluates an op that reads or makes integers.
fn eval_typed(op: &Op, name: &str, ins: &[In<'_>]) -> Result<Value> {
    let wrong = |k: usize, want: DType| {
        let found = match ins.get(k) {
            Some(In::I64(_)) => DType::I64,
            _ => DType::F32,
        };
        Error::DtypeMismatch {
            node: name.to_string(),
            op: op.kind().to_string(),
            input: k,
            expected: want,
            found,
        }
    };
    Ok(match (op, ins) {
        (Op::Embedding(e), [In::I64(ids)]) => {
            Value::F32(indexing::embedding_forward(e, ids.view(), name)?)
        }
        (Op::Embedding(_), _) => return Err(wrong(0, DType::I64)),
        (Op::Cast { to: DType::F32 }, [In::I64(t)]) => Value::F32(t.mapv(|v| v as f32)),
        (Op::Cast { to: DType::F32 }, [In::F32(t)]) => Value::F32((*t).clone()),
        (Op::Cast { to: DType::I64 }, [In::I64(t)]) => Value::I64(t.to_owned()),
        (op, [In::I64(t)]) if is_layout(op) => {
            let per_sample = op.output_shape(name, &[&t.shape()[1..]])?;
            let mut full = vec![t.shape()[0]];
            full.extend(per_sample);
            let data: Vec<i64> = t.iter().copied().collect();
            Value::I64(
                ArrayD::from_shape_vec(IxDyn(&full), data)
                    .map_err(|e| Error::Unsupported(format!("`{name}`: {e}")))?,
            )
        }
        (Op::Positions { axis }, [x]) => {
            let a = nd::resolve_axis(*axis, x.shape().len(), &format!("node `{name}`"))?;
            Value::I64(indexing::positions_forward(x.shape(), a)?)
        }
        (Op::Where, [c, a, b]) => {
            let cond = match c {
                In::I64(v) => indexing::Condition::Int(v.view()),
                In::F32(v) => indexing::Condition::Float(v.view()),
            };
            match (a, b) {
                (In::F32(a), In::F32(b)) => Value::F32(indexing::where_forward(cond, a, b, name)?),
                (In::I64(a), In::I64(b)) => Value::I64(indexing::where_forward(
                    cond,
                    &a.to_owned(),
                    &b.to_owned(),
                    name,
                )?),
                (In::F32(_), _) => return Err(wrong(2, DType::F32)),
                (In::I64(_), _) => return Err(wrong(2, DType::I64)),
            }
        }
        _ => {
            return Err(Error::Unsupported(format!(
                "`{name}` ({}) cannot take these inputs",
                op.kind()
            )))
        }
    })
}

impl Graph {
    /// Evaluates node `id` alone in inference mode on the given input values (used by
    /// executors that run some nodes their own way).
    ///
    /// # Errors
    /// As [`Graph::forward`]; [`Error::Unsupported`] for the input node.
    pub(crate) fn eval_node(&self, id: NodeId, ins: &[&Tensor]) -> Result<Tensor> {
        let node = self.node(id);
        match &node.op {
            Op::BatchNorm2d(bn) => Ok(layers::batch_norm_eval(
                bn,
                as_4d(ins[0], "batch_norm2d", Some(&node.name))?,
            )
            .into_dyn()),
            op => Ok(eval(op, &node.name, ins, None)?.0),
        }
    }
}

/// What [`Graph::forward_with`] calls with each node's output.
type Tap<'t> = dyn FnMut(NodeId, &Node, &Tensor) + 't;

/// A value of an inference pass: a caller's input, a reshaped view of one, or a value the
/// pass produced (until its last reader has run).
pub(crate) enum Slot<'x> {
    Dropped,
    Fed(&'x Tensor),
    FedInt(&'x ArrayD<i64>),
    Reshaped(ArrayViewD<'x, f32>),
    Owned(Tensor),
    Int(ArrayD<i64>),
}

impl Slot<'_> {
    /// The float value as a tensor (a reshaped view is copied), `None` once dropped or for
    /// an integer value.
    pub(crate) fn tensor(&self) -> Option<std::borrow::Cow<'_, Tensor>> {
        use std::borrow::Cow;
        match self {
            Slot::Owned(t) => Some(Cow::Borrowed(t)),
            Slot::Fed(x) => Some(Cow::Borrowed(*x)),
            Slot::Reshaped(v) => Some(Cow::Owned(v.to_owned())),
            Slot::Dropped | Slot::FedInt(_) | Slot::Int(_) => None,
        }
    }

    /// The float value's shape, `None` once dropped or for an integer value.
    fn float_shape(&self) -> Option<&[usize]> {
        match self {
            Slot::Owned(t) => Some(t.shape()),
            Slot::Fed(x) => Some(x.shape()),
            Slot::Reshaped(v) => Some(v.shape()),
            Slot::Dropped | Slot::FedInt(_) | Slot::Int(_) => None,
        }
    }

    /// The float value as an owned tensor, `None` once dropped or for an integer value.
    pub(crate) fn into_tensor(self) -> Option<Tensor> {
        match self.into_value()? {
            Value::F32(t) => Some(t),
            Value::I64(_) => None,
        }
    }

    /// The value, owned; `None` once dropped.
    fn into_value(self) -> Option<Value> {
        match self {
            Slot::Owned(t) => Some(Value::F32(t)),
            Slot::Int(t) => Some(Value::I64(t)),
            other => other.clone_value(),
        }
    }

    /// A copy of the value; `None` once dropped.
    fn clone_value(&self) -> Option<Value> {
        match self {
            Slot::Owned(t) => Some(Value::F32(t.clone())),
            Slot::Fed(x) => Some(Value::F32((*x).clone())),
            Slot::Reshaped(v) => Some(Value::F32(v.to_owned())),
            Slot::Int(t) => Some(Value::I64(t.clone())),
            Slot::FedInt(t) => Some(Value::I64((*t).clone())),
            Slot::Dropped => None,
        }
    }
}

/// Flatten of `node`'s input without a copy where it can be had: a view of the caller's
/// input (or of a view of it), or the producer's own buffer when `node` (at index `i`) is
/// its last reader. `None` when neither applies (the caller copies).
///
/// # Errors
/// When ndarray refuses a reshape it was promised would work.
pub(crate) fn flatten_in_place<'x>(
    values: &mut [Slot<'x>],
    node: &Node,
    i: usize,
    last_use: &[usize],
) -> Result<Option<Slot<'x>>> {
    let reshape = |e: ndarray::ShapeError| Error::Unsupported(e.to_string());
    let [j] = node.inputs.as_slice() else {
        return Ok(None);
    };
    let view = match &values[j.0] {
        Slot::Fed(x) => x.view(),
        Slot::Reshaped(v) => v.clone(),
        _ => {
            let standard = |t: &Tensor| t.is_standard_layout();
            return match take_last_read(values, node, i, last_use, standard) {
                Some(t) => {
                    let dim = flat_dim(t.shape());
                    Ok(Some(Slot::Owned(
                        t.into_shape_with_order(dim).map_err(reshape)?,
                    )))
                }
                None => Ok(None),
            };
        }
    };
    if !view.is_standard_layout() {
        return Ok(None);
    }
    let dim = flat_dim(view.shape());
    Ok(Some(Slot::Reshaped(
        view.into_shape_with_order(dim).map_err(reshape)?,
    )))
}

/// The buffer of `node`'s only input when `node` (at index `i`) is its last reader, the
/// pass owns it and `usable` accepts it; the slot is then dropped.
fn take_last_read(
    values: &mut [Slot<'_>],
    node: &Node,
    i: usize,
    last_use: &[usize],
    usable: impl Fn(&Tensor) -> bool,
) -> Option<Tensor> {
    let [j] = node.inputs.as_slice() else {
        return None;
    };
    match &values[j.0] {
        Slot::Owned(t) if last_use[j.0] == i && usable(t) => {
            match std::mem::replace(&mut values[j.0], Slot::Dropped) {
                Slot::Owned(t) => Some(t),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `op(a, b)` written over `a`'s buffer when this node (at index `i`) is `a`'s last
/// reader, the pass owns `a` in standard layout and `b` has `a`'s shape (so the output
/// has it too); `None` otherwise, and nothing is taken.
fn binary_in_place(
    values: &mut [Slot<'_>],
    node: &Node,
    i: usize,
    last_use: &[usize],
    op: nd::Binary,
) -> Result<Option<Tensor>> {
    let [a, b] = node.inputs.as_slice() else {
        return Ok(None);
    };
    if a == b || last_use[a.0] != i {
        return Ok(None);
    }
    let fits = match (&values[a.0], &values[b.0]) {
        (Slot::Owned(t), other) => {
            t.is_standard_layout() && other.float_shape().is_some_and(|s| s == t.shape())
        }
        _ => false,
    };
    if !fits {
        return Ok(None);
    }
    let Slot::Owned(mut t) = std::mem::replace(&mut values[a.0], Slot::Dropped) else {
        return Ok(None);
    };
    let bv = match &values[b.0] {
        Slot::Owned(u) => u.view(),
        Slot::Fed(x) => x.view(),
        Slot::Reshaped(v) => v.view(),
        Slot::Dropped | Slot::FedInt(_) | Slot::Int(_) => return Err(dropped(node)),
    };
    nd::binary_assign(op, &mut t, bv)?;
    Ok(Some(t))
}

/// `[N, product of the rest]`, the shape Flatten gives `shape` (`[1, 1]` for a scalar).
fn flat_dim(shape: &[usize]) -> IxDyn {
    match shape.split_first() {
        Some((&n, rest)) => IxDyn(&[n, rest.iter().product()]),
        None => IxDyn(&[1, 1]),
    }
}

fn dropped(node: &Node) -> Error {
    Error::Unsupported(format!("input of `{}` was dropped", node.name))
}

/// A view of `node`'s first input.
pub(crate) fn input_view<'v>(values: &'v [Slot<'_>], node: &Node) -> Result<ArrayViewD<'v, f32>> {
    let j = node.inputs.first().ok_or_else(|| dropped(node))?;
    match &values[j.0] {
        Slot::Owned(t) => Ok(t.view()),
        Slot::Fed(x) => Ok(x.view()),
        Slot::Reshaped(v) => Ok(v.view()),
        Slot::Dropped | Slot::FedInt(_) | Slot::Int(_) => Err(dropped(node)),
    }
}

/// Evaluates `node` by [`eval`] (reshaped views among its inputs are copied first).
fn generic(values: &mut [Slot<'_>], node: &Node) -> Result<Tensor> {
    let ins = gather_slots(values, node)?;
    Ok(eval(&node.op, &node.name, &ins, None)?.0)
}

/// `node`'s inputs as tensors (reshaped views among them are copied into their slots).
///
/// # Errors
/// When an input was dropped.
pub(crate) fn gather_slots<'v>(values: &'v mut [Slot<'_>], node: &Node) -> Result<Vec<&'v Tensor>> {
    for j in &node.inputs {
        if let Slot::Reshaped(v) = &values[j.0] {
            values[j.0] = Slot::Owned(v.to_owned());
        }
    }
    let values: &'v [Slot<'_>] = values;
    node.inputs
        .iter()
        .map(|j| match &values[j.0] {
            Slot::Owned(t) => Ok(t),
            Slot::Fed(x) => Ok(*x),
            _ => Err(dropped(node)),
        })
        .collect()
}

/// Evaluates a stateless op (BatchNorm in inference mode is handled by callers). With
/// `keep` set, keeps the backward state.
fn eval(op: &Op, name: &str, ins: &[&Tensor], keep: Option<()>) -> Result<(Tensor, Aux)> {
    let node = Some(name);
    Ok(match op {
        Op::Linear(l) => (
            layers::over_rows(ins[0].view(), l.in_features(), node, |rows| {
                layers::linear_forward(l, rows)
            })?,
            Aux::None,
        ),
        Op::DynamicLinear(l) => (l.forward(ins[0], name)?, Aux::None),
        Op::Conv2d(c) => {
            let (y, cols) =
                layers::conv2d_forward(c, as_4d(ins[0], "conv2d", node)?, keep.is_some())?;
            (y.into_dyn(), Aux::Cols(cols))
        }
        Op::ReLU => (ins[0].mapv(|v| v.max(0.0)), Aux::None),
        Op::ReLU6 => (ins[0].mapv(|v| v.clamp(0.0, 6.0)), Aux::None),
        Op::MaxPool2d(p) => {
            let x = as_4d(ins[0], "max_pool2d", node)?;
            let (y, arg) = layers::max_pool_forward(p, x, keep.is_some())?;
            (y.into_dyn(), arg.map_or(Aux::None, Aux::MaxPool))
        }
        Op::AvgPool2d(p) => (
            layers::avg_pool_forward(p, as_4d(ins[0], "avg_pool2d", node)?)?.into_dyn(),
            Aux::None,
        ),
        Op::GlobalAvgPool => {
            let x = as_4d(ins[0], "global_avg_pool", node)?;
            let (n, c, h, w) = x.dim();
            let area = (h * w) as f32;
            let m = x
                .to_shape((n, c, h * w))
                .map_err(|e| Error::Unsupported(e.to_string()))?
                .sum_axis(Axis(2))
                / area;
            (
                m.into_shape_with_order(IxDyn(&[n, c, 1, 1]))
                    .map_err(|e| Error::Unsupported(e.to_string()))?,
                Aux::None,
            )
        }
        Op::Flatten => (
            ins[0]
                .to_shape(flat_dim(ins[0].shape()))
                .map_err(|e| Error::Unsupported(e.to_string()))?
                .into_owned(),
            Aux::None,
        ),
        Op::Add => {
            let mut y = ins[0].clone();
            for t in &ins[1..] {
                y += *t;
            }
            (y, Aux::None)
        }
        Op::Concat => {
            let views: Vec<_> = ins.iter().map(|t| t.view()).collect();
            (
                ndarray::concatenate(Axis(1), &views)
                    .map_err(|e| Error::Unsupported(e.to_string()))?,
                Aux::None,
            )
        }
        Op::ConcatAxis { axis } => {
            let a = nd::resolve_axis(*axis, ins[0].ndim(), &format!("node `{name}`"))?;
            let views: Vec<_> = ins.iter().map(|t| t.view()).collect();
            (
                ndarray::concatenate(Axis(a), &views)
                    .map_err(|e| Error::Unsupported(e.to_string()))?,
                Aux::None,
            )
        }
        Op::Softmax { axis } => {
            let what = format!("node `{name}`");
            (
                nd::softmax(ins[0], nd::resolve_axis(*axis, ins[0].ndim(), &what)?),
                Aux::None,
            )
        }
        Op::Unary(f) => (nd::unary_forward(*f, ins[0].view()), Aux::None),
        Op::Binary(b) => (
            nd::binary_forward(*b, ins[0].view(), ins[1].view())?,
            Aux::None,
        ),
        Op::BinaryConst(b) => {
            let c = nd::constant_view(&b.constant);
            let y = if b.constant_first {
                nd::binary_forward(b.op, c, ins[0].view())?
            } else {
                nd::binary_forward(b.op, ins[0].view(), c)?
            };
            (y, Aux::None)
        }
        Op::LayerNorm(ln) => (nd::layer_norm_forward(ln, ins[0])?, Aux::None),
        Op::RmsNorm(n) => (super::decoder::rms_norm_forward(n, ins[0])?, Aux::None),
        Op::Rotary(r) => (super::decoder::rotary_forward(r, ins[0])?, Aux::None),
        Op::MatMul => (nd::matmul_forward(ins[0].view(), ins[1].view())?, Aux::None),
        Op::Attention(a) => (
            super::attention::attention_forward(
                a,
                name,
                [0, 1, 2, 3].map(|i| ins.get(i).map(|t| t.view())),
            )?,
            Aux::None,
        ),
        Op::Reshape { .. } => {
            let mut dim = vec![ins[0].shape()[0]];
            dim.extend(reshape_target(op, name, ins[0].shape())?);
            (
                ins[0]
                    .to_shape(IxDyn(&dim))
                    .map_err(|e| Error::Unsupported(e.to_string()))?
                    .into_owned(),
                Aux::None,
            )
        }
        Op::Permute { axes } => (nd::permute_forward(ins[0].view(), axes)?, Aux::None),
        Op::Reduce {
            how,
            axes,
            keep_dims,
        } => {
            let axes = nd::reduce_axes(name, axes, ins[0].ndim() - 1)?;
            (
                nd::reduce_forward(ins[0], *how, &axes, *keep_dims),
                Aux::None,
            )
        }
        Op::Identity => (ins[0].clone(), Aux::None),
        Op::Slice { axis, start, end } => {
            let a = nd::resolve_axis(*axis, ins[0].ndim(), &format!("node `{name}`"))?;
            let (lo, hi) = indexing::slice_bounds(*start, *end, ins[0].shape()[a]);
            let part = ins[0].slice_axis(Axis(a), ndarray::Slice::from(lo..hi.max(lo)));
            (part.to_owned(), Aux::None)
        }
        Op::Unsqueeze { .. } | Op::Squeeze { .. } => {
            let per = op.output_shape(name, &[&ins[0].shape()[1..]])?;
            let mut dim = vec![ins[0].shape()[0]];
            dim.extend(per);
            (
                ins[0]
                    .to_shape(IxDyn(&dim))
                    .map_err(|e| Error::Unsupported(e.to_string()))?
                    .into_owned(),
                Aux::None,
            )
        }
        Op::Dropout { .. } => (ins[0].clone(), Aux::None),
        Op::Custom(c) => (c.forward(ins)?, Aux::None),
        Op::FakeQuant(fq) => {
            let (y, cache) = qat::fake_quant_eval(fq, ins[0]);
            (y, keep.map_or(Aux::None, |_| Aux::FakeQuant(cache)))
        }
        Op::QatConv2d(q) => {
            let (y, cache, _) =
                qat::qat_conv_forward(q, as_4d(ins[0], "qat_conv2d", node)?, false)?;
            (
                y.into_dyn(),
                keep.map_or(Aux::None, |_| Aux::QatConv(Box::new(cache))),
            )
        }
        Op::QatLinear(q) => {
            let (y, cache) = qat::qat_linear_forward(q, as_2d(ins[0], "qat_linear", node)?)?;
            (
                y.into_dyn(),
                keep.map_or(Aux::None, |_| Aux::QatLinear(Box::new(cache))),
            )
        }
        Op::Input { .. }
        | Op::BatchNorm2d(_)
        | Op::Embedding(_)
        | Op::Cast { .. }
        | Op::Positions { .. }
        | Op::Where => {
            return Err(Error::Unsupported(format!(
                "`{name}` ({}) cannot be evaluated here",
                op.kind()
            )))
        }
    })
}

/// The per-sample shape a Reshape node gives an input of full shape `x`.
pub(crate) fn reshape_target(op: &Op, name: &str, x: &[usize]) -> Result<Vec<usize>> {
    match op {
        Op::Reshape { shape } if !x.is_empty() => nd::reshape_shape(name, shape, &x[1..]),
        _ => Err(Error::shape(op.kind(), Some(name), "[N, …]", x)),
    }
}
