//! GGUF reading. A GGUF file is untrusted input: every count and length in its header is checked
//! against the bytes that are actually left in the file before anything is allocated, so a
//! header that claims 2^40 tensors or a 1 TB string is an error, not an out-of-memory kill. Tensor
//! data is memory mapped and only sliced once its extent has been checked against the file size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::types::{TensorInfo, TensorType, Value, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_META_ITEMS};
use crate::bail_format;
use crate::bytes::SharedBytes;
use crate::error::{Error, Result};

/// A parsed GGUF file: metadata, tensor directory and the mapped bytes.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Where the tensor data section starts: the header's end, rounded up to the alignment.
    pub(super) data_start: u64,
    /// The file's bytes: memory mapped from disk, or owned (tests, fuzzing, in-memory files).
    data: SharedBytes,
}


impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata array items read so far (bounded by `MAX_META_ITEMS`).
    items: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail_format!(
                self.path,
                "truncated GGUF: {what} needs {n} bytes at offset {} but the file has {} left",
                self.pos,
                self.remaining()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    /// A count that will size an allocation: it must fit in what is left of the file, given that
    /// each item takes at least `min_item_bytes`.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > fits {
            bail_format!(
                self.path,
                "truncated or corrupt GGUF header: {what} is {n} but only {} bytes remain (at most {fits} items fit)",
                self.remaining()
            );
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail_format!(self.path, "metadata `{key}`: invalid bool byte {b}"),
            },
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail_format!(self.path, "metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}");
                }
                let elem_ty = self.u32(key)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4 | 5 | 6 => 4,
                    8 | 10 | 11 | 12 => 8,
                    9 => 12,
                    t => bail_format!(self.path, "metadata `{key}`: unknown array element type {t}"),
                };
                let n = self.count(&format!("metadata `{key}` array length"), min)?;
                self.items = self.items.saturating_add(n);
                if self.items > MAX_META_ITEMS {
                    bail_format!(self.path, "metadata `{key}`: arrays of over {MAX_META_ITEMS} items in all (a real vocabulary has about a million)");
                }
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => bail_format!(self.path, "metadata `{key}`: unknown value type {t}"),
        })
    }
}

impl Gguf {
    /// Opens and validates a GGUF file. The tensor data stays on disk (memory mapped).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated by another process while we run can
        // still fault, as with every memory-mapped reader (llama.cpp included).
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, SharedBytes::mapped(data))
    }

    /// Parses a GGUF image held in memory; `path` is only used in error messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path.as_ref(), SharedBytes::owned(bytes))
    }

    fn parse(path: &Path, data: SharedBytes) -> Result<Self> {
        let mut c = Cursor { buf: &data, pos: 0, path, items: 0 };
        let magic = c.take(4, "magic").map_err(|_| {
            Error::format(path, format!("not a GGUF file: only {} bytes", data.len()))
        })?;
        if magic != MAGIC {
            bail_format!(path, "not a GGUF file: magic is {:?}, expected \"GGUF\"", String::from_utf8_lossy(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            bail_format!(path, "unsupported GGUF version {version} (2 and 3 are supported)");
        }
        // A tensor entry takes at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes;
        // a metadata entry at least 8 (key len) + 4 (type) + 1 (value).
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata count", 13)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let value = c.value(ty, &key, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                bail_format!(path, "duplicate metadata key `{key}`");
            }
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment") {
            Some(&i) => match metadata[i].1.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => bail_format!(path, "general.alignment must be a power of two up to 1 MiB"),
            },
            None => DEFAULT_ALIGNMENT,
        };

        struct Raw {
            name: String,
            dims: Vec<u64>,
            ty: u32,
            rel: u64,
        }
        let mut raws = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dims")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail_format!(path, "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)");
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dim")?);
            }
            let ty = c.u32("tensor type")?;
            let rel = c.u64("tensor offset")?;
            raws.push(Raw { name, dims, ty, rel });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = data.len() as u64;

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for r in raws {
            let name = r.name;
            let ty = TensorType::from_id(r.ty).ok_or_else(|| {
                Error::format(path, format!("tensor `{name}` has unsupported type id {}", r.ty))
            })?;
            let n_el = r
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::format(path, format!("tensor `{name}` has invalid dims {:?}", r.dims)))?;
            let (bs, bb) = ty.block();
            if r.dims[0] % bs != 0 {
                bail_format!(path, "tensor `{name}`: row length {} is not a multiple of the {} block size {bs}", r.dims[0], ty.name());
            }
            let n_bytes = (n_el / bs)
                .checked_mul(bb)
                .ok_or_else(|| Error::format(path, format!("tensor `{name}` is too large")))?;
            if r.rel % alignment != 0 {
                bail_format!(path, "tensor `{name}`: offset {} is not aligned to {alignment}", r.rel);
            }
            let offset = data_start
                .checked_add(r.rel)
                .filter(|o| o.checked_add(n_bytes).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "tensor `{name}` ({n_bytes} bytes at data offset {}) extends beyond the end of the file ({file_len} bytes)",
                            r.rel
                        ),
                    )
                })?;
            // candle reads the data in place as f32 / f16 / block structs; a `general.alignment`
            // of 1 or 2 can place it at an address where that is undefined behaviour.
            let need = match ty {
                TensorType::F32 | TensorType::Q8K => 4,
                _ => 2,
            };
            if (data.as_ptr() as u64).wrapping_add(offset) % need != 0 {
                bail_format!(
                    path,
                    "tensor `{name}`: {} data at offset {offset} is not {need}-byte aligned (general.alignment is {alignment})",
                    ty.name()
                );
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                bail_format!(path, "duplicate tensor name `{name}`");
            }
            tensors.push(TensorInfo { name, dims: r.dims, ty, offset, n_bytes });
        }
        Ok(Gguf { path: path.to_path_buf(), version, metadata, index, tensors, tensor_index, data_start, data })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of a tensor; bounds were checked at open.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.data[info.offset as usize..(info.offset + info.n_bytes) as usize]
    }

    /// A tensor's bytes, sharing the file's map instead of copying it; an error for an extent
    /// outside the file (a `TensorInfo` of another file).
    pub fn tensor_shared(&self, info: &TensorInfo) -> Result<SharedBytes> {
        let (start, end) = (info.offset as usize, info.offset.saturating_add(info.n_bytes) as usize);
        self.data.slice(start..end).ok_or_else(|| Error::format(&self.path, format!("tensor `{}` lies outside the file", info.name)))
    }

    /// The whole mapped file, for hashing without a second read.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Loads a tensor as a candle `QTensor` (quantized types stay quantized).
    pub fn qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::format(&self.path, format!("missing tensor `{name}`")))?;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.ty.to_candle(),
            self.tensor_bytes(info),
            info.shape(),
            &candle_core::Device::Cpu,
        )
        .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok(q)
    }
}
