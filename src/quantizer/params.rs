//! Scales and zero points from ranges, and quantize / dequantize with them.

use super::scheme::{Granularity, QuantDtype, QuantMode, QuantScheme};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::tensor::QuantGrid;
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Scale(s) and zero point(s) of a quantized tensor: one pair per tensor, or one per index of
/// the scheme's channel axis.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantParams {
    /// The scheme the parameters were made for.
    pub scheme: QuantScheme,
    /// Scales, all finite and > 0.
    pub scale: Vec<f32>,
    /// Zero points, within the scheme's integer range.
    pub zero_point: Vec<i32>,
}

impl QuantParams {
    /// Parameters that map each `[min[c], max[c]]` onto the scheme's integer range.
    ///
    /// Affine: the range is widened to include 0 (so real 0 is exact), `s = (max − min) /
    /// (q_max − q_min)`, `z = q_min − round_half_even(min / s)`. Symmetric: `s = max|x| /
    /// q_max` with `z = 0` (signed) or `z = 128` (u8). A zero range (all-zero or empty data)
    /// gives `s = 1` instead of 0, so nothing divides by zero; float types get `s = 1, z = 0`.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for a NaN or infinite bound, [`Error::InvalidConfig`] when
    /// `min > max` or the two slices differ in length or are empty.
    pub fn from_range(scheme: QuantScheme, min: &[f32], max: &[f32]) -> Result<Self> {
        if min.len() != max.len() || min.is_empty() {
            return Err(Error::config(
                "quantization range",
                "one (min, max) pair per channel is needed",
            ));
        }
        let mut scale = Vec::with_capacity(min.len());
        let mut zero_point = Vec::with_capacity(min.len());
        for (&lo, &hi) in min.iter().zip(max) {
            if !lo.is_finite() || !hi.is_finite() {
                return Err(Error::NonFinite(format!("quantization range [{lo}, {hi}]")));
            }
            if lo > hi {
                return Err(Error::config(
                    "quantization range",
                    format!("min {lo} > max {hi}"),
                ));
            }
            let Some((qmin, qmax)) = scheme.qrange() else {
                scale.push(1.0);
                zero_point.push(0);
                continue;
            };
            let grid = QuantGrid {
                qmin,
                qmax,
                symmetric: scheme.mode == QuantMode::Symmetric,
            };
            let (s, z) = grid.params(lo, hi);
            scale.push(s);
            zero_point.push(z);
        }
        Ok(QuantParams {
            scheme,
            scale,
            zero_point,
        })
    }

    /// Min-max parameters of `x` itself (per tensor or per channel, as the scheme says).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a channel axis out of range, [`Error::NonFinite`] for
    /// NaN or infinite data.
    pub fn from_tensor(scheme: QuantScheme, x: ArrayViewD<f32>) -> Result<Self> {
        let layout = ChannelLayout::of(&scheme, x.shape())?;
        let mut min = vec![0.0f32; layout.channels];
        let mut max = vec![0.0f32; layout.channels];
        let mut seen = vec![false; layout.channels];
        let xs = x.as_standard_layout();
        for (i, &v) in xs.iter().enumerate() {
            if !v.is_finite() {
                return Err(Error::NonFinite("tensor to quantize".into()));
            }
            let c = layout.channel(i);
            if seen[c] {
                min[c] = min[c].min(v);
                max[c] = max[c].max(v);
            } else {
                (min[c], max[c], seen[c]) = (v, v, true);
            }
        }
        QuantParams::from_range(scheme, &min, &max)
    }

    /// ONNX-style parameters: affine `dtype` with the given scales and zero points, one
    /// pair per tensor (`axis: None`) or per index of `axis` of a rank-`rank` tensor, where a
    /// negative axis counts from the end (−1 is the last), as in `QuantizeLinear` /
    /// `DequantizeLinear`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an axis outside `[−rank, rank)`, a float dtype, scales that
    /// are not finite and > 0, zero points outside the dtype's range, or scale and zero-point
    /// lists of different lengths (or not one pair per tensor without an axis).
    ///
    /// # Examples
    /// ```
    /// use nncompress::quantizer::{quantize, QuantDtype, QuantParams};
    /// let x = ndarray::arr2(&[[0.5f32, -1.0], [2.0, 3.0]]).into_dyn();
    /// let p = QuantParams::per_axis(QuantDtype::UInt8, vec![0.5, 0.25], vec![128, 0], Some(-1), 2)?;
    /// assert_eq!(quantize(x.view(), &p)?.int_values()?, vec![129, 0, 132, 12]);
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn per_axis(
        dtype: QuantDtype,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
        axis: Option<isize>,
        rank: usize,
    ) -> Result<Self> {
        let what = "per-axis quantization parameters";
        let granularity = match axis {
            None => Granularity::PerTensor,
            Some(a) => {
                let r = rank as isize;
                if !(-r..r).contains(&a) {
                    return Err(Error::config(
                        what,
                        format!("axis {a} is outside [{}, {r}) for rank {rank}", -r),
                    ));
                }
                Granularity::PerChannel {
                    axis: if a < 0 { (a + r) as usize } else { a as usize },
                }
            }
        };
        let scheme = QuantScheme {
            dtype,
            mode: QuantMode::Affine,
            granularity,
            narrow_range: false,
        };
        if scheme.qrange().is_none() {
            return Err(Error::config(
                what,
                "a float dtype has no scale or zero point",
            ));
        }
        if scales.len() != zero_points.len() || (axis.is_none() && scales.len() != 1) {
            return Err(Error::config(
                what,
                format!(
                    "{} scales and {} zero points{}",
                    scales.len(),
                    zero_points.len(),
                    if axis.is_none() {
                        " without an axis (one pair is needed)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let params = QuantParams {
            scheme,
            scale: scales,
            zero_point: zero_points,
        };
        params.check_values()?;
        Ok(params)
    }

    /// Number of (scale, zero point) pairs.
    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// Checks that the parameters can quantize a tensor of `shape`: one zero point per
    /// scale, one pair per channel of the scheme's axis, scales finite and > 0, zero points
    /// within the scheme's integer range. The fields are public, so every function that
    /// takes parameters calls this before it indexes them.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for the wrong number of pairs, [`Error::InvalidConfig`] for
    /// a channel axis out of range, a bad scale or zero point.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        self.layout(shape).map(|_| ())
    }

    pub(crate) fn layout(&self, shape: &[usize]) -> Result<ChannelLayout> {
        let layout = ChannelLayout::of(&self.scheme, shape)?;
        if self.scale.len() != self.zero_point.len() || self.scale.len() != layout.channels {
            return Err(Error::shape(
                "quantization parameters",
                None,
                format!(
                    "{} (scale, zero point) pairs, got {} scales and {} zero points for",
                    layout.channels,
                    self.scale.len(),
                    self.zero_point.len()
                ),
                shape,
            ));
        }
        self.check_values()?;
        Ok(layout)
    }

    /// Scales finite and > 0, zero points within the scheme's integer range.
    fn check_values(&self) -> Result<()> {
        if let Some(s) = self.scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::config(
                "quantization parameters",
                format!("scale {s} (must be finite and > 0)"),
            ));
        }
        if let Some((lo, hi)) = self.scheme.qrange() {
            if let Some(z) = self.zero_point.iter().find(|z| !(lo..=hi).contains(*z)) {
                return Err(Error::config(
                    "quantization parameters",
                    format!("zero point {z} is outside [{lo}, {hi}]"),
                ));
            }
        }
        Ok(())
    }
}

/// Which channel each element of a standard-layout tensor belongs to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelLayout {
    pub channels: usize,
    inner: usize,
}

impl ChannelLayout {
    pub fn of(scheme: &QuantScheme, shape: &[usize]) -> Result<Self> {
        match scheme.granularity {
            Granularity::PerTensor => Ok(ChannelLayout {
                channels: 1,
                inner: usize::MAX,
            }),
            Granularity::PerChannel { axis } => {
                if axis >= shape.len() {
                    return Err(Error::config(
                        "per-channel quantization",
                        format!(
                            "axis {axis} is out of range for a tensor of rank {}",
                            shape.len()
                        ),
                    ));
                }
                Ok(ChannelLayout {
                    channels: shape[axis].max(1),
                    inner: shape[axis + 1..].iter().product::<usize>().max(1),
                })
            }
        }
    }

    #[inline(always)]
    pub fn channel(&self, flat: usize) -> usize {
        if self.channels == 1 {
            0
        } else {
            (flat / self.inner) % self.channels
        }
    }
}

/// Stored values of a quantized tensor.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum QData {
    /// i8 values.
    I8(Vec<i8>),
    /// u8 values.
    U8(Vec<u8>),
    /// i32 values (biases; ONNX int32 tensors).
    I32(Vec<i32>),
    /// Signed 4-bit values, two per byte: element `2i` in the low nibble of byte `i`,
    /// element `2i + 1` in the high nibble (two's complement).
    I4Packed(Vec<u8>),
    /// float16 values.
    F16(Vec<f16>),
    /// bfloat16 values.
    BF16(Vec<bf16>),
}

/// A quantized tensor: stored values, shape and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct QTensor {
    /// Stored values in standard (row-major) order.
    pub data: QData,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Scales and zero points.
    pub params: QuantParams,
}

impl QTensor {
    /// Bytes of stored values (scales and zero points not included).
    pub fn nbytes(&self) -> usize {
        match &self.data {
            QData::I8(v) => v.len(),
            QData::U8(v) => v.len(),
            QData::I4Packed(v) => v.len(),
            QData::I32(v) => 4 * v.len(),
            QData::F16(v) => 2 * v.len(),
            QData::BF16(v) => 2 * v.len(),
        }
    }

    /// Elements of the shape (checked: the fields are public).
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] when the product overflows or passes the default limits.
    pub fn len(&self) -> Result<usize> {
        Limits::default().check_elements(&self.shape, "quantized tensor")
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.shape.contains(&0)
    }

    /// The integer values (for integer types), unpacking int4.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for float16 / bfloat16 data, [`Error::ShapeMismatch`] when the
    /// stored values do not fill the shape exactly.
    pub fn int_values(&self) -> Result<Vec<i32>> {
        let n = self.len()?;
        let values: Vec<i32> = match &self.data {
            QData::I8(v) => v.iter().map(|&q| q as i32).collect(),
            QData::U8(v) => v.iter().map(|&q| q as i32).collect(),
            QData::I32(v) => v.clone(),
            QData::I4Packed(v) => {
                if v.len() != n.div_ceil(2) {
                    return Err(Error::shape(
                        "int4 tensor",
                        None,
                        format!("{} packed bytes", n.div_ceil(2)),
                        &[v.len()],
                    ));
                }
                unpack_i4(v, n)?
            }
            QData::F16(_) | QData::BF16(_) => {
                return Err(Error::Unsupported(
                    "integer values of a float16 / bfloat16 tensor".into(),
                ))
            }
        };
        if values.len() != n {
            return Err(Error::shape(
                "quantized tensor",
                None,
                format!("{n} values"),
                &[values.len()],
            ));
        }
        Ok(values)
    }
}

/// Packs signed 4-bit values (each in `[-8, 7]`) two per byte, low nibble first.
pub fn pack_i4(values: &[i32]) -> Vec<u8> {
    values
        .chunks(2)
        .map(|p| {
            let lo = (p[0] as u8) & 0x0f;
            let hi = p.get(1).map_or(0, |&v| (v as u8) & 0x0f);
            lo | (hi << 4)
        })
        .collect()
}

/// Unpacks `n` signed 4-bit values packed by [`pack_i4`].
///
/// # Errors
/// [`Error::ShapeMismatch`] when `bytes` holds fewer than `n` values.
pub fn unpack_i4(bytes: &[u8], n: usize) -> Result<Vec<i32>> {
    if n.div_ceil(2) > bytes.len() {
        return Err(Error::shape(
            "unpack_i4",
            None,
            format!("{} bytes for {n} values", n.div_ceil(2)),
            &[bytes.len()],
        ));
    }
    Ok((0..n)
        .map(|i| {
            let b = bytes[i / 2];
            let nib = if i % 2 == 0 { b & 0x0f } else { b >> 4 };
            // Sign-extend the nibble.
            ((nib << 4) as i8 >> 4) as i32
        })
        .collect())
}

/// Quantizes `x`: `q = clamp(round_half_even(x / s) + z, q_min, q_max)` per element with
/// its channel's `s` and `z`, the quotient `x / s` computed in f32 as ONNX's
/// `QuantizeLinear` does (so ties are those of the f32 quotient); ±∞ saturates. Float16 /
/// bfloat16: round to nearest even in that format.
///
/// # Errors
/// As [`QuantParams::check`] (one pair per channel of `x`, valid scales and zero points),
/// [`Error::NonFinite`] for NaN values (±∞ saturates to `q_min` / `q_max`).
///
/// # Examples
/// ```
/// use nncompress::quantizer::{dequantize, quantize, QuantParams, QuantScheme};
/// let x = ndarray::arr1(&[-1.0f32, 0.0, 0.25, 1.0]).into_dyn();
/// let p = QuantParams::from_tensor(QuantScheme::default(), x.view())?;
/// let q = quantize(x.view(), &p)?;
/// assert_eq!(q.int_values().unwrap(), vec![-127, 0, 32, 127]); // 0.25·127 = 31.75 → 32
/// let back = dequantize(&q)?;
/// assert!((back[2] - 0.25).abs() <= p.scale[0] / 2.0);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn quantize(x: ArrayViewD<f32>, params: &QuantParams) -> Result<QTensor> {
    let scheme = params.scheme;
    let layout = params.layout(x.shape())?;
    let xs = x.as_standard_layout();
    // ±∞ saturates to the grid's ends, as ONNX's QuantizeLinear does; NaN has no integer.
    if xs.iter().any(|v| v.is_nan()) {
        return Err(Error::NonFinite("NaN in the tensor to quantize".into()));
    }
    let shape = x.shape().to_vec();
    let data = match scheme.qrange() {
        None => match scheme.dtype {
            QuantDtype::BFloat16 => QData::BF16(xs.iter().map(|&v| bf16::from_f32(v)).collect()),
            _ => QData::F16(xs.iter().map(|&v| f16::from_f32(v)).collect()),
        },
        Some((qmin, qmax)) => {
            let grid = QuantGrid {
                qmin,
                qmax,
                symmetric: scheme.mode == QuantMode::Symmetric,
            };
            let q: Vec<i32> = xs
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let c = layout.channel(i);
                    grid.quantize(v, params.scale[c], params.zero_point[c])
                })
                .collect();
            match scheme.dtype {
                QuantDtype::UInt8 => QData::U8(q.iter().map(|&v| v as u8).collect()),
                QuantDtype::Int4 => QData::I4Packed(pack_i4(&q)),
                QuantDtype::Int32 => QData::I32(q),
                _ => QData::I8(q.iter().map(|&v| v as i8).collect()),
            }
        }
    };
    Ok(QTensor {
        data,
        shape,
        params: params.clone(),
    })
}

/// Dequantizes: `x̂ = s·(q − z)` per element with its channel's parameters.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the stored values do not fill the shape or the parameters
/// do not have one pair per channel; as [`QuantParams::check`] for bad parameters.
pub fn dequantize(q: &QTensor) -> Result<ArrayD<f32>> {
    let n = q.len()?;
    let values: Vec<f32> = match &q.data {
        QData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        QData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        _ => {
            let layout = q.params.layout(&q.shape)?;
            let ints = q.int_values()?;
            ints.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let c = layout.channel(i);
                    // In i64: an int32 value minus its zero point can leave i32.
                    q.params.scale[c] * (i64::from(v) - i64::from(q.params.zero_point[c])) as f32
                })
                .collect()
        }
    };
    if values.len() != n {
        return Err(Error::shape(
            "dequantize",
            None,
            format!("{n} values"),
            &[values.len()],
        ));
    }
    ArrayD::from_shape_vec(IxDyn(&q.shape), values).map_err(|e| Error::Unsupported(e.to_string()))
}

/// Quantize then dequantize in one step (what fake quantization computes).
///
/// # Errors
/// As [`quantize`].
pub fn fake_quantize(x: ArrayViewD<f32>, params: &QuantParams) -> Result<ArrayD<f32>> {
    dequantize(&quantize(x, params)?)
}
