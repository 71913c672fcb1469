//! The compression-policy space (AMC / HAQ style): per-layer channel-prune ratios and weight
//! bit widths over a given trained model, searched with the same controllers.

use super::controller::Candidate;
use super::search::{Evaluator, Metrics};
use super::space::{checked_choices, code_to_string, SearchSpace};
use crate::error::{Error, Result};
use crate::model::{Graph, Op, ParamKind};
use crate::pruner::{dependency_groups, macs, L1Norm, StructuredPruner};
use crate::tensor::QuantGrid;
use crate::train::{evaluate, InMemoryDataset};
use std::collections::BTreeMap;

/// Per prunable channel group a prune ratio, per Conv2d / Linear a weight bit width.
#[derive(Clone, Debug)]
pub struct CompressionPolicySpace<'a> {
    model: &'a Graph,
    /// Producers of the prunable groups (the names ratios apply to).
    pub groups: Vec<String>,
    /// Conv2d / Linear layers (the names bit widths apply to).
    pub layers: Vec<String>,
    /// Prune-ratio options.
    pub ratios: Vec<f32>,
    /// Bit-width options (2 to 8; symmetric per-output-channel weights).
    pub bits: Vec<u32>,
}

/// A decoded policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `(group producer, ratio)`.
    pub ratios: Vec<(String, f32)>,
    /// `(layer, bits)`.
    pub bits: Vec<(String, u32)>,
}

impl<'a> CompressionPolicySpace<'a> {
    /// The space over `model` with the given options.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for ratios outside `[0, 1)` or bits outside `2..=8`;
    /// [`Error::Empty`] when the model has nothing to prune or quantize.
    pub fn new(model: &'a Graph, ratios: &[f32], bits: &[u32]) -> Result<Self> {
        if ratios.iter().any(|r| !(0.0..1.0).contains(r)) {
            return Err(Error::config("policy space", "ratios must be in [0, 1)"));
        }
        if bits.iter().any(|b| !(2..=8).contains(b)) {
            return Err(Error::config("policy space", "bit widths must be 2 to 8"));
        }
        let deps = dependency_groups(model)?;
        let groups: Vec<String> = deps.prunable().map(|g| g.name().to_string()).collect();
        let layers: Vec<String> = model
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Conv2d(_) | Op::Linear(_)))
            .map(|n| n.name.clone())
            .collect();
        if layers.is_empty() {
            return Err(Error::Empty("layers to compress".into()));
        }
        Ok(CompressionPolicySpace {
            model,
            groups,
            layers,
            ratios: ratios.to_vec(),
            bits: bits.to_vec(),
        })
    }

    /// The policy of a code.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a code that does not fit.
    pub fn policy(&self, code: &[usize]) -> Result<Policy> {
        let c = self.choices();
        if code.len() != c.len() || code.iter().zip(&c).any(|(x, n)| x >= n) {
            return Err(Error::config(
                "policy code",
                format!("`{}` does not fit {c:?}", code_to_string(code)),
            ));
        }
        let (r, b) = code.split_at(self.groups.len());
        Ok(Policy {
            ratios: self
                .groups
                .iter()
                .cloned()
                .zip(r.iter().map(|&i| self.ratios[i]))
                .collect(),
            bits: self
                .layers
                .iter()
                .cloned()
                .zip(b.iter().map(|&i| self.bits[i]))
                .collect(),
        })
    }

    /// The code of a uniform policy (one ratio option and one bits option everywhere).
    pub fn uniform(&self, ratio: usize, bits: usize) -> Vec<usize> {
        let mut c = vec![ratio; self.groups.len()];
        c.extend(vec![bits; self.layers.len()]);
        c
    }

    /// Stored weight bytes of `graph` under `policy`'s bit widths (biases and other
    /// parameters at 32 bits).
    pub fn size_bytes(graph: &Graph, policy: &Policy) -> f64 {
        let mut bits = 0.0f64;
        graph.visit_params(|name, kind, v| {
            if !kind.is_trainable() {
                return;
            }
            let node = name.rsplit_once('.').map_or(name, |(n, _)| n);
            let b = match kind {
                ParamKind::Weight => policy
                    .bits
                    .iter()
                    .find(|(l, _)| l == node)
                    .map_or(32, |(_, b)| *b),
                _ => 32,
            };
            bits += v.len() as f64 * b as f64;
        });
        bits / 8.0
    }
}

impl SearchSpace for CompressionPolicySpace<'_> {
    type Arch = Vec<usize>;

    fn choices(&self) -> Vec<usize> {
        let mut c = vec![self.ratios.len(); self.groups.len()];
        c.extend(vec![self.bits.len(); self.layers.len()]);
        c
    }
    fn encode(&self, arch: &Vec<usize>) -> Vec<usize> {
        arch.clone()
    }
    fn decode(&self, code: &[usize]) -> Result<Vec<usize>> {
        checked_choices(&self.choices())?;
        self.policy(code)?;
        Ok(code.to_vec())
    }

    /// The model pruned by the policy's ratios (L1 criterion) with every weight
    /// fake-quantized to its bit width (symmetric, per output channel), no fine-tuning.
    fn build(&self, arch: &Vec<usize>) -> Result<Graph> {
        let policy = self.policy(arch)?;
        let mut pruner = StructuredPruner::new(L1Norm);
        for (g, r) in &policy.ratios {
            pruner = pruner.with_layer_ratio(g, *r)?;
        }
        let (mut g, _) = pruner.prune(self.model, None)?;
        for (layer, bits) in &policy.bits {
            let q = (1i32 << (bits - 1)) - 1;
            let grid = QuantGrid {
                qmin: -q,
                qmax: q,
                symmetric: true,
            };
            for (kind, mut w) in g.params_of_mut(layer)? {
                if kind != ParamKind::Weight {
                    continue;
                }
                for mut row in w.outer_iter_mut() {
                    let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let (s, z) = grid.params(-amax, amax);
                    row.mapv_inplace(|v| grid.fake_quantize(v, s, z));
                }
            }
        }
        Ok(g)
    }
}

/// Scores a policy: accuracy of the compressed model on held-out data, if its weight bytes
/// (or MACs) are within the budget; `accuracy − 1` otherwise.
pub struct PolicyEvaluator<'a, 's> {
    /// The space (to read bit widths from the candidate's code).
    pub space: &'s CompressionPolicySpace<'a>,
    /// Held-out data.
    pub eval: &'s InMemoryDataset,
    /// Weight-byte budget.
    pub max_bytes: Option<f64>,
    /// MACs budget.
    pub max_macs: Option<u64>,
}

impl Evaluator for PolicyEvaluator<'_, '_> {
    fn evaluate(&self, graph: &Graph, candidate: &Candidate) -> Result<Metrics> {
        let policy = self.space.policy(&candidate.code)?;
        let accuracy = evaluate(graph, self.eval, 500)?.accuracy as f64;
        let bytes = CompressionPolicySpace::size_bytes(graph, &policy);
        let m = macs(graph);
        let fits =
            self.max_bytes.is_none_or(|b| bytes <= b) && self.max_macs.is_none_or(|b| m <= b);
        Ok(Metrics {
            score: if fits { accuracy } else { accuracy - 1.0 },
            values: BTreeMap::from([
                ("accuracy".to_string(), accuracy),
                ("bytes".to_string(), bytes),
                ("macs".to_string(), m as f64),
            ]),
        })
    }
}
