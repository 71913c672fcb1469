//! The `.nnq` file format of a [`QuantizedModel`].
//!
//! ```text
//! offset  size  field
//! 0       4     magic "NNQM"
//! 4       4     format version, u32 little-endian (1)
//! 8       8     payload length in bytes, u64 little-endian
//! 16      4     CRC-32 (IEEE) of the payload, u32 little-endian
//! 20      ...   payload: a safetensors container
//! ```
//!
//! Payload tensors, named after the nodes of the BatchNorm-folded graph:
//! - quantized layers: `{node}.weight_q` (I8, the float layer's layout), `{node}.weight_scale`
//!   (F32, one per output channel), `{node}.bias` (F32, when present);
//! - every other parameter: `{node}.{weight|bias|running_mean|running_var}` (F32; F16 in
//!   float16 mode);
//! - full-integer mode: `{node}.act` (F32 `[scale, zero_point]`) for every node's output.
//!
//! The safetensors metadata holds one key, `nnq`, with `mode=…;keep_float=a,b`. Loading takes
//! the float architecture (as [`crate::Graph::from_safetensors`] does), folds its BatchNorms
//! to recover the node structure, and rebuilds the model from the stored values; the
//! calibration report is not stored.

use super::fold::fold_batch_norms;
use super::ptq::{PtqMode, QuantConfig};
use super::qmodel::{QuantizedModel, StoredWeights};
use crate::error::{Error, Result};
use crate::model::Graph;
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

const MAGIC: &[u8; 4] = b"NNQM";
const VERSION: u32 = 1;

fn mode_name(mode: PtqMode) -> &'static str {
    match mode {
        PtqMode::FullInteger => "full_integer",
        PtqMode::DynamicRange => "dynamic_range",
        PtqMode::Float16 => "float16",
    }
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub(crate) type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

pub(crate) fn f32_entry(name: String, shape: &[usize], values: impl Iterator<Item = f32>) -> Entry {
    (
        name,
        Dtype::F32,
        shape.to_vec(),
        values.flat_map(f32::to_le_bytes).collect(),
    )
}

impl QuantizedModel {
    /// Serializes the model (see the module docs for the layout).
    ///
    /// # Errors
    /// [`Error::Unsupported`] if the container rejects a tensor (it does not for valid models).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let (entries, mode, keep) = self.entries();
        let views = entries
            .iter()
            .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Unsupported(format!("nnq: {e}")))?;
        let meta = HashMap::from([(
            "nnq".to_string(),
            format!("mode={};keep_float={}", mode_name(mode), keep.join(",")),
        )]);
        let payload = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Unsupported(format!("nnq: {e}")))?;
        Ok(crate::io::container::wrap(MAGIC, VERSION, &payload))
    }

    /// Writes the model to a `.nnq` file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = path.as_ref();
        std::fs::write(p, self.to_bytes()?).map_err(|e| Error::io(p, e))
    }

    /// Reads a `.nnq` file written for a model of `architecture`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, otherwise as [`QuantizedModel::from_bytes`].
    pub fn load(path: impl AsRef<Path>, architecture: &Graph) -> Result<Self> {
        let p = path.as_ref();
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        Self::from_bytes(&bytes, architecture, Some(p))
    }

    /// Parses `.nnq` bytes for a model of `architecture`.
    ///
    /// # Errors
    /// [`Error::CorruptFile`] for a bad magic number, an unknown version, a length or checksum
    /// that does not match, or a malformed container; [`Error::MissingTensor`],
    /// [`Error::TensorShape`], [`Error::UnsupportedDtype`] when the stored tensors do not fit
    /// the architecture.
    pub fn from_bytes(bytes: &[u8], architecture: &Graph, path: Option<&Path>) -> Result<Self> {
        let bad = |r: String| Error::corrupt(path, r);
        let payload = crate::io::container::unwrap(bytes, MAGIC, VERSION, "nnq", path)?;
        let st = SafeTensors::deserialize(payload).map_err(|e| bad(format!("container: {e}")))?;
        let (_, meta) =
            SafeTensors::read_metadata(payload).map_err(|e| bad(format!("container: {e}")))?;
        let info = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("nnq"))
            .ok_or_else(|| bad("missing nnq metadata".into()))?;
        let mut mode = None;
        let mut keep = Vec::new();
        for part in info.split(';') {
            match part.split_once('=') {
                Some(("mode", "full_integer")) => mode = Some(PtqMode::FullInteger),
                Some(("mode", "dynamic_range")) => mode = Some(PtqMode::DynamicRange),
                Some(("mode", "float16")) => mode = Some(PtqMode::Float16),
                Some(("keep_float", list)) => {
                    keep = list
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                _ => return Err(bad(format!("unknown nnq metadata `{part}`"))),
            }
        }
        let mode = mode.ok_or_else(|| bad("nnq metadata lacks the mode".into()))?;
        let mut folded = fold_batch_norms(architecture)?;
        let read = |name: &str, shape: &[usize]| -> Result<ArrayD<f32>> {
            let t = st
                .tensor(name)
                .map_err(|_| Error::MissingTensor(name.to_string()))?;
            if t.shape() != shape {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    got: t.shape().to_vec(),
                });
            }
            let values = crate::io::to_f32(name, &t)?;
            ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| bad(e.to_string()))
        };
        let mut stored = StoredWeights::new();
        let mut params: Vec<(String, ArrayD<f32>)> = Vec::new();
        let mut error = None;
        folded.visit_params(|name, kind, value| {
            if error.is_some() {
                return;
            }
            let node = &name[..name.len() - kind.suffix().len() - 1];
            let quantized = st.tensor(&format!("{node}.weight_q")).is_ok();
            let result = (|| -> Result<()> {
                if quantized && kind == crate::model::ParamKind::Weight {
                    let t = st
                        .tensor(&format!("{node}.weight_q"))
                        .map_err(|e| bad(e.to_string()))?;
                    if t.dtype() != Dtype::I8 || t.shape() != value.shape() {
                        return Err(Error::TensorShape {
                            name: format!("{node}.weight_q"),
                            expected: value.shape().to_vec(),
                            got: t.shape().to_vec(),
                        });
                    }
                    let q = ArrayD::from_shape_vec(
                        IxDyn(t.shape()),
                        t.data().iter().map(|&b| b as i8).collect(),
                    )
                    .map_err(|e| bad(e.to_string()))?;
                    let scales = read(&format!("{node}.weight_scale"), &[value.shape()[0]])?;
                    if scales.iter().any(|&s| s <= 0.0) {
                        return Err(bad(format!("`{node}.weight_scale` holds a scale ≤ 0")));
                    }
                    stored.insert(node.to_string(), (q, scales.iter().copied().collect()));
                } else {
                    params.push((name.to_string(), read(name, value.shape())?));
                }
                Ok(())
            })();
            if let Err(e) = result {
                error = Some(e);
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        let values: HashMap<String, ArrayD<f32>> = params.into_iter().collect();
        folded.map_params(|name, _, mut p| {
            if let Some(v) = values.get(name) {
                p.assign(v);
            }
        });
        let config = QuantConfig {
            mode,
            keep_float: keep,
            ..QuantConfig::int8()
        };
        match mode {
            PtqMode::FullInteger => {
                let acts = folded
                    .nodes()
                    .iter()
                    .map(|n| {
                        let a = read(&format!("{}.act", n.name), &[2])?;
                        if a[0] <= 0.0 || !(0.0..=255.0).contains(&a[1]) || a[1].fract() != 0.0 {
                            return Err(bad(format!(
                                "activation parameters of `{}` are out of range",
                                n.name
                            )));
                        }
                        Ok((a[0], a[1] as u8))
                    })
                    .collect::<Result<Vec<_>>>()?;
                QuantizedModel::build(&folded, &acts, &config, &stored)
            }
            PtqMode::DynamicRange => QuantizedModel::dynamic(&folded, &config, &stored),
            PtqMode::Float16 => QuantizedModel::float16(&folded, &config),
        }
    }
}
