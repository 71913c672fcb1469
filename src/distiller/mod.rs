//! Knowledge distillation: a frozen teacher, a trainable student, and losses between their
//! activations at named nodes.
//!
//! - [`DistillationLoss`]: value and gradients with respect to the student activations it
//!   reads (and its own parameters); users write their own.
//! - Built in: [`LogitKd`] (temperature, `T²` scaling, mixed with the hard labels by `α`),
//!   [`FitNet`] hints through a learned regressor, [`Fsp`] matrices, [`AttentionTransfer`].
//! - [`Distiller`]: runs teacher and student on the same batches, sums the weighted losses,
//!   injects their gradients at the student's nodes in one backward pass
//!   ([`crate::model::Graph::backward_with`]), and steps the optimizer; FitNet's two stages
//!   are two runs ([`Distiller::fit`] with hints, then with KD).

mod losses;

pub use losses::{AttentionTransfer, DistillationLoss, FitNet, Fsp, LogitKd, LossOutput};

use crate::error::{Error, Result};
use crate::model::{Graph, Mode, NodeId};
use crate::tensor::Tensor;
use crate::train::{
    batch_indices, softmax_cross_entropy, Dataset, EpochMeter, Optimizer, Progress, TrainConfig,
    TrainReport,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;
use std::time::Instant;

type ProgressFn<'a> = Box<dyn FnMut(&Progress) + 'a>;

/// Trains a student against a frozen teacher.
///
/// # Examples
/// ```
/// use nncompress::distiller::{Distiller, LogitKd};
/// use nncompress::model::zoo;
/// use nncompress::train::{InMemoryDataset, Sgd, TrainConfig};
/// let teacher = zoo::digits_cnn(1)?;
/// let mut student = zoo::digits_cnn(2)?;
/// let x = ndarray::ArrayD::from_shape_fn(vec![32, 1, 8, 8], |d| (d[0] % 2) as f32);
/// let data = InMemoryDataset::new(x, (0..32).map(|i| i % 2).collect(), 10)?;
/// let mut d = Distiller::new(&teacher, TrainConfig::new(1, 16, 0), Sgd::new(0.01))
///     .with_loss(1.0, LogitKd::new("fc", "fc", 4.0, 0.9)?)?;
/// d.fit(&mut student, &data)?;
/// # Ok::<(), nncompress::Error>(())
/// ```
pub struct Distiller<'a> {
    teacher: &'a Graph,
    config: TrainConfig,
    optimizer: Box<dyn Optimizer + 'a>,
    losses: Vec<(f32, Box<dyn DistillationLoss + 'a>)>,
    hard_labels: f32,
    on_progress: Option<ProgressFn<'a>>,
    cache_teacher: bool,
    /// Teacher activations per sample, by node (filled on the first epoch when caching).
    cache: HashMap<String, Vec<Option<Tensor>>>,
}

impl<'a> Distiller<'a> {
    /// A distiller with a frozen `teacher` (run in inference mode), the student's training
    /// configuration and optimizer, no losses, no hard-label term.
    pub fn new(teacher: &'a Graph, config: TrainConfig, optimizer: impl Optimizer + 'a) -> Self {
        Distiller {
            teacher,
            config,
            optimizer: Box::new(optimizer),
            losses: Vec::new(),
            hard_labels: 0.0,
            on_progress: None,
            cache_teacher: false,
            cache: HashMap::new(),
        }
    }

    /// Adds `weight · loss`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a negative or non-finite weight.
    pub fn with_loss(mut self, weight: f32, loss: impl DistillationLoss + 'a) -> Result<Self> {
        check_weight(weight, loss.name())?;
        self.losses.push((weight, Box::new(loss)));
        Ok(self)
    }

    /// Adds `weight ·` cross-entropy of the student's output against the labels (for hint,
    /// FSP and attention losses, which do not see the labels).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a negative or non-finite weight.
    pub fn with_hard_labels(mut self, weight: f32) -> Result<Self> {
        check_weight(weight, "hard labels")?;
        self.hard_labels = weight;
        Ok(self)
    }

    /// Calls `f` after every batch.
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + 'a) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }

    /// Keeps the teacher's activations per training sample after computing them once (the
    /// teacher is frozen and inference-mode, so they never change): later epochs skip the
    /// teacher. Costs memory for every requested teacher node.
    pub fn cache_teacher(mut self, cache: bool) -> Self {
        self.cache_teacher = cache;
        self
    }

    /// The losses (to read a regressor after training).
    pub fn losses(&self) -> impl Iterator<Item = &dyn DistillationLoss> {
        self.losses
            .iter()
            .map(|(_, l)| l.as_ref() as &dyn DistillationLoss)
    }

    /// Checks node names and shapes of every loss against both graphs.
    fn check(&self, student: &Graph) -> Result<()> {
        if self.losses.is_empty() && self.hard_labels == 0.0 {
            return Err(Error::config(
                "distillation",
                "no loss: add one with with_loss or with_hard_labels",
            ));
        }
        for (_, l) in &self.losses {
            let s: Vec<NodeId> = l
                .student_nodes()
                .iter()
                .map(|n| student.id(n).map_err(|e| named(e, "student", l.name())))
                .collect::<Result<_>>()?;
            let t: Vec<NodeId> = l
                .teacher_nodes()
                .iter()
                .map(|n| {
                    self.teacher
                        .id(n)
                        .map_err(|e| named(e, "teacher", l.name()))
                })
                .collect::<Result<_>>()?;
            let ss: Vec<&[usize]> = s.iter().map(|&i| student.shape(i)).collect();
            let ts: Vec<&[usize]> = t.iter().map(|&i| self.teacher.shape(i)).collect();
            l.check(&ss, &ts)?;
        }
        if student.input_shape() != self.teacher.input_shape() {
            return Err(Error::shape(
                "distillation",
                None,
                format!(
                    "student input {:?} (the teacher's)",
                    self.teacher.input_shape()
                ),
                student.input_shape(),
            ));
        }
        Ok(())
    }

    /// The teacher's activations at `nodes` for batch `idx` (cached per sample if enabled).
    fn teacher_outputs(
        &mut self,
        x: &Tensor,
        idx: &[usize],
        nodes: &[String],
        n: usize,
    ) -> Result<HashMap<String, Tensor>> {
        if self.cache_teacher {
            let hit = nodes.iter().all(|name| {
                self.cache
                    .get(name)
                    .is_some_and(|c| idx.iter().all(|&i| c.get(i).is_some_and(Option::is_some)))
            });
            if hit {
                let mut out = HashMap::new();
                for name in nodes {
                    let c = &self.cache[name];
                    let views: Vec<_> = idx
                        .iter()
                        .map(|&i| c[i].as_ref().expect("checked above").view())
                        .collect();
                    out.insert(
                        name.clone(),
                        ndarray::concatenate(ndarray::Axis(0), &views)
                            .map_err(|e| Error::Unsupported(e.to_string()))?,
                    );
                }
                return Ok(out);
            }
        }
        let ids: Vec<(NodeId, &String)> = nodes
            .iter()
            .map(|name| self.teacher.id(name).map(|id| (id, name)))
            .collect::<Result<_>>()?;
        let mut out = HashMap::new();
        self.teacher.forward_with(x, &mut |id, _, v| {
            for (want, name) in &ids {
                if *want == id {
                    out.insert((*name).clone(), v.clone());
                }
            }
        })?;
        if self.cache_teacher {
            for (name, v) in &out {
                let c = self
                    .cache
                    .entry(name.clone())
                    .or_insert_with(|| vec![None; n]);
                for (k, &i) in idx.iter().enumerate() {
                    c[i] = Some(
                        v.index_axis(ndarray::Axis(0), k)
                            .insert_axis(ndarray::Axis(0))
                            .to_owned(),
                    );
                }
            }
        }
        Ok(out)
    }

    /// Trains `student` on `train`.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for node names missing in either graph,
    /// [`Error::ShapeMismatch`] for layers a loss cannot pair, [`Error::InvalidConfig`] with
    /// no loss, zero epochs or batch size, [`Error::Empty`] for no data, [`Error::NonFinite`]
    /// if the loss diverges; the models' errors.
    pub fn fit(&mut self, student: &mut Graph, train: &dyn Dataset) -> Result<TrainReport> {
        let cfg = self.config;
        if train.is_empty() {
            return Err(Error::Empty("distillation data set".into()));
        }
        if cfg.epochs == 0 || cfg.batch_size == 0 {
            return Err(Error::config(
                "distillation",
                "epochs and batch size must be at least 1",
            ));
        }
        self.check(student)?;
        let mut teacher_nodes: Vec<String> = Vec::new();
        for (_, l) in &self.losses {
            for n in l.teacher_nodes() {
                if !teacher_nodes.contains(&n) {
                    teacher_nodes.push(n);
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let base_lr = self.optimizer.learning_rate();
        let mut velocity: Vec<Vec<ndarray::ArrayD<f32>>> = Vec::new();
        let mut report = TrainReport { epochs: Vec::new() };
        for epoch in 1..=cfg.epochs {
            let start = Instant::now();
            let lr = base_lr * cfg.schedule.factor(epoch - 1, cfg.epochs);
            self.optimizer.set_learning_rate(lr);
            let batches = batch_indices(train.len(), cfg.batch_size, Some(&mut rng));
            let mut meter = EpochMeter::default();
            for (b, idx) in batches.iter().enumerate() {
                let (x, y) = train.batch(idx)?;
                let teacher = self.teacher_outputs(&x, idx, &teacher_nodes, train.len())?;
                let trace = student.trace(&x, Mode::Training, &mut rng)?;
                let mut extra: HashMap<NodeId, Tensor> = HashMap::new();
                let mut loss = 0.0f32;
                let out = student.output_id();
                if self.hard_labels > 0.0 {
                    let (l, g) = softmax_cross_entropy(trace.value(out), &y)?;
                    loss += self.hard_labels * l;
                    add(&mut extra, out, g * self.hard_labels);
                }
                let mut param_updates: Vec<Vec<ndarray::ArrayD<f32>>> = Vec::new();
                for (w, l) in &self.losses {
                    let s_ids: Vec<NodeId> = l
                        .student_nodes()
                        .iter()
                        .map(|n| student.id(n))
                        .collect::<Result<_>>()?;
                    let s_vals: Vec<&Tensor> = s_ids.iter().map(|&i| trace.value(i)).collect();
                    let t_vals: Vec<&Tensor> = l
                        .teacher_nodes()
                        .iter()
                        .map(|n| {
                            teacher.get(n).ok_or_else(|| {
                                Error::Unsupported(format!("teacher node `{n}` was not computed"))
                            })
                        })
                        .collect::<Result<_>>()?;
                    let o = l.compute(&s_vals, &t_vals, &y)?;
                    if o.student_grads.len() != s_ids.len() {
                        return Err(Error::Arity {
                            node: l.name().to_string(),
                            op: "distillation loss gradients".into(),
                            expected: s_ids.len().to_string(),
                            got: o.student_grads.len(),
                        });
                    }
                    loss += w * o.value;
                    for (id, g) in s_ids.into_iter().zip(o.student_grads) {
                        add(&mut extra, id, g * *w);
                    }
                    param_updates.push(o.param_grads.into_iter().map(|g| g * *w).collect());
                }
                if !loss.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "distillation loss at epoch {epoch}, batch {}",
                        b + 1
                    )));
                }
                meter.count_correct(trace.value(out), &y)?;
                let extra: Vec<(NodeId, Tensor)> = extra.into_iter().collect();
                let grads = student.backward_with(&trace, None, &extra)?;
                drop(trace);
                self.optimizer.step(student, &grads)?;
                // The losses' own parameters (regressors): SGD with momentum 0.9.
                if velocity.len() < self.losses.len() {
                    velocity.resize(self.losses.len(), Vec::new());
                }
                for (((_, l), grads), vel) in self
                    .losses
                    .iter_mut()
                    .zip(param_updates)
                    .zip(velocity.iter_mut())
                {
                    let mut params = l.params_mut();
                    if vel.len() != params.len() {
                        *vel = grads
                            .iter()
                            .map(|g| ndarray::ArrayD::zeros(g.raw_dim()))
                            .collect();
                    }
                    for ((p, g), v) in params.iter_mut().zip(&grads).zip(vel.iter_mut()) {
                        if p.shape() == g.shape() && v.shape() == g.shape() {
                            *v *= 0.9;
                            *v += g;
                            p.scaled_add(-lr, v);
                        }
                    }
                }
                meter.add_loss(loss, y.len());
                if let Some(f) = &mut self.on_progress {
                    f(&meter.progress((epoch, cfg.epochs), (b + 1, batches.len()), lr));
                }
            }
            report
                .epochs
                .push(meter.stats(epoch, None, start.elapsed().as_secs_f32()));
        }
        self.optimizer.set_learning_rate(base_lr);
        Ok(report)
    }
}

fn add(extra: &mut HashMap<NodeId, Tensor>, id: NodeId, g: Tensor) {
    match extra.get_mut(&id) {
        Some(old) => *old += &g,
        None => {
            extra.insert(id, g);
        }
    }
}

fn check_weight(w: f32, what: &str) -> Result<()> {
    if w.is_finite() && w >= 0.0 {
        Ok(())
    } else {
        Err(Error::config(
            format!("distillation loss `{what}`"),
            format!("weight {w} must be finite and ≥ 0"),
        ))
    }
}

fn named(e: Error, model: &str, loss: &str) -> Error {
    match e {
        Error::UnknownNode { input, .. } => Error::UnknownNode {
            node: format!("({loss} on the {model})"),
            input,
        },
        e => e,
    }
}
