//! Model files: a graph's parameters as safetensors (PyTorch names and layouts), and the
//! checked envelope of the crate's own formats.

pub(crate) mod container;
mod safetensors_io;

pub(crate) use safetensors_io::to_f32;

pub use safetensors_io::{
    from_safetensors_bytes, load_safetensors, save_safetensors, to_safetensors_bytes,
};
