//! The graph IR: nodes in topological order, unique dotted names, shape inference, surgery,
//! and parameter visiting by name.

use super::op::{Op, ParamKind};
use crate::error::{Error, Result};
use crate::kernels::PackedLinear;
use crate::tensor::DType;
use ndarray::{ArrayViewD, ArrayViewMutD};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

/// A node's position in its graph's topological order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) usize);

impl NodeId {
    /// The index into [`Graph::nodes`].
    pub fn index(self) -> usize {
        self.0
    }

    pub(crate) fn from_index(i: usize) -> Self {
        NodeId(i)
    }
}

/// One node of a [`Graph`].
#[derive(Clone, Debug)]
pub struct Node {
    /// Unique dotted name (`features.3.conv`); parameters are `name.weight`, `name.bias`, ...
    pub name: String,
    /// What the node computes.
    pub op: Op,
    /// Producers of the node's inputs, in argument order.
    pub inputs: Vec<NodeId>,
}

/// A node described by name, before the graph is ordered and checked (see
/// [`Graph::from_specs`]).
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Unique node name.
    pub name: String,
    /// The op.
    pub op: Op,
    /// Names of the input nodes, in argument order.
    pub inputs: Vec<String>,
}

impl NodeSpec {
    /// A spec from a name, an op and input names.
    pub fn new(name: impl Into<String>, op: Op, inputs: &[&str]) -> Self {
        NodeSpec {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Cost of one node for one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCost {
    /// Node name.
    pub name: String,
    /// Op kind.
    pub kind: String,
    /// Parameter count (weights and biases; buffers excluded).
    pub params: u64,
    /// Multiply-accumulates per sample.
    pub macs: u64,
    /// Output activation bytes per sample (f32).
    pub activation_bytes: u64,
}

/// A neural network as a DAG of [`Node`]s with one or more named inputs and outputs.
///
/// Nodes are kept in topological order, so a forward pass is a single sweep. Per-sample
/// shapes (without the batch axis) and element types are inferred and checked when the graph
/// is built and after every surgery, so a graph that exists is a graph that runs. A dynamic
/// input axis (a sequence length) is checked at build time with its example size and again
/// with the sizes of each run.
///
/// Inference ([`Graph::forward`]) packs the float Linear weights once for the AVX-512F
/// kernel ([`crate::kernels::PackedLinear`]) and keeps the packed copy until a method that
/// takes `&mut self` runs: every edit of the weights goes through one, so a stale copy
/// cannot be used.
#[derive(Clone, Debug)]
pub struct Graph {
    nodes: Vec<Node>,
    shapes: Vec<Vec<usize>>,
    dtypes: Vec<DType>,
    inputs: Vec<NodeId>,
    outputs: Vec<NodeId>,
    packed: PackedCache,
}

/// The packed Linear weights of float inference, one entry per node, built on first use.
#[derive(Clone, Default)]
struct PackedCache(OnceLock<Arc<[Option<PackedLinear>]>>);

impl std::fmt::Debug for PackedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let built = self.0.get().map(|p| p.iter().flatten().count());
        write!(f, "PackedCache({built:?} packed layers)")
    }
}

impl Graph {
    /// Orders `specs` topologically, checks names, arity and shapes, and returns the graph
    /// whose output is the node named `output`.
    ///
    /// # Errors
    /// [`Error::DuplicateNode`], [`Error::UnknownNode`], [`Error::Cycle`],
    /// [`Error::InputCount`], and the shape and configuration errors of each op.
    pub fn from_specs(specs: Vec<NodeSpec>, output: &str) -> Result<Graph> {
        Graph::from_specs_with_outputs(specs, &[output])
    }

    /// As [`Graph::from_specs`], with several outputs (in the order [`Graph::run`] returns
    /// them; the first is the one [`Graph::forward`] and training use).
    ///
    /// # Errors
    /// As [`Graph::from_specs`]; also [`Error::InvalidConfig`] for an empty output list,
    /// and [`Error::DtypeMismatch`] where a node reads a value of the wrong element type.
    pub fn from_specs_with_outputs(specs: Vec<NodeSpec>, outputs: &[&str]) -> Result<Graph> {
        if outputs.is_empty() {
            return Err(Error::config(
                "graph outputs",
                "at least one output is needed",
            ));
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            if index.insert(s.name.as_str(), i).is_some() {
                return Err(Error::DuplicateNode(s.name.clone()));
            }
        }
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(specs.len());
        for s in &specs {
            let mut d = Vec::with_capacity(s.inputs.len());
            for inp in &s.inputs {
                let j = *index.get(inp.as_str()).ok_or_else(|| Error::UnknownNode {
                    node: s.name.clone(),
                    input: inp.clone(),
                })?;
                d.push(j);
            }
            deps.push(d);
        }
        let out_specs = outputs
            .iter()
            .map(|&output| {
                index
                    .get(output)
                    .copied()
                    .ok_or_else(|| Error::UnknownNode {
                        node: "(graph output)".into(),
                        input: output.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if !specs.iter().any(|s| matches!(s.op, Op::Input { .. })) {
            return Err(Error::InputCount { found: 0 });
        }
        // Kahn's algorithm, always taking the earliest ready spec, so specs that are already in
        // order keep their order.
        let n = specs.len();
        let mut pending: Vec<usize> = deps.iter().map(Vec::len).collect();
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, d) in deps.iter().enumerate() {
            for &j in d {
                users[j].push(i);
            }
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|&i| pending[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &u in &users[i] {
                pending[u] -= 1;
                if pending[u] == 0 {
                    ready.insert(u);
                }
            }
        }
        if order.len() != n {
            let nodes = (0..n)
                .filter(|&i| pending[i] > 0)
                .map(|i| specs[i].name.clone())
                .collect();
            return Err(Error::Cycle { nodes });
        }
        let mut position = vec![0; n];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos;
        }
        let mut slots: Vec<Option<NodeSpec>> = specs.into_iter().map(Some).collect();
        let mut nodes = Vec::with_capacity(n);
        for &i in &order {
            let spec = slots[i]
                .take()
                .ok_or_else(|| Error::DuplicateNode(String::new()))?;
            nodes.push(Node {
                name: spec.name,
                op: spec.op,
                inputs: deps[i].iter().map(|&j| NodeId(position[j])).collect(),
            });
        }
        let inputs = (0..nodes.len())
            .filter(|&i| matches!(nodes[i].op, Op::Input { .. }))
            .map(NodeId)
            .collect();
        let mut g = Graph {
            nodes,
            shapes: Vec::new(),
            dtypes: Vec::new(),
            inputs,
            outputs: out_specs.iter().map(|&o| NodeId(position[o])).collect(),
            packed: PackedCache::default(),
        };
        g.infer_shapes()?;
        Ok(g)
    }

    fn infer_shapes(&mut self) -> Result<()> {
        self.packed = PackedCache::default();
        self.check_symbols()?;
        self.shapes = self.shapes_with(None)?;
        let mut dtypes: Vec<DType> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let ins: Vec<DType> = node.inputs.iter().map(|i| dtypes[i.0]).collect();
            dtypes.push(node.op.output_dtype(&node.name, &ins)?);
        }
        self.dtypes = dtypes;
        Ok(())
    }

    /// Inputs that share a dynamic symbol must also share its build-time example size, or
    /// the graph would be checked with shapes no run can have.
    fn check_symbols(&self) -> Result<()> {
        let mut seen: HashMap<&str, (usize, &str)> = HashMap::new();
        for node in &self.nodes {
            if let Op::Input { shape, dynamic, .. } = &node.op {
                for (axis, sym) in dynamic {
                    let Some(&size) = shape.get(*axis) else {
                        continue; // output_shape names the bad axis
                    };
                    match seen.insert(sym, (size, &node.name)) {
                        Some((other, first)) if other != size => {
                            return Err(Error::config(
                                format!("input `{}`", node.name),
                                format!(
                                    "dynamic size `{sym}` is {size} here but {other} at input `{first}`"
                                ),
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Every node's per-sample shape, with the inputs' declared shapes, or (`fed`, by
    /// position in [`Graph::input_ids`]) the shapes of a run, batch first.
    fn shapes_with(&self, fed: Option<&[&[usize]]>) -> Result<Vec<Vec<usize>>> {
        let mut next_input = 0;
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let shape = match &node.op {
                Op::Input { shape, .. } => {
                    node.op.output_shape(&node.name, &[])?;
                    let run = fed.and_then(|f| f.get(next_input)).map(|s| s[1..].to_vec());
                    next_input += 1;
                    run.unwrap_or_else(|| shape.clone())
                }
                op => {
                    let ins: Vec<&[usize]> =
                        node.inputs.iter().map(|i| shapes[i.0].as_slice()).collect();
                    op.output_shape(&node.name, &ins)?
                }
            };
            // Per-sample values past the limits would size every forward pass's buffers;
            // checking each node also keeps the next node's shape arithmetic from overflowing.
            crate::limits::Limits::default()
                .check_elements(&shape, &format!("output of node `{}`", node.name))?;
            shapes.push(shape);
        }
        Ok(shapes)
    }

    /// Every node's per-sample shape for a run whose inputs (by position in
    /// [`Graph::input_ids`]) have these full shapes, batch first, after checking them
    /// against the declared inputs: rank, fixed sizes, one batch, and one size per
    /// dynamic symbol. `None` when they are the build-time shapes.
    pub(crate) fn run_shapes(&self, fed: &[&[usize]]) -> Result<Option<Vec<Vec<usize>>>> {
        let bad = |node: &Node, reason: String| Error::BadInput {
            input: node.name.clone(),
            reason,
        };
        let mut batch: Option<(usize, &str)> = None;
        let mut sizes: HashMap<&str, (usize, &str)> = HashMap::new();
        let mut same = true;
        for (&id, &full) in self.inputs.iter().zip(fed) {
            let node = &self.nodes[id.0];
            let Op::Input { shape, dynamic, .. } = &node.op else {
                continue;
            };
            let wrong_shape = || {
                let dims: Vec<String> = shape
                    .iter()
                    .enumerate()
                    .map(|(a, d)| match dynamic.iter().find(|(axis, _)| *axis == a) {
                        Some((_, sym)) => sym.clone(),
                        None => d.to_string(),
                    })
                    .collect();
                Error::shape(
                    "forward",
                    Some(&node.name),
                    format!("[N, {}]", dims.join(", ")),
                    full,
                )
            };
            if full.len() != shape.len() + 1 {
                return Err(wrong_shape());
            }
            match batch {
                None if full[0] == 0 => {
                    return Err(Error::Empty(format!(
                        "the batch fed to `{}` has no samples",
                        node.name
                    )))
                }
                None => batch = Some((full[0], &node.name)),
                Some((b, first)) if b != full[0] => {
                    return Err(bad(
                        node,
                        format!("batch {} differs from input `{first}`'s {b}", full[0]),
                    ))
                }
                Some(_) => {}
            }
            for (axis, (&want, &got)) in shape.iter().zip(&full[1..]).enumerate() {
                match dynamic.iter().find(|(a, _)| *a == axis) {
                    None if want != got => return Err(wrong_shape()),
                    None => {}
                    Some((_, sym)) => {
                        if got == 0 {
                            return Err(bad(node, format!("dynamic size `{sym}` is 0")));
                        }
                        same &= got == want;
                        match sizes.insert(sym, (got, &node.name)) {
                            Some((other, first)) if other != got => {
                                return Err(bad(
                                    node,
                                    format!("`{sym}` is {got} here but {other} at input `{first}`"),
                                ))
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if same {
            return Ok(None);
        }
        self.shapes_with(Some(fed)).map(Some)
    }

    /// The graph as specs (for rebuilding after surgery).
    pub fn to_specs(&self) -> Vec<NodeSpec> {
        self.nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                op: n.op.clone(),
                inputs: n
                    .inputs
                    .iter()
                    .map(|i| self.nodes[i.0].name.clone())
                    .collect(),
            })
            .collect()
    }

    /// All nodes, in topological order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub(crate) fn nodes_mut(&mut self) -> &mut [Node] {
        self.packed = PackedCache::default();
        &mut self.nodes
    }

    /// The packed weight of every float Linear node (by node index), packed on first use;
    /// `None` when this CPU has no packed path.
    pub(crate) fn packed_linears(&self) -> Option<&[Option<PackedLinear>]> {
        if !PackedLinear::is_supported() {
            return None;
        }
        let packed = self.packed.0.get_or_init(|| {
            self.nodes
                .iter()
                .map(|node| match &node.op {
                    Op::Linear(l) => {
                        PackedLinear::new(l.weight.view(), l.bias.as_ref().map(|b| b.view())).ok()
                    }
                    _ => None,
                })
                .collect()
        });
        Some(packed)
    }

    /// The node with id `id`.
    ///
    /// # Panics
    /// If `id` does not come from this graph (ids are only handed out by the graph itself).
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    /// The id of the node named `name`.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name).map(NodeId)
    }

    /// The id of the node named `name`, or [`Error::UnknownNode`].
    ///
    /// # Errors
    /// When no node has that name.
    pub fn id(&self, name: &str) -> Result<NodeId> {
        self.find(name).ok_or_else(|| Error::UnknownNode {
            node: String::new(),
            input: name.to_string(),
        })
    }

    /// The per-sample output shape of node `id` (without the batch axis).
    ///
    /// # Panics
    /// If `id` does not come from this graph (as [`Graph::node`]).
    pub fn shape(&self, id: NodeId) -> &[usize] {
        &self.shapes[id.0]
    }

    /// The element type of node `id`'s output.
    ///
    /// # Panics
    /// If `id` does not come from this graph (as [`Graph::node`]).
    pub fn dtype(&self, id: NodeId) -> DType {
        self.dtypes[id.0]
    }

    /// The first input node (the only one of a CNN or MLP).
    pub fn input_id(&self) -> NodeId {
        self.inputs[0]
    }

    /// Every input node, in topological order (the order [`Graph::run`] checks them in).
    pub fn input_ids(&self) -> &[NodeId] {
        &self.inputs
    }

    /// The first output node.
    pub fn output_id(&self) -> NodeId {
        self.outputs[0]
    }

    /// Every output node, in the order [`Graph::run`] returns them.
    pub fn output_ids(&self) -> &[NodeId] {
        &self.outputs
    }

    /// The first input's per-sample shape (a dynamic axis at its build-time size).
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[self.input_id().0]
    }

    /// The first output's per-sample shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.shapes[self.output_id().0]
    }

    /// The producers of node `id`'s inputs.
    ///
    /// # Panics
    /// If `id` does not come from this graph (as [`Graph::node`]).
    pub fn producers(&self, id: NodeId) -> &[NodeId] {
        &self.nodes[id.0].inputs
    }

    /// The nodes that take node `id`'s output as an input, in topological order.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&j| self.nodes[j].inputs.contains(&id))
            .map(NodeId)
            .collect()
    }

    /// Makes the node named `name` the graph output.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] when no node has that name.
    pub fn set_output(&mut self, name: &str) -> Result<()> {
        self.packed = PackedCache::default();
        self.outputs = vec![self.id(name)?];
        Ok(())
    }

    /// Replaces the op of node `name` and re-checks the whole graph's shapes; on error the
    /// graph is left unchanged.
    ///
    /// # Errors
    /// [`Error::UnknownNode`], or the shape errors the new op causes anywhere downstream.
    pub fn replace_op(&mut self, name: &str, op: Op) -> Result<Op> {
        self.packed = PackedCache::default();
        let id = self.id(name)?;
        let old = std::mem::replace(&mut self.nodes[id.0].op, op);
        if let Err(e) = self.infer_shapes() {
            self.nodes[id.0].op = old;
            return Err(e);
        }
        Ok(old)
    }

    /// Replaces the ops of several nodes at once (`(name, op)` pairs), re-checking the
    /// graph's shapes once; on error the graph is left unchanged.
    ///
    /// # Errors
    /// As [`Graph::replace_op`].
    pub fn replace_ops(&mut self, ops: Vec<(String, Op)>) -> Result<()> {
        let ids = ops
            .iter()
            .map(|(name, _)| self.id(name))
            .collect::<Result<Vec<_>>>()?;
        self.packed = PackedCache::default();
        let old: Vec<Op> = ids
            .iter()
            .zip(ops)
            .map(|(id, (_, op))| std::mem::replace(&mut self.nodes[id.0].op, op))
            .collect();
        if let Err(e) = self.infer_shapes() {
            for (id, op) in ids.iter().zip(old) {
                self.nodes[id.0].op = op;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Inserts a new single-input node `name` computing `op` on the output of `after`; every
    /// former consumer of `after` (and the graph output, if it was `after`) now reads the new
    /// node instead. Returns the new node's id.
    ///
    /// # Errors
    /// [`Error::UnknownNode`], [`Error::DuplicateNode`], or shape errors.
    pub fn insert_after(&mut self, after: &str, name: &str, op: Op) -> Result<NodeId> {
        self.packed = PackedCache::default();
        let after_id = self.id(after)?;
        let mut specs = self.to_specs();
        for s in &mut specs {
            for inp in &mut s.inputs {
                if inp == after {
                    *inp = name.to_string();
                }
            }
        }
        specs.insert(after_id.0 + 1, NodeSpec::new(name, op, &[after]));
        let outputs: Vec<String> = self
            .outputs
            .iter()
            .map(|&o| {
                if o == after_id {
                    name.to_string()
                } else {
                    self.nodes[o.0].name.clone()
                }
            })
            .collect();
        let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        *self = Graph::from_specs_with_outputs(specs, &outputs)?;
        self.id(name)
    }

    /// Calls `f(name, kind, value)` for every parameter and buffer, in topological order,
    /// with PyTorch-style dotted names (`conv1.weight`, `bn1.running_mean`).
    pub fn visit_params(&self, mut f: impl FnMut(&str, ParamKind, ArrayViewD<'_, f32>)) {
        let mut name = String::new();
        for node in &self.nodes {
            for (kind, value) in node.op.params() {
                name.clear();
                let _ = write!(name, "{}.{}", node.name, kind.suffix());
                f(&name, kind, value);
            }
        }
    }

    /// Calls `f(name, kind, value)` with mutable access to every parameter and buffer (see
    /// [`Graph::visit_params`]). Shapes cannot change through a view, so the graph stays valid.
    pub fn map_params(&mut self, mut f: impl FnMut(&str, ParamKind, ArrayViewMutD<'_, f32>)) {
        self.packed = PackedCache::default();
        let mut name = String::new();
        for node in &mut self.nodes {
            for (kind, value) in node.op.params_mut() {
                name.clear();
                let _ = write!(name, "{}.{}", node.name, kind.suffix());
                f(&name, kind, value);
            }
        }
    }

    /// Mutable access to one op, for edits that keep its shapes (a user's custom update).
    /// Call [`Graph::replace_op`] instead when shapes change.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] when no node has that name.
    pub fn params_of_mut(
        &mut self,
        name: &str,
    ) -> Result<Vec<(ParamKind, ArrayViewMutD<'_, f32>)>> {
        self.packed = PackedCache::default();
        let id = self.id(name)?;
        Ok(self.nodes[id.0].op.params_mut())
    }

    /// The number of trainable parameters (weights and biases, not BatchNorm buffers).
    pub fn param_count(&self) -> usize {
        let mut total = 0;
        self.visit_params(|_, kind, v| {
            if kind.is_trainable() {
                total += v.len();
            }
        });
        total
    }

    /// Multiply-accumulates of one sample through the whole graph.
    pub fn macs_per_sample(&self) -> u64 {
        self.macs_with(&self.shapes)
    }

    /// Multiply-accumulates of one sample with these per-node shapes.
    pub(crate) fn macs_with(&self, shapes: &[Vec<usize>]) -> u64 {
        (0..self.nodes.len())
            .map(|i| self.node_macs(i, shapes))
            .fold(0, u64::saturating_add)
    }

    /// One node's multiply-accumulates per sample: [`Op::macs`], and for a MatMul of two
    /// activations the output's size times the shared axis.
    fn node_macs(&self, i: usize, shapes: &[Vec<usize>]) -> u64 {
        let node = &self.nodes[i];
        match (&node.op, node.inputs.first()) {
            (Op::MatMul, Some(a)) => {
                let k = shapes[a.0].last().copied().unwrap_or(1) as u64;
                shapes[i].iter().fold(k, |m, &d| m.saturating_mul(d as u64))
            }
            (Op::Attention(_), Some(q)) => {
                // Scores and context: Sq · Sk · (width of q + width of the output).
                let (q, k) = (&shapes[q.0], &shapes[node.inputs[1].0]);
                let per = |s: &[usize], i: usize| s.get(i).copied().unwrap_or(0) as u64;
                per(q, 0)
                    .saturating_mul(per(k, 0))
                    .saturating_mul(per(q, 1).saturating_add(per(&shapes[i], 1)))
            }
            _ => node.op.macs(&shapes[i]),
        }
    }

    /// Per-node parameters, multiply-accumulates and activation bytes for one sample.
    pub fn cost(&self) -> Vec<NodeCost> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeCost {
                name: n.name.clone(),
                kind: n.op.kind().to_string(),
                params: n
                    .op
                    .params()
                    .iter()
                    .filter(|(k, _)| k.is_trainable())
                    .map(|(_, v)| v.len() as u64)
                    .sum(),
                macs: self.node_macs(i, &self.shapes),
                activation_bytes: 4 * self.shapes[i].iter().product::<usize>() as u64,
            })
            .collect()
    }

    /// A plain-text table of nodes, shapes, parameters and MACs.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:<20} {:<16} {:<16} {:>10} {:>12}\n",
            "node", "op", "output", "params", "MACs"
        );
        let (mut p, mut m) = (0, 0);
        for (c, shape) in self.cost().iter().zip(&self.shapes) {
            let _ = writeln!(
                s,
                "{:<20} {:<16} {:<16} {:>10} {:>12}",
                c.name,
                c.kind,
                format!("{shape:?}"),
                c.params,
                c.macs
            );
            p += c.params;
            m += c.macs;
        }
        let _ = writeln!(s, "{:<54} {p:>10} {m:>12}", "total");
        s
    }
}
