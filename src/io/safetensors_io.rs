//! A graph's parameters in the safetensors format.
//!
//! Tensor names are the dotted node names plus `.weight`, `.bias`, `.running_mean`,
//! `.running_var` (and `.num_batches_tracked`, written as an i64 scalar for PyTorch's
//! `load_state_dict(strict=True)` and ignored on load), with PyTorch layouts, so a
//! `state_dict` saved with `safetensors.torch.save_file` from a module whose submodule names
//! match the graph's node names loads unchanged.

use crate::error::{Error, Result};
use crate::model::{Graph, Op};
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// Serializes the graph's parameters and buffers (f32, little-endian) to safetensors bytes.
///
/// # Errors
/// [`Error::Unsupported`] if the serializer rejects a tensor (it does not for valid graphs).
pub fn to_safetensors_bytes(graph: &Graph) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    graph.visit_params(|name, _, v| {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        buffers.push((name.to_string(), v.shape().to_vec(), bytes));
    });
    let zero = 0i64.to_le_bytes();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    let bad = |e: safetensors::SafeTensorError| Error::Unsupported(format!("safetensors: {e}"));
    for (name, shape, bytes) in &buffers {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(bad)?,
        ));
    }
    for node in graph.nodes() {
        if let Op::BatchNorm2d(_) = node.op {
            views.push((
                format!("{}.{NUM_BATCHES_TRACKED}", node.name),
                TensorView::new(Dtype::I64, vec![], &zero).map_err(bad)?,
            ));
        }
    }
    // One metadata key only: the serializer writes a HashMap in its iteration order, and
    // the same model must give the same bytes.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(bad)
}

/// Writes the graph's parameters to a safetensors file.
///
/// # Errors
/// [`Error::Io`] when the file cannot be written.
pub fn save_safetensors(graph: &Graph, path: impl AsRef<Path>) -> Result<()> {
    let p = path.as_ref();
    let bytes = to_safetensors_bytes(graph)?;
    std::fs::write(p, bytes).map_err(|e| Error::io(p, e))
}

/// A stored tensor's values as f32 (from F32, F64, F16 or BF16), refusing NaN and infinity.
pub(crate) fn to_f32(name: &str, t: &TensorView<'_>) -> Result<Vec<f32>> {
    let d = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!("tensor `{name}`")));
    }
    Ok(v)
}

/// Loads parameters from safetensors bytes into `graph`. Every parameter and buffer must be
/// present with its exact shape, and every tensor must belong to the graph (except
/// BatchNorm's `num_batches_tracked`). Nothing is changed unless everything checks out.
///
/// # Errors
/// [`Error::CorruptFile`] for a malformed file (bad header, offsets that do not match the
/// data), [`Error::MissingTensor`], [`Error::UnexpectedTensor`], [`Error::TensorShape`],
/// [`Error::UnsupportedDtype`], [`Error::NonFinite`].
pub fn from_safetensors_bytes(graph: &mut Graph, bytes: &[u8], path: Option<&Path>) -> Result<()> {
    from_safetensors_bytes_skipping(graph, bytes, path, &[])
}

/// As [`from_safetensors_bytes`], skipping the tensors named in `skip` when the file has
/// them (buffers another framework stores that the graph computes, such as Hugging Face's
/// `embeddings.position_ids`).
///
/// # Errors
/// As [`from_safetensors_bytes`].
pub fn from_safetensors_bytes_skipping(
    graph: &mut Graph,
    bytes: &[u8],
    path: Option<&Path>,
    skip: &[&str],
) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::corrupt(path, format!("safetensors: {e}")))?;
    let mut wanted: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    graph.visit_params(|name, _, v| {
        wanted.insert(name.to_string(), v.shape().to_vec());
    });
    let bn_nodes: Vec<String> = graph
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm2d(_)))
        .map(|n| n.name.clone())
        .collect();
    let mut names = st.names();
    names.sort_unstable();
    for name in names {
        let is_counter = name
            .strip_suffix(NUM_BATCHES_TRACKED)
            .and_then(|p| p.strip_suffix('.'))
            .is_some_and(|node| bn_nodes.iter().any(|b| b == node));
        if !wanted.contains_key(name) && !is_counter && !skip.contains(&name) {
            return Err(Error::UnexpectedTensor(name.to_string()));
        }
    }
    let mut loaded: BTreeMap<String, ArrayD<f32>> = BTreeMap::new();
    for (name, shape) in &wanted {
        let t = st
            .tensor(name)
            .map_err(|_| Error::MissingTensor(name.clone()))?;
        if t.shape() != shape.as_slice() {
            return Err(Error::TensorShape {
                name: name.clone(),
                expected: shape.clone(),
                got: t.shape().to_vec(),
            });
        }
        let v = to_f32(name, &t)?;
        let arr = ArrayD::from_shape_vec(IxDyn(shape), v)
            .map_err(|e| Error::corrupt(path, format!("tensor `{name}`: {e}")))?;
        loaded.insert(name.clone(), arr);
    }
    graph.map_params(|name, _, mut p| {
        if let Some(v) = loaded.get(name) {
            p.assign(v);
        }
    });
    Ok(())
}

/// Loads parameters from a safetensors file into `graph` (see [`from_safetensors_bytes`]).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, otherwise as [`from_safetensors_bytes`].
pub fn load_safetensors(graph: &mut Graph, path: impl AsRef<Path>) -> Result<()> {
    load_safetensors_skipping(graph, path, &[])
}

/// As [`load_safetensors`], skipping the tensors named in `skip` (see
/// [`from_safetensors_bytes_skipping`]).
///
/// # Errors
/// As [`load_safetensors`].
pub fn load_safetensors_skipping(
    graph: &mut Graph,
    path: impl AsRef<Path>,
    skip: &[&str],
) -> Result<()> {
    let p = path.as_ref();
    let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    from_safetensors_bytes_skipping(graph, &bytes, Some(p), skip)
}

/// A [`crate::model::zoo::bert_encoder`] with the weights of a Hugging Face BERT-family
/// `model.safetensors` (every parameter there with its shape;
/// [`crate::model::zoo::HF_BERT_BUFFERS`] skipped).
///
/// # Errors
/// The errors of `bert_encoder` and of [`load_safetensors`].
pub fn load_hf_bert(
    config: &crate::model::zoo::BertConfig,
    path: impl AsRef<Path>,
) -> Result<Graph> {
    let mut g = crate::model::zoo::bert_encoder_zeroed(config)?;
    load_safetensors_skipping(&mut g, path, crate::model::zoo::HF_BERT_BUFFERS)?;
    Ok(g)
}

impl Graph {
    /// Builds a model from an architecture and a safetensors weights file.
    ///
    /// # Errors
    /// As [`load_safetensors`].
    pub fn from_safetensors(path: impl AsRef<Path>, mut architecture: Graph) -> Result<Graph> {
        load_safetensors(&mut architecture, path)?;
        Ok(architecture)
    }

    /// Writes this graph's parameters to a safetensors file (see [`save_safetensors`]).
    ///
    /// # Errors
    /// As [`save_safetensors`].
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        save_safetensors(self, path)
    }
}
