//! Data sets: the [`Dataset`] trait, an in-memory implementation, seeded batching, and
//! loaders for MNIST (IDX, gzip) and the UCI optical digits (CSV, gzip).

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::tensor::Tensor;
use flate2::read::GzDecoder;
use ndarray::{Array3, ArrayD, Axis, IxDyn};
use rand::seq::SliceRandom;
use rand::RngCore;
use std::io::Read;
use std::path::Path;

/// A labelled classification data set.
pub trait Dataset: Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether the set has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One sample's shape (without the batch axis).
    fn sample_shape(&self) -> Vec<usize>;
    /// Number of classes; every label is below it.
    fn classes(&self) -> usize;
    /// Gathers the samples at `indices` into a batch `[indices.len(), ...sample_shape]` and
    /// their labels.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for an index out of range.
    fn batch(&self, indices: &[usize]) -> Result<(Tensor, Vec<usize>)>;
}

/// Splits `0..len` into batches of `batch_size` (the last one may be smaller), shuffled by
/// `rng` when given.
pub fn batch_indices(
    len: usize,
    batch_size: usize,
    rng: Option<&mut dyn RngCore>,
) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..len).collect();
    if let Some(rng) = rng {
        idx.shuffle(rng);
    }
    idx.chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// A data set held in memory: `data` is `[N, ...sample_shape]`, `labels` has N entries.
#[derive(Clone, Debug)]
pub struct InMemoryDataset {
    data: ArrayD<f32>,
    labels: Vec<usize>,
    classes: usize,
}

impl InMemoryDataset {
    /// Checks and wraps samples and labels.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the sample count and label count differ,
    /// [`Error::LabelOutOfRange`] for a label ≥ `classes`, [`Error::NonFinite`] for NaN or
    /// infinite data.
    pub fn new(data: ArrayD<f32>, labels: Vec<usize>, classes: usize) -> Result<Self> {
        if data.ndim() < 2 || data.shape()[0] != labels.len() {
            return Err(Error::shape(
                "dataset",
                None,
                format!("[{}, ...] (one sample per label)", labels.len()),
                data.shape(),
            ));
        }
        if let Some((index, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
            return Err(Error::LabelOutOfRange {
                index,
                label,
                classes,
            });
        }
        crate::tensor::check_finite(&data, "dataset samples")?;
        Ok(InMemoryDataset {
            data,
            labels,
            classes,
        })
    }

    /// All samples.
    pub fn data(&self) -> &ArrayD<f32> {
        &self.data
    }

    /// All labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The samples at `indices`, as a new data set.
    ///
    /// # Errors
    /// As [`Dataset::batch`].
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let (data, labels) = self.batch(indices)?;
        Ok(InMemoryDataset {
            data,
            labels,
            classes: self.classes,
        })
    }

    /// The first `n` samples (all of them if there are fewer).
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.len());
        InMemoryDataset {
            data: self.data.slice_axis(Axis(0), (0..n).into()).to_owned(),
            labels: self.labels[..n].to_vec(),
            classes: self.classes,
        }
    }

    /// A seeded random split into `(first, second)` with `first_len` samples in the first.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `first_len` exceeds the set.
    pub fn split(&self, first_len: usize, rng: &mut dyn RngCore) -> Result<(Self, Self)> {
        if first_len > self.len() {
            return Err(Error::config(
                "dataset split",
                format!("{first_len} samples asked of {}", self.len()),
            ));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(rng);
        Ok((
            self.subset(&idx[..first_len])?,
            self.subset(&idx[first_len..])?,
        ))
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.data.shape()[1..].to_vec()
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn batch(&self, indices: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::shape(
                "dataset batch",
                None,
                format!("indices below {}", self.len()),
                &[bad],
            ));
        }
        Ok((
            self.data.select(Axis(0), indices),
            indices.iter().map(|&i| self.labels[i]).collect(),
        ))
    }
}

/// Which MNIST split to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MnistSplit {
    /// The 60,000 training images (`train-*`).
    Train,
    /// The 10,000 test images (`t10k-*`).
    Test,
}

fn read_u32_be(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A read error of a gzip stream: damaged data is a corrupt file, anything else I/O.
fn inflate_error(path: Option<&Path>, e: std::io::Error) -> Error {
    match path {
        Some(p)
            if e.kind() != std::io::ErrorKind::InvalidInput
                && e.kind() != std::io::ErrorKind::InvalidData
                && e.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            Error::io(p, e)
        }
        _ => Error::corrupt(path, format!("cannot decompress: {e}")),
    }
}

/// Appends what `reader` yields to `buf`, refusing to grow `buf` past `max` bytes.
fn read_bounded(
    reader: impl Read,
    path: Option<&Path>,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let room = max.saturating_sub(buf.len()) as u64;
    // One byte past the limit tells "too long" from "exactly at the limit".
    reader
        .take(room.saturating_add(1))
        .read_to_end(buf)
        .map_err(|e| inflate_error(path, e))?;
    if buf.len() > max {
        return Err(Error::LimitExceeded {
            what: format!(
                "decompressed bytes of {}",
                path.map_or("a stream".to_string(), |p| p.display().to_string())
            ),
            limit: max as u64,
            requested: buf.len() as u64,
        });
    }
    Ok(())
}

/// Parses an IDX image file (magic `0x00000803`, `[N, rows, cols]`, u8 pixels).
///
/// # Errors
/// [`Error::CorruptFile`] for a bad magic number or a body shorter or longer than the header
/// says, [`Error::LimitExceeded`] for a header past the default limits.
pub fn parse_idx_images(buf: &[u8], path: Option<&Path>) -> Result<Array3<u8>> {
    let bad = |r: &str| Error::corrupt(path, r.to_string());
    if read_u32_be(buf, 0) != Some(0x0000_0803) {
        return Err(bad("not an IDX u8 3-D image file (magic 0x00000803)"));
    }
    let dims: Vec<usize> = (0..3)
        .map(|i| read_u32_be(buf, 4 + 4 * i).map(|v| v as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("header truncated"))?;
    let body = &buf[16..];
    let want = Some(Limits::default().check_elements(&dims, "IDX images")?);
    if want != Some(body.len()) {
        return Err(bad(&format!(
            "header says {dims:?} ({want:?} bytes) but {} bytes follow",
            body.len()
        )));
    }
    Array3::from_shape_vec((dims[0], dims[1], dims[2]), body.to_vec())
        .map_err(|e| bad(&e.to_string()))
}

/// Parses an IDX label file (magic `0x00000801`, `[N]`, u8 labels).
///
/// # Errors
/// [`Error::CorruptFile`] for a bad magic number or a wrong body length.
pub fn parse_idx_labels(buf: &[u8], path: Option<&Path>) -> Result<Vec<u8>> {
    let bad = |r: String| Error::corrupt(path, r);
    if read_u32_be(buf, 0) != Some(0x0000_0801) {
        return Err(bad("not an IDX u8 label file (magic 0x00000801)".into()));
    }
    let n = read_u32_be(buf, 4).ok_or_else(|| bad("header truncated".into()))? as usize;
    let body = &buf[8..];
    if body.len() != n {
        return Err(bad(format!(
            "header says {n} labels but {} bytes follow",
            body.len()
        )));
    }
    Ok(body.to_vec())
}

fn open_gz(path: &Path) -> Result<GzDecoder<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(GzDecoder::new(std::io::BufReader::new(file)))
}

/// Inflates an IDX file: its header first, so that the body is read only up to the size
/// the header declares (and the limits allow), not to whatever the gzip stream inflates to.
fn read_idx_gz(path: &Path, header: usize, limits: &Limits) -> Result<Vec<u8>> {
    let mut z = open_gz(path)?;
    let mut buf = Vec::new();
    // The header alone: a short one is reported by the parser.
    (&mut z)
        .take(header as u64)
        .read_to_end(&mut buf)
        .map_err(|e| inflate_error(Some(path), e))?;
    let dims = (4..header)
        .step_by(4)
        .filter_map(|at| read_u32_be(&buf, at).map(|d| d as usize))
        .collect::<Vec<_>>();
    let body = limits.check_elements(&dims, &format!("IDX file {}", path.display()))?;
    // No reservation from the header's word: the buffer grows with the bytes the stream
    // really inflates, up to what the header declares (and the limits allow).
    let max = body
        .min(limits.max_decompressed_bytes)
        .saturating_add(header);
    read_bounded(&mut z, Some(path), max, &mut buf)?;
    Ok(buf)
}

/// Loads an MNIST split from `dir` (the gzip IDX files `{train,t10k}-images-idx3-ubyte.gz`
/// and `…-labels-idx1-ubyte.gz`), pixels scaled to `[0, 1]`, shape `[N, 1, 28, 28]`.
///
/// # Errors
/// [`Error::Io`] for a missing file, [`Error::CorruptFile`] for a malformed or truncated
/// one, [`Error::ShapeMismatch`] when images and labels differ in count,
/// [`Error::LimitExceeded`] for files past the default [`Limits`].
pub fn load_mnist(dir: impl AsRef<Path>, split: MnistSplit) -> Result<InMemoryDataset> {
    load_mnist_with_limits(dir, split, &Limits::default())
}

/// [`load_mnist`] under explicit resource limits (the images' element count and the
/// inflated bytes of each file).
///
/// # Errors
/// As [`load_mnist`].
pub fn load_mnist_with_limits(
    dir: impl AsRef<Path>,
    split: MnistSplit,
    limits: &Limits,
) -> Result<InMemoryDataset> {
    let prefix = match split {
        MnistSplit::Train => "train",
        MnistSplit::Test => "t10k",
    };
    let ip = dir.as_ref().join(format!("{prefix}-images-idx3-ubyte.gz"));
    let lp = dir.as_ref().join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let images = parse_idx_images(&read_idx_gz(&ip, 16, limits)?, Some(&ip))?;
    let labels = parse_idx_labels(&read_idx_gz(&lp, 8, limits)?, Some(&lp))?;
    let (n, h, w) = images.dim();
    if let Some((index, &label)) = labels.iter().enumerate().find(|(_, &l)| l > 9) {
        return Err(Error::LabelOutOfRange {
            index,
            label: label as usize,
            classes: 10,
        });
    }
    let data = images
        .mapv(|p| p as f32 / 255.0)
        .into_shape_with_order(IxDyn(&[n, 1, h, w]))
        .map_err(|e| Error::corrupt(Some(&ip), e.to_string()))?;
    InMemoryDataset::new(data, labels.iter().map(|&l| l as usize).collect(), 10)
}

/// Parses the UCI optical digits CSV (65 integer columns: 64 pixels in 0..16, then the
/// label), pixels scaled to `[0, 1]`, shape `[N, 1, 8, 8]`.
///
/// # Errors
/// [`Error::CorruptFile`] for a row without 65 integer columns or a value out of range.
pub fn parse_digits_csv(text: &str, path: Option<&Path>) -> Result<InMemoryDataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (row, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::corrupt(path, format!("row {row}: {e}")))?;
        if vals.len() != 65 || vals[..64].iter().any(|&v| v > 16) || vals[64] > 9 {
            return Err(Error::corrupt(
                path,
                format!("row {row}: want 64 pixels in 0..=16 and a label in 0..=9"),
            ));
        }
        pixels.extend(vals[..64].iter().map(|&v| v as f32 / 16.0));
        labels.push(vals[64] as usize);
    }
    if labels.is_empty() {
        return Err(Error::Empty("digits CSV has no rows".into()));
    }
    let data = ArrayD::from_shape_vec(IxDyn(&[labels.len(), 1, 8, 8]), pixels)
        .map_err(|e| Error::corrupt(path, e.to_string()))?;
    InMemoryDataset::new(data, labels, 10)
}

/// Loads the gzip-compressed UCI optical digits CSV (see [`parse_digits_csv`]).
///
/// # Errors
/// [`Error::Io`] for a missing file, [`Error::LimitExceeded`] when it inflates past the
/// default [`Limits`], otherwise as [`parse_digits_csv`].
pub fn load_digits(path: impl AsRef<Path>) -> Result<InMemoryDataset> {
    load_digits_with_limits(path, &Limits::default())
}

/// [`load_digits`] under explicit resource limits (inflated bytes).
///
/// # Errors
/// As [`load_digits`].
pub fn load_digits_with_limits(path: impl AsRef<Path>, limits: &Limits) -> Result<InMemoryDataset> {
    let p = path.as_ref();
    let mut bytes = Vec::new();
    read_bounded(
        open_gz(p)?,
        Some(p),
        limits.max_decompressed_bytes,
        &mut bytes,
    )?;
    let text = String::from_utf8(bytes).map_err(|e| Error::corrupt(Some(p), e.to_string()))?;
    parse_digits_csv(&text, Some(p))
}
