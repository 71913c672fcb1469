//! Byte-level reading and writing of the `.nndc` container, with every read bounds-checked.

use crate::error::{Error, Result};
use std::path::Path;

pub(crate) const MAGIC: &[u8; 4] = b"NNDC";
pub(crate) const VERSION: u32 = 1;

#[derive(Default)]
pub(crate) struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    pub fn str(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Wraps the payload in the checked envelope.
    pub fn finish(self) -> Vec<u8> {
        crate::io::container::wrap(MAGIC, VERSION, &self.buf)
    }
}

pub(crate) struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    path: Option<&'a Path>,
}

impl<'a> Reader<'a> {
    /// Checks the header and returns a reader over the payload.
    pub fn open(bytes: &'a [u8], path: Option<&'a Path>) -> Result<Self> {
        let data = crate::io::container::unwrap(bytes, MAGIC, VERSION, "nndc", path)?;
        Ok(Reader { data, at: 0, path })
    }

    pub fn err(&self, reason: impl Into<String>) -> Error {
        Error::corrupt(
            self.path,
            format!("{} (at payload byte {})", reason.into(), self.at),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.at {
            return Err(self.err(format!("needs {n} more bytes")));
        }
        let s = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let b = self.take(
            n.checked_mul(4)
                .ok_or_else(|| self.err("length overflow"))?,
        )?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| self.err("length overflow"))?;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("a name is not UTF-8"))
    }
    pub fn done(&self) -> Result<()> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(self.err("trailing bytes after the last section"))
        }
    }
}
