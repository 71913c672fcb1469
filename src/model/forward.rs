//! Forward passes: plain inference, inference with activation taps, and traced passes that
//! keep what backward needs.

use super::graph::{Graph, Node, NodeId};
use super::layers::{self, BnCache};
use super::nd;
use super::op::Op;
use super::qat;
use crate::error::{Error, Result};
use crate::tensor::{as_2d, as_4d, view_4d, Tensor};
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
    pub(crate) values: Vec<Tensor>,
    pub(crate) aux: Vec<Aux>,
    pub(crate) mode: Mode,
}

impl Trace {
    /// The output of node `id`.
    ///
    /// # Panics
    /// If `id` does not come from the traced graph (ids are only handed out by a graph).
    pub fn value(&self, id: NodeId) -> &Tensor {
        &self.values[id.0]
    }
    /// The mode the pass ran in.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

impl Graph {
    fn check_input(&self, x: &Tensor) -> Result<()> {
        let want = self.input_shape();
        if x.ndim() != want.len() + 1 || &x.shape()[1..] != want {
            return Err(Error::shape(
                "forward",
                Some(&self.node(self.input_id()).name),
                format!("[N, {}]", fmt_dims(want)),
                x.shape(),
            ));
        }
        if x.shape()[0] == 0 {
            return Err(Error::Empty("forward input batch has no samples".into()));
        }
        Ok(())
    }

    /// Runs the graph in inference mode on a batch `x` of shape `[N, ...input_shape]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `x` does not fit the input, [`Error::Empty`] for a batch
    /// of zero samples, or an error from a custom op.
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
        self.infer(x, None)
    }

    /// For each node, the index of the last node that reads its value (`usize::MAX` for the
    /// graph output, 0 for a value nobody reads): an inference pass may drop a value once
    /// that node has run.
    pub(crate) fn last_uses(&self) -> Vec<usize> {
        let mut last_use = vec![0usize; self.nodes().len()];
        for (i, node) in self.nodes().iter().enumerate() {
            for inp in &node.inputs {
                last_use[inp.0] = i;
            }
        }
        last_use[self.output_id().0] = usize::MAX;
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
        self.infer(x, Some(tap))
    }

    /// The inference pass behind [`Graph::forward`] and [`Graph::forward_with`]. The input
    /// is never copied: Linear and Conv2d read it in place and Flatten reshapes it as a view.
    /// An element-wise op (ReLU, ReLU6, inference Dropout) or a Flatten that is the last
    /// reader of a value the pass owns reuses that value's buffer.
    fn infer(&self, x: &Tensor, tap: Option<&mut Tap<'_>>) -> Result<Tensor> {
        self.check_input(x)?;
        let macs = self.macs_per_sample().saturating_mul(x.shape()[0] as u64);
        crate::kernels::parallel::session(macs, || self.infer_checked(x, tap))
    }

    fn infer_checked(&self, x: &Tensor, mut tap: Option<&mut Tap<'_>>) -> Result<Tensor> {
        let n = self.nodes().len();
        let last_use = self.last_uses();
        let mut values: Vec<Slot<'_>> = (0..n).map(|_| Slot::Dropped).collect();
        let packed = self.packed_linears();
        for (i, node) in self.nodes().iter().enumerate() {
            let name = Some(node.name.as_str());
            let out = match (&node.op, packed.and_then(|p| p[i].as_ref())) {
                (Op::Input { .. }, _) => Slot::Input,
                (Op::Linear(l), Some(p)) => {
                    let v = input_view(&values, node, x)?;
                    Slot::Owned(layers::over_rows(v, l.in_features(), name, |rows| {
                        p.forward(rows)
                    })?)
                }
                (Op::Conv2d(c), _) => {
                    let v = input_view(&values, node, x)?;
                    Slot::Owned(layers::conv2d_infer(c, view_4d(v, "conv2d", name)?)?.into_dyn())
                }
                (Op::BatchNorm2d(bn), _) => {
                    let v = input_view(&values, node, x)?;
                    Slot::Owned(
                        layers::batch_norm_eval(bn, view_4d(v, "batch_norm2d", name)?).into_dyn(),
                    )
                }
                (Op::Flatten, _) => match flatten_in_place(&mut values, node, i, &last_use, x)? {
                    Some(slot) => slot,
                    None => Slot::Owned(generic(&mut values, node, x)?),
                },
                (Op::ReLU | Op::ReLU6 | Op::Dropout { .. }, _) => {
                    match take_last_read(&mut values, node, i, &last_use, |_| true) {
                        Some(mut t) => {
                            match node.op {
                                Op::ReLU => t.mapv_inplace(|v| v.max(0.0)),
                                Op::ReLU6 => t.mapv_inplace(|v| v.clamp(0.0, 6.0)),
                                _ => {}
                            }
                            Slot::Owned(t)
                        }
                        None => Slot::Owned(generic(&mut values, node, x)?),
                    }
                }
                _ => Slot::Owned(generic(&mut values, node, x)?),
            };
            if let Some(tap) = tap.as_mut() {
                if let Some(t) = out.tensor(x) {
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
        std::mem::replace(&mut values[self.output_id().0], Slot::Dropped)
            .into_tensor(x)
            .ok_or_else(|| Error::Unsupported("graph output was not computed".into()))
    }

    /// Runs the graph and keeps every node's output and backward state in a [`Trace`].
    /// In [`Mode::Training`], BatchNorm uses batch statistics and updates its running
    /// statistics in the graph, and Dropout draws its masks from `rng`.
    ///
    /// # Errors
    /// As [`Graph::forward`]; also [`Error::InvalidConfig`] for training-mode BatchNorm on a
    /// batch with a single value per channel.
    pub fn trace(&mut self, x: &Tensor, mode: Mode, rng: &mut dyn RngCore) -> Result<Trace> {
        self.check_input(x)?;
        let n = self.nodes().len();
        let mut values: Vec<Tensor> = Vec::with_capacity(n);
        let mut aux = Vec::with_capacity(n);
        for i in 0..n {
            let (out, a) = {
                let node = &self.nodes()[i];
                let ins: Vec<&Tensor> = node.inputs.iter().map(|j| &values[j.0]).collect();
                match (&node.op, mode) {
                    (Op::Input { .. }, _) => (x.clone(), Aux::None),
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
                        layers::batch_norm_eval(
                            bn,
                            as_4d(ins[0], "batch_norm2d", Some(&node.name))?,
                        )
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
                    (op, _) => eval(op, &node.name, &ins, Some(()))?,
                }
            };
            values.push(out);
            aux.push(a);
        }
        Ok(Trace { values, aux, mode })
    }
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

fn fmt_dims(d: &[usize]) -> String {
    d.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`Graph::forward_with`] calls with each node's output.
type Tap<'t> = dyn FnMut(NodeId, &Node, &Tensor) + 't;

/// A value of an inference pass: the caller's input, a reshaped view of it, or a tensor
/// the pass produced (until its last reader has run).
pub(crate) enum Slot<'x> {
    Dropped,
    Input,
    Reshaped(ArrayViewD<'x, f32>),
    Owned(Tensor),
}

impl Slot<'_> {
    /// The value as a tensor (a reshaped view is copied), `None` once dropped.
    pub(crate) fn tensor<'a>(&'a self, x: &'a Tensor) -> Option<std::borrow::Cow<'a, Tensor>> {
        use std::borrow::Cow;
        match self {
            Slot::Owned(t) => Some(Cow::Borrowed(t)),
            Slot::Input => Some(Cow::Borrowed(x)),
            Slot::Reshaped(v) => Some(Cow::Owned(v.to_owned())),
            Slot::Dropped => None,
        }
    }

    /// The value as an owned tensor, `None` once dropped.
    pub(crate) fn into_tensor(self, x: &Tensor) -> Option<Tensor> {
        match self {
            Slot::Owned(t) => Some(t),
            Slot::Input => Some(x.clone()),
            Slot::Reshaped(v) => Some(v.to_owned()),
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
    x: &'x Tensor,
) -> Result<Option<Slot<'x>>> {
    let reshape = |e: ndarray::ShapeError| Error::Unsupported(e.to_string());
    let [j] = node.inputs.as_slice() else {
        return Ok(None);
    };
    let view = match &values[j.0] {
        Slot::Input => x.view(),
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
pub(crate) fn input_view<'v>(
    values: &'v [Slot<'_>],
    node: &Node,
    x: &'v Tensor,
) -> Result<ArrayViewD<'v, f32>> {
    let j = node.inputs.first().ok_or_else(|| dropped(node))?;
    match &values[j.0] {
        Slot::Owned(t) => Ok(t.view()),
        Slot::Input => Ok(x.view()),
        Slot::Reshaped(v) => Ok(v.view()),
        Slot::Dropped => Err(dropped(node)),
    }
}

/// Evaluates `node` by [`eval`] (reshaped views among its inputs are copied first).
fn generic(values: &mut [Slot<'_>], node: &Node, x: &Tensor) -> Result<Tensor> {
    let ins = gather_slots(values, node, x)?;
    Ok(eval(&node.op, &node.name, &ins, None)?.0)
}

/// `node`'s inputs as tensors (reshaped views among them are copied into their slots).
///
/// # Errors
/// When an input was dropped.
pub(crate) fn gather_slots<'v>(
    values: &'v mut [Slot<'_>],
    node: &Node,
    x: &'v Tensor,
) -> Result<Vec<&'v Tensor>> {
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
            Slot::Input => Ok(x),
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
        Op::MatMul => (nd::matmul_forward(ins[0].view(), ins[1].view())?, Aux::None),
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
        Op::Input { .. } | Op::BatchNorm2d(_) => {
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
