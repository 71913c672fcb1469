//! Post-training quantization: calibrate a float graph into a [`QuantizedModel`].

use super::fold::fold_batch_norms;
use super::observer::{
    KldObserver, MinMaxObserver, MovingAverageObserver, MseObserver, Observer, PercentileObserver,
};
use super::ort_entropy::{OrtEntropyObserver, OrtMerge};
use super::qat::QatOptions;
use super::qmodel::QuantizedModel;
use super::scheme::QuantScheme;
use crate::error::{Error, Result};
use crate::model::Graph;
use crate::tensor::Tensor;

/// How activation ranges are chosen from calibration data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Calibration {
    /// Exact min and max.
    MinMax,
    /// Moving average of batch min / max with this constant.
    MovingAverage(f32),
    /// Keep this percentile of `|x|`.
    Percentile(f64),
    /// TensorRT's entropy calibration (2048 bins, 128 levels).
    Kld,
    /// Minimum squared error for 8 bits.
    Mse,
    /// ONNX Runtime's entropy calibration with its `num_bins` and `num_quantized_bins`
    /// (ORT's defaults: 128, 128), batches combined as `merge` says ([`OrtMerge::Stacked`]
    /// for `quantize_static`'s ranges).
    OrtEntropy {
        /// Histogram bins.
        bins: usize,
        /// Quantized bins.
        quantized_bins: usize,
        /// How calibration batches are combined.
        merge: OrtMerge,
    },
}

impl Calibration {
    /// A fresh observer for this method.
    ///
    /// # Errors
    /// The observer's own [`Error::InvalidConfig`] for a parameter out of range (a NaN
    /// percentile, 0 bins, ...).
    pub fn observer(self) -> Result<Box<dyn Observer>> {
        Ok(match self {
            Calibration::MinMax => Box::new(MinMaxObserver::new()),
            Calibration::MovingAverage(c) => Box::new(MovingAverageObserver::new(c)?),
            Calibration::Percentile(p) => Box::new(PercentileObserver::new(p)?),
            Calibration::Kld => Box::new(KldObserver::default()),
            Calibration::Mse => Box::new(MseObserver::new(8)?),
            Calibration::OrtEntropy {
                bins,
                quantized_bins,
                merge,
            } => Box::new(OrtEntropyObserver::new(bins, quantized_bins)?.with_merge(merge)),
        })
    }
}

/// The post-training quantization mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtqMode {
    /// Integer-only between quantize at the input and dequantize at the output: u8
    /// activations with calibrated ranges, i8 weights, i32 biases.
    FullInteger,
    /// i8 weights; each Conv2d / Linear input is quantized to u8 with the range of the batch
    /// it sees, the kernels return f32; every other op stays float.
    DynamicRange,
    /// Weights stored as float16; computation in f32.
    Float16,
}

/// What [`Quantizer::calibrate`] produces.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// The mode.
    pub mode: PtqMode,
    /// Activation range method.
    pub calibration: Calibration,
    /// Weight scheme (the int8 kernels need i8 symmetric per output channel).
    pub weights: QuantScheme,
    /// Activation scheme (the int8 kernels need u8 affine per tensor).
    pub activations: QuantScheme,
    /// Nodes kept in float (run between dequantize and quantize).
    pub keep_float: Vec<String>,
    /// Per-layer weight schemes (signed, symmetric, per tensor or per output channel; e.g.
    /// int4 for one layer): they override `weights` for the named Conv2d / Linear.
    pub layer_weights: Vec<(String, QuantScheme)>,
    /// Per-layer calibration methods for the named node's output.
    pub layer_calibration: Vec<(String, Calibration)>,
    /// Options of quantization-aware training ([`super::prepare_qat`]).
    pub qat: QatOptions,
}

impl QuantConfig {
    /// Full-integer int8: i8 per-channel weights, u8 activations, KLD calibration.
    pub fn int8() -> Self {
        QuantConfig {
            mode: PtqMode::FullInteger,
            calibration: Calibration::Kld,
            weights: QuantScheme::int8_weights(),
            activations: QuantScheme::uint8_activations(),
            keep_float: Vec::new(),
            layer_weights: Vec::new(),
            layer_calibration: Vec::new(),
            qat: QatOptions::default(),
        }
    }

    /// Sets the options of quantization-aware training.
    pub fn with_qat(mut self, qat: QatOptions) -> Self {
        self.qat = qat;
        self
    }

    /// Quantizes the weights of layer `name` with `scheme` instead of the default.
    pub fn with_layer_weights(mut self, name: &str, scheme: QuantScheme) -> Self {
        self.layer_weights.push((name.to_string(), scheme));
        self
    }

    /// Calibrates the output of node `name` with `calibration` instead of the default.
    pub fn with_layer_calibration(mut self, name: &str, calibration: Calibration) -> Self {
        self.layer_calibration.push((name.to_string(), calibration));
        self
    }

    /// The weight scheme of layer `name`.
    pub fn weights_for(&self, name: &str) -> QuantScheme {
        self.layer_weights
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map_or(self.weights, |(_, s)| *s)
    }

    /// The calibration method of node `name`.
    pub fn calibration_for(&self, name: &str) -> Calibration {
        self.layer_calibration
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map_or(self.calibration, |(_, c)| *c)
    }

    /// Dynamic-range int8: i8 weights, activations quantized per batch on the fly.
    pub fn dynamic_int8() -> Self {
        QuantConfig {
            mode: PtqMode::DynamicRange,
            ..QuantConfig::int8()
        }
    }

    /// float16 weights.
    pub fn float16() -> Self {
        QuantConfig {
            mode: PtqMode::Float16,
            ..QuantConfig::int8()
        }
    }

    /// Sets the calibration method.
    pub fn calibration(mut self, calibration: Calibration) -> Self {
        self.calibration = calibration;
        self
    }

    /// Keeps the node named `name` in float.
    pub fn keep_float(mut self, name: &str) -> Self {
        self.keep_float.push(name.to_string());
        self
    }
}

/// Calibrates and converts float graphs.
///
/// # Examples
/// ```
/// use nncompress::model::zoo;
/// use nncompress::quantizer::{QuantConfig, Quantizer};
/// let net = zoo::lenet5(1)?;
/// let batch = ndarray::ArrayD::from_shape_fn(vec![4, 1, 28, 28], |d| (d[2] * d[3] % 9) as f32 / 9.0);
/// let q = Quantizer::new(QuantConfig::int8()).calibrate(&net, &[batch.clone()])?;
/// assert_eq!(q.forward(&batch)?.shape(), &[4, 10]);
/// # Ok::<(), nncompress::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Quantizer {
    config: QuantConfig,
}

impl Quantizer {
    /// A quantizer with `config`.
    pub fn new(config: QuantConfig) -> Self {
        Quantizer { config }
    }

    /// Folds BatchNorm into convolutions, observes every node's output on `batches` (float
    /// inference), and builds the integer model.
    ///
    /// # Errors
    /// [`Error::Empty`] for no batches, [`Error::ShapeMismatch`] for a batch that does not fit
    /// the model input, [`Error::NonFinite`] for NaN or infinite calibration data or
    /// activations, [`Error::InvalidConfig`] for schemes the int8 kernels cannot run.
    pub fn calibrate(&self, model: &Graph, batches: &[Tensor]) -> Result<QuantizedModel> {
        self.calibrate_with_progress(model, batches, |_, _| {})
    }

    /// [`Quantizer::calibrate`], calling `progress(done, total)` after each calibration
    /// batch has been observed (for a progress bar over a long calibration).
    ///
    /// # Errors
    /// As [`Quantizer::calibrate`].
    pub fn calibrate_with_progress(
        &self,
        model: &Graph,
        batches: &[Tensor],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<QuantizedModel> {
        if batches.is_empty() {
            return Err(Error::Empty("calibration batches".into()));
        }
        let cfg = &self.config;
        if cfg.weights != QuantScheme::int8_weights()
            || cfg.activations != QuantScheme::uint8_activations()
        {
            return Err(Error::config(
                "full-integer quantization",
                "the int8 kernels take i8 symmetric per-channel (axis 0, narrow) weights and u8 affine per-tensor activations",
            ));
        }
        for (name, scheme) in &cfg.layer_weights {
            model.id(name)?;
            let ok = matches!(
                scheme.dtype,
                super::scheme::QuantDtype::Int8 | super::scheme::QuantDtype::Int4
            ) && scheme.mode == super::scheme::QuantMode::Symmetric
                && matches!(
                    scheme.granularity,
                    super::scheme::Granularity::PerTensor
                        | super::scheme::Granularity::PerChannel { axis: 0 }
                );
            if !ok {
                return Err(Error::config(
                    format!("weights of `{name}`"),
                    "the int8 kernels take signed symmetric weights (int8 or int4), per tensor or per output channel",
                ));
            }
        }
        for (name, _) in cfg
            .keep_float
            .iter()
            .map(|n| (n, ()))
            .chain(cfg.layer_calibration.iter().map(|(n, _)| (n, ())))
        {
            model.id(name)?;
        }
        for (i, b) in batches.iter().enumerate() {
            crate::tensor::check_finite(b, &format!("calibration batch {i}"))?;
        }
        let folded = fold_batch_norms(model)?;
        if let Some(b) = batches
            .iter()
            .find(|b| b.shape().get(1..) != Some(folded.input_shape()))
        {
            return Err(Error::shape(
                "calibrate",
                None,
                format!("batches [N, {:?}]", folded.input_shape()),
                b.shape(),
            ));
        }
        let model = match cfg.mode {
            PtqMode::FullInteger => None,
            PtqMode::DynamicRange => {
                Some(QuantizedModel::dynamic(&folded, cfg, &Default::default())?)
            }
            PtqMode::Float16 => Some(QuantizedModel::float16(&folded, cfg)?),
        };
        if let Some(mut m) = model {
            m.measure(&folded, batches)?;
            return Ok(m);
        }
        // The input's and the output's ranges are always min-max. Inputs are bounded data
        // (pixels) whose extremes are signal, not outliers; clipping the largest logits (what
        // saturating methods like KLD do to a long tail) changes exactly what the argmax reads.
        let (inp, out) = (folded.input_id().index(), folded.output_id().index());
        let observers: Result<Vec<Box<dyn Observer>>> = (0..folded.nodes().len())
            .map(|i| {
                let name = &folded.nodes()[i].name;
                if cfg.layer_calibration.iter().any(|(n, _)| n == name) {
                    cfg.calibration_for(name).observer()
                } else if i == out || i == inp {
                    Calibration::MinMax.observer()
                } else {
                    cfg.calibration.observer()
                }
            })
            .collect();
        let mut observers = observers?;
        for (done, b) in batches.iter().enumerate() {
            let mut failure = None;
            folded.forward_with(b, &mut |id, _, out| {
                if failure.is_none() {
                    if let Err(e) = observers[id.index()].observe(out.view()) {
                        failure = Some(e);
                    }
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            progress(done + 1, batches.len());
        }
        let ranges = observers
            .iter()
            .map(|o| o.range())
            .collect::<Result<Vec<_>>>()?;
        let acts = ranges
            .iter()
            .map(|&r| super::qmodel::act_params(cfg, r))
            .collect::<Result<Vec<_>>>()?;
        let mut m = QuantizedModel::build(&folded, &acts, cfg, &Default::default())?;
        m.measure(&folded, batches)?;
        Ok(m)
    }
}
