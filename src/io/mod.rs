//! Model files: a graph's parameters as safetensors (PyTorch names and layouts), the
//! checked envelope of the crate's own formats, and NumPy `.npy` arrays (calibration data).

pub(crate) mod container;
mod npy;
mod safetensors_io;

pub(crate) use safetensors_io::to_f32;

pub use npy::{load_npy, npy_from_bytes, npy_to_bytes};

pub use safetensors_io::{
    from_safetensors_bytes, from_safetensors_bytes_skipping, load_hf_bert, load_safetensors,
    load_safetensors_skipping, save_safetensors, to_safetensors_bytes,
};
