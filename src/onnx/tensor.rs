//! ONNX `TensorProto` ↔ the crate's [`Value`].

use super::proto::{tensor_proto::DataType, TensorProto};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::tensor::Value;
use ndarray::{ArrayD, IxDyn};

/// The value a `TensorProto` holds: FLOAT as f32, INT64 / INT32 / BOOL as i64.
///
/// Every size is checked before anything is allocated: each dimension non-negative, their
/// product within `limits`, and the data (typed fields or `raw_data`) exactly that many
/// elements.
///
/// # Errors
/// [`Error::UnsupportedDtype`] for other element types (doubles, strings, 16-bit floats,
/// 8-bit integers: their meaning would change as f32 / i64), [`Error::Unsupported`] for
/// data stored outside the file or more than 32 axes, [`Error::CorruptFile`] for negative dimensions or data
/// of the wrong length, [`Error::LimitExceeded`] past `limits`.
pub fn tensor_from_proto(t: &TensorProto, limits: &Limits) -> Result<Value> {
    let name = t.name.as_deref().unwrap_or("");
    if t.dims.len() > super::MAX_RANK {
        return Err(Error::Unsupported(format!(
            "tensor `{name}` has {} axes (at most {})",
            t.dims.len(),
            super::MAX_RANK
        )));
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        let d = usize::try_from(d)
            .map_err(|_| corrupt(format!("tensor `{name}` has dimension {d}")))?;
        shape.push(d);
    }
    let count = limits.check_elements(&shape, &format!("ONNX tensor `{name}`"))?;
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(Error::Unsupported(format!(
            "tensor `{name}` keeps its data in an external file"
        )));
    }
    let dtype = t.data_type.and_then(|d| DataType::try_from(d).ok());
    let raw = t.raw_data.as_deref();
    let wrong_length = |got: usize| {
        corrupt(format!(
            "tensor `{name}` of shape {shape:?} holds {got} values, not {count}"
        ))
    };
    let dim = IxDyn(&shape);
    let shaped_f32 = |v: Vec<f32>| {
        ArrayD::from_shape_vec(dim.clone(), v)
            .map(Value::F32)
            .map_err(|e| corrupt(e.to_string()))
    };
    let shaped_i64 = |v: Vec<i64>| {
        ArrayD::from_shape_vec(dim.clone(), v)
            .map(Value::I64)
            .map_err(|e| corrupt(e.to_string()))
    };
    match dtype {
        Some(DataType::Float) => {
            let v = match raw {
                Some(bytes) => from_le::<4, f32>(bytes, count, f32::from_le_bytes)
                    .ok_or_else(|| wrong_length(bytes.len() / 4))?,
                None if t.float_data.len() == count => t.float_data.clone(),
                None => return Err(wrong_length(t.float_data.len())),
            };
            shaped_f32(v)
        }
        Some(DataType::Int64) => {
            let v = match raw {
                Some(bytes) => from_le::<8, i64>(bytes, count, i64::from_le_bytes)
                    .ok_or_else(|| wrong_length(bytes.len() / 8))?,
                None if t.int64_data.len() == count => t.int64_data.clone(),
                None => return Err(wrong_length(t.int64_data.len())),
            };
            shaped_i64(v)
        }
        Some(DataType::Int32) => {
            let v = match raw {
                Some(bytes) => from_le::<4, i64>(bytes, count, |b| i32::from_le_bytes(b).into())
                    .ok_or_else(|| wrong_length(bytes.len() / 4))?,
                None if t.int32_data.len() == count => {
                    t.int32_data.iter().map(|&v| v.into()).collect()
                }
                None => return Err(wrong_length(t.int32_data.len())),
            };
            shaped_i64(v)
        }
        Some(DataType::Bool) => {
            let v = match raw {
                Some(bytes) => from_le::<1, i64>(bytes, count, |b| i64::from(b[0] != 0))
                    .ok_or_else(|| wrong_length(bytes.len()))?,
                // ONNX keeps bools in `int32_data`.
                None if t.int32_data.len() == count => {
                    t.int32_data.iter().map(|&v| i64::from(v != 0)).collect()
                }
                None => return Err(wrong_length(t.int32_data.len())),
            };
            shaped_i64(v)
        }
        other => Err(Error::UnsupportedDtype {
            name: name.into(),
            dtype: match other {
                Some(d) => d.as_str_name().to_string(),
                None => format!("code {:?}", t.data_type),
            },
        }),
    }
}

/// `count` little-endian values of `N` bytes each, when `bytes` holds exactly that many.
fn from_le<const N: usize, T>(
    bytes: &[u8],
    count: usize,
    read: impl Fn([u8; N]) -> T,
) -> Option<Vec<T>> {
    if bytes.len() != count.checked_mul(N)? {
        return None;
    }
    Some(
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                read(a)
            })
            .collect(),
    )
}

/// A value as an ONNX `TensorProto` named `name` (FLOAT or INT64, little-endian
/// `raw_data`).
pub fn tensor_to_proto(name: &str, value: &Value) -> TensorProto {
    let (dims, data_type, raw_data): (Vec<i64>, DataType, Vec<u8>) = match value {
        Value::F32(t) => (
            t.shape().iter().map(|&d| d as i64).collect(),
            DataType::Float,
            t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Value::I64(t) => (
            t.shape().iter().map(|&d| d as i64).collect(),
            DataType::Int64,
            t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    };
    TensorProto {
        dims,
        data_type: Some(data_type as i32),
        name: Some(name.into()),
        raw_data: Some(raw_data),
        ..Default::default()
    }
}

fn corrupt(reason: String) -> Error {
    Error::CorruptFile { path: None, reason }
}

/// Bytes per element of the types an external tensor may hold here.
fn element_width(dtype: Option<DataType>) -> Option<usize> {
    match dtype? {
        DataType::Float | DataType::Int32 => Some(4),
        DataType::Int64 => Some(8),
        DataType::Int8 | DataType::Uint8 | DataType::Bool => Some(1),
        _ => None,
    }
}

/// Reads every initializer kept in an external file (`data_location = EXTERNAL`) into its
/// `raw_data`, from files under `dir` (the model's folder).
///
/// A `location` must be a relative path that stays inside `dir` once symbolic links are
/// resolved; `offset` and `length` must lie within the file, and the length must be what
/// the tensor's dims and type need (checked against `limits` before anything is read).
///
/// # Errors
/// [`Error::CorruptFile`] for a location that escapes `dir`, is absolute or missing,
/// offsets and lengths past the file or not matching the dims; [`Error::LimitExceeded`]
/// past `limits`; [`Error::UnsupportedDtype`] for element types the importer does not read.
pub fn load_external_data(
    model: &mut super::proto::ModelProto,
    dir: &std::path::Path,
    limits: &Limits,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let Some(graph) = model.graph.as_mut() else {
        return Ok(());
    };
    let root = dir
        .canonicalize()
        .map_err(|e| corrupt(format!("model folder {}: {e}", dir.display())))?;
    for t in graph.initializer.iter_mut() {
        if t.data_location != Some(1) && t.external_data.is_empty() {
            continue;
        }
        let name = t.name.clone().unwrap_or_default();
        let bad = |why: String| corrupt(format!("external data of tensor `{name}`: {why}"));
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key.as_deref() == Some(key))
                .and_then(|e| e.value.clone())
        };
        let location = entry("location").ok_or_else(|| bad("no location".into()))?;
        let number = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| v.parse::<u64>().map_err(|_| bad(format!("{key} `{v}`"))))
                .transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let relative = std::path::Path::new(&location);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(format!(
                "location `{location}` leaves the model's folder"
            )));
        }
        let path = root
            .join(relative)
            .canonicalize()
            .map_err(|e| bad(format!("`{location}`: {e}")))?;
        if !path.starts_with(&root) {
            return Err(bad(format!(
                "location `{location}` leaves the model's folder"
            )));
        }
        let mut shape = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            shape.push(usize::try_from(d).map_err(|_| bad(format!("dimension {d}")))?);
        }
        let count = limits.check_elements(&shape, &format!("ONNX tensor `{name}`"))?;
        let dtype = t.data_type.and_then(|d| DataType::try_from(d).ok());
        let width = element_width(dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.clone(),
            dtype: format!("{dtype:?} in an external file"),
        })?;
        let need = count
            .checked_mul(width)
            .ok_or_else(|| bad("a size that overflows".into()))? as u64;
        if length.is_some_and(|l| l != need) {
            return Err(bad(format!("length {length:?} for {need} bytes of data")));
        }
        let mut file = std::fs::File::open(&path).map_err(|e| bad(e.to_string()))?;
        let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        if offset.checked_add(need).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "{need} bytes at offset {offset} of a {size}-byte file"
            )));
        }
        let mut raw = vec![0u8; need as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| bad(e.to_string()))?;
        t.raw_data = Some(raw);
        t.external_data.clear();
        t.data_location = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_lying_sizes_are_errors() {
        let limits = Limits::default();
        let x = Value::F32(ndarray::arr2(&[[1.0f32, -2.5], [3.0, 0.0]]).into_dyn());
        let back = tensor_from_proto(&tensor_to_proto("x", &x), &limits).unwrap();
        assert_eq!(back.as_f32().unwrap(), x.as_f32().unwrap());
        let ids = Value::I64(ndarray::arr1(&[7i64, -1, 1 << 40]).into_dyn());
        let back = tensor_from_proto(&tensor_to_proto("ids", &ids), &limits).unwrap();
        assert_eq!(back.as_i64().unwrap(), ids.as_i64().unwrap());

        let mut t = tensor_to_proto("x", &x);
        t.dims = vec![2, 3];
        assert!(matches!(
            tensor_from_proto(&t, &limits),
            Err(Error::CorruptFile { .. })
        ));
        t.dims = vec![-1, 4];
        assert!(matches!(
            tensor_from_proto(&t, &limits),
            Err(Error::CorruptFile { .. })
        ));
        // A huge shape is refused before anything is allocated.
        t.dims = vec![1 << 40, 1 << 40];
        assert!(matches!(
            tensor_from_proto(&t, &limits),
            Err(Error::LimitExceeded { .. })
        ));
        t.dims = vec![4];
        t.data_type = Some(DataType::Double as i32);
        assert!(matches!(
            tensor_from_proto(&t, &limits),
            Err(Error::UnsupportedDtype { .. })
        ));
        t.data_type = Some(DataType::Float as i32);
        t.data_location = Some(1);
        assert!(matches!(
            tensor_from_proto(&t, &limits),
            Err(Error::Unsupported(_))
        ));
    }
}
