//! Forward passes: plain inference, inference with activation taps, and traced passes that
//! keep what backward needs.

use super::graph::{Graph, Node, NodeId};
use super::layers::{self, BnCache};
use super::op::Op;
use super::qat;
use crate::error::{Error, Result};
use crate::tensor::{as_2d, as_4d, Tensor};
use ndarray::{Array4, ArrayD, Axis, IxDyn};
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
        self.forward_with(x, &mut |_, _, _| {})
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
        self.check_input(x)?;
        let n = self.nodes().len();
        let last_use = self.last_uses();
        let mut values: Vec<Option<Tensor>> = vec![None; n];
        let packed = self.packed_linears();
        for (i, node) in self.nodes().iter().enumerate() {
            let out = {
                let ins = gather(&values, node)?;
                match (&node.op, packed.and_then(|p| p[i].as_ref())) {
                    (Op::Linear(_), Some(p)) => p
                        .forward(as_2d(ins[0], "linear", Some(&node.name))?)?
                        .into_dyn(),
                    _ => match &node.op {
                        Op::Input { .. } => x.clone(),
                        Op::Conv2d(c) => {
                            layers::conv2d_infer(c, as_4d(ins[0], "conv2d", Some(&node.name))?)?
                                .into_dyn()
                        }
                        Op::BatchNorm2d(bn) => layers::batch_norm_eval(
                            bn,
                            as_4d(ins[0], "batch_norm2d", Some(&node.name))?,
                        )
                        .into_dyn(),
                        op => eval(op, &node.name, &ins, None)?.0,
                    },
                }
            };
            tap(NodeId(i), node, &out);
            values[i] = Some(out);
            for inp in &node.inputs {
                if last_use[inp.0] == i {
                    values[inp.0] = None;
                }
            }
        }
        values[self.output_id().0]
            .take()
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

fn gather<'a>(values: &'a [Option<Tensor>], node: &Node) -> Result<Vec<&'a Tensor>> {
    node.inputs
        .iter()
        .map(|i| {
            values[i.0]
                .as_ref()
                .ok_or_else(|| Error::Unsupported(format!("input of `{}` was dropped", node.name)))
        })
        .collect()
}

/// Evaluates a stateless op (BatchNorm in inference mode is handled by callers). With
/// `keep` set, keeps the backward state.
fn eval(op: &Op, name: &str, ins: &[&Tensor], keep: Option<()>) -> Result<(Tensor, Aux)> {
    let node = Some(name);
    Ok(match op {
        Op::Linear(l) => (
            layers::linear_forward(l, as_2d(ins[0], "linear", node)?)?.into_dyn(),
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
        Op::Flatten => {
            let n = ins[0].shape()[0];
            let f = ins[0].len() / n.max(1);
            (
                ins[0]
                    .to_shape(IxDyn(&[n, f]))
                    .map_err(|e| Error::Unsupported(e.to_string()))?
                    .into_owned(),
                Aux::None,
            )
        }
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
        Op::Softmax => (softmax_axis1(ins[0]), Aux::None),
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

/// Softmax along axis 1, stabilised by subtracting each lane's maximum.
pub(crate) fn softmax_axis1(x: &Tensor) -> Tensor {
    let mut y = x.clone();
    for mut lane in y.lanes_mut(Axis(1)) {
        let m = lane.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        lane.mapv_inplace(|v| (v - m).exp());
        let s = lane.sum();
        lane.mapv_inplace(|v| v / s);
    }
    y
}
