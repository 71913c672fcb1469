//! The graph IR: nodes in topological order, unique dotted names, shape inference, surgery,
//! and parameter visiting by name.

use super::op::{Op, ParamKind};
use crate::error::{Error, Result};
use crate::kernels::PackedLinear;
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

/// A neural network as a DAG of [`Node`]s with exactly one input and one output.
///
/// Nodes are kept in topological order, so a forward pass is a single sweep. Per-sample
/// shapes (without the batch axis) are inferred and checked when the graph is built and after
/// every surgery, so a graph that exists is a graph that runs.
///
/// Inference ([`Graph::forward`]) packs the float Linear weights once for the AVX-512F
/// kernel ([`crate::kernels::PackedLinear`]) and keeps the packed copy until a method that
/// takes `&mut self` runs: every edit of the weights goes through one, so a stale copy
/// cannot be used.
#[derive(Clone, Debug)]
pub struct Graph {
    nodes: Vec<Node>,
    shapes: Vec<Vec<usize>>,
    input: NodeId,
    output: NodeId,
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
        let Some(&out_spec) = index.get(output) else {
            return Err(Error::UnknownNode {
                node: "(graph output)".into(),
                input: output.to_string(),
            });
        };
        let inputs = specs
            .iter()
            .filter(|s| matches!(s.op, Op::Input { .. }))
            .count();
        if inputs != 1 {
            return Err(Error::InputCount { found: inputs });
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
        let input = nodes
            .iter()
            .position(|nd| matches!(nd.op, Op::Input { .. }))
            .map(NodeId)
            .ok_or(Error::InputCount { found: 0 })?;
        let mut g = Graph {
            nodes,
            shapes: Vec::new(),
            input,
            output: NodeId(position[out_spec]),
            packed: PackedCache::default(),
        };
        g.infer_shapes()?;
        Ok(g)
    }

    fn infer_shapes(&mut self) -> Result<()> {
        self.packed = PackedCache::default();
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let ins: Vec<&[usize]> = node.inputs.iter().map(|i| shapes[i.0].as_slice()).collect();
            let shape = node.op.output_shape(&node.name, &ins)?;
            // Per-sample values past the limits would size every forward pass's buffers;
            // checking each node also keeps the next node's shape arithmetic from overflowing.
            crate::limits::Limits::default()
                .check_elements(&shape, &format!("output of node `{}`", node.name))?;
            shapes.push(shape);
        }
        self.shapes = shapes;
        Ok(())
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

    /// The input node.
    pub fn input_id(&self) -> NodeId {
        self.input
    }

    /// The output node.
    pub fn output_id(&self) -> NodeId {
        self.output
    }

    /// The per-sample input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[self.input.0]
    }

    /// The per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.shapes[self.output.0]
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
        self.output = self.id(name)?;
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
        let output = if self.output == after_id {
            name.to_string()
        } else {
            self.nodes[self.output.0].name.clone()
        };
        *self = Graph::from_specs(specs, &output)?;
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
        self.nodes
            .iter()
            .zip(&self.shapes)
            .map(|(n, s)| n.op.macs(s))
            .fold(0, u64::saturating_add)
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
                macs: n.op.macs(&self.shapes[i]),
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
