//! Search spaces: what an architecture is, how to draw, mutate, encode and build one.

use crate::error::{Error, Result};
use crate::model::{Conv2dConfig, Graph, GraphBuilder, Pool2d};
use rand::rngs::StdRng;
use rand::Rng;
use std::fmt::Debug;
use std::hash::Hash;

/// A space of architectures with a discrete encoding: decision `i` takes one of
/// `choices()[i]` options.
///
/// `sample` and `mutate` have defaults over the encoding (uniform draw; one decision
/// re-drawn to a different option); an architecture serialises as its code (see
/// [`code_to_string`]).
pub trait SearchSpace: Send + Sync {
    /// An architecture.
    type Arch: Clone + Debug + Eq + Hash + Send + Sync;

    /// Options per decision (each at least 1).
    fn choices(&self) -> Vec<usize>;

    /// The code of an architecture.
    fn encode(&self, arch: &Self::Arch) -> Vec<usize>;

    /// The architecture of a code.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a code of the wrong length or an option out of range.
    fn decode(&self, code: &[usize]) -> Result<Self::Arch>;

    /// Builds the graph of an architecture.
    ///
    /// # Errors
    /// When the architecture does not make a valid graph (the search records the failure and
    /// goes on).
    fn build(&self, arch: &Self::Arch) -> Result<Graph>;

    /// A uniformly drawn architecture.
    ///
    /// # Errors
    /// [`Error::Empty`] for a space without decisions or with a decision without options.
    fn sample(&self, rng: &mut StdRng) -> Result<Self::Arch> {
        let c = checked_choices(&self.choices())?;
        self.decode(
            &c.iter()
                .map(|&n| rng.random_range(0..n))
                .collect::<Vec<_>>(),
        )
    }

    /// `arch` with one decision (that has more than one option) re-drawn to another option.
    ///
    /// # Errors
    /// As [`SearchSpace::sample`].
    fn mutate(&self, arch: &Self::Arch, rng: &mut StdRng) -> Result<Self::Arch> {
        let c = checked_choices(&self.choices())?;
        let mut code = self.encode(arch);
        check_code(&c, &code)?;
        mutate_code(&c, &mut code, rng);
        self.decode(&code)
    }
}

/// Checks that `code` has one option per decision, each in range.
///
/// # Errors
/// [`Error::InvalidConfig`] otherwise (a code from another space, or an architecture with an
/// option the space does not offer).
pub fn check_code(choices: &[usize], code: &[usize]) -> Result<()> {
    if code.len() != choices.len() || code.iter().zip(choices).any(|(c, n)| c >= n) {
        return Err(Error::config(
            "architecture code",
            format!(
                "`{}` does not fit the options {choices:?}",
                code_to_string(code)
            ),
        ));
    }
    Ok(())
}

/// Re-draws one decision of `code` (one with more than one option) to another option; the
/// caller has checked the code with [`check_code`].
pub(crate) fn mutate_code(choices: &[usize], code: &mut [usize], rng: &mut StdRng) {
    let free: Vec<usize> = (0..choices.len()).filter(|&i| choices[i] > 1).collect();
    if free.is_empty() {
        return;
    }
    let i = free[rng.random_range(0..free.len())];
    code[i] = (code[i] + rng.random_range(1..choices[i])) % choices[i];
}

/// Checks that a space has decisions and each has options.
///
/// # Errors
/// [`Error::Empty`] otherwise.
pub fn checked_choices(choices: &[usize]) -> Result<Vec<usize>> {
    if choices.is_empty() || choices.contains(&0) {
        return Err(Error::Empty(
            "search space (no decisions, or a decision without options)".into(),
        ));
    }
    Ok(choices.to_vec())
}

/// A code as text: `2-0-1`.
pub fn code_to_string(code: &[usize]) -> String {
    code.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("-")
}

/// Parses [`code_to_string`]'s text.
///
/// # Errors
/// [`Error::InvalidConfig`] for text that is not dash-separated numbers.
pub fn code_from_string(s: &str) -> Result<Vec<usize>> {
    s.split('-')
        .map(|p| {
            p.parse::<usize>()
                .map_err(|_| Error::config("architecture code", format!("`{s}` is not a code")))
        })
        .collect()
}

/// One stage of a [`CnnSpace`] architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stage {
    /// Conv layers in the stage.
    pub depth: usize,
    /// Output channels.
    pub width: usize,
    /// Kernel size (3 or 5).
    pub kernel: usize,
    /// Stride of the first conv (1 or 2; a 2×2 max pool follows stride-1 stages).
    pub stride: usize,
    /// A residual connection around the stage's convs after the first (when depth > 1).
    pub residual: bool,
}

/// A CNN architecture: stages, then global average pooling and a linear classifier.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CnnArch {
    /// The stages in order.
    pub stages: Vec<Stage>,
}

/// Stages × {depth, width, kernel 3/5, stride 1/2, residual}, every conv followed by
/// BatchNorm and ReLU; a stride-1 stage ends with 2×2 max pooling, so each stage halves the
/// resolution either way.
#[derive(Clone, Debug, PartialEq)]
pub struct CnnSpace {
    /// Input per-sample shape `[C, H, W]`.
    pub input: [usize; 3],
    /// Output classes.
    pub classes: usize,
    /// Number of stages.
    pub stages: usize,
    /// Depth options.
    pub depths: Vec<usize>,
    /// Width options.
    pub widths: Vec<usize>,
    /// Kernel options.
    pub kernels: Vec<usize>,
    /// Seed of the built graphs' initial weights.
    pub init_seed: u64,
}

impl CnnSpace {
    /// A space for `input` and `classes`: `stages` stages, depth 1–2, widths 8/16/32/64,
    /// kernels 3/5, stride 1/2, residual or not.
    pub fn new(input: [usize; 3], classes: usize, stages: usize) -> Self {
        CnnSpace {
            input,
            classes,
            stages,
            depths: vec![1, 2],
            widths: vec![8, 16, 32, 64],
            kernels: vec![3, 5],
            init_seed: 0,
        }
    }
}

const PER_STAGE: usize = 5;

impl SearchSpace for CnnSpace {
    type Arch = CnnArch;

    fn choices(&self) -> Vec<usize> {
        (0..self.stages)
            .flat_map(|_| {
                [
                    self.depths.len(),
                    self.widths.len(),
                    self.kernels.len(),
                    2,
                    2,
                ]
            })
            .collect()
    }

    fn encode(&self, arch: &CnnArch) -> Vec<usize> {
        // An option the space does not offer encodes past its decision's range, so that
        // `decode` (and `mutate`) refuse it instead of silently mapping it to option 0.
        let idx = |v: &[usize], x: usize| v.iter().position(|&o| o == x).unwrap_or(usize::MAX);
        arch.stages
            .iter()
            .flat_map(|s| {
                [
                    idx(&self.depths, s.depth),
                    idx(&self.widths, s.width),
                    idx(&self.kernels, s.kernel),
                    s.stride.checked_sub(1).unwrap_or(usize::MAX),
                    usize::from(s.residual),
                ]
            })
            .collect()
    }

    fn decode(&self, code: &[usize]) -> Result<CnnArch> {
        check_code(&checked_choices(&self.choices())?, code)?;
        Ok(CnnArch {
            stages: code
                .chunks(PER_STAGE)
                .map(|c| Stage {
                    depth: self.depths[c[0]],
                    width: self.widths[c[1]],
                    kernel: self.kernels[c[2]],
                    stride: c[3] + 1,
                    residual: c[4] == 1,
                })
                .collect(),
        })
    }

    fn build(&self, arch: &CnnArch) -> Result<Graph> {
        let mut b = GraphBuilder::new(self.init_seed);
        b.input("input", &self.input);
        let mut prev = "input".to_string();
        let mut channels = self.input[0];
        for (i, s) in arch.stages.iter().enumerate() {
            let mut stage_in = String::new();
            for d in 0..s.depth {
                let p = format!("stage{i}.{d}");
                let stride = if d == 0 { s.stride } else { 1 };
                b.conv2d(
                    &format!("{p}.conv"),
                    &prev,
                    Conv2dConfig::new(channels, s.width, s.kernel)
                        .with_stride(stride)
                        .with_padding(s.kernel / 2)
                        .with_bias(false),
                )
                .batch_norm2d(&format!("{p}.bn"), &format!("{p}.conv"), s.width);
                let mut out = format!("{p}.bn");
                if s.residual && d > 0 {
                    b.add(&format!("{p}.add"), &[&out, &stage_in]);
                    out = format!("{p}.add");
                }
                b.relu(&format!("{p}.relu"), &out);
                prev = format!("{p}.relu");
                channels = s.width;
                if d == 0 {
                    stage_in = prev.clone();
                }
            }
            if s.stride == 1 {
                b.max_pool2d(&format!("stage{i}.pool"), &prev, Pool2d::new(2, 2));
                prev = format!("stage{i}.pool");
            }
        }
        b.global_avg_pool("gap", &prev)
            .flatten("flatten", "gap")
            .linear("classifier", "flatten", channels, self.classes, true);
        b.build("classifier")
    }
}
