//! What happens to each i32 accumulator after the dot product: written once, as data, and
//! shared by every kernel path.
//!
//! The accumulator handed to an epilogue is already zero-point corrected:
//! `acc[m, n] = Σ_k (a[m, k] − z_a) · w[n, k]`.

use super::requant::{multiply_by_quantized_multiplier, quantize_multiplier};
use crate::error::{Error, Result};

/// One output element from a corrected accumulator.
pub(crate) trait Epilogue: Sync {
    /// Output element type.
    type Out: Copy + Send + Sync;
    /// Output columns this epilogue has parameters for (`None`: any).
    fn columns(&self) -> Option<usize>;
    /// The output for column `n`.
    fn apply(&self, n: usize, acc: i32) -> Self::Out;
    /// A run of columns `n0..n0 + out.len()` of one row, from raw sums `acc` and the
    /// zero-point corrections `corr` (implementations specialise this so it vectorises).
    #[inline(always)]
    fn apply_row(&self, n0: usize, acc: &[i32], corr: &[i32], out: &mut [Self::Out]) {
        let len = out.len();
        for (i, ((o, &a), &z)) in out
            .iter_mut()
            .zip(&acc[..len])
            .zip(&corr[..len])
            .enumerate()
        {
            *o = self.apply(n0 + i, a.wrapping_sub(z));
        }
    }
    /// [`Epilogue::apply`] for row `row` of the whole problem (row-dependent epilogues
    /// override this and [`Epilogue::apply_row_at`]).
    #[inline(always)]
    fn apply_at(&self, _row: usize, n: usize, acc: i32) -> Self::Out {
        self.apply(n, acc)
    }
    /// [`Epilogue::apply_row`] for row `row` of the whole problem.
    #[inline(always)]
    fn apply_row_at(
        &self,
        _row: usize,
        n0: usize,
        acc: &[i32],
        corr: &[i32],
        out: &mut [Self::Out],
    ) {
        self.apply_row(n0, acc, corr, out)
    }
}

/// The dequantizing epilogue for activations quantized per row:
/// `out = acc · (s_row[m] · s_w[n]) + bias[n]`.
pub(crate) struct DequantizeRows<'a> {
    row_scales: &'a [f32],
    weight_scales: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl<'a> DequantizeRows<'a> {
    pub(crate) fn new(
        row_scales: &'a [f32],
        weight_scales: &'a [f32],
        bias: Option<&'a [f32]>,
    ) -> Result<Self> {
        if row_scales
            .iter()
            .chain(weight_scales)
            .any(|s| !s.is_finite())
        {
            return Err(Error::config("dequantize", "scales must be finite"));
        }
        if bias.is_some_and(|b| b.len() != weight_scales.len()) {
            return Err(Error::config(
                "dequantize",
                "bias length differs from the channels",
            ));
        }
        Ok(DequantizeRows {
            row_scales,
            weight_scales,
            bias,
        })
    }

    /// The one formula every path uses, so that they agree bit for bit.
    #[inline(always)]
    pub(crate) fn value(row_scale: f32, weight_scale: f32, bias: f32, acc: i32) -> f32 {
        acc as f32 * (row_scale * weight_scale) + bias
    }
}

impl Epilogue for DequantizeRows<'_> {
    type Out = f32;
    fn columns(&self) -> Option<usize> {
        Some(self.weight_scales.len())
    }
    fn apply(&self, n: usize, acc: i32) -> f32 {
        self.apply_at(0, n, acc)
    }
    #[inline(always)]
    fn apply_at(&self, row: usize, n: usize, acc: i32) -> f32 {
        let b = self.bias.map_or(0.0, |b| b[n]);
        Self::value(self.row_scales[row], self.weight_scales[n], b, acc)
    }
    #[inline(always)]
    fn apply_row_at(&self, row: usize, n0: usize, acc: &[i32], corr: &[i32], out: &mut [f32]) {
        let len = out.len();
        let rs = self.row_scales[row];
        let ws = &self.weight_scales[n0..n0 + len];
        let (acc, corr) = (&acc[..len], &corr[..len]);
        match self.bias {
            Some(b) => {
                let b = &b[n0..n0 + len];
                for i in 0..len {
                    out[i] = Self::value(rs, ws[i], b[i], acc[i].wrapping_sub(corr[i]));
                }
            }
            None => {
                for i in 0..len {
                    out[i] = Self::value(rs, ws[i], 0.0, acc[i].wrapping_sub(corr[i]));
                }
            }
        }
    }
}

/// The "i32 out" epilogue: the accumulator plus an optional i32 bias.
pub(crate) struct I32Out<'a> {
    pub bias: Option<&'a [i32]>,
}

impl Epilogue for I32Out<'_> {
    type Out = i32;
    fn columns(&self) -> Option<usize> {
        self.bias.map(<[i32]>::len)
    }
    #[inline(always)]
    fn apply(&self, n: usize, acc: i32) -> i32 {
        match self.bias {
            Some(b) => acc.wrapping_add(b[n]),
            None => acc,
        }
    }
    #[inline(always)]
    fn apply_row(&self, n0: usize, acc: &[i32], corr: &[i32], out: &mut [i32]) {
        let len = out.len();
        let (acc, corr) = (&acc[..len], &corr[..len]);
        match self.bias {
            Some(b) => {
                let b = &b[n0..n0 + len];
                for i in 0..len {
                    out[i] = acc[i].wrapping_sub(corr[i]).wrapping_add(b[i]);
                }
            }
            None => {
                for i in 0..len {
                    out[i] = acc[i].wrapping_sub(corr[i]);
                }
            }
        }
    }
}

/// A ReLU or ReLU6 fused into the requantization clamp.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FusedActivation {
    /// No clamp beyond the output type's range.
    None,
    /// Clamp below at the output zero point (real 0).
    Relu,
    /// Clamp to the quantized values of real 0 and 6.
    Relu6,
}

/// How the real multiplier `s_a·s_w / s_out` of a requantization is formed from f32 scales
/// before it becomes a Q31 multiplier and shift. The two differ in the last bits of the
/// multiplier, which moves an output by one where `acc·M` lies near a rounding tie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MultiplierRule {
    /// In f64 from the f32 scales, as TFLite's reference kernels and gemmlowp do (and the
    /// crate's own quantized models).
    #[default]
    F64,
    /// In f32, `s_a * s_w / s_out`, as ONNX Runtime forms its output scales for
    /// `QLinearMatMul` / `QLinearConv`.
    F32,
}

/// The output type of a requantization, with its zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizedOutput {
    /// u8 output (ONNX `uint8`).
    U8(u8),
    /// i8 output (ONNX `int8`).
    I8(i8),
}

/// Parameters of the requantizing epilogue, per output channel `n`:
///
/// ```text
/// out = clamp(z_out + multiply_by_quantized_multiplier(acc + bias[n], M0[n], shift[n]), min, max)
/// ```
///
/// with `M0[n] · 2^shift[n] / 2^31 = s_a · s_w[n] / s_out` and `bias` quantized with scale
/// `s_a · s_w[n]` (see [`crate::kernels::requant`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Requantize {
    bias: Vec<i32>,
    multiplier: Vec<i32>,
    shift: Vec<i32>,
    zero_point: i32,
    min: u8,
    max: u8,
    /// The output is i8: the values above are on the u8 grid (i8 + 128), and the i8-output
    /// epilogue flips the sign bit.
    signed: bool,
    /// Every shift ≤ 0 (multipliers below 1, the usual case): the branch-free fast path,
    /// with per-channel right shift `e = −shift`, `2^e − 1` and `(2^e − 1) >> 1`.
    right_shift_only: bool,
    rshift: Vec<u32>,
    rmask: Vec<i32>,
    rhalf: Vec<i32>,
}

/// [`multiply_by_quantized_multiplier`] for `shift ≤ 0` and `multiplier ≥ 0`, written without
/// branches so a row of it vectorises; equal to the scalar definition on that domain.
/// `mask = 2^e − 1` and `half = mask >> 1` for `e = −shift` are precomputed per channel.
#[inline(always)]
fn requant_right_shift(x: i32, multiplier: i32, e: u32, mask: i32, half: i32) -> i32 {
    // srdhm: the i32::MIN · i32::MIN saturation cannot occur with multiplier ≥ 0.
    let ab = x as i64 * multiplier as i64;
    let nudge = if ab >= 0 {
        1i64 << 30
    } else {
        1 - (1i64 << 30)
    };
    let high = ((ab + nudge) / (1i64 << 31)) as i32;
    // rounding_divide_by_pot(high, e)
    let threshold = half + i32::from(high < 0);
    (high >> e) + i32::from((high & mask) > threshold)
}

impl Requantize {
    /// From Q31 multipliers and shifts (as [`quantize_multiplier`] makes them).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the lengths differ, a multiplier is negative or a shift is
    /// outside `-31..=31`.
    pub fn new(
        bias: Vec<i32>,
        multiplier: Vec<i32>,
        shift: Vec<i32>,
        output_zero_point: u8,
    ) -> Result<Self> {
        if bias.len() != multiplier.len() || bias.len() != shift.len() {
            return Err(Error::config(
                "requantize",
                format!(
                    "bias ({}), multipliers ({}) and shifts ({}) must have one entry per output channel",
                    bias.len(),
                    multiplier.len(),
                    shift.len()
                ),
            ));
        }
        if multiplier.iter().any(|&m| m < 0) || shift.iter().any(|s| !(-31..=31).contains(s)) {
            return Err(Error::config(
                "requantize",
                "multipliers must be ≥ 0 and shifts within -31..=31",
            ));
        }
        let right_shift_only = shift.iter().all(|&s| s <= 0);
        let rshift: Vec<u32> = shift.iter().map(|&s| (-s).clamp(0, 31) as u32).collect();
        let rmask: Vec<i32> = rshift.iter().map(|&e| ((1u32 << e) - 1) as i32).collect();
        let rhalf = rmask.iter().map(|&m| m >> 1).collect();
        Ok(Requantize {
            bias,
            multiplier,
            shift,
            zero_point: output_zero_point as i32,
            min: 0,
            max: 255,
            signed: false,
            right_shift_only,
            rshift,
            rmask,
            rhalf,
        })
    }

    /// From the scales of ONNX's `QLinearMatMul` / `QLinearConv`: activations `input_scale`,
    /// weights `weight_scales` (one, or one per output channel), output `output_scale`,
    /// with the output type and zero point, and the rule forming `s_a·s_w[n] / s_out` (see
    /// [`MultiplierRule`]); `bias` is on the accumulator's scale `s_a·s_w[n]` (zeros for
    /// `QLinearMatMul`) and sets the channel count.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for scales that are not finite and positive, a weight-scale
    /// count other than 1 or the bias length, or a multiplier out of the Q31 range.
    ///
    /// # Examples
    /// ```
    /// use nncompress::kernels::{MultiplierRule, QuantizedOutput, Requantize};
    /// let rq = Requantize::from_scales(
    ///     vec![0; 4], 0.02, &[0.005], 0.1, QuantizedOutput::I8(-3), MultiplierRule::F32,
    /// )?;
    /// assert_eq!(rq.len(), 4);
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn from_scales(
        bias: Vec<i32>,
        input_scale: f32,
        weight_scales: &[f32],
        output_scale: f32,
        output: QuantizedOutput,
        rule: MultiplierRule,
    ) -> Result<Self> {
        let n = bias.len();
        if weight_scales.len() != 1 && weight_scales.len() != n {
            return Err(Error::config(
                "requantize",
                format!(
                    "{} weight scales for {n} channels (1 or {n})",
                    weight_scales.len()
                ),
            ));
        }
        let positive = |s: f32| s.is_finite() && s > 0.0;
        if !positive(input_scale)
            || !positive(output_scale)
            || !weight_scales.iter().all(|&s| positive(s))
        {
            return Err(Error::config("requantize", "scales must be finite and > 0"));
        }
        let reals: Vec<f64> = (0..n)
            .map(|c| {
                let s_w = weight_scales[c.min(weight_scales.len() - 1)];
                match rule {
                    MultiplierRule::F64 => {
                        f64::from(input_scale) * f64::from(s_w) / f64::from(output_scale)
                    }
                    MultiplierRule::F32 => f64::from(input_scale * s_w / output_scale),
                }
            })
            .collect();
        let (zero_point, signed) = match output {
            QuantizedOutput::U8(z) => (z, false),
            QuantizedOutput::I8(z) => ((z as u8) ^ 0x80, true),
        };
        let mut rq = Self::from_real(bias, &reals, zero_point)?;
        rq.signed = signed;
        Ok(rq)
    }

    /// Whether the output is i8 ([`QuantizedOutput::I8`]).
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    /// An error unless the output type is i8 (`signed`) or u8.
    pub(crate) fn check_signed(&self, signed: bool) -> Result<()> {
        if self.signed == signed {
            Ok(())
        } else {
            let name = |s: bool| if s { "i8" } else { "u8" };
            Err(Error::config(
                "requantize",
                format!(
                    "made for {} output, used for {} output",
                    name(self.signed),
                    name(signed)
                ),
            ))
        }
    }

    /// From real multipliers `s_a · s_w[n] / s_out` (as f64; how they are formed from f32
    /// scales decides the last bit of some results, see [`MultiplierRule`]), for u8 output.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a negative or non-finite multiplier, or lengths that differ.
    pub fn from_real(
        bias: Vec<i32>,
        real_multipliers: &[f64],
        output_zero_point: u8,
    ) -> Result<Self> {
        let mut mult = Vec::with_capacity(real_multipliers.len());
        let mut shift = Vec::with_capacity(real_multipliers.len());
        for &r in real_multipliers {
            let (m, s) = quantize_multiplier(r).ok_or_else(|| {
                Error::config(
                    "requantize",
                    format!("multiplier {r} is not finite and ≥ 0"),
                )
            })?;
            mult.push(m);
            shift.push(s);
        }
        Requantize::new(bias, mult, shift, output_zero_point)
    }

    /// Clamps the output to `[min, max]`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `min > max`.
    pub fn with_clamp(mut self, min: u8, max: u8) -> Result<Self> {
        if min > max {
            return Err(Error::config(
                "requantize",
                format!("clamp [{min}, {max}] is empty"),
            ));
        }
        self.min = min;
        self.max = max;
        Ok(self)
    }

    /// Fuses a ReLU (clamp at the zero point) or ReLU6 (also clamp at the quantized 6, given
    /// the output scale).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a non-positive or non-finite output scale with ReLU6.
    pub fn with_activation(self, act: FusedActivation, output_scale: f32) -> Result<Self> {
        let zp = self.zero_point;
        match act {
            FusedActivation::None => Ok(self),
            FusedActivation::Relu => self.with_clamp(zp as u8, 255),
            FusedActivation::Relu6 => {
                if !(output_scale.is_finite() && output_scale > 0.0) {
                    return Err(Error::config(
                        "requantize",
                        "ReLU6 needs a positive output scale",
                    ));
                }
                let six = (zp as f64 + (6.0 / output_scale as f64).round_ties_even()).min(255.0);
                self.with_clamp(zp as u8, six as u8)
            }
        }
    }

    /// Output channels.
    pub fn len(&self) -> usize {
        self.bias.len()
    }

    /// Whether there are no channels.
    pub fn is_empty(&self) -> bool {
        self.bias.is_empty()
    }

    /// The output for channel `n` and corrected accumulator `acc` (the scalar definition all
    /// paths share).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a channel `n` past the epilogue's channels.
    pub fn apply(&self, n: usize, acc: i32) -> Result<u8> {
        if n >= self.bias.len() {
            return Err(channel_error("requantize", n, self.bias.len()));
        }
        Ok(self.value(n, acc))
    }

    /// [`Requantize::apply`] for a channel the kernel driver has checked.
    #[inline(always)]
    fn value(&self, n: usize, acc: i32) -> u8 {
        let v = multiply_by_quantized_multiplier(
            acc.saturating_add(self.bias[n]),
            self.multiplier[n],
            self.shift[n],
        );
        v.saturating_add(self.zero_point)
            .clamp(self.min as i32, self.max as i32) as u8
    }
}

impl Epilogue for Requantize {
    type Out = u8;
    fn columns(&self) -> Option<usize> {
        Some(self.bias.len())
    }
    #[inline(always)]
    fn apply(&self, n: usize, acc: i32) -> u8 {
        self.value(n, acc)
    }
    #[inline(always)]
    fn apply_row(&self, n0: usize, acc: &[i32], corr: &[i32], out: &mut [u8]) {
        let len = out.len();
        if !self.right_shift_only {
            for (i, ((o, &a), &z)) in out
                .iter_mut()
                .zip(&acc[..len])
                .zip(&corr[..len])
                .enumerate()
            {
                *o = self.value(n0 + i, a.wrapping_sub(z));
            }
            return;
        }
        let (acc, corr) = (&acc[..len], &corr[..len]);
        let bias = &self.bias[n0..n0 + len];
        let mult = &self.multiplier[n0..n0 + len];
        let (e, mask, half) = (
            &self.rshift[n0..n0 + len],
            &self.rmask[n0..n0 + len],
            &self.rhalf[n0..n0 + len],
        );
        // clamp(v + zp, lo, hi) == clamp(v, lo − zp, hi − zp) + zp for any i32 v, without the
        // saturating add (zp, lo and hi are all within 0..=255).
        let zp = self.zero_point;
        let (lo, hi) = (self.min as i32 - zp, self.max as i32 - zp);
        for i in 0..len {
            let x = acc[i].wrapping_sub(corr[i]).saturating_add(bias[i]);
            let v = requant_right_shift(x, mult[i], e[i], mask[i], half[i]);
            out[i] = (v.clamp(lo, hi) + zp) as u8;
        }
    }
}

/// Parameters of the dequantizing ("f32 out") epilogue for dynamic-range mode:
/// `out = acc · scale[n] + bias[n]`, with `scale[n] = s_a · s_w[n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dequantize {
    scale: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// Clamp at zero (a fused ReLU).
    relu: bool,
}

impl Dequantize {
    /// From the activation scale, per-channel weight scales and an optional f32 bias.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for non-finite scales or a bias of another length.
    pub fn new(input_scale: f32, weight_scales: &[f32], bias: Option<Vec<f32>>) -> Result<Self> {
        if !input_scale.is_finite() || weight_scales.iter().any(|s| !s.is_finite()) {
            return Err(Error::config("dequantize", "scales must be finite"));
        }
        if bias
            .as_ref()
            .is_some_and(|b| b.len() != weight_scales.len())
        {
            return Err(Error::config(
                "dequantize",
                "bias length differs from the channels",
            ));
        }
        Ok(Dequantize {
            scale: weight_scales.iter().map(|&s| s * input_scale).collect(),
            bias,
            relu: false,
        })
    }

    /// The same epilogue followed by a ReLU (`max(out, 0)`), fused so the f32 output is
    /// written once.
    #[must_use]
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// The output for channel `n` and corrected accumulator `acc`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a channel `n` past the epilogue's channels.
    pub fn apply(&self, n: usize, acc: i32) -> Result<f32> {
        if n >= self.scale.len() {
            return Err(channel_error("dequantize", n, self.scale.len()));
        }
        Ok(self.value(n, acc))
    }

    /// [`Dequantize::apply`] for a channel the kernel driver has checked.
    #[inline(always)]
    fn value(&self, n: usize, acc: i32) -> f32 {
        let v = acc as f32 * self.scale[n];
        let v = match &self.bias {
            Some(b) => v + b[n],
            None => v,
        };
        match self.relu {
            // As the row loop: `v > 0 ? v : 0`, NaN to 0 like `f32::max(v, 0)`.
            true if v > 0.0 => v,
            true => 0.0,
            false => v,
        }
    }
}

impl Epilogue for Dequantize {
    type Out = f32;
    fn columns(&self) -> Option<usize> {
        Some(self.scale.len())
    }
    #[inline(always)]
    fn apply(&self, n: usize, acc: i32) -> f32 {
        self.value(n, acc)
    }
    #[inline(always)]
    fn apply_row(&self, n0: usize, acc: &[i32], corr: &[i32], out: &mut [f32]) {
        let len = out.len();
        let (acc, corr) = (&acc[..len], &corr[..len]);
        let scale = &self.scale[n0..n0 + len];
        if self.relu {
            self.row::<true>(scale, n0, acc, corr, out);
        } else {
            self.row::<false>(scale, n0, acc, corr, out);
        }
    }
}

impl Dequantize {
    #[inline(always)]
    fn row<const RELU: bool>(
        &self,
        scale: &[f32],
        n0: usize,
        acc: &[i32],
        corr: &[i32],
        out: &mut [f32],
    ) {
        // `v > 0 ? v : 0` is `f32::max(v, 0)` for every v, NaN included, in one instruction.
        let relu = |v: f32| if !RELU || v > 0.0 { v } else { 0.0 };
        let len = out.len();
        match &self.bias {
            Some(b) => {
                let b = &b[n0..n0 + len];
                for i in 0..len {
                    out[i] = relu(acc[i].wrapping_sub(corr[i]) as f32 * scale[i] + b[i]);
                }
            }
            None => {
                for i in 0..len {
                    out[i] = relu(acc[i].wrapping_sub(corr[i]) as f32 * scale[i]);
                }
            }
        }
    }
}

fn channel_error(what: &str, n: usize, channels: usize) -> Error {
    Error::config(what, format!("channel {n} is past the {channels} channels"))
}
