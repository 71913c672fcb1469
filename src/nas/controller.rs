//! Controllers: ask for a candidate, tell its score. Several candidates can be out at once,
//! and scores can come back in any order.

use super::space::{check_code, checked_choices, mutate_code};
use crate::error::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;

/// A proposed architecture, by code (see [`super::SearchSpace::choices`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Trial number, from 0, in order of asking.
    pub id: usize,
    /// The architecture's code.
    pub code: Vec<usize>,
}

/// Proposes candidates and learns from their scores (higher is better).
pub trait Controller: Send {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// The next candidate.
    ///
    /// # Errors
    /// When the controller cannot propose (an empty space).
    fn ask(&mut self) -> Result<Candidate>;
    /// The score of a candidate asked earlier; `None` for a failed evaluation (it is not
    /// learned from as a good one). A candidate whose code does not fit the controller's
    /// space, or a non-finite score, is not learned from either.
    fn tell(&mut self, candidate: &Candidate, score: Option<f64>);
}

/// The next candidate: `code` under trial number `*next`, which then advances.
fn issue(next: &mut usize, code: Vec<usize>) -> Candidate {
    let c = Candidate { id: *next, code };
    *next += 1;
    c
}

fn uniform(choices: &[usize], rng: &mut StdRng) -> Vec<usize> {
    choices.iter().map(|&n| rng.random_range(0..n)).collect()
}

/// Uniform random search.
pub struct RandomSearch {
    choices: Vec<usize>,
    rng: StdRng,
    next: usize,
}

impl RandomSearch {
    /// Random search over `choices`, seeded.
    ///
    /// # Errors
    /// [`crate::Error::Empty`] for an empty space.
    pub fn new(choices: &[usize], seed: u64) -> Result<Self> {
        Ok(RandomSearch {
            choices: checked_choices(choices)?,
            rng: StdRng::seed_from_u64(seed),
            next: 0,
        })
    }
}

impl Controller for RandomSearch {
    fn name(&self) -> &str {
        "random"
    }
    fn ask(&mut self) -> Result<Candidate> {
        Ok(issue(&mut self.next, uniform(&self.choices, &mut self.rng)))
    }
    fn tell(&mut self, _: &Candidate, _: Option<f64>) {}
}

/// Regularized evolution (Real et al. 2019): the first `population` candidates are random;
/// afterwards each child mutates one decision of the best of `sample_size` members drawn
/// from the population, and the oldest member dies when a child joins (aging).
pub struct RegularizedEvolution {
    choices: Vec<usize>,
    population: usize,
    sample_size: usize,
    rng: StdRng,
    next: usize,
    /// Members (code, score), oldest first.
    members: VecDeque<(Vec<usize>, f64)>,
    /// Codes to ask first (a known-good starting point, e.g. a uniform policy).
    initial: VecDeque<Vec<usize>>,
}

impl RegularizedEvolution {
    /// Evolution over `choices` with a population and a tournament size, seeded.
    ///
    /// # Errors
    /// [`crate::Error::Empty`] for an empty space; [`crate::Error::InvalidConfig`] for a
    /// population or sample size of 0.
    pub fn new(
        choices: &[usize],
        population: usize,
        sample_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if population == 0 || sample_size == 0 {
            return Err(crate::Error::config(
                "regularized evolution",
                "population and sample size must be at least 1",
            ));
        }
        Ok(RegularizedEvolution {
            choices: checked_choices(choices)?,
            population,
            sample_size,
            rng: StdRng::seed_from_u64(seed),
            next: 0,
            members: VecDeque::new(),
            initial: VecDeque::new(),
        })
    }

    /// Asks these codes first (they count toward the initial population).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a code that does not fit the choices.
    pub fn with_initial(mut self, codes: &[Vec<usize>]) -> Result<Self> {
        for c in codes {
            check_code(&self.choices, c)?;
        }
        self.initial = codes.iter().cloned().collect();
        Ok(self)
    }
}

impl Controller for RegularizedEvolution {
    fn name(&self) -> &str {
        "evolution"
    }
    fn ask(&mut self) -> Result<Candidate> {
        // The first `population` candidates are the given initial codes, then random; later
        // ones are children.
        let code = if let Some(c) = self.initial.pop_front() {
            c
        } else if self.next < self.population || self.members.is_empty() {
            uniform(&self.choices, &mut self.rng)
        } else {
            let mut best: Option<&(Vec<usize>, f64)> = None;
            for _ in 0..self.sample_size {
                let m = &self.members[self.rng.random_range(0..self.members.len())];
                if best.is_none_or(|b| m.1 > b.1) {
                    best = Some(m);
                }
            }
            let mut child = best.map(|b| b.0.clone()).unwrap_or_default();
            mutate_code(&self.choices, &mut child, &mut self.rng);
            child
        };
        Ok(issue(&mut self.next, code))
    }
    fn tell(&mut self, candidate: &Candidate, score: Option<f64>) {
        // A code from elsewhere (not of this space) would become a parent: not learned from.
        let Some(s) = score.filter(|s| s.is_finite()) else {
            return;
        };
        if check_code(&self.choices, &candidate.code).is_err() {
            return;
        }
        self.members.push_back((candidate.code.clone(), s));
        while self.members.len() > self.population {
            self.members.pop_front();
        }
    }
}

/// REINFORCE (Williams 1992; Zoph & Le 2017) over the discrete encoding: one softmax per
/// decision, sampled independently; each told score updates the logits by
/// `lr·(score − baseline)·∇log p(code)`, with a moving-average baseline.
pub struct Reinforce {
    logits: Vec<Vec<f64>>,
    lr: f64,
    baseline: Option<f64>,
    decay: f64,
    rng: StdRng,
    next: usize,
}

impl Reinforce {
    /// A policy over `choices` with learning rate `lr` and baseline decay 0.9, seeded.
    ///
    /// # Errors
    /// [`crate::Error::Empty`] for an empty space, [`crate::Error::InvalidConfig`] for a
    /// learning rate that is not finite and positive.
    pub fn new(choices: &[usize], lr: f64, seed: u64) -> Result<Self> {
        let choices = checked_choices(choices)?;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(crate::Error::config(
                "REINFORCE",
                format!("learning rate {lr} (must be finite and > 0)"),
            ));
        }
        Ok(Reinforce {
            logits: choices.iter().map(|&n| vec![0.0; n]).collect(),
            lr,
            baseline: None,
            decay: 0.9,
            rng: StdRng::seed_from_u64(seed),
            next: 0,
        })
    }

    fn probs(logits: &[f64]) -> Vec<f64> {
        let m = logits.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    /// The probability of each option of each decision.
    pub fn policy(&self) -> Vec<Vec<f64>> {
        self.logits.iter().map(|l| Self::probs(l)).collect()
    }
}

impl Controller for Reinforce {
    fn name(&self) -> &str {
        "reinforce"
    }
    fn ask(&mut self) -> Result<Candidate> {
        let code: Vec<usize> = self
            .logits
            .iter()
            .map(|l| {
                let p = Self::probs(l);
                let u: f64 = self.rng.random();
                let mut acc = 0.0;
                p.iter()
                    .position(|&q| {
                        acc += q;
                        u < acc
                    })
                    .unwrap_or(p.len() - 1)
            })
            .collect();
        Ok(issue(&mut self.next, code))
    }
    fn tell(&mut self, candidate: &Candidate, score: Option<f64>) {
        let Some(s) = score.filter(|s| s.is_finite()) else {
            return;
        };
        if candidate.code.len() != self.logits.len()
            || candidate
                .code
                .iter()
                .zip(&self.logits)
                .any(|(&k, l)| k >= l.len())
        {
            return;
        }
        let b = *self.baseline.get_or_insert(s);
        let advantage = s - b;
        for (l, &k) in self.logits.iter_mut().zip(&candidate.code) {
            let p = Self::probs(l);
            for (j, lj) in l.iter_mut().enumerate() {
                let grad = f64::from(u8::from(j == k)) - p[j];
                *lj += self.lr * advantage * grad;
            }
        }
        self.baseline = Some(self.decay * b + (1.0 - self.decay) * s);
    }
}
