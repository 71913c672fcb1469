//! The model graph: a small DAG IR with float forward and backward passes.
//!
//! - [`Graph`]: nodes in topological order, each with a unique dotted name, an [`Op`] and its
//!   input ids; per-sample shapes are inferred and checked on construction.
//! - [`GraphBuilder`]: build a graph in code with seeded initialisation.
//! - Forward: [`Graph::forward`] (one float input), [`Graph::run`] (named inputs of any
//!   element type, several outputs), [`Graph::forward_with`] (activation taps),
//!   [`Graph::trace`] / [`Graph::trace_inputs`] (keep what backward needs).
//! - Backward: [`Graph::backward`], [`Graph::backward_with`] (extra gradients at any node).
//! - Parameters by dotted name: [`Graph::visit_params`], [`Graph::map_params`].
//! - Surgery: [`Graph::replace_op`], [`Graph::insert_after`], [`Graph::consumers`].
//! - [`zoo`]: LeNet-300-100, LeNet-5, a digits CNN, a small VGG with BatchNorm and a small
//!   ResNet.

mod attention;
mod backward;
mod bert;
mod builder;
mod decoder;
mod forward;
mod graph;
mod indexing;
mod layers;
mod llama;
mod nd;
mod op;
mod qat;
mod quantized;
pub mod zoo;

pub use backward::Gradients;
pub use builder::{Conv2dConfig, GraphBuilder};
pub(crate) use forward::{flatten_in_place, gather_slots, input_view, Slot};
pub use forward::{Mode, Trace};
pub use graph::{Graph, Node, NodeCost, NodeId, NodeSpec};
pub use nd::broadcast_shapes;
pub use op::{
    Attention, BatchNorm2d, Binary, BinaryConst, Conv2d, CustomOp, Dim, Embedding, FakeQuant,
    LayerNorm, Linear, Op, ParamKind, Pool2d, QatConv2d, QatLinear, Reduction, RmsNorm, Rotary,
    Unary, WeightFakeQuant,
};
pub use quantized::{ActivationGranularity, DynamicLinear};
