//! Optimizers and learning-rate schedules.

use crate::error::{Error, Result};
use crate::model::{Gradients, Graph};
use ndarray::{ArrayD, Zip};
use std::collections::BTreeMap;

/// Updates a graph's trainable parameters from their gradients.
pub trait Optimizer {
    /// Applies one update. Parameters without a gradient are left alone.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when a gradient's shape differs from its parameter's.
    fn step(&mut self, graph: &mut Graph, grads: &Gradients) -> Result<()>;
    /// The current learning rate.
    fn learning_rate(&self) -> f32;
    /// Sets the learning rate (schedules call this each epoch).
    fn set_learning_rate(&mut self, lr: f32);
}

/// How the learning rate changes over epochs, as a factor of the initial rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    /// Always 1.
    Constant,
    /// Multiplied by `factor` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: usize,
        /// Decay factor.
        factor: f32,
    },
    /// Cosine annealing from 1 to 0 over the run.
    Cosine,
}

impl LrSchedule {
    /// The factor for epoch `epoch` (from 0) of `epochs`.
    pub fn factor(&self, epoch: usize, epochs: usize) -> f32 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Step { every, factor } => factor.powi((epoch / every.max(1)) as i32),
            LrSchedule::Cosine => {
                0.5 * (1.0 + (std::f32::consts::PI * epoch as f32 / epochs.max(1) as f32).cos())
            }
        }
    }
}

fn check(name: &str, p: &ndarray::ArrayViewMutD<f32>, g: &ArrayD<f32>) -> Result<()> {
    if p.shape() == g.shape() {
        Ok(())
    } else {
        Err(Error::shape(
            "optimizer step",
            Some(name),
            format!("{:?}", p.shape()),
            g.shape(),
        ))
    }
}

/// Applies `update(name, param, grad)` to every trainable parameter that has a gradient.
fn for_each_param(
    graph: &mut Graph,
    grads: &Gradients,
    mut update: impl FnMut(&str, ndarray::ArrayViewMutD<f32>, &ArrayD<f32>),
) -> Result<()> {
    let mut err = None;
    graph.map_params(|name, kind, p| {
        if !kind.is_trainable() || err.is_some() {
            return;
        }
        if let Some(g) = grads.get(name) {
            match check(name, &p, g) {
                Ok(()) => update(name, p, g),
                Err(e) => err = Some(e),
            }
        }
    });
    err.map_or(Ok(()), Err)
}

/// Stochastic gradient descent with momentum and L2 weight decay (PyTorch's `SGD`):
/// `v ← μ·v + (g + λ·w)`, `w ← w − η·v`.
#[derive(Clone, Debug)]
pub struct Sgd {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    velocity: BTreeMap<String, ArrayD<f32>>,
}

impl Sgd {
    /// Plain SGD with learning rate `lr`.
    pub fn new(lr: f32) -> Self {
        Sgd {
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
            velocity: BTreeMap::new(),
        }
    }
    /// Sets the momentum μ.
    pub fn with_momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }
    /// Sets the L2 weight decay λ.
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, graph: &mut Graph, grads: &Gradients) -> Result<()> {
        let (lr, mu, wd) = (self.lr, self.momentum, self.weight_decay);
        let velocity = &mut self.velocity;
        for_each_param(graph, grads, |name, mut p, g| {
            let v = velocity
                .entry(name.to_string())
                .or_insert_with(|| ArrayD::zeros(g.raw_dim()));
            Zip::from(&mut p).and(v).and(g).for_each(|w, v, &g| {
                *v = mu * *v + g + wd * *w;
                *w -= lr * *v;
            });
        })
    }
    fn learning_rate(&self) -> f32 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }
}

/// Adam (Kingma & Ba 2015) with bias correction and optional L2 weight decay added to the
/// gradient (PyTorch's `Adam`).
#[derive(Clone, Debug)]
pub struct Adam {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    t: i32,
    moments: BTreeMap<String, (ArrayD<f32>, ArrayD<f32>)>,
}

impl Adam {
    /// Adam with learning rate `lr`, β = (0.9, 0.999), ε = 1e-8.
    pub fn new(lr: f32) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 0,
            moments: BTreeMap::new(),
        }
    }
    /// Sets β₁ and β₂.
    pub fn with_betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }
    /// Sets the L2 weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

impl Optimizer for Adam {
    fn step(&mut self, graph: &mut Graph, grads: &Gradients) -> Result<()> {
        self.t += 1;
        let (lr, b1, b2, eps, wd) = (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay);
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        let moments = &mut self.moments;
        for_each_param(graph, grads, |name, mut p, g| {
            let (m, v) = moments
                .entry(name.to_string())
                .or_insert_with(|| (ArrayD::zeros(g.raw_dim()), ArrayD::zeros(g.raw_dim())));
            Zip::from(&mut p)
                .and(m)
                .and(v)
                .and(g)
                .for_each(|w, m, v, &g| {
                    let g = g + wd * *w;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                });
        })
    }
    fn learning_rate(&self) -> f32 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }
}
