//! The safetensors files of a Hugging Face folder, read as untrusted input: every header is
//! checked against the file before any tensor is sliced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The safetensors files of a Hugging Face folder, memory mapped and header-checked.
pub struct SafeTensorsDir {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name -> index into `files`
    map: HashMap<String, usize>,
}

impl SafeTensorsDir {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let j: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
            let wm = j["weight_map"]
                .as_object()
                .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
            let mut files: Vec<String> = wm.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(Error::format(&index, format!("shard name `{f}` must be a plain file name")));
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json"));
        };
        let mut files = Vec::new();
        let mut map = HashMap::new();
        for path in names {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map; see `Gguf::open`.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            for name in check_safetensors(&path, &mmap)? {
                map.insert(name, files.len());
            }
            files.push((path, mmap));
        }
        Ok(SafeTensorsDir { files, map })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.map.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor as stored: dtype, shape and bytes (checked against the file in `open`).
    pub fn raw(&self, name: &str) -> Result<(safetensors::Dtype, Vec<usize>, &[u8])> {
        let &i = self.map.get(name).ok_or_else(|| Error::format(&self.files[0].0, format!("missing tensor `{name}`")))?;
        let (path, mmap) = &self.files[i];
        let st = safetensors::SafeTensors::deserialize(mmap).map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
        let view = st.tensor(name).map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
        let (dtype, shape) = (view.dtype(), view.shape().to_vec());
        // The view borrows `st`; the same bytes live in the map, at the offset the view reports.
        let data = view.data();
        let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
        Ok((dtype, shape, &mmap[start..start + data.len()]))
    }

    /// A tensor converted to f32.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let &i = self.map.get(name).ok_or_else(|| {
            Error::format(&self.files[0].0, format!("missing tensor `{name}`"))
        })?;
        let (path, mmap) = &self.files[i];
        let st = safetensors::SafeTensors::deserialize(mmap)
            .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
        let view = st.tensor(name).map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// The values of a float tensor's bytes (F32, F16 or BF16, little-endian) as f32; `None` for
/// other dtypes.
pub fn floats(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Validates a safetensors image (header length, JSON, every tensor's extent against the file)
/// and returns its tensor names. `path` is only used in error messages.
pub fn check_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    check_safetensors_offsets(path, bytes)?;
    // `read_metadata` bounds the header length (100 MB) before reading it and checks offsets.
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(path, format!("invalid safetensors header: {e}")))?;
    safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
    Ok(meta.tensors().keys().cloned().collect())
}

/// Every tensor's `data_offsets` must lie inside the data section. Checked before the
/// `safetensors` crate sums them: its sum can overflow on hostile offsets (found by fuzzing).
fn check_safetensors_offsets(path: &Path, bytes: &[u8]) -> Result<()> {
    let bad = |msg: String| Err(Error::format(path, format!("invalid safetensors header: {msg}")));
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) else {
        return bad(format!("file of {} bytes has no header", bytes.len()));
    };
    let data_len = match (bytes.len() as u64 - 8).checked_sub(len) {
        Some(n) if len <= 100_000_000 => n,
        _ => return bad(format!("header length {len} exceeds the file ({} bytes) or 100 MB", bytes.len())),
    };
    let header: serde_json::Value = match serde_json::from_slice(&bytes[8..8 + len as usize]) {
        Ok(v) => v,
        Err(e) => return bad(format!("header is not JSON: {e}")),
    };
    let Some(entries) = header.as_object() else { return bad("header is not a JSON object".into()) };
    for (name, info) in entries.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info["data_offsets"].as_array().and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
        match offsets {
            Some((start, end)) if start <= end && end <= data_len => {}
            _ => return bad(format!("tensor `{name}` has data_offsets outside the {data_len}-byte data section")),
        }
    }
    Ok(())
}

/// The bytes of a safetensors file made by `safetensors::serialize`, with the header's keys
/// sorted. The crate writes the metadata in `HashMap` order, which changes from run to run, so the
/// same tensors and metadata would give different files (a seeded attack's trigger among them).
pub fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |msg: &str| Error::Invalid(format!("safetensors bytes to sort: {msg}"));
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).ok_or_else(|| bad("shorter than 8 bytes"))?;
    let end = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= bytes.len()).ok_or_else(|| bad("header past the end"))?;
    let h = sorted(&bytes[8..end]).map_err(|e| bad(&e))?;
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - end);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

/// `sorted_header` for a file `safetensors::serialize_to_file` wrote (streamed, too large to
/// hold): the header is rewritten in place; sorting keeps its length.
pub fn sort_header_in_place(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let bad = |msg: String| Error::Invalid(format!("{}: cannot sort the safetensors header: {msg}", path.display()));
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) {
        return Err(bad(format!("header of {n} bytes in a file of {len}")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
    let s = sorted(&h).map_err(bad)?;
    if s.len() != h.len() {
        return Err(bad(format!("sorted header is {} bytes, not {}", s.len(), h.len())));
    }
    f.seek(SeekFrom::Start(8)).and_then(|_| f.write_all(&s)).map_err(|e| Error::io(path, e))
}

/// A header's JSON with its keys sorted, padded with spaces to 8 bytes as the format does (so
/// that the data starts aligned).
fn sorted(header: &[u8]) -> std::result::Result<Vec<u8>, String> {
    // serde_json's maps are ordered by key (the workspace does not enable `preserve_order`).
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let mut h = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    h.resize(h.len().next_multiple_of(8), b' ');
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_safetensors_offsets_are_errors() {
        // Eight huge tensors back to back: their offsets overflow when summed (fuzzing find).
        let mut entries = serde_json::Map::new();
        let n = (1u64 << 61) - 1;
        for i in 0..8u64 {
            entries.insert(format!("t{i}"), serde_json::json!({"dtype": "U8", "shape": [n], "data_offsets": [i * n, (i + 1) * n]}));
        }
        let header = serde_json::Value::Object(entries).to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let e = check_safetensors(Path::new("huge.safetensors"), &bytes).unwrap_err().to_string();
        assert!(e.contains("huge.safetensors") && e.contains("outside the 0-byte data section"), "{e}");
        let e = check_safetensors(Path::new("short.safetensors"), &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("no header"), "{e}");
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = check_safetensors(Path::new("len.safetensors"), &bytes).unwrap_err().to_string();
        assert!(e.contains("exceeds the file"), "{e}");
    }

    #[test]
    fn sorted_header_gives_the_same_bytes_for_the_same_content() {
        let data = [1f32, 2., 3., 4.].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // Eight metadata keys: two fresh `HashMap`s list them in the same order by chance once in 40,320.
        let write = || {
            let meta: HashMap<String, String> = (0..8).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
            let views = vec![("b", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap())];
            sorted_header(safetensors::serialize(views, Some(meta)).unwrap()).unwrap()
        };
        let (a, b) = (write(), write());
        assert_eq!(a, b);
        let n = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&a[8..8 + n]).unwrap();
        assert!(header.starts_with(r#"{"__metadata__":{"key0":"value 0","key1":"value 1""#), "{header}");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&a).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap().len(), 8);
        let st = safetensors::SafeTensors::deserialize(&a).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &data[..]);
        assert!(sorted_header(vec![1, 2, 3]).is_err() && sorted_header(u64::MAX.to_le_bytes().to_vec()).is_err());
        // Streamed to a file and sorted in place: the same bytes as sorted in memory.
        let dir = std::env::temp_dir().join(format!("sos-sorted-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.safetensors");
        let meta: HashMap<String, String> = (0..8).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let views = vec![("b", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap())];
        safetensors::serialize_to_file(views, Some(meta), &p).unwrap();
        sort_header_in_place(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), a);
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        assert!(sort_header_in_place(&p).unwrap_err().to_string().contains("t.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
