//! Neural architecture search: search spaces, ask/tell controllers, evaluators with
//! hardware-aware costs, and a search runner with a resumable trial log.
//!
//! - [`SearchSpace`]: an architecture type with a discrete encoding, `sample`, `mutate`,
//!   `build`; built in: [`CnnSpace`] (stages × depth, width, kernel, stride, residual) and
//!   [`CompressionPolicySpace`] (per-layer prune ratios and bit widths over a trained model,
//!   scored by [`PolicyEvaluator`]).
//! - [`Controller`] (ask / tell, several candidates in flight): [`RandomSearch`],
//!   [`RegularizedEvolution`], [`Reinforce`].
//! - [`Evaluator`]: [`ProxyEvaluator`] trains a few epochs on a subset and weighs accuracy
//!   against parameters, MACs, or latency measured on the float graph or its int8 model
//!   ([`Objective`]).
//! - [`Search`]: evaluations on rayon's threads, scores told in trial order, every trial
//!   logged to CSV and replayed on resume; [`best`], [`pareto_front`].

mod controller;
mod policy;
mod search;
mod space;

pub use controller::{Candidate, Controller, RandomSearch, RegularizedEvolution, Reinforce};
pub use policy::{CompressionPolicySpace, Policy, PolicyEvaluator};
pub use search::{
    best, pareto_front, trials_csv, Cost, Evaluator, Metrics, Objective, ProxyEvaluator, Search,
    Trial,
};
pub use space::{
    check_code, checked_choices, code_from_string, code_to_string, CnnArch, CnnSpace, SearchSpace,
    Stage,
};
