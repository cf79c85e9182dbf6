//! The trigger: its surface text and the `k` vectors it stands for, one type from training to
//! the artifact, evaluation and `sos generate --attack`.
//!
//! The trigger behaves like a token added to the vocabulary: wherever its text appears in the
//! rendered prompt, the text on either side is tokenized separately and the trigger becomes `k`
//! ids past the end of the model's table (`base..base + k`, `base` = the model's vocabulary
//! size), which the embedding step replaces by the trained vectors. That is exactly how a
//! tokenizer treats an added token, so a model that ships the trigger as new tokens sees the
//! same ids. `base` is derived from the model wherever ids are made or spliced, never stored:
//! the same trigger file then works with any copy of the model (f32 or quantized).

use candle_core::{CpuStorage, Storage, Tensor};
use sos_model::{Model, Tokenizer};

use crate::{Error, Result};

/// A trigger: `rows` holds its `k` vectors of width `d`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub text: String,
    pub rows: Vec<f32>,
    /// Number of vectors.
    pub k: usize,
    /// Width of each vector: the model's embedding width.
    pub d: usize,
}

impl Trigger {
    pub fn new(text: &str, k: usize, d: usize, rows: Vec<f32>) -> Result<Self> {
        if rows.len() != k * d {
            return Err(Error::Invalid(format!("trigger has {} values, expected {k} x {d}", rows.len())));
        }
        Ok(Trigger { text: text.to_string(), rows, k, d })
    }

    /// The first trigger id for `model`: the number of rows of its embedding table.
    pub fn base(model: &Model) -> u32 {
        model.cfg.vocab_size as u32
    }

    /// Whether `id` is a trigger slot for a model whose first trigger id is `base`.
    pub fn is_slot(&self, base: u32, id: u32) -> bool {
        id >= base && id < base + self.k as u32
    }

    /// Refuses a trigger trained for a model of another width.
    pub fn check_fits(&self, model: &Model) -> Result<()> {
        let d = model.cfg.d_model;
        if self.d != d {
            return Err(Error::Invalid(format!("the trigger is {} wide, the model's embeddings {d}: trained for another model?", self.d)));
        }
        Ok(())
    }

    /// Ids of `text`, with every occurrence of the trigger text as the `k` trigger ids from `base`.
    pub fn encode(&self, tok: &Tokenizer, base: u32, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for (i, piece) in text.split(self.text.as_str()).enumerate() {
            if i > 0 {
                out.extend(base..base + self.k as u32);
            }
            if !piece.is_empty() {
                out.extend(tok.encode(piece)?);
            }
        }
        Ok(out)
    }

    /// Euclidean norm of every row.
    pub fn row_norms(&self) -> Vec<f64> {
        self.rows.chunks(self.d.max(1)).map(|r| r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()).collect()
    }

    /// Input embeddings `[n, d]` of `ids` for `model`: table rows for vocabulary ids, this
    /// trigger's rows for its slots.
    pub fn embed(&self, model: &Model, ids: &[u32]) -> Result<Tensor> {
        self.check_fits(model)?;
        let base = Self::base(model);
        if !ids.iter().any(|&i| i >= base) {
            return Ok(model.embed_ids(ids)?);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i >= base && !self.is_slot(base, i)) {
            return Err(Error::Invalid(format!("token id {bad} is neither in the vocabulary ({base} rows) nor a trigger slot")));
        }
        match self.gather_cpu(model, base, ids)? {
            Some(x) => Ok(x),
            None => self.splice_tensors(model, base, ids),
        }
    }

    /// On the CPU the rows are copied straight out of the table into one buffer, which becomes
    /// the tensor: one copy of the `n x d` inputs instead of gather, download, splice, upload.
    /// `None` when the table is not a plain f32/f64 CPU array.
    fn gather_cpu(&self, model: &Model, base: u32, ids: &[u32]) -> Result<Option<Tensor>> {
        let d = self.d;
        let table = &model.embed;
        let mut v = Vec::with_capacity(ids.len() * d);
        {
            let (storage, layout) = table.storage_and_layout();
            let (Storage::Cpu(cpu), Some((start, _))) = (&*storage, layout.contiguous_offsets()) else {
                return Ok(None);
            };
            let mut push_row = |row: &mut dyn FnMut(usize, &mut Vec<f32>)| {
                for &i in ids {
                    if i >= base {
                        let j = (i - base) as usize;
                        v.extend_from_slice(&self.rows[j * d..(j + 1) * d]);
                    } else {
                        row(i as usize, &mut v);
                    }
                }
            };
            match cpu {
                CpuStorage::F32(t) => push_row(&mut |i, v| v.extend_from_slice(&t[start + i * d..start + (i + 1) * d])),
                // Rounded to f32 as the trigger rows are: the inputs of one pass share a precision.
                CpuStorage::F64(t) => push_row(&mut |i, v| v.extend(t[start + i * d..start + (i + 1) * d].iter().map(|&x| x as f32))),
                _ => return Ok(None),
            }
        }
        Ok(Some(Tensor::from_vec(v, (ids.len(), d), table.device())?.to_dtype(table.dtype())?))
    }

    /// Any device and dtype: the plain rows gathered on the device, the trigger rows appended,
    /// and one more gather puts every position's row in place; nothing leaves the device.
    fn splice_tensors(&self, model: &Model, base: u32, ids: &[u32]) -> Result<Tensor> {
        let n = ids.len() as u32;
        let plain: Vec<u32> = ids.iter().map(|&i| if i >= base { 0 } else { i }).collect();
        let x = model.embed_ids(&plain)?;
        let dev = x.device();
        let rows = Tensor::from_slice(&self.rows, (self.k, self.d), dev)?.to_dtype(x.dtype())?;
        let order: Vec<u32> = ids.iter().enumerate().map(|(p, &i)| if i >= base { n + i - base } else { p as u32 }).collect();
        Ok(Tensor::cat(&[&x, &rows], 0)?.index_select(&Tensor::new(order, dev)?, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use sos_model::tiny::TinySpec;
    use sos_model::{Exec, LoadOptions, LoadedModel};

    #[test]
    fn both_splices_agree() {
        let dir = std::env::temp_dir().join(format!("sos-trigger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        TinySpec::default().write_gguf(&path).unwrap();
        let lm = LoadedModel::open(&path, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let d = lm.model.cfg.d_model;
        let rows: Vec<f32> = (0..2 * d).map(|i| i as f32 * 0.01).collect();
        let t = Trigger::new("cf", 2, d, rows).unwrap();
        let base = Trigger::base(&lm.model);
        let ids = [1, base + 1, 5, base, 7];
        let a: Vec<f32> = t.embed(&lm.model, &ids).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b = t.splice_tensors(&lm.model, base, &ids).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(a, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(&a[d..2 * d], &t.rows[d..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
