//! GGUF v3 writer: the layout llama.cpp's loader accepts (aligned, offsets in order).

use std::io::Write;
use std::path::Path;

use super::reader::Gguf;
use super::types::{TensorType, Value, DEFAULT_ALIGNMENT, MAGIC};
use crate::bytes::SharedBytes;
use crate::error::Result;

/// Writes a GGUF v3 file in the layout llama.cpp's loader demands: tensor data in directory
/// order, each at the running sum of the padded sizes before it, padded to `general.alignment`
/// (32 when absent). A file in that layout read and written back unchanged gives the same bytes.
/// Used to bake distributions and by tests that build tiny models.
#[derive(Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, TensorType, SharedBytes)>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }
    /// A writer holding all of `g`'s metadata and tensors, to be edited and written elsewhere.
    /// The tensor data stays in `g`'s map (no copy).
    pub fn copy_of(g: &Gguf) -> Result<Self> {
        let mut w = Writer::new();
        w.metadata = g.metadata.clone();
        for t in &g.tensors {
            let dims = t.dims.clone();
            w.tensors.push((t.name.clone(), dims, t.ty, g.tensor_shared(t)?));
        }
        Ok(w)
    }
    /// Sets `key`, replacing an existing value in place or appending a new one.
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }
    pub fn remove_meta(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }
    pub fn get_meta(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// `shape` is row-major (outermost first); `bytes` are the raw ggml-encoded data.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: TensorType, bytes: Vec<u8>) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.to_string(), dims, ty, SharedBytes::owned(bytes)));
        self
    }

    /// Replaces tensor `name`'s shape and data in place (its position in the file is kept);
    /// `false` when there is no such tensor.
    pub fn replace_tensor(&mut self, name: &str, shape: &[usize], ty: TensorType, bytes: Vec<u8>) -> bool {
        let Some(t) = self.tensors.iter_mut().find(|t| t.0 == name) else { return false };
        *t = (name.to_string(), shape.iter().rev().map(|&d| d as u64).collect(), ty, SharedBytes::owned(bytes));
        true
    }

    /// Removes tensor `name`; `false` when there is no such tensor.
    pub fn remove_tensor(&mut self, name: &str) -> bool {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.0 != name);
        self.tensors.len() != before
    }

    /// The data alignment the file will use: `general.alignment` when set, else 32.
    fn alignment(&self) -> u64 {
        match self.get_meta("general.alignment").and_then(Value::as_u64) {
            Some(a) if a.is_power_of_two() => a,
            _ => DEFAULT_ALIGNMENT,
        }
    }
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> &mut Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, shape, TensorType::F32, bytes)
    }

    pub fn write_to(&self, mut w: impl Write) -> std::io::Result<()> {
        fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
            w.write_all(&(s.len() as u64).to_le_bytes())?;
            w.write_all(s.as_bytes())
        }
        fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
            match v {
                Value::U8(x) => w.write_all(&[*x]),
                Value::I8(x) => w.write_all(&x.to_le_bytes()),
                Value::U16(x) => w.write_all(&x.to_le_bytes()),
                Value::I16(x) => w.write_all(&x.to_le_bytes()),
                Value::U32(x) => w.write_all(&x.to_le_bytes()),
                Value::I32(x) => w.write_all(&x.to_le_bytes()),
                Value::U64(x) => w.write_all(&x.to_le_bytes()),
                Value::I64(x) => w.write_all(&x.to_le_bytes()),
                Value::F32(x) => w.write_all(&x.to_le_bytes()),
                Value::F64(x) => w.write_all(&x.to_le_bytes()),
                Value::Bool(x) => w.write_all(&[*x as u8]),
                Value::Str(s) => put_str(w, s),
                Value::Array(items) => {
                    let elem = items.first().map_or(4, Value::type_id);
                    w.write_all(&elem.to_le_bytes())?;
                    w.write_all(&(items.len() as u64).to_le_bytes())?;
                    items.iter().try_for_each(|i| put_value(w, i))
                }
            }
        }
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut header, k)?;
            header.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut header, v)?;
        }
        let align = self.alignment();
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut header, name)?;
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + bytes.len() as u64).div_ceil(align) * align;
        }
        let pad = |n: usize| (n as u64).div_ceil(align) as usize * align as usize - n;
        header.resize(header.len() + pad(header.len()), 0);
        w.write_all(&header)?;
        for (_, _, _, bytes) in &self.tensors {
            w.write_all(bytes)?;
            w.write_all(&vec![0u8; pad(bytes.len())])?;
        }
        w.flush()
    }

    /// Writes atomically: to a temporary file beside `path`, then renamed over it.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, |f| self.write_to(std::io::BufWriter::new(f)))
    }
}
