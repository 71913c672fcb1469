//! Quantization: schemes, parameters, quantize / dequantize, and calibration observers.
//!
//! This module is being built up by the quantizer issue; so far it has the ground it stands
//! on: [`QuantScheme`], [`QuantParams`], [`quantize`] / [`dequantize`] (int8, uint8, packed
//! int4, float16, bfloat16; per tensor or per channel on any axis) and the [`Observer`]s that
//! turn calibration data into ranges. The real multiplier of a requantization,
//! `s_in·s_w / s_out`, is split into a Q31 multiplier and a shift by
//! [`quantize_multiplier`] and applied by [`multiply_by_quantized_multiplier`]
//! (gemmlowp / TFLite semantics, shared with the kernels).

mod fold;
mod format;
mod observer;
mod params;
mod ptq;
mod qmodel;
mod scheme;

pub use crate::kernels::requant::{multiply_by_quantized_multiplier, quantize_multiplier};
pub use fold::fold_batch_norms;
pub use observer::{
    AciqDistribution, AciqObserver, Histogram, KldObserver, MinMaxObserver, MovingAverageObserver,
    MseObserver, Observer, OrtEntropyObserver, PercentileObserver,
};
pub use params::{
    dequantize, fake_quantize, pack_i4, quantize, unpack_i4, QData, QTensor, QuantParams,
};
pub use ptq::{Calibration, PtqMode, QuantConfig, Quantizer};
pub use qmodel::{LayerReport, QuantizedModel};
pub use scheme::{Granularity, QuantDtype, QuantMode, QuantScheme};
