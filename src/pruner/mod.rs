//! Pruning: criteria, unstructured masks with schedules, channel dependency groups, and
//! structured pruning that removes channels for real.
//!
//! - [`PruningCriterion`]: scores per output channel or per weight; built in [`L1Norm`],
//!   [`L2Norm`], [`Fpgm`], [`BnScale`], [`Magnitude`], [`Taylor`].
//! - Unstructured: [`UnstructuredPruner`] makes [`Masks`] (kept apart from the weights,
//!   applied again after each optimizer step) per layer or with one global threshold;
//!   [`Schedule`]: one-shot, iterative, AGP.
//! - [`dependency_groups`]: which layers share a channel dimension (residual Add, Concat
//!   offsets, depthwise, Flatten → Linear); custom ops block and the groups say where.
//! - [`StructuredPruner`] / [`prune_channels`]: a smaller dense graph; network slimming with
//!   [`slimming_penalty`] and [`BnScale`]; [`LassoPruner`]: LASSO channel selection and
//!   least-squares reconstruction.
//! - [`deep_compression`]: k-means weight sharing with trained centroids, relative-index
//!   sparse storage and Huffman coding in a `.nndc` file.
//! - [`sensitivity`]: accuracy against prune ratio per group (table, CSV) and per-group ratios
//!   for a FLOPs target.

mod criterion;
pub mod deep_compression;
mod deps;
mod lasso;
mod sensitivity;
mod structured;
mod unstructured;

pub use criterion::{
    BnScale, Fpgm, L1Norm, L2Norm, LayerParams, Magnitude, PruningCriterion, Taylor,
};
pub use deps::{dependency_groups, ChannelGroup, DependencyGraph, Member};
pub use lasso::{LassoPruner, LassoReport};
pub use sensitivity::{sensitivity, Sensitivity, SensitivityRow};
pub use structured::{
    accumulate_gradients, macs, prune_channels, report, slimming_penalty, zero_channels,
    GroupChange, PruneReport, Removals, Scope, StructuredPruner,
};
pub use unstructured::{
    sparsity_report, sparsity_table, LayerSparsity, Masks, Schedule, Threshold, UnstructuredPruner,
};
