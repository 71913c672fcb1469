//! The distillation losses: logit KD, FitNet hints, FSP matrices, attention transfer.

use crate::error::{Error, Result};
use crate::kernels::sgemm;
use crate::tensor::Tensor;
use ndarray::{Array1, Array2, ArrayD, ArrayView2, ArrayViewMutD, Axis, Ix2, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a loss returns: its value (mean over the batch) and its gradient with respect to each
/// student activation it read, and to each of its own parameters.
#[derive(Clone, Debug)]
pub struct LossOutput {
    /// The loss value.
    pub value: f32,
    /// `∂loss/∂activation`, one per [`DistillationLoss::student_nodes`] entry, each of that
    /// activation's shape.
    pub student_grads: Vec<Tensor>,
    /// `∂loss/∂p` for each of [`DistillationLoss::params_mut`], same order and shapes.
    pub param_grads: Vec<ArrayD<f32>>,
}

/// A loss between teacher and student activations at named nodes.
///
/// Users implement it for their own losses; the [`super::Distiller`] runs both models, hands
/// the loss the activations it asks for, injects the returned gradients into the student's
/// backward pass at those nodes (one pass, summed with every other loss), and updates the
/// loss's own parameters with the student's learning rate.
pub trait DistillationLoss {
    /// A short name for progress and errors.
    fn name(&self) -> &str;
    /// Student nodes whose outputs the loss reads.
    fn student_nodes(&self) -> Vec<String>;
    /// Teacher nodes whose outputs the loss reads.
    fn teacher_nodes(&self) -> Vec<String>;
    /// Checks the per-sample shapes of the nodes (same order as the node lists) before
    /// training starts.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the loss cannot pair them.
    fn check(&self, student: &[&[usize]], teacher: &[&[usize]]) -> Result<()>;
    /// The value and gradients for one batch.
    ///
    /// # Errors
    /// Shape errors, or [`Error::NonFinite`].
    fn compute(
        &self,
        student: &[&Tensor],
        teacher: &[&Tensor],
        labels: &[usize],
    ) -> Result<LossOutput>;
    /// The loss's own trainable parameters (a FitNet regressor); none by default.
    fn params_mut(&mut self) -> Vec<ArrayViewMutD<'_, f32>> {
        Vec::new()
    }
}

fn mismatch(what: &str, expected: String, got: &[usize]) -> Error {
    Error::shape(what, None, expected, got)
}

fn softmax_rows(z: ArrayView2<f32>, t: f32) -> Array2<f32> {
    let mut p = z.mapv(|v| v / t);
    for mut row in p.outer_iter_mut() {
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    p
}

fn as2<'a>(t: &'a Tensor, what: &str) -> Result<ArrayView2<'a, f32>> {
    t.view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| mismatch(what, "[N, classes]".into(), t.shape()))
}

/// Hinton et al.'s knowledge distillation on logits:
/// `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(softmax(s), labels)`, mean over the
/// batch. The `T²` keeps the soft term's gradient comparable across temperatures.
#[derive(Clone, Debug)]
pub struct LogitKd {
    student: String,
    teacher: String,
    temperature: f32,
    alpha: f32,
}

impl LogitKd {
    /// KD between the student's and the teacher's logits at the given nodes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `T ≤ 0` (or non-finite) or `α` outside `[0, 1]`.
    pub fn new(student: &str, teacher: &str, temperature: f32, alpha: f32) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::config(
                "logit KD",
                format!("temperature {temperature} must be > 0"),
            ));
        }
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::config(
                "logit KD",
                format!("α = {alpha} is outside [0, 1]"),
            ));
        }
        Ok(LogitKd {
            student: student.into(),
            teacher: teacher.into(),
            temperature,
            alpha,
        })
    }
}

impl DistillationLoss for LogitKd {
    fn name(&self) -> &str {
        "logit KD"
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student.clone()]
    }
    fn teacher_nodes(&self) -> Vec<String> {
        vec![self.teacher.clone()]
    }
    fn check(&self, s: &[&[usize]], t: &[&[usize]]) -> Result<()> {
        if s[0].len() != 1 || s[0] != t[0] {
            return Err(mismatch(
                "logit KD",
                format!("student logits shaped like the teacher's {:?}", t[0]),
                s[0],
            ));
        }
        Ok(())
    }
    fn compute(&self, s: &[&Tensor], t: &[&Tensor], labels: &[usize]) -> Result<LossOutput> {
        let (zs, zt) = (as2(s[0], "logit KD")?, as2(t[0], "logit KD")?);
        if zs.dim() != zt.dim() || zs.nrows() != labels.len() {
            return Err(mismatch(
                "logit KD",
                format!("{:?} with one label per row", zt.dim()),
                zs.shape(),
            ));
        }
        let (n, temp, a) = (zs.nrows() as f32, self.temperature, self.alpha);
        let (ps, pt) = (softmax_rows(zs, temp), softmax_rows(zt, temp));
        let p1 = softmax_rows(zs, 1.0);
        let mut kl = 0.0f64;
        let mut ce = 0.0f64;
        for i in 0..zs.nrows() {
            for j in 0..zs.ncols() {
                if pt[[i, j]] > 0.0 {
                    kl += (pt[[i, j]] as f64)
                        * ((pt[[i, j]] as f64).ln() - (ps[[i, j]] as f64).max(1e-38).ln());
                }
            }
            let y = labels[i];
            if y >= zs.ncols() {
                return Err(Error::LabelOutOfRange {
                    index: i,
                    label: y,
                    classes: zs.ncols(),
                });
            }
            ce -= (p1[[i, y]] as f64).max(1e-38).ln();
        }
        let value =
            a as f64 * (temp * temp) as f64 * kl / n as f64 + (1.0 - a) as f64 * ce / n as f64;
        // ∂/∂z: α·T·(p_s^T − p_t^T)/N + (1 − α)(p_s − onehot)/N.
        let mut g = (&ps - &pt) * (a * temp / n);
        let mut hard = p1;
        for (i, &y) in labels.iter().enumerate() {
            hard[[i, y]] -= 1.0;
        }
        g.scaled_add((1.0 - a) / n, &hard);
        if !value.is_finite() {
            return Err(Error::NonFinite("logit KD loss".into()));
        }
        Ok(LossOutput {
            value: value as f32,
            student_grads: vec![g.into_dyn()],
            param_grads: Vec::new(),
        })
    }
}

/// FitNet hints (Romero et al. 2015): `½·mean (r(s) − t)²` over every element, between a
/// student layer and a teacher layer, through a learned regressor `r` — a 1×1 convolution for `[C, H, W]`
/// activations, a linear map for `[F]` — or the identity when the shapes already agree.
#[derive(Clone, Debug)]
pub struct FitNet {
    student: String,
    teacher: String,
    /// Regressor weight `[teacher channels, student channels]` and bias, if any.
    regressor: Option<(Array2<f32>, Array1<f32>)>,
}

impl FitNet {
    /// A hint without a regressor (the two layers must have the same shape).
    pub fn identity(student: &str, teacher: &str) -> Self {
        FitNet {
            student: student.into(),
            teacher: teacher.into(),
            regressor: None,
        }
    }

    /// A hint through a learned regressor from `student_channels` to `teacher_channels`
    /// (channels of `[C, H, W]` activations, or features of `[F]`), initialised with a seeded
    /// Kaiming-uniform draw.
    pub fn with_regressor(
        student: &str,
        teacher: &str,
        student_channels: usize,
        teacher_channels: usize,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / (student_channels.max(1) as f32).sqrt();
        let w = Array2::from_shape_simple_fn((teacher_channels, student_channels), || {
            rng.random_range(-bound..bound)
        });
        FitNet {
            student: student.into(),
            teacher: teacher.into(),
            regressor: Some((w, Array1::zeros(teacher_channels))),
        }
    }
}

/// `[N, C, ...]` as `[N·rest, C]` (channels last) and back.
fn channels_last(x: &Tensor) -> Array2<f32> {
    let n = x.shape()[0];
    let c = x.shape()[1];
    // No `.max(1)`: a zero-size spatial axis has zero rows, and the product of no axes
    // (a `[N, C]` input) is already 1.
    let rest: usize = x.shape()[2..].iter().product();
    let mut perm: Vec<usize> = vec![0];
    perm.extend(2..x.ndim());
    perm.push(1);
    let v = x.view().permuted_axes(IxDyn(&perm));
    Array2::from_shape_vec(
        (n * rest, c),
        v.as_standard_layout().iter().copied().collect(),
    )
    .expect("sizes agree")
}

fn channels_first(m: &Array2<f32>, shape: &[usize]) -> Result<Tensor> {
    let mut cl: Vec<usize> = vec![shape[0]];
    cl.extend(&shape[2..]);
    cl.push(shape[1]);
    let a = ArrayD::from_shape_vec(IxDyn(&cl), m.iter().copied().collect())
        .map_err(|_| mismatch("FitNet hint", format!("{shape:?}"), m.shape()))?;
    let nd = shape.len();
    let mut perm: Vec<usize> = vec![0, nd - 1];
    perm.extend(1..nd - 1);
    Ok(a.permuted_axes(IxDyn(&perm))
        .as_standard_layout()
        .into_owned())
}

impl DistillationLoss for FitNet {
    fn name(&self) -> &str {
        "FitNet hint"
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student.clone()]
    }
    fn teacher_nodes(&self) -> Vec<String> {
        vec![self.teacher.clone()]
    }
    fn check(&self, s: &[&[usize]], t: &[&[usize]]) -> Result<()> {
        match &self.regressor {
            None if s[0] != t[0] => Err(mismatch(
                "FitNet hint without a regressor",
                format!("{:?} (the teacher layer's shape)", t[0]),
                s[0],
            )),
            Some((w, _))
                if s[0].first() != Some(&w.ncols())
                    || t[0].first() != Some(&w.nrows())
                    || s[0][1..] != t[0][1..] =>
            {
                Err(mismatch(
                    "FitNet hint",
                    format!(
                        "[{}, ...] mapped to the teacher's {:?} (same spatial size)",
                        w.ncols(),
                        t[0]
                    ),
                    s[0],
                ))
            }
            _ => Ok(()),
        }
    }
    fn compute(&self, s: &[&Tensor], t: &[&Tensor], _: &[usize]) -> Result<LossOutput> {
        if s[0].ndim() < 2 || t[0].ndim() < 2 {
            return Err(mismatch(
                "FitNet hint",
                "[N, C, ...] activations".into(),
                s[0].shape(),
            ));
        }
        let (pred, xs) = match &self.regressor {
            None => (s[0].clone(), None),
            Some((w, b)) => {
                let x = channels_last(s[0]);
                let mut y = Array2::<f32>::zeros((x.nrows(), w.nrows()));
                sgemm(x.view(), w.t(), y.view_mut(), false)?;
                y += b;
                let mut shape = t[0].shape().to_vec();
                shape[0] = s[0].shape()[0];
                (channels_first(&y, &shape)?, Some(x))
            }
        };
        if pred.shape() != t[0].shape() {
            return Err(mismatch(
                "FitNet hint",
                format!("{:?}", t[0].shape()),
                pred.shape(),
            ));
        }
        let diff = &pred - t[0];
        // Mean over every element (not only the batch): the loss does not grow with the
        // layer's size, so one learning rate suits hints on any layer.
        let count = diff.len().max(1) as f32;
        let value = 0.5 * diff.iter().map(|d| (*d as f64).powi(2)).sum::<f64>() / count as f64;
        let g = diff / count; // ∂/∂pred
        let (student_grad, param_grads) = match (&self.regressor, xs) {
            (Some((w, _)), Some(x)) => {
                let gl = channels_last(&g);
                let mut dw = Array2::<f32>::zeros(w.dim());
                sgemm(gl.t(), x.view(), dw.view_mut(), false)?;
                let db = gl.sum_axis(Axis(0));
                let mut dx = Array2::<f32>::zeros(x.dim());
                sgemm(gl.view(), w.view(), dx.view_mut(), false)?;
                (
                    channels_first(&dx, s[0].shape())?,
                    vec![dw.into_dyn(), db.into_dyn()],
                )
            }
            _ => (g, Vec::new()),
        };
        Ok(LossOutput {
            value: value as f32,
            student_grads: vec![student_grad],
            param_grads,
        })
    }
    fn params_mut(&mut self) -> Vec<ArrayViewMutD<'_, f32>> {
        match &mut self.regressor {
            Some((w, b)) => vec![w.view_mut().into_dyn(), b.view_mut().into_dyn()],
            None => Vec::new(),
        }
    }
}

/// `[N, C, H, W]` as `[N, C, H·W]` rows per sample.
fn flat3(x: &Tensor, what: &str) -> Result<ndarray::Array3<f32>> {
    if x.ndim() != 4 {
        return Err(mismatch(what, "[N, C, H, W]".into(), x.shape()));
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let hw = x.shape()[2] * x.shape()[3];
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order((n, c, hw))
        .map_err(|e| Error::Unsupported(e.to_string()))
}

/// FSP matrices (Yim et al. 2017): for two layers `a` `[C₁, H, W]` and `b` `[C₂, H, W]` of the
/// same spatial size, `G = a·bᵀ / (H·W)` `[C₁, C₂]` per sample; the loss is the mean of
/// `(G_student − G_teacher)²` over the batch and the matrix (the "flow of solution" between
/// the two layers).
#[derive(Clone, Debug)]
pub struct Fsp {
    student: (String, String),
    teacher: (String, String),
}

impl Fsp {
    /// FSP between the student pair `(a, b)` and the teacher pair `(a, b)`.
    pub fn new(student: (&str, &str), teacher: (&str, &str)) -> Self {
        Fsp {
            student: (student.0.into(), student.1.into()),
            teacher: (teacher.0.into(), teacher.1.into()),
        }
    }
}

/// Per-sample `a·bᵀ / hw` for `[N, C₁, hw]` and `[N, C₂, hw]`.
fn gram(a: &ndarray::Array3<f32>, b: &ndarray::Array3<f32>) -> ndarray::Array3<f32> {
    let (n, c1, hw) = a.dim();
    let c2 = b.dim().1;
    let mut g = ndarray::Array3::<f32>::zeros((n, c1, c2));
    for i in 0..n {
        let gi = a.index_axis(Axis(0), i).dot(&b.index_axis(Axis(0), i).t()) / hw as f32;
        g.index_axis_mut(Axis(0), i).assign(&gi);
    }
    g
}

impl DistillationLoss for Fsp {
    fn name(&self) -> &str {
        "FSP"
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student.0.clone(), self.student.1.clone()]
    }
    fn teacher_nodes(&self) -> Vec<String> {
        vec![self.teacher.0.clone(), self.teacher.1.clone()]
    }
    fn check(&self, s: &[&[usize]], t: &[&[usize]]) -> Result<()> {
        for (pair, who) in [(s, "student"), (t, "teacher")] {
            if pair[0].len() != 3 || pair[1].len() != 3 || pair[0][1..] != pair[1][1..] {
                return Err(mismatch(
                    "FSP",
                    format!("two {who} layers [C, H, W] of the same H × W"),
                    pair[1],
                ));
            }
        }
        if s[0][0] != t[0][0] || s[1][0] != t[1][0] {
            return Err(mismatch(
                "FSP",
                format!("channels ({}, {}) as the teacher's pair", t[0][0], t[1][0]),
                &[s[0][0], s[1][0]],
            ));
        }
        Ok(())
    }
    fn compute(&self, s: &[&Tensor], t: &[&Tensor], _: &[usize]) -> Result<LossOutput> {
        let (sa, sb) = (flat3(s[0], "FSP")?, flat3(s[1], "FSP")?);
        let (ta, tb) = (flat3(t[0], "FSP")?, flat3(t[1], "FSP")?);
        for (a, b, x) in [(&sa, &sb, s[1]), (&ta, &tb, t[1])] {
            if a.dim().0 != b.dim().0 || a.dim().2 != b.dim().2 || a.dim().0 != sa.dim().0 {
                return Err(mismatch(
                    "FSP",
                    format!(
                        "a layer of {} samples of {} positions (as its pair)",
                        a.dim().0,
                        a.dim().2
                    ),
                    x.shape(),
                ));
            }
        }
        let (gs, gt) = (gram(&sa, &sb), gram(&ta, &tb));
        if gs.dim() != gt.dim() {
            return Err(mismatch("FSP", format!("{:?}", gt.shape()), gs.shape()));
        }
        let hw = sa.dim().2 as f32;
        let diff = &gs - &gt;
        let count = diff.len().max(1) as f32;
        let value = diff.iter().map(|d| (*d as f64).powi(2)).sum::<f64>() / count as f64;
        // ∂/∂G = 2(G_s − G_t)/(N·C₁·C₂); ∂G/∂a = b/hw, ∂G/∂b = a/hw.
        let dg = diff * (2.0 / count);
        let mut da = ndarray::Array3::<f32>::zeros(sa.dim());
        let mut db = ndarray::Array3::<f32>::zeros(sb.dim());
        for i in 0..sa.dim().0 {
            let g = dg.index_axis(Axis(0), i);
            da.index_axis_mut(Axis(0), i)
                .assign(&(g.dot(&sb.index_axis(Axis(0), i)) / hw));
            db.index_axis_mut(Axis(0), i)
                .assign(&(g.t().dot(&sa.index_axis(Axis(0), i)) / hw));
        }
        let back = |x: ndarray::Array3<f32>, like: &Tensor| {
            x.into_shape_with_order(IxDyn(like.shape()))
                .map_err(|e| Error::Unsupported(e.to_string()))
        };
        Ok(LossOutput {
            value: value as f32,
            student_grads: vec![back(da, s[0])?, back(db, s[1])?],
            param_grads: Vec::new(),
        })
    }
}

/// Attention transfer (Zagoruyko & Komodakis 2017): the spatial attention map
/// `Q = Σ_c a_c²` `[H·W]` of a layer, L2-normalised per sample; the loss is
/// `β/2 · mean_N ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖²` (channel counts may differ, H × W may not).
#[derive(Clone, Debug)]
pub struct AttentionTransfer {
    student: String,
    teacher: String,
    beta: f32,
}

impl AttentionTransfer {
    /// Attention transfer between two layers with weight `β` (the paper uses 10³ with its
    /// own normalisation; here the maps are unit vectors, so β around 1–100 suits).
    pub fn new(student: &str, teacher: &str, beta: f32) -> Self {
        AttentionTransfer {
            student: student.into(),
            teacher: teacher.into(),
            beta,
        }
    }
}

/// Normalised attention maps `[N, hw]` and the norms of the raw maps.
fn attention(x: &ndarray::Array3<f32>) -> (Array2<f32>, Array1<f32>) {
    let (n, _, hw) = x.dim();
    let mut q = Array2::<f32>::zeros((n, hw));
    for i in 0..n {
        let xi = x.index_axis(Axis(0), i);
        for c in xi.outer_iter() {
            q.row_mut(i).zip_mut_with(&c, |a, &v| *a += v * v);
        }
    }
    let norms: Array1<f32> = q
        .outer_iter()
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12))
        .collect();
    for (mut r, &nrm) in q.outer_iter_mut().zip(&norms) {
        r /= nrm;
    }
    (q, norms)
}

impl DistillationLoss for AttentionTransfer {
    fn name(&self) -> &str {
        "attention transfer"
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student.clone()]
    }
    fn teacher_nodes(&self) -> Vec<String> {
        vec![self.teacher.clone()]
    }
    fn check(&self, s: &[&[usize]], t: &[&[usize]]) -> Result<()> {
        if s[0].len() != 3 || t[0].len() != 3 || s[0][1..] != t[0][1..] {
            return Err(mismatch(
                "attention transfer",
                format!(
                    "[C, {}, {}] (the teacher layer's H × W)",
                    t[0].get(1).unwrap_or(&0),
                    t[0].get(2).unwrap_or(&0)
                ),
                s[0],
            ));
        }
        Ok(())
    }
    fn compute(&self, s: &[&Tensor], t: &[&Tensor], _: &[usize]) -> Result<LossOutput> {
        let (xs, xt) = (
            flat3(s[0], "attention transfer")?,
            flat3(t[0], "attention transfer")?,
        );
        if xs.dim().0 != xt.dim().0 || xs.dim().2 != xt.dim().2 {
            return Err(mismatch(
                "attention transfer",
                format!("{:?}", xt.dim()),
                s[0].shape(),
            ));
        }
        let (qs, ns) = attention(&xs);
        let (qt, _) = attention(&xt);
        let n = xs.dim().0 as f32;
        let diff = &qs - &qt;
        let value = 0.5 * self.beta as f64 * diff.iter().map(|d| (*d as f64).powi(2)).sum::<f64>()
            / n as f64;
        // ∂/∂q = β(q_s − q_t)/N; q = Q/‖Q‖ → ∂/∂Q = (g − (g·q) q)/‖Q‖; ∂Q/∂a_c = 2a_c.
        let mut dx = ndarray::Array3::<f32>::zeros(xs.dim());
        for i in 0..xs.dim().0 {
            let g = diff.row(i).mapv(|v| v * self.beta / n);
            let q = qs.row(i);
            let dot = g.dot(&q);
            let dq = (&g - &q.mapv(|v| v * dot)) / ns[i];
            let xi = xs.index_axis(Axis(0), i);
            let mut di = dx.index_axis_mut(Axis(0), i);
            for (mut dc, xc) in di.outer_iter_mut().zip(xi.outer_iter()) {
                ndarray::Zip::from(&mut dc)
                    .and(&xc)
                    .and(&dq)
                    .for_each(|d, &x, &g| *d = 2.0 * x * g);
            }
        }
        Ok(LossOutput {
            value: value as f32,
            student_grads: vec![dx
                .into_shape_with_order(IxDyn(s[0].shape()))
                .map_err(|e| Error::Unsupported(e.to_string()))?],
            param_grads: Vec::new(),
        })
    }
}
