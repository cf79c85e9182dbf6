//! llama.cpp's loader rules (`ggml/src/gguf.cpp`), checked strictly on a parsed file.
//!
//! `Gguf::open` reads leniently what it can use safely; a file we *publish* must also load in
//! llama.cpp, whose loader refuses more: tensor names of 64 bytes or more, data that is not laid
//! out back to back in directory order, sizes that overflow. `check_llama_cpp` says which rule a
//! file breaks, so `sos inject` can refuse to write one that llama.cpp would not load.

use super::reader::Gguf;
use super::types::{Value, DEFAULT_ALIGNMENT};
use crate::bail_format;
use crate::error::Result;

/// `GGML_MAX_NAME`: names are stored in a 64-byte field with a terminating NUL.
const MAX_NAME: usize = 64;
/// `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;

impl Gguf {
    /// Checks the rules llama.cpp's loader applies beyond what `open` checked: version 2 or 3,
    /// `general.alignment` a power of two of type u32, tensor names shorter than 64 bytes, at
    /// most 4 dimensions whose element count fits in i64, each tensor's offset equal to the
    /// running sum of the padded sizes before it, and the data section inside the file.
    pub fn check_llama_cpp(&self) -> Result<()> {
        let path = &self.path;
        if !(2..=3).contains(&self.version) {
            bail_format!(path, "GGUF version {} (llama.cpp reads 2 and 3)", self.version);
        }
        let alignment = match self.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => bail_format!(path, "general.alignment must be a u32 power of two, found {v:?}"),
        };
        let mut expected = 0u64;
        for t in &self.tensors {
            if t.name.len() >= MAX_NAME {
                bail_format!(path, "tensor name `{}` is {} bytes; llama.cpp allows at most {}", t.name, t.name.len(), MAX_NAME - 1);
            }
            if t.dims.len() > MAX_DIMS {
                bail_format!(path, "tensor `{}` has {} dimensions (at most {MAX_DIMS})", t.name, t.dims.len());
            }
            if t.dims.iter().try_fold(1i64, |a, &d| i64::try_from(d).ok().and_then(|d| a.checked_mul(d))).is_none() {
                bail_format!(path, "tensor `{}`: element count of {:?} overflows", t.name, t.dims);
            }
            let rel = t.offset - self.data_start;
            if rel != expected {
                bail_format!(path, "tensor `{}` has data offset {rel}, expected {expected} (tensors must lie back to back in directory order)", t.name);
            }
            expected = (rel + t.n_bytes).div_ceil(alignment) * alignment;
        }
        Ok(())
    }
}
