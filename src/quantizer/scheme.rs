//! Quantization schemes: what a quantized tensor looks like.

/// The stored element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantDtype {
    /// Signed 8-bit, `[-128, 127]` (`[-127, 127]` with narrow range).
    Int8,
    /// Unsigned 8-bit, `[0, 255]`.
    UInt8,
    /// Signed 4-bit, `[-8, 7]` (`[-7, 7]` with narrow range), two values per byte.
    Int4,
    /// Signed 32-bit, `[-2³¹, 2³¹ − 1]`: biases of integer layers (scale `s_in·s_w`, zero
    /// point 0), ONNX's int32 `DequantizeLinear`.
    Int32,
    /// IEEE half precision (no scale or zero point).
    Float16,
    /// bfloat16 (no scale or zero point).
    BFloat16,
}

impl QuantDtype {
    /// Whether this is a floating-point storage type.
    pub fn is_float(self) -> bool {
        matches!(self, QuantDtype::Float16 | QuantDtype::BFloat16)
    }

    /// Bits per stored value.
    pub fn bits(self) -> u32 {
        match self {
            QuantDtype::Int4 => 4,
            QuantDtype::Int8 | QuantDtype::UInt8 => 8,
            QuantDtype::Int32 => 32,
            QuantDtype::Float16 | QuantDtype::BFloat16 => 16,
        }
    }
}

/// How real values map to integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantMode {
    /// `x ≈ s·(q − z)` with any zero point `z` (asymmetric): fits ranges like ReLU outputs.
    Affine,
    /// `z` fixed at the middle of the range (0 for signed types, 128 for u8): what integer
    /// kernels want for weights.
    Symmetric,
}

/// Which elements share a scale and zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per index along `axis` (axis 0 for conv and linear weights).
    PerChannel {
        /// The channel axis.
        axis: usize,
    },
}

/// A complete quantization scheme: a small `Copy` value, built from a preset and `with_*`.
///
/// Quantization is `q = clamp(round_half_even(x / s) + z, q_min, q_max)`, dequantization
/// `x̂ = s·(q − z)`.
///
/// # Examples
/// ```
/// use nncompress::quantizer::{Granularity, QuantDtype, QuantScheme};
/// let w = QuantScheme::int8_weights();
/// assert_eq!(w.granularity, Granularity::PerChannel { axis: 0 });
/// assert_eq!(w.qrange(), Some((-127, 127)));
/// let w4 = w.with_dtype(QuantDtype::Int4);
/// assert_eq!(w4.qrange(), Some((-7, 7)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantScheme {
    /// Stored type.
    pub dtype: QuantDtype,
    /// Affine or symmetric.
    pub mode: QuantMode,
    /// Per tensor or per channel.
    pub granularity: Granularity,
    /// Drop the most negative value of signed types (`[-127, 127]`), as TFLite does for
    /// weights, so that `−q` is always representable.
    pub narrow_range: bool,
}

impl Default for QuantScheme {
    /// Signed 8-bit, symmetric, per tensor.
    fn default() -> Self {
        QuantScheme {
            dtype: QuantDtype::Int8,
            mode: QuantMode::Symmetric,
            granularity: Granularity::PerTensor,
            narrow_range: false,
        }
    }
}

impl QuantScheme {
    /// Weights for the int8 kernels: i8, symmetric, per output channel (axis 0), narrow.
    pub const fn int8_weights() -> Self {
        QuantScheme {
            dtype: QuantDtype::Int8,
            mode: QuantMode::Symmetric,
            granularity: Granularity::PerChannel { axis: 0 },
            narrow_range: true,
        }
    }

    /// Activations for the int8 kernels: u8, affine, per tensor.
    pub const fn uint8_activations() -> Self {
        QuantScheme {
            dtype: QuantDtype::UInt8,
            mode: QuantMode::Affine,
            granularity: Granularity::PerTensor,
            narrow_range: false,
        }
    }

    /// float16 storage.
    pub const fn float16() -> Self {
        QuantScheme {
            dtype: QuantDtype::Float16,
            mode: QuantMode::Symmetric,
            granularity: Granularity::PerTensor,
            narrow_range: false,
        }
    }

    /// Sets the stored type.
    pub const fn with_dtype(mut self, dtype: QuantDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets the mode.
    pub const fn with_mode(mut self, mode: QuantMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the granularity.
    pub const fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// Sets narrow range.
    pub const fn with_narrow_range(mut self, narrow: bool) -> Self {
        self.narrow_range = narrow;
        self
    }

    /// The integer range `[q_min, q_max]`, or `None` for float types.
    pub fn qrange(&self) -> Option<(i32, i32)> {
        let narrow = i32::from(self.narrow_range);
        match self.dtype {
            QuantDtype::Int8 => Some((-128 + narrow, 127)),
            QuantDtype::UInt8 => Some((0, 255)),
            QuantDtype::Int4 => Some((-8 + narrow, 7)),
            QuantDtype::Int32 => Some((i32::MIN + narrow, i32::MAX)),
            QuantDtype::Float16 | QuantDtype::BFloat16 => None,
        }
    }
}
