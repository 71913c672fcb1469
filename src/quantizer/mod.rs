//! Quantization: schemes, parameters, calibration, post-training quantization,
//! quantization-aware training, and the integer model they produce.
//!
//! - [`QuantScheme`], [`QuantParams`], [`quantize`] / [`dequantize`] (int8, uint8, packed
//!   int4, float16, bfloat16; per tensor or per channel on any axis).
//! - [`Observer`]s turn calibration data into ranges (min-max, moving average, percentile,
//!   KLD, ONNX Runtime's entropy, MSE, ACIQ).
//! - [`Quantizer::calibrate`] folds BatchNorm, calibrates and builds a [`QuantizedModel`]
//!   (full integer on the int8 kernels, dynamic range, or float16), saved as `.nnq`.
//! - [`dynamic_int8`] swaps the Linear layers of any graph (a transformer's included) for
//!   dynamic int8 nodes of the same graph, activations quantized per tensor or per token.
//! - [`prepare_qat`] makes a trainable graph with fake quantization where the integer model
//!   quantizes (BatchNorm folded for training, straight-through or LSQ gradients);
//!   [`convert`] turns it into the same [`QuantizedModel`].
//!
//! The real multiplier of a requantization, `s_in·s_w / s_out`, is split into a Q31
//! multiplier and a shift by [`quantize_multiplier`] and applied by
//! [`multiply_by_quantized_multiplier`] (gemmlowp / TFLite semantics, shared with the
//! kernels).

mod dynamic;
mod fold;
mod format;
mod gptq;
mod observer;
mod ort_entropy;
mod params;
mod ptq;
mod qat;
mod qmodel;
mod scheme;

pub use crate::kernels::requant::{multiply_by_quantized_multiplier, quantize_multiplier};
pub use dynamic::{dynamic_int8, DynamicInt8, DynamicLayer, DynamicReport};
pub use fold::fold_batch_norms;
pub use gptq::{
    quantize_gptq, quantize_rtn, weight_only_int4, GptqConfig, GroupQuantized, GroupScheme,
    Hessian, WeightMethod,
};
pub use observer::{
    AciqDistribution, AciqObserver, Histogram, KldObserver, MinMaxObserver, MovingAverageObserver,
    MseObserver, Observer, PercentileObserver, DEFAULT_MIN_COVERAGE, MAX_HISTOGRAM_BINS,
};
pub use ort_entropy::{OrtEntropyObserver, OrtHistogram, OrtMerge, DEFAULT_ORT_MAX_BINS};
pub use params::{
    dequantize, fake_quantize, pack_i4, quantize, unpack_i4, QData, QTensor, QuantParams,
};
pub use ptq::{Calibration, PtqMode, QuantConfig, Quantizer};
pub use qat::{
    convert, freeze_batch_norms, freeze_observers, prepare_qat, qat_report, QatNodeReport,
    QatOptions,
};
pub(crate) use qmodel::{bias_to_i32, StoredWeights};
pub use qmodel::{LayerReport, QuantizedModel};
pub use scheme::{Granularity, QuantDtype, QuantMode, QuantScheme};

/// Whether node `name` of `g` has no integer kernel yet and stays in float whatever the
/// config says: a Linear over the last axis of a rank > 1 value (a transformer's
/// projections; the int8 kernels take `[N, features]`).
pub(crate) fn float_only(g: &crate::model::Graph, name: &str) -> bool {
    g.id(name).is_ok_and(|id| {
        let node = g.node(id);
        matches!(node.op, crate::model::Op::Linear(_))
            && node.inputs.first().is_some_and(|&j| g.shape(j).len() != 1)
    })
}

/// How the full-integer model would run each node of `graph` (after BatchNorm folding),
/// in order: `(node, how)`, where `how` says why a node stays in float. The same rules as
/// [`Quantizer::calibrate`] applies; no calibration is needed to read them.
///
/// # Errors
/// As [`fold_batch_norms`].
pub fn integer_plan(graph: &crate::model::Graph) -> crate::error::Result<Vec<(String, String)>> {
    use crate::model::Op;
    let g = fold_batch_norms(graph)?;
    Ok(g.nodes()
        .iter()
        .map(|node| {
            let how = match &node.op {
                Op::Input { .. } => "quantize to u8".to_string(),
                Op::Conv2d(_) => "int8 conv (u8 × i8 per channel)".into(),
                Op::Linear(_) if float_only(&g, &node.name) => {
                    "float: the int8 kernels take [N, features], not a sequence".into()
                }
                Op::Linear(_) => "int8 linear (u8 × i8 per channel)".into(),
                Op::ReLU | Op::ReLU6 => {
                    "u8 clamp (fused into a conv / linear it alone follows)".into()
                }
                Op::MaxPool2d(_) => "u8 max pooling".into(),
                Op::AvgPool2d(_) | Op::GlobalAvgPool => "u8 pooling, requantized".into(),
                Op::Flatten | Op::Dropout { .. } => "u8, layout only".into(),
                Op::Add | Op::Concat => "u8, inputs requantized".into(),
                op if node.inputs.len() == 1 => format!(
                    "float ({}): no integer kernel, runs between dequantize and quantize",
                    op.kind()
                ),
                op => format!(
                    "refused ({} with {} inputs): no quantized form",
                    op.kind(),
                    node.inputs.len()
                ),
            };
            (node.name.clone(), how)
        })
        .collect())
}
