//! Dynamic int8 for the Linear layers of any graph (transformers included): each Linear
//! becomes a [`DynamicLinear`] node of the same graph (int8 weights per output channel,
//! its input quantized to u8 on the fly per tensor or per token), everything else —
//! LayerNorm, GELU, softmax, attention, residual adds, embeddings — stays f32, as Q8BERT
//! and ONNX Runtime's `quantize_dynamic` do. The result runs on the graph's own executor.

use crate::error::{Error, Result};
use crate::model::{ActivationGranularity, DynamicLinear, Graph, Op};
use crate::tensor::QuantGrid;
use ndarray::Array2;

/// The symmetric int8 grid of the weights (`[−127, 127]`, zero point 0).
const I8: QuantGrid = QuantGrid {
    qmin: -127,
    qmax: 127,
    symmetric: true,
};

/// Options of [`dynamic_int8`].
///
/// # Examples
/// ```
/// use nncompress::model::zoo;
/// use nncompress::quantizer::{dynamic_int8, DynamicInt8};
/// let net = zoo::lenet_300_100(7)?;
/// let options = DynamicInt8::per_row().exclude("fc3");
/// let (q, report) = dynamic_int8(&net, &options)?;
/// assert_eq!(report.layers.len(), 2); // fc1, fc2; fc3 stays f32
/// let x = ndarray::Array4::<f32>::from_elem((2, 1, 28, 28), 0.5).into_dyn();
/// let (a, b) = (net.forward(&x)?, q.forward(&x)?);
/// assert!((&a - &b).iter().all(|d| d.abs() < 0.05));
/// # Ok::<(), nncompress::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicInt8 {
    /// How each quantized layer's input is quantized.
    pub granularity: ActivationGranularity,
    /// Linear nodes kept in f32, by name.
    pub excluded: Vec<String>,
}

impl DynamicInt8 {
    /// Activations quantized per row (per token).
    pub fn per_row() -> Self {
        DynamicInt8 {
            granularity: ActivationGranularity::PerRow,
            excluded: Vec::new(),
        }
    }

    /// Activations quantized per tensor (ONNX Runtime's `DynamicQuantizeLinear`).
    pub fn per_tensor() -> Self {
        DynamicInt8 {
            granularity: ActivationGranularity::PerTensor,
            ..DynamicInt8::per_row()
        }
    }

    /// Keeps Linear node `name` in f32.
    #[must_use]
    pub fn exclude(mut self, name: &str) -> Self {
        self.excluded.push(name.to_string());
        self
    }
}

/// One quantized layer of a [`DynamicReport`].
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicLayer {
    /// Node name.
    pub name: String,
    /// Input and output features.
    pub shape: [usize; 2],
    /// Bytes of the f32 weight matrix.
    pub f32_bytes: usize,
    /// Bytes of the int8 weights and their f32 per-channel scales.
    pub int8_bytes: usize,
    /// Signal-to-quantization-noise ratio of the weights, in dB.
    pub weight_sqnr_db: f64,
}

/// What [`dynamic_int8`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicReport {
    /// The quantized layers, in graph order.
    pub layers: Vec<DynamicLayer>,
    /// The Linear layers kept in f32 (excluded by name).
    pub kept_f32: Vec<String>,
}

impl DynamicReport {
    /// f32 weight bytes over int8 weight bytes (scales included) of the quantized layers.
    pub fn weight_compression(&self) -> f64 {
        let f: usize = self.layers.iter().map(|l| l.f32_bytes).sum();
        let q: usize = self.layers.iter().map(|l| l.int8_bytes).sum();
        f as f64 / q.max(1) as f64
    }
}

/// Symmetric int8 per output channel: `(q, scales)` with `s[c] = max|w[c, :]| / 127`
/// (1 for an all-zero row).
pub(crate) fn int8_per_channel(w: &Array2<f32>) -> (Array2<i8>, Vec<f32>) {
    let scales: Vec<f32> = w
        .rows()
        .into_iter()
        .map(|row| {
            let (lo, hi) = row
                .iter()
                .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            I8.params(lo, hi).0
        })
        .collect();
    let q = Array2::from_shape_fn(w.dim(), |(c, k)| I8.quantize(w[[c, k]], scales[c], 0) as i8);
    (q, scales)
}

fn sqnr_db(w: &Array2<f32>, q: &Array2<i8>, scales: &[f32]) -> f64 {
    let (mut signal, mut noise) = (0f64, 0f64);
    for ((c, k), &v) in w.indexed_iter() {
        let back = f64::from(q[[c, k]]) * f64::from(scales[c]);
        signal += f64::from(v) * f64::from(v);
        noise += (f64::from(v) - back).powi(2);
    }
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// The graph with every Linear node not excluded replaced by a [`DynamicLinear`] (int8
/// weights per output channel, symmetric; activations quantized on the fly as `options`
/// says), and a report of what changed. The graph keeps its names, inputs and outputs.
///
/// # Errors
/// [`Error::InvalidConfig`] for an excluded name that is not a Linear node of the graph (a
/// misspelt exclusion would otherwise quantize the layer it meant to keep);
/// [`Error::NonFinite`] for a weight that is NaN or infinite.
pub fn dynamic_int8(graph: &Graph, options: &DynamicInt8) -> Result<(Graph, DynamicReport)> {
    for name in &options.excluded {
        let is_linear = graph
            .find(name)
            .is_some_and(|id| matches!(graph.node(id).op, Op::Linear(_)));
        if !is_linear {
            return Err(Error::config(
                "dynamic int8 exclusion",
                format!("`{name}` is not a Linear node of the graph"),
            ));
        }
    }
    let mut out = graph.clone();
    let mut report = DynamicReport {
        layers: Vec::new(),
        kept_f32: Vec::new(),
    };
    let mut swaps = Vec::new();
    for node in graph.nodes() {
        let Op::Linear(l) = &node.op else { continue };
        if options.excluded.contains(&node.name) {
            report.kept_f32.push(node.name.clone());
            continue;
        }
        if l.weight.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("weight of `{}`", node.name)));
        }
        let (q, scales) = int8_per_channel(&l.weight);
        let (o, i) = l.weight.dim();
        report.layers.push(DynamicLayer {
            name: node.name.clone(),
            shape: [i, o],
            f32_bytes: 4 * o * i,
            int8_bytes: o * i + 4 * o,
            weight_sqnr_db: sqnr_db(&l.weight, &q, &scales),
        });
        let op = DynamicLinear::new(q, scales, l.bias.clone(), options.granularity)?;
        swaps.push((node.name.clone(), Op::DynamicLinear(op)));
    }
    out.replace_ops(swaps)?;
    Ok((out, report))
}
