//! BatchNorm folding for inference.

use crate::error::Result;
use crate::model::{Graph, Op};
use std::collections::HashMap;

/// Folds every inference-mode BatchNorm2d whose input is a Conv2d used by nothing else into
/// that convolution: `W' = W·γ/σ`, `b' = (b − μ)·γ/σ + β` per output channel with
/// `σ = √(running_var + eps)`. The BatchNorm node disappears and its consumers read the
/// convolution (which keeps its name). Other BatchNorms are left as they are.
///
/// # Errors
/// Only the graph's own re-validation errors, which a valid input graph cannot cause.
pub fn fold_batch_norms(graph: &Graph) -> Result<Graph> {
    let mut specs = graph.to_specs();
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut remove = Vec::new();
    for (i, node) in graph.nodes().iter().enumerate() {
        let Op::BatchNorm2d(bn) = &node.op else {
            continue;
        };
        let conv_id = node.inputs[0];
        let single_use = graph.consumers(conv_id).len() == 1 && graph.output_id() != conv_id;
        let Op::Conv2d(conv) = &graph.node(conv_id).op else {
            continue;
        };
        if !single_use {
            continue;
        }
        let mut folded = conv.clone();
        let out = folded.out_channels();
        let mut bias = folded
            .bias
            .take()
            .unwrap_or_else(|| ndarray::Array1::zeros(out));
        for c in 0..out {
            let k = bn.gamma[c] / (bn.running_var[c] + bn.eps).sqrt();
            folded
                .weight
                .index_axis_mut(ndarray::Axis(0), c)
                .mapv_inplace(|w| w * k);
            bias[c] = (bias[c] - bn.running_mean[c]) * k + bn.beta[c];
        }
        folded.bias = Some(bias);
        specs[conv_id.index()].op = Op::Conv2d(folded);
        renamed.insert(node.name.clone(), graph.node(conv_id).name.clone());
        remove.push(i);
    }
    for &i in remove.iter().rev() {
        specs.remove(i);
    }
    for s in &mut specs {
        for inp in &mut s.inputs {
            if let Some(to) = renamed.get(inp) {
                *inp = to.clone();
            }
        }
    }
    let outs: Vec<&str> = graph
        .output_names()
        .into_iter()
        .map(|o| renamed.get(o).map_or(o, String::as_str))
        .collect();
    Graph::from_specs_with_outputs(specs, &outs)
}
