//! Typed values: what flows along a graph edge when not every value is a float (token ids,
//! attention masks).

use super::Tensor;
use ndarray::ArrayD;
use std::fmt;

/// The element type of a graph value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float: activations, logits, embeddings.
    F32,
    /// 64-bit signed integer: token ids, positions, attention masks (ONNX's and PyTorch's
    /// type for them).
    I64,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
        })
    }
}

/// A batch of values of one [`DType`], batch first.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Floats.
    F32(Tensor),
    /// Integers.
    I64(ArrayD<i64>),
}

impl Value {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Value::F32(_) => DType::F32,
            Value::I64(_) => DType::I64,
        }
    }

    /// The full shape, batch first.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(t) => t.shape(),
            Value::I64(t) => t.shape(),
        }
    }

    /// The floats, when this is a float value.
    pub fn as_f32(&self) -> Option<&Tensor> {
        match self {
            Value::F32(t) => Some(t),
            Value::I64(_) => None,
        }
    }

    /// The integers, when this is an integer value.
    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            Value::I64(t) => Some(t),
            Value::F32(_) => None,
        }
    }

    /// The floats, when this is a float value (the value itself otherwise).
    ///
    /// # Errors
    /// The value unchanged when it holds integers.
    pub fn into_f32(self) -> std::result::Result<Tensor, Value> {
        match self {
            Value::F32(t) => Ok(t),
            other => Err(other),
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::F32(t)
    }
}

impl From<ArrayD<i64>> for Value {
    fn from(t: ArrayD<i64>) -> Self {
        Value::I64(t)
    }
}
