//! Sensitivity analysis: accuracy against prune ratio, one channel group at a time, and
//! per-group ratios for a FLOPs target.

use super::criterion::PruningCriterion;
use super::deps::dependency_groups;
use super::structured::{macs, StructuredPruner};
use crate::error::{Error, Result};
use crate::model::Graph;
use crate::train::{evaluate, Dataset};
use std::fmt::Write as _;

/// Accuracy of the model with one group pruned at one ratio (no fine-tuning).
#[derive(Clone, Debug, PartialEq)]
pub struct SensitivityRow {
    /// The group (its first producer).
    pub group: String,
    /// Fraction of the group's channels removed.
    pub ratio: f32,
    /// Accuracy on the evaluation data.
    pub accuracy: f32,
    /// Multiply-accumulates per sample of the pruned model.
    pub macs: u64,
}

/// The sensitivity of every prunable group.
#[derive(Clone, Debug, PartialEq)]
pub struct Sensitivity {
    /// Accuracy of the unpruned model.
    pub baseline: f32,
    /// MACs per sample of the unpruned model.
    pub baseline_macs: u64,
    /// One row per (group, ratio).
    pub rows: Vec<SensitivityRow>,
}

/// Prunes each prunable group alone at each of `ratios` with `criterion`, evaluates on
/// `eval`, and calls `progress(done, total)` after each evaluation.
///
/// # Errors
/// [`Error::InvalidConfig`] for a ratio outside `[0, 1)`, [`Error::Empty`] for empty data,
/// the criterion's and the model's errors.
pub fn sensitivity<C: PruningCriterion + Clone + 'static>(
    graph: &Graph,
    criterion: C,
    ratios: &[f32],
    eval: &dyn Dataset,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Sensitivity> {
    let deps = dependency_groups(graph)?;
    let groups: Vec<String> = deps.prunable().map(|g| g.name().to_string()).collect();
    let baseline = evaluate(graph, eval, batch_size)?.accuracy;
    let total = groups.len() * ratios.len();
    let mut rows = Vec::with_capacity(total);
    for g in &groups {
        for &r in ratios {
            let pruner = StructuredPruner::new(criterion.clone()).with_layer_ratio(g, r)?;
            let (pruned, _) = pruner.prune(graph, None)?;
            rows.push(SensitivityRow {
                group: g.clone(),
                ratio: r,
                accuracy: evaluate(&pruned, eval, batch_size)?.accuracy,
                macs: macs(&pruned),
            });
            progress(rows.len(), total);
        }
    }
    Ok(Sensitivity {
        baseline,
        baseline_macs: macs(graph),
        rows,
    })
}

impl Sensitivity {
    /// Accuracy per group (rows) and ratio (columns).
    pub fn table(&self) -> String {
        let mut ratios: Vec<f32> = self.rows.iter().map(|r| r.ratio).collect();
        ratios.sort_by(f32::total_cmp);
        ratios.dedup();
        let mut s = format!("{:<24}", "group \\ ratio");
        for r in &ratios {
            let _ = write!(s, " {:>6.2}", r);
        }
        let _ = writeln!(s, "   (baseline {:.2} %)", 100.0 * self.baseline);
        let mut groups: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !groups.contains(&r.group.as_str()) {
                groups.push(&r.group);
            }
        }
        for g in groups {
            let _ = write!(s, "{g:<24}");
            for r in &ratios {
                match self.rows.iter().find(|x| x.group == g && x.ratio == *r) {
                    Some(x) => {
                        let _ = write!(s, " {:>6.2}", 100.0 * x.accuracy);
                    }
                    None => s.push_str("      -"),
                }
            }
            s.push('\n');
        }
        s
    }

    /// The rows as CSV (`group,ratio,accuracy,macs`), for plotting.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("group,ratio,accuracy,macs\n");
        for r in &self.rows {
            let _ = writeln!(s, "{},{},{},{}", r.group, r.ratio, r.accuracy, r.macs);
        }
        s
    }

    /// Per-group ratios that reach `macs_fraction` of the unpruned MACs while losing as
    /// little measured accuracy as possible: for a tolerance `t`, each group takes the largest
    /// measured ratio whose accuracy drop is at most `t`; the smallest `t` whose combined
    /// pruning meets the target wins. Returns the ratios and the MACs fraction reached.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a fraction outside `(0, 1]` or a target no measured ratio
    /// reaches; the pruner's errors.
    pub fn ratios_for_macs(
        &self,
        graph: &Graph,
        macs_fraction: f64,
    ) -> Result<(Vec<(String, f32)>, f64)> {
        if !(macs_fraction > 0.0 && macs_fraction <= 1.0) {
            return Err(Error::config(
                "FLOPs target",
                format!("fraction {macs_fraction} is outside (0, 1]"),
            ));
        }
        let mut tolerances: Vec<f32> = self
            .rows
            .iter()
            .map(|r| (self.baseline - r.accuracy).max(0.0))
            .collect();
        tolerances.push(0.0);
        tolerances.sort_by(f32::total_cmp);
        tolerances.dedup();
        let base = macs(graph) as f64;
        for t in tolerances {
            let mut ratios: Vec<(String, f32)> = Vec::new();
            for r in &self.rows {
                if self.baseline - r.accuracy <= t {
                    match ratios.iter_mut().find(|(g, _)| *g == r.group) {
                        Some((_, best)) => *best = best.max(r.ratio),
                        None => ratios.push((r.group.clone(), r.ratio)),
                    }
                }
            }
            let mut pruner = StructuredPruner::new(super::L1Norm);
            for (g, r) in &ratios {
                pruner = pruner.with_layer_ratio(g, *r)?;
            }
            let (pruned, _) = pruner.prune(graph, None)?;
            let reached = macs(&pruned) as f64 / base.max(1.0);
            if reached <= macs_fraction {
                return Ok((ratios, reached));
            }
        }
        Err(Error::config(
            "FLOPs target",
            format!(
                "{:.1} % of the MACs is not reachable with the measured ratios",
                100.0 * macs_fraction
            ),
        ))
    }
}
