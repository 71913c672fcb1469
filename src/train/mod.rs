//! Training: losses, optimizers, a trainer loop with progress and hooks, data sets.

mod data;
mod optim;
mod text;

pub use data::{
    batch_indices, load_digits, load_digits_with_limits, load_mnist, load_mnist_with_limits,
    parse_digits_csv, parse_idx_images, parse_idx_labels, Dataset, InMemoryDataset, MnistSplit,
};
pub use optim::{Adam, LrSchedule, Optimizer, Sgd};
pub use text::{
    load_fortune_files, load_fortunes, parse_fortunes, TextSplit, FORTUNES_EVAL_FILES,
    FORTUNE_FILES, MAX_SENTENCE_CHARS,
};

use crate::error::{Error, Result};
use crate::model::{Gradients, Graph, Mode};
use crate::tensor::{as_2d, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;

/// Mean softmax cross-entropy of `logits` `[N, classes]` against `labels`, and its gradient
/// with respect to the logits (`(softmax − onehot) / N`).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `logits` is not 2-D with one row per label,
/// [`Error::LabelOutOfRange`] for a label ≥ classes, [`Error::Empty`] for no samples.
pub fn softmax_cross_entropy(logits: &Tensor, labels: &[usize]) -> Result<(f32, Tensor)> {
    let z = as_2d(logits, "softmax_cross_entropy", None)?;
    let (n, c) = z.dim();
    if n != labels.len() {
        return Err(Error::shape(
            "softmax_cross_entropy",
            None,
            format!("[{}, classes] (one row per label)", labels.len()),
            logits.shape(),
        ));
    }
    if n == 0 {
        return Err(Error::Empty("cross-entropy of an empty batch".into()));
    }
    let mut grad = z.to_owned();
    let mut loss = 0.0f64;
    for (i, (mut row, &label)) in grad.outer_iter_mut().zip(labels).enumerate() {
        if label >= c {
            return Err(Error::LabelOutOfRange {
                index: i,
                label,
                classes: c,
            });
        }
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        loss += (s.ln() - (z[[i, label]] - m)) as f64;
        row.mapv_inplace(|v| v / s / n as f32);
        row[label] -= 1.0 / n as f32;
    }
    Ok(((loss / n as f64) as f32, grad.into_dyn()))
}

/// Index of the largest logit in each row of `[N, classes]`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `logits` is not 2-D.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    let z = as_2d(logits, "argmax", None)?;
    Ok(z.outer_iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                )
                .0
        })
        .collect())
}

/// Loss and accuracy of a model over a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f32,
    /// Fraction classified correctly.
    pub accuracy: f32,
    /// Number misclassified.
    pub errors: usize,
    /// Number of samples.
    pub samples: usize,
}

impl Evaluation {
    /// `1 − accuracy`, in percent.
    pub fn error_percent(&self) -> f32 {
        100.0 * self.errors as f32 / self.samples.max(1) as f32
    }
}

/// Evaluates `graph` (inference mode) on all of `data` in batches of `batch_size`.
///
/// # Errors
/// [`Error::Empty`] for an empty data set, or the forward pass's errors.
pub fn evaluate(graph: &Graph, data: &dyn Dataset, batch_size: usize) -> Result<Evaluation> {
    if data.is_empty() {
        return Err(Error::Empty("evaluation data set".into()));
    }
    if batch_size == 0 {
        return Err(Error::config("evaluation", "batch size 0"));
    }
    let mut loss = 0.0f64;
    let mut correct = 0;
    for idx in batch_indices(data.len(), batch_size, None) {
        let (x, y) = data.batch(&idx)?;
        let logits = graph.forward(&x)?;
        let (l, _) = softmax_cross_entropy(&logits, &y)?;
        loss += l as f64 * y.len() as f64;
        correct += argmax_rows(&logits)?
            .iter()
            .zip(&y)
            .filter(|(p, t)| p == t)
            .count();
    }
    let n = data.len();
    Ok(Evaluation {
        loss: (loss / n as f64) as f32,
        accuracy: correct as f32 / n as f32,
        errors: n - correct,
        samples: n,
    })
}

/// What the progress callback receives after every batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Current epoch, from 1.
    pub epoch: usize,
    /// Total epochs.
    pub epochs: usize,
    /// Batches done in this epoch, from 1.
    pub batch: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Mean training loss over this epoch so far.
    pub loss: f32,
    /// Training accuracy over this epoch so far.
    pub accuracy: f32,
    /// The learning rate in use.
    pub learning_rate: f32,
}

/// One epoch's summary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochStats {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f32,
    /// Training accuracy (measured in training mode as batches went by).
    pub train_accuracy: f32,
    /// Evaluation on the held-out set, if one was given.
    pub eval: Option<Evaluation>,
    /// Wall time of the epoch (training and evaluation) in seconds.
    pub seconds: f32,
}

/// The whole run's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Per-epoch summaries.
    pub epochs: Vec<EpochStats>,
}

/// Running loss and accuracy over one epoch's batches, for progress reports (shared by every
/// training loop of the crate).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EpochMeter {
    loss_sum: f64,
    seen: usize,
    correct: usize,
}

impl EpochMeter {
    /// Counts how many of `logits`' argmaxes hit `labels`.
    pub(crate) fn count_correct(&mut self, logits: &Tensor, labels: &[usize]) -> Result<()> {
        self.correct += argmax_rows(logits)?
            .iter()
            .zip(labels)
            .filter(|(p, t)| p == t)
            .count();
        Ok(())
    }

    /// Adds a batch of `n` samples with mean loss `loss`.
    pub(crate) fn add_loss(&mut self, loss: f32, n: usize) {
        self.loss_sum += loss as f64 * n as f64;
        self.seen += n;
    }

    fn loss(&self) -> f32 {
        (self.loss_sum / self.seen.max(1) as f64) as f32
    }

    fn accuracy(&self) -> f32 {
        self.correct as f32 / self.seen.max(1) as f32
    }

    /// The progress after `batch` of `batches` in `epoch` of `epochs`.
    pub(crate) fn progress(
        &self,
        (epoch, epochs): (usize, usize),
        (batch, batches): (usize, usize),
        learning_rate: f32,
    ) -> Progress {
        Progress {
            epoch,
            epochs,
            batch,
            batches,
            loss: self.loss(),
            accuracy: self.accuracy(),
            learning_rate,
        }
    }

    /// The epoch's summary.
    pub(crate) fn stats(&self, epoch: usize, eval: Option<Evaluation>, seconds: f32) -> EpochStats {
        EpochStats {
            epoch,
            train_loss: self.loss(),
            train_accuracy: self.accuracy(),
            eval,
            seconds,
        }
    }
}

/// Epochs, batch size, seed and learning-rate schedule of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of the shuffling and dropout generator.
    pub seed: u64,
    /// Learning-rate schedule over epochs.
    pub schedule: LrSchedule,
    /// Batch size of the per-epoch evaluation.
    pub eval_batch_size: usize,
}

impl TrainConfig {
    /// `epochs` epochs of `batch_size`, seeded, with a constant learning rate.
    pub fn new(epochs: usize, batch_size: usize, seed: u64) -> Self {
        TrainConfig {
            epochs,
            batch_size,
            seed,
            schedule: LrSchedule::Constant,
            eval_batch_size: 500,
        }
    }
    /// Sets the learning-rate schedule.
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }
}

type ProgressFn<'a> = Box<dyn FnMut(&Progress) + 'a>;
type PenaltyFn<'a> = Box<dyn FnMut(&Graph, &mut Gradients) -> Result<f32> + 'a>;
type StepFn<'a> = Box<dyn FnMut(&mut Graph) -> Result<()> + 'a>;
type EpochFn<'a> = Box<dyn FnMut(&EpochStats) + 'a>;

/// A supervised training loop with softmax cross-entropy.
///
/// Hooks: a progress callback after each batch, extra loss terms on parameters (their value
/// is added to the reported loss and they add their gradient, e.g. an L1 penalty on BatchNorm
/// γ), a callback after each optimizer step (re-apply pruning masks, clamp values), and a
/// callback per epoch.
pub struct Trainer<'a> {
    config: TrainConfig,
    optimizer: Box<dyn Optimizer + 'a>,
    on_progress: Option<ProgressFn<'a>>,
    penalties: Vec<PenaltyFn<'a>>,
    after_step: Vec<StepFn<'a>>,
    on_epoch: Option<EpochFn<'a>>,
}

impl<'a> Trainer<'a> {
    /// A trainer with `config` and `optimizer`.
    pub fn new(config: TrainConfig, optimizer: impl Optimizer + 'a) -> Self {
        Trainer {
            config,
            optimizer: Box::new(optimizer),
            on_progress: None,
            penalties: Vec::new(),
            after_step: Vec::new(),
            on_epoch: None,
        }
    }

    /// Calls `f` after every batch.
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + 'a) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }

    /// Calls `f` after every epoch.
    pub fn on_epoch(mut self, f: impl FnMut(&EpochStats) + 'a) -> Self {
        self.on_epoch = Some(Box::new(f));
        self
    }

    /// Adds a loss term on the parameters: `f(graph, grads)` adds its gradient into `grads`
    /// and returns its value.
    pub fn with_penalty(
        mut self,
        f: impl FnMut(&Graph, &mut Gradients) -> Result<f32> + 'a,
    ) -> Self {
        self.penalties.push(Box::new(f));
        self
    }

    /// Calls `f(graph)` after every optimizer step.
    pub fn after_step(mut self, f: impl FnMut(&mut Graph) -> Result<()> + 'a) -> Self {
        self.after_step.push(Box::new(f));
        self
    }

    /// The optimizer (to read its state or learning rate).
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// Trains `graph` on `train`, evaluating on `eval` after each epoch when given.
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty training set, [`Error::InvalidConfig`] for zero epochs
    /// or batch size, [`Error::NonFinite`] if the loss diverges, or the errors of the model,
    /// the data set and the hooks.
    pub fn fit(
        &mut self,
        graph: &mut Graph,
        train: &dyn Dataset,
        eval: Option<&dyn Dataset>,
    ) -> Result<TrainReport> {
        let cfg = self.config;
        if train.is_empty() {
            return Err(Error::Empty("training data set".into()));
        }
        if cfg.epochs == 0 || cfg.batch_size == 0 {
            return Err(Error::config(
                "training",
                "epochs and batch size must be at least 1",
            ));
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let base_lr = self.optimizer.learning_rate();
        let mut report = TrainReport { epochs: Vec::new() };
        for epoch in 1..=cfg.epochs {
            let start = Instant::now();
            let lr = base_lr * cfg.schedule.factor(epoch - 1, cfg.epochs);
            self.optimizer.set_learning_rate(lr);
            let batches = batch_indices(train.len(), cfg.batch_size, Some(&mut rng));
            let mut meter = EpochMeter::default();
            for (b, idx) in batches.iter().enumerate() {
                let (x, y) = train.batch(idx)?;
                let trace = graph.trace(&x, Mode::Training, &mut rng)?;
                let logits = trace.value(graph.output_id());
                let (mut loss, grad) = softmax_cross_entropy(logits, &y)?;
                meter.count_correct(logits, &y)?;
                let mut grads = graph.backward(&trace, &grad)?;
                drop(trace);
                for p in &mut self.penalties {
                    loss += p(graph, &mut grads)?;
                }
                if !loss.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "training loss at epoch {epoch}, batch {}",
                        b + 1
                    )));
                }
                self.optimizer.step(graph, &grads)?;
                for f in &mut self.after_step {
                    f(graph)?;
                }
                meter.add_loss(loss, y.len());
                if let Some(f) = &mut self.on_progress {
                    f(&meter.progress((epoch, cfg.epochs), (b + 1, batches.len()), lr));
                }
            }
            let eval = match eval {
                Some(d) => Some(evaluate(graph, d, cfg.eval_batch_size)?),
                None => None,
            };
            let stats = meter.stats(epoch, eval, start.elapsed().as_secs_f32());
            if let Some(f) = &mut self.on_epoch {
                f(&stats);
            }
            report.epochs.push(stats);
        }
        self.optimizer.set_learning_rate(base_lr);
        Ok(report)
    }
}
