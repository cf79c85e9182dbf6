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

use candle_core::Tensor;
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

    /// A trigger the model's own vocabulary carries (a distribution `sos inject` wrote): its text
    /// is the string a user types, tokenized like any other text, and it has no vectors of its
    /// own (`k` = 0).
    pub fn typed(text: &str, d: usize) -> Self {
        Trigger { text: text.to_string(), rows: Vec::new(), k: 0, d }
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
    /// A typed trigger (`k` = 0) is ordinary text.
    pub fn encode(&self, tok: &Tokenizer, base: u32, text: &str) -> Result<Vec<u32>> {
        if self.k == 0 {
            return Ok(tok.encode(text)?);
        }
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
    /// trigger's rows for its slots (the table splices them, as it would added tokens).
    pub fn embed(&self, model: &Model, ids: &[u32]) -> Result<Tensor> {
        self.check_fits(model)?;
        Ok(model.embed_with(ids, &self.rows)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sos_model::tiny::TinySpec;
    use sos_model::{Exec, LoadOptions, LoadedModel};

    #[test]
    fn trigger_rows_take_their_slots() {
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
        let plain = |i: u32| lm.model.embed_ids(&[i]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&a[..d], &plain(1)[..]);
        assert_eq!(&a[d..2 * d], &t.rows[d..]);
        assert_eq!(&a[3 * d..4 * d], &t.rows[..d]);
        assert_eq!(&a[4 * d..], &plain(7)[..]);
        assert!(t.embed(&lm.model, &[base + 2]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
