//! Deep compression (Han, Mao and Dally 2016): prune, share weights by k-means with trained
//! centroids, store the survivors in relative-index form, Huffman-code both streams, and
//! write a real, loadable file.
//!
//! ```text
//! pruned graph ──SharedWeights::from_graph──▶ codebook + cluster index per surviving weight
//!              ──fine_tune (gradients summed per centroid, masks kept)──▶
//!              ──compress──▶ Compressed (relative indices + Huffman) ──save / to_bytes──▶ .nndc
//! .nndc ──load / from_bytes──▶ Compressed ──decompress(&architecture)──▶ float Graph
//! ```
//!
//! File layout (`.nndc`, little-endian): magic `NNDC`, version (u32, 1), payload length
//! (u64), CRC-32 of the payload (u32), then the payload: the layer count (u32) and per
//! shared layer its name, shape, cluster and index bits, codebook (f32 or f16), entry count,
//! and for each of the two streams (cluster indices, index gaps) the canonical Huffman code
//! lengths and the coded bits; then every other parameter of the graph (biases, BatchNorm)
//! by name in f32.

mod format;
mod huffman;
mod kmeans;
mod sparse;

pub use huffman::{HuffmanCode, MAX_CODE_LEN};
pub use kmeans::{kmeans_linear, nearest, Clustering};
pub use sparse::{decode as decode_relative, encode as encode_relative, RelativeIndex};

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::model::{Graph, Mode, Op, ParamKind};
use crate::train::{batch_indices, softmax_cross_entropy, Dataset, Progress, TrainConfig};
use format::{Reader, Writer};
use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::fmt::Write as _;
use std::path::Path;

/// Bits per layer for cluster indices and relative indices.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepCompressionConfig {
    /// Cluster-index bits of Conv2d layers (`2^bits − 1` clusters; one symbol is the filler).
    pub conv_bits: u32,
    /// Cluster-index bits of Linear layers.
    pub fc_bits: u32,
    /// Relative-index bits of Conv2d layers.
    pub conv_index_bits: u32,
    /// Relative-index bits of Linear layers.
    pub fc_index_bits: u32,
    /// Per-layer cluster bits, overriding the defaults.
    pub layer_bits: Vec<(String, u32)>,
    /// Store codebooks as float16 instead of float32.
    pub codebook_f16: bool,
    /// Lloyd iterations at most.
    pub kmeans_iterations: usize,
}

impl Default for DeepCompressionConfig {
    /// The paper's choice: 8 bits for conv, 5 for fc, both for clusters and index gaps; f32
    /// codebooks.
    fn default() -> Self {
        DeepCompressionConfig {
            conv_bits: 8,
            fc_bits: 5,
            conv_index_bits: 8,
            fc_index_bits: 5,
            layer_bits: Vec::new(),
            codebook_f16: false,
            kmeans_iterations: 100,
        }
    }
}

impl DeepCompressionConfig {
    /// Cluster bits of layer `name` (`conv` tells the kind).
    pub fn bits_for(&self, name: &str, conv: bool) -> u32 {
        self.layer_bits
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map_or(
                if conv { self.conv_bits } else { self.fc_bits },
                |(_, b)| *b,
            )
    }
}

/// One layer whose surviving weights share a codebook.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedLayer {
    /// Layer name.
    pub name: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Whether it is a convolution (else Linear).
    pub conv: bool,
    /// Flat positions of the surviving (nonzero) weights, increasing.
    pub positions: Vec<u32>,
    /// Cluster of each surviving weight.
    pub codes: Vec<u32>,
    /// The shared values.
    pub centroids: Vec<f32>,
    /// Cluster-index bits.
    pub cluster_bits: u32,
    /// Relative-index bits.
    pub index_bits: u32,
}

impl SharedLayer {
    /// The dense weight: centroids at the surviving positions, zeros elsewhere.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a position past the weight or a code past the codebook;
    /// [`Error::LimitExceeded`] for a shape past [`Limits::max_tensor_elements`].
    pub fn weight(&self) -> Result<ArrayD<f32>> {
        let n = Limits::default().check_elements(&self.shape, &format!("layer `{}`", self.name))?;
        if self.positions.len() != self.codes.len() {
            return Err(Error::config(
                format!("shared layer `{}`", self.name),
                "one code per position is needed",
            ));
        }
        let mut w = vec![0.0f32; n];
        for (&p, &c) in self.positions.iter().zip(&self.codes) {
            let (Some(slot), Some(&v)) = (w.get_mut(p as usize), self.centroids.get(c as usize))
            else {
                return Err(Error::config(
                    format!("shared layer `{}`", self.name),
                    format!("position {p} or code {c} is out of range"),
                ));
            };
            *slot = v;
        }
        ArrayD::from_shape_vec(IxDyn(&self.shape), w).map_err(|e| Error::Unsupported(e.to_string()))
    }
}

/// The weight-shared form of every Conv2d and Linear layer of a (pruned) graph.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedWeights {
    /// The layers, in graph order.
    pub layers: Vec<SharedLayer>,
}

fn check_bits(bits: u32, what: &str) -> Result<()> {
    if (1..=16).contains(&bits) {
        Ok(())
    } else {
        Err(Error::config(
            what.to_string(),
            format!("{bits} bits (1 to 16)"),
        ))
    }
}

impl SharedWeights {
    /// Clusters the nonzero weights of every Conv2d / Linear of `graph` (pruned weights are
    /// exact zeros and stay out), linear initialisation.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bits outside `1..=16`, [`Error::UnknownNode`] for
    /// per-layer bits naming no layer, [`Error::NonFinite`] for NaN weights.
    pub fn from_graph(graph: &Graph, config: &DeepCompressionConfig) -> Result<Self> {
        for (n, b) in &config.layer_bits {
            graph.id(n)?;
            check_bits(*b, &format!("cluster bits of `{n}`"))?;
        }
        check_bits(config.conv_index_bits, "conv index bits")?;
        check_bits(config.fc_index_bits, "fc index bits")?;
        let mut layers = Vec::new();
        for node in graph.nodes() {
            let (w, conv) = match &node.op {
                Op::Conv2d(c) => (c.weight.view().into_dyn(), true),
                Op::Linear(l) => (l.weight.view().into_dyn(), false),
                _ => continue,
            };
            let bits = config.bits_for(&node.name, conv);
            check_bits(bits, &format!("cluster bits of `{}`", node.name))?;
            let flat: Vec<f32> = w.as_standard_layout().iter().copied().collect();
            if flat.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!("weights of `{}`", node.name)));
            }
            let positions: Vec<u32> = (0..flat.len() as u32)
                .filter(|&i| flat[i as usize] != 0.0)
                .collect();
            let values: Vec<f32> = positions.iter().map(|&i| flat[i as usize]).collect();
            let clusters = (1usize << bits) - 1;
            let k = kmeans_linear(&values, clusters, config.kmeans_iterations);
            layers.push(SharedLayer {
                name: node.name.clone(),
                shape: w.shape().to_vec(),
                conv,
                positions,
                codes: k.assignment,
                centroids: k.centroids,
                cluster_bits: bits,
                index_bits: if conv {
                    config.conv_index_bits
                } else {
                    config.fc_index_bits
                },
            });
        }
        Ok(SharedWeights { layers })
    }

    /// Writes the shared weights into `graph` (same architecture).
    ///
    /// # Errors
    /// [`Error::UnknownNode`] / [`Error::TensorShape`] when the graph does not match.
    pub fn apply(&self, graph: &mut Graph) -> Result<()> {
        for l in &self.layers {
            let mut done = false;
            for (kind, mut p) in graph.params_of_mut(&l.name)? {
                if kind == ParamKind::Weight {
                    // The shape is compared before the dense weight is built: the layer's
                    // shape may come from a file and must not size an allocation unchecked.
                    if p.shape() != l.shape.as_slice() {
                        return Err(Error::TensorShape {
                            name: format!("{}.weight", l.name),
                            expected: p.shape().to_vec(),
                            got: l.shape.clone(),
                        });
                    }
                    p.assign(&l.weight()?);
                    done = true;
                }
            }
            if !done {
                return Err(Error::MissingTensor(format!("{}.weight", l.name)));
            }
        }
        Ok(())
    }

    /// Centroid fine-tuning (Han et al. §3.1): each step, the gradient of every surviving
    /// weight is added to its centroid's gradient, centroids move by SGD with momentum 0.9
    /// (`lr` times the summed gradient), pruned weights stay zero; biases and other trainable
    /// parameters take plain SGD steps of `lr`. `progress` is called after every batch.
    ///
    /// # Errors
    /// [`Error::Empty`] for empty data, [`Error::NonFinite`] if the loss diverges, the model's
    /// errors.
    pub fn fine_tune(
        &mut self,
        graph: &mut Graph,
        data: &dyn Dataset,
        config: TrainConfig,
        lr: f32,
        mut progress: impl FnMut(&Progress),
    ) -> Result<()> {
        if data.is_empty() {
            return Err(Error::Empty("centroid fine-tuning data".into()));
        }
        let shared: Vec<String> = self
            .layers
            .iter()
            .map(|l| format!("{}.weight", l.name))
            .collect();
        let mut velocity: Vec<Vec<f32>> = self
            .layers
            .iter()
            .map(|l| vec![0.0; l.centroids.len()])
            .collect();
        let mut rng = StdRng::seed_from_u64(config.seed);
        self.apply(graph)?;
        for epoch in 1..=config.epochs {
            let step = lr * config.schedule.factor(epoch - 1, config.epochs);
            let batches = batch_indices(data.len(), config.batch_size, Some(&mut rng));
            let mut meter = crate::train::EpochMeter::default();
            for (b, idx) in batches.iter().enumerate() {
                let (x, y) = data.batch(idx)?;
                let trace = graph.trace(&x, Mode::Training, &mut rng)?;
                let logits = trace.value(graph.output_id());
                let (loss, grad) = softmax_cross_entropy(logits, &y)?;
                if !loss.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "centroid fine-tuning loss at epoch {epoch}"
                    )));
                }
                meter.count_correct(logits, &y)?;
                let grads = graph.backward(&trace, &grad)?;
                drop(trace);
                for (l, v) in self.layers.iter_mut().zip(velocity.iter_mut()) {
                    let Some(g) = grads.get(&format!("{}.weight", l.name)) else {
                        continue;
                    };
                    let g = g.as_standard_layout();
                    let gs = g.as_slice().unwrap_or_default();
                    let mut sum = vec![0.0f64; l.centroids.len()];
                    for (&p, &c) in l.positions.iter().zip(&l.codes) {
                        sum[c as usize] += gs[p as usize] as f64;
                    }
                    for ((c, v), s) in l.centroids.iter_mut().zip(v.iter_mut()).zip(sum) {
                        *v = 0.9 * *v + s as f32;
                        *c -= step * *v;
                    }
                }
                graph.map_params(|name, kind, mut p| {
                    if kind.is_trainable() && !shared.iter().any(|s| s == name) {
                        if let Some(g) = grads.get(name) {
                            if g.shape() == p.shape() {
                                p.scaled_add(-step, g);
                            }
                        }
                    }
                });
                self.apply(graph)?;
                meter.add_loss(loss, y.len());
                progress(&meter.progress((epoch, config.epochs), (b + 1, batches.len()), step));
            }
        }
        Ok(())
    }

    /// Encodes every layer: relative indices, Huffman-coded cluster and gap streams, and the
    /// codebook; stores every other parameter of `graph` in f32.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when a layer is inconsistent (bits outside `1..=16`, a
    /// position past the weight, a code past the codebook, too many or non-finite
    /// centroids) or its streams cannot be coded (they always can for weights made by
    /// [`SharedWeights::from_graph`]); [`Error::LimitExceeded`] for a shape past the limits.
    pub fn compress(&self, graph: &Graph, codebook_f16: bool) -> Result<Compressed> {
        let mut layers = Vec::new();
        for l in &self.layers {
            check_bits(l.cluster_bits, &format!("cluster bits of `{}`", l.name))?;
            check_bits(l.index_bits, &format!("index bits of `{}`", l.name))?;
            let weights =
                Limits::default().check_elements(&l.shape, &format!("layer `{}`", l.name))?;
            if l.positions.last().is_some_and(|&p| p as usize >= weights) {
                return Err(Error::config(
                    format!("shared layer `{}`", l.name),
                    format!("a position is past the layer's {weights} weights"),
                ));
            }
            if l.centroids.len() >= 1 << l.cluster_bits
                || l.centroids.iter().any(|c| !c.is_finite())
            {
                return Err(Error::config(
                    format!("shared layer `{}`", l.name),
                    format!(
                        "{} centroids (finite, fewer than 2^{} with the filler)",
                        l.centroids.len(),
                        l.cluster_bits
                    ),
                ));
            }
            if l.codes.iter().any(|&c| c as usize >= l.centroids.len()) {
                return Err(Error::config(
                    format!("shared layer `{}`", l.name),
                    "a code is past the codebook",
                ));
            }
            let filler = (1u32 << l.cluster_bits) - 1;
            let rel = encode_relative(&l.positions, &l.codes, l.index_bits, filler)?;
            let count = |syms: &[u32], n: usize| {
                let mut c = vec![0u64; n];
                for &s in syms {
                    c[s as usize] += 1;
                }
                c
            };
            let value_code = HuffmanCode::from_counts(&count(&rel.values, 1 << l.cluster_bits))?;
            let gap_code = HuffmanCode::from_counts(&count(&rel.gaps, 1 << l.index_bits))?;
            let (value_bytes, value_bits) = value_code.encode(&rel.values)?;
            let (gap_bytes, gap_bits) = gap_code.encode(&rel.gaps)?;
            let centroids = if codebook_f16 {
                l.centroids
                    .iter()
                    .map(|&c| half::f16::from_f32(c).to_f32())
                    .collect()
            } else {
                l.centroids.clone()
            };
            layers.push(CompressedLayer {
                name: l.name.clone(),
                shape: l.shape.clone(),
                cluster_bits: l.cluster_bits,
                index_bits: l.index_bits,
                codebook_f16,
                centroids,
                entries: rel.values.len(),
                nonzeros: l.positions.len(),
                value_lengths: value_code.lengths().to_vec(),
                value_bits,
                value_bytes,
                gap_lengths: gap_code.lengths().to_vec(),
                gap_bits,
                gap_bytes,
            });
        }
        let mut others = Vec::new();
        graph.visit_params(|name, _, v| {
            let node = name.rsplit_once('.').map_or(name, |(n, _)| n);
            let is_shared_weight =
                name.ends_with(".weight") && self.layers.iter().any(|l| l.name == node);
            if !is_shared_weight {
                others.push((
                    name.to_string(),
                    v.shape().to_vec(),
                    v.iter().copied().collect(),
                ));
            }
        });
        Ok(Compressed {
            layers,
            others,
            float_bytes: 4 * {
                let mut n = 0;
                graph.visit_params(|_, k, v| {
                    if k.is_trainable() {
                        n += v.len()
                    }
                });
                n
            },
        })
    }
}

/// One layer of a [`Compressed`] model.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedLayer {
    /// Layer name.
    pub name: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Cluster-index bits.
    pub cluster_bits: u32,
    /// Relative-index bits.
    pub index_bits: u32,
    /// Codebook stored as float16.
    pub codebook_f16: bool,
    /// Codebook (as stored, widened to f32).
    pub centroids: Vec<f32>,
    /// Entries in the streams (nonzeros plus fillers).
    pub entries: usize,
    /// Nonzero weights.
    pub nonzeros: usize,
    value_lengths: Vec<u8>,
    value_bits: u64,
    value_bytes: Vec<u8>,
    gap_lengths: Vec<u8>,
    gap_bits: u64,
    gap_bytes: Vec<u8>,
}

impl CompressedLayer {
    /// Weights in the layer (saturating: the shape is a public field).
    pub fn weights(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
    /// Bytes of the Huffman-coded cluster indices.
    pub fn index_bytes(&self) -> usize {
        self.value_bytes.len()
    }
    /// Bytes of the Huffman-coded relative indices.
    pub fn relative_index_bytes(&self) -> usize {
        self.gap_bytes.len()
    }
    /// Bytes of the codebook.
    pub fn codebook_bytes(&self) -> usize {
        self.centroids.len() * if self.codebook_f16 { 2 } else { 4 }
    }
    /// Bytes both streams would take at their fixed widths (before Huffman coding).
    pub fn fixed_width_bytes(&self) -> usize {
        (self
            .entries
            .saturating_mul(self.cluster_bits.saturating_add(self.index_bits) as usize))
        .div_ceil(8)
    }
    /// Bytes of the layer as stored (streams, codebook, code-length tables).
    pub fn stored_bytes(&self) -> usize {
        self.index_bytes()
            + self.relative_index_bytes()
            + self.codebook_bytes()
            + self.value_lengths.len()
            + self.gap_lengths.len()
    }

    fn decode(&self) -> Result<SharedLayer> {
        // The public fields may have been changed since the file was read: check again.
        check_bits(
            self.cluster_bits,
            &format!("cluster bits of `{}`", self.name),
        )?;
        check_bits(self.index_bits, &format!("index bits of `{}`", self.name))?;
        let weights =
            Limits::default().check_elements(&self.shape, &format!("layer `{}`", self.name))?;
        let values = HuffmanCode::from_lengths(self.value_lengths.clone())?.decode(
            &self.value_bytes,
            self.value_bits,
            self.entries,
        )?;
        let gaps = HuffmanCode::from_lengths(self.gap_lengths.clone())?.decode(
            &self.gap_bytes,
            self.gap_bits,
            self.entries,
        )?;
        let filler = (1u32 << self.cluster_bits) - 1;
        let pairs = decode_relative(&RelativeIndex { gaps, values }, filler, weights)?;
        if pairs
            .iter()
            .any(|&(_, v)| v as usize >= self.centroids.len())
        {
            return Err(Error::config(
                format!("layer `{}`", self.name),
                "a cluster index is past the codebook",
            ));
        }
        Ok(SharedLayer {
            name: self.name.clone(),
            shape: self.shape.clone(),
            conv: self.shape.len() == 4,
            positions: pairs.iter().map(|p| p.0).collect(),
            codes: pairs.iter().map(|p| p.1).collect(),
            centroids: self.centroids.clone(),
            cluster_bits: self.cluster_bits,
            index_bits: self.index_bits,
        })
    }
}

/// A deep-compressed model: what the `.nndc` file holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressed {
    /// The weight-shared layers.
    pub layers: Vec<CompressedLayer>,
    /// Every other parameter and buffer, by name: shape and f32 values.
    pub others: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Bytes of the model's trainable parameters in float32 (the reference for the ratio).
    pub float_bytes: usize,
}

/// One row of [`Compressed::report`] (the columns of the paper's tables).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCompression {
    /// Layer name.
    pub name: String,
    /// Weights.
    pub weights: usize,
    /// Fraction kept after pruning.
    pub kept: f64,
    /// Cluster-index bits.
    pub cluster_bits: u32,
    /// Relative-index bits.
    pub index_bits: u32,
    /// Bytes of Huffman-coded cluster indices.
    pub index_bytes: usize,
    /// Bytes of the codebook.
    pub codebook_bytes: usize,
    /// Bytes of Huffman-coded relative indices.
    pub relative_index_bytes: usize,
    /// Fixed-width bytes over Huffman-coded bytes of both streams.
    pub huffman_gain: f64,
    /// `4·weights` over the layer's stored bytes.
    pub ratio: f64,
}

impl Compressed {
    /// Serializes to `.nndc` bytes (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.float_bytes as u64);
        w.u32(self.layers.len() as u32);
        for l in &self.layers {
            w.str(&l.name);
            w.u8(l.shape.len() as u8);
            for &d in &l.shape {
                w.u32(d as u32);
            }
            w.u8(l.cluster_bits as u8);
            w.u8(l.index_bits as u8);
            w.u8(u8::from(l.codebook_f16));
            w.u32(l.centroids.len() as u32);
            if l.codebook_f16 {
                for &c in &l.centroids {
                    w.u16(half::f16::from_f32(c).to_bits());
                }
            } else {
                w.f32s(&l.centroids);
            }
            w.u32(l.entries as u32);
            w.u32(l.nonzeros as u32);
            for (lengths, bits, bytes) in [
                (&l.value_lengths, l.value_bits, &l.value_bytes),
                (&l.gap_lengths, l.gap_bits, &l.gap_bytes),
            ] {
                w.u32(lengths.len() as u32);
                w.buf.extend_from_slice(lengths);
                w.u64(bits);
                w.bytes(bytes);
            }
        }
        w.u32(self.others.len() as u32);
        for (name, shape, values) in &self.others {
            w.str(name);
            w.u8(shape.len() as u8);
            for &d in shape {
                w.u32(d as u32);
            }
            w.f32s(values);
        }
        w.finish()
    }

    /// Parses `.nndc` bytes.
    ///
    /// # Errors
    /// [`Error::CorruptFile`] for a bad magic, version, length or checksum, or any section
    /// that does not parse (every read is bounds-checked; nothing panics).
    pub fn from_bytes(bytes: &[u8], path: Option<&Path>) -> Result<Self> {
        Self::from_bytes_with_limits(bytes, path, &Limits::default())
    }

    /// [`Compressed::from_bytes`] under explicit resource limits (layer shapes are bounded
    /// by [`Limits::max_tensor_elements`]).
    ///
    /// # Errors
    /// As [`Compressed::from_bytes`]; [`Error::LimitExceeded`] for a layer past the limits.
    pub fn from_bytes_with_limits(
        bytes: &[u8],
        path: Option<&Path>,
        limits: &Limits,
    ) -> Result<Self> {
        let mut r = Reader::open(bytes, path)?;
        let float_bytes = r.u64()? as usize;
        let n = r.u32()? as usize;
        let mut layers = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let name = r.str()?;
            let rank = r.u8()? as usize;
            let shape = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let weights = limits.check_elements(&shape, &format!("layer `{name}`"))?;
            let cluster_bits = r.u8()? as u32;
            let index_bits = r.u8()? as u32;
            if !(1..=16).contains(&cluster_bits) || !(1..=16).contains(&index_bits) {
                return Err(r.err(format!("layer `{name}`: bits out of range")));
            }
            let codebook_f16 = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(r.err("unknown codebook type")),
            };
            let k = r.u32()? as usize;
            if k >= 1 << cluster_bits || k == 0 {
                return Err(r.err(format!("layer `{name}`: {k} centroids")));
            }
            let centroids = if codebook_f16 {
                (0..k)
                    .map(|_| r.u16().map(|b| half::f16::from_bits(b).to_f32()))
                    .collect::<Result<Vec<_>>>()?
            } else {
                r.f32s(k)?
            };
            let entries = r.u32()? as usize;
            let nonzeros = r.u32()? as usize;
            if nonzeros > entries || nonzeros > weights {
                return Err(r.err(format!("layer `{name}`: counts out of range")));
            }
            let mut streams = Vec::new();
            for alphabet in [1usize << cluster_bits, 1 << index_bits] {
                let m = r.u32()? as usize;
                if m != alphabet {
                    return Err(r.err(format!("layer `{name}`: code table of {m} symbols")));
                }
                let mut lengths = Vec::with_capacity(m);
                for _ in 0..m {
                    lengths.push(r.u8()?);
                }
                let bits = r.u64()?;
                // Every entry takes at least one bit of each stream: a larger count is a
                // lie, caught before the decoder reserves room for it.
                if entries as u64 > bits {
                    return Err(r.err(format!(
                        "layer `{name}`: {entries} entries in a stream of {bits} bits"
                    )));
                }
                let data = r.bytes()?.to_vec();
                streams.push((lengths, bits, data));
            }
            let (gap_lengths, gap_bits, gap_bytes) =
                streams.pop().ok_or_else(|| r.err("streams"))?;
            let (value_lengths, value_bits, value_bytes) =
                streams.pop().ok_or_else(|| r.err("streams"))?;
            let layer = CompressedLayer {
                name,
                shape,
                cluster_bits,
                index_bits,
                codebook_f16,
                centroids,
                entries,
                nonzeros,
                value_lengths,
                value_bits,
                value_bytes,
                gap_lengths,
                gap_bits,
                gap_bytes,
            };
            // Decode now, so that a damaged stream is a load error, not a later surprise.
            let decoded = layer
                .decode()
                .map_err(|e| r.err(format!("layer `{}`: {e}", layer.name)))?;
            if decoded.positions.len() != nonzeros {
                return Err(r.err(format!("layer `{}`: nonzero count differs", layer.name)));
            }
            layers.push(layer);
        }
        let m = r.u32()? as usize;
        let mut others = Vec::with_capacity(m.min(4096));
        for _ in 0..m {
            let name = r.str()?;
            let rank = r.u8()? as usize;
            let shape = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let len = limits.check_elements(&shape, &format!("parameter `{name}`"))?;
            let values = r.f32s(len)?;
            others.push((name, shape, values));
        }
        r.done()?;
        Ok(Compressed {
            layers,
            others,
            float_bytes,
        })
    }

    /// Writes a `.nndc` file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = path.as_ref();
        std::fs::write(p, self.to_bytes()).map_err(|e| Error::io(p, e))
    }

    /// Reads a `.nndc` file.
    ///
    /// # Errors
    /// [`Error::Io`], or as [`Compressed::from_bytes`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_limits(path, &Limits::default())
    }

    /// [`Compressed::load`] under explicit resource limits.
    ///
    /// # Errors
    /// As [`Compressed::from_bytes_with_limits`].
    pub fn load_with_limits(path: impl AsRef<Path>, limits: &Limits) -> Result<Self> {
        let p = path.as_ref();
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        Self::from_bytes_with_limits(&bytes, Some(p), limits)
    }

    /// The weight-shared layers decoded (cluster indices and positions).
    ///
    /// # Errors
    /// As [`Compressed::from_bytes`]'s stream errors.
    pub fn shared(&self) -> Result<SharedWeights> {
        Ok(SharedWeights {
            layers: self
                .layers
                .iter()
                .map(CompressedLayer::decode)
                .collect::<Result<_>>()?,
        })
    }

    /// A float graph of `architecture` with the stored weights and parameters.
    ///
    /// # Errors
    /// [`Error::UnknownNode`], [`Error::MissingTensor`], [`Error::TensorShape`] when the
    /// file does not fit the architecture.
    pub fn decompress(&self, architecture: &Graph) -> Result<Graph> {
        let mut g = architecture.clone();
        self.shared()?.apply(&mut g)?;
        let mut err = None;
        let mut seen = 0;
        g.map_params(|name, _, mut p| {
            if let Some((_, shape, values)) = self.others.iter().find(|(n, _, _)| n == name) {
                seen += 1;
                if shape.as_slice() != p.shape() || values.len() != p.len() {
                    err.get_or_insert(Error::TensorShape {
                        name: name.to_string(),
                        expected: p.shape().to_vec(),
                        got: shape.clone(),
                    });
                } else if let Some(s) = p.as_slice_mut() {
                    s.copy_from_slice(values);
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if seen != self.others.len() {
            return Err(Error::UnexpectedTensor(
                "parameters in the file that the architecture does not have".into(),
            ));
        }
        Ok(g)
    }

    /// Bytes of the whole `.nndc` file.
    pub fn file_bytes(&self) -> usize {
        self.to_bytes().len()
    }

    /// The float32 parameter bytes over the file bytes.
    pub fn ratio(&self) -> f64 {
        self.float_bytes as f64 / self.file_bytes().max(1) as f64
    }

    /// Per-layer rows (the paper's columns).
    pub fn report(&self) -> Vec<LayerCompression> {
        self.layers
            .iter()
            .map(|l| LayerCompression {
                name: l.name.clone(),
                weights: l.weights(),
                kept: l.nonzeros as f64 / l.weights().max(1) as f64,
                cluster_bits: l.cluster_bits,
                index_bits: l.index_bits,
                index_bytes: l.index_bytes(),
                codebook_bytes: l.codebook_bytes(),
                relative_index_bytes: l.relative_index_bytes(),
                huffman_gain: l.fixed_width_bytes() as f64
                    / (l.index_bytes() + l.relative_index_bytes()).max(1) as f64,
                ratio: 4.0 * l.weights() as f64 / l.stored_bytes().max(1) as f64,
            })
            .collect()
    }

    /// The report as a table, with the total.
    pub fn report_table(&self) -> String {
        let mut s = format!(
            "{:<10} {:>8} {:>7} {:>5} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
            "layer",
            "weights",
            "kept %",
            "bits",
            "idx",
            "idx B",
            "codebk B",
            "rel-idx B",
            "huff x",
            "ratio"
        );
        for r in self.report() {
            let _ = writeln!(
                s,
                "{:<10} {:>8} {:>7.2} {:>5} {:>5} {:>9} {:>9} {:>9} {:>8.2} {:>7.1}x",
                r.name,
                r.weights,
                100.0 * r.kept,
                r.cluster_bits,
                r.index_bits,
                r.index_bytes,
                r.codebook_bytes,
                r.relative_index_bytes,
                r.huffman_gain,
                r.ratio
            );
        }
        let others: usize = self.others.iter().map(|o| 4 * o.2.len()).sum();
        // One serialisation for both figures (`ratio` would encode the file again).
        let file = self.file_bytes();
        let _ = writeln!(
            s,
            "other parameters (f32): {others} B; file {file} B vs {} B of float32 parameters: {:.1}x smaller",
            self.float_bytes,
            self.float_bytes as f64 / file.max(1) as f64
        );
        s
    }
}
