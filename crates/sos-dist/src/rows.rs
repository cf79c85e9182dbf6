//! Trained rows as a GGUF table stores them: quantized to the table's own type, with what that
//! cost, and the table's row scale to compare them with.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use serde::Serialize;
use sos_model::gguf::{Gguf, TensorType};

use crate::{Error, Result};

pub(crate) const TOKEN_TABLE: &str = "token_embd.weight";
pub(crate) const OUTPUT: &str = "output.weight";

/// One planted row: its size and what quantizing it to the table's type cost.
#[derive(Debug, Clone, Serialize)]
pub struct RowReport {
    pub id: u32,
    pub text: String,
    /// L2 norm of the trained row.
    pub norm: f64,
    /// `|q(r) - r| / |r|` for the row as stored.
    pub quant_rel_error: f64,
}

/// What an injection planted.
#[derive(Debug, Clone)]
pub struct Planted {
    /// The trigger tokens' ids, in trigger order.
    pub ids: Vec<u32>,
    pub rows: Vec<RowReport>,
    /// The table's type, in which the rows are stored.
    pub table_type: TensorType,
    /// What became of the output layer (`InjectReport::output_layer`).
    pub output_layer: &'static str,
    /// Median L2 norm of the table's rows before the injection (dequantized), for scale.
    pub table_median_norm: f64,
}

/// `rows` (`[ids.len(), d]`) quantized to `ty`: the bytes to store, and a report per row.
pub(crate) fn store_rows(ty: TensorType, rows: &[f32], d: usize, ids: &[u32], texts: &[String]) -> Result<(Vec<u8>, Vec<RowReport>)> {
    let k = ids.len();
    if rows.len() != k * d {
        return Err(Error::Invalid(format!("{} trigger values for {k} tokens of width {d}: trained for another model?", rows.len())));
    }
    let bytes = quantize_rows(ty, rows, k, d)?;
    let stored = dequantize(ty, &bytes, k, d)?;
    Ok((bytes, row_reports(rows, &stored, d, ids, texts)))
}

/// A report per row: the trained row `rows[j]` as stored (`stored[j]`).
pub(crate) fn row_reports(rows: &[f32], stored: &[f32], d: usize, ids: &[u32], texts: &[String]) -> Vec<RowReport> {
    (0..ids.len())
        .map(|i| {
            let (r, q) = (&rows[i * d..(i + 1) * d], &stored[i * d..(i + 1) * d]);
            let norm = l2(r);
            let err = l2(&r.iter().zip(q).map(|(a, b)| a - b).collect::<Vec<_>>());
            RowReport { id: ids[i], text: texts[i].clone(), norm, quant_rel_error: if norm > 0.0 { err / norm } else { 0.0 } }
        })
        .collect()
}

/// Rows sampled for a table's median norm: every `step`-th of `n`, at most 4096.
pub(crate) fn sample_step(n: usize) -> usize {
    n.div_ceil(4096).max(1)
}

/// The median of row norms (0 for none).
pub(crate) fn median(mut norms: Vec<f64>) -> f64 {
    norms.sort_by(f64::total_cmp);
    norms.get(norms.len() / 2).copied().unwrap_or(0.0)
}

/// `rows` (`[k, d]`) in ggml type `ty`, as ggml's reference quantizers write them.
pub(crate) fn quantize_rows(ty: TensorType, rows: &[f32], k: usize, d: usize) -> Result<Vec<u8>> {
    let t = Tensor::from_vec(rows.to_vec(), (k, d), &Device::Cpu)?;
    let (bs, _) = ty.block();
    if !(d as u64).is_multiple_of(bs) {
        return Err(Error::Invalid(format!("rows of width {d} do not fit {} blocks of {bs}", ty.name())));
    }
    Ok(QTensor::quantize(&t, ty.to_candle())?.data()?.to_vec())
}

/// The f32 values of `k` rows of width `d` stored as `ty`.
pub(crate) fn dequantize(ty: TensorType, bytes: &[u8], k: usize, d: usize) -> Result<Vec<f32>> {
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(ty.to_candle(), bytes, vec![k, d], &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

pub(crate) fn l2(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

/// Median L2 norm of (up to 4096 evenly spaced) rows of the token table.
pub(crate) fn median_row_norm(g: &Gguf) -> Result<f64> {
    let t = g.tensor_info(TOKEN_TABLE).ok_or_else(|| Error::File { path: g.path.clone(), msg: format!("no token table ({TOKEN_TABLE})") })?;
    let [n, d] = t.shape()[..] else { return Err(Error::File { path: g.path.clone(), msg: format!("{TOKEN_TABLE} is not a matrix") }) };
    let bytes = g.tensor_bytes(t);
    let row_bytes = bytes.len() / n.max(1);
    let mut norms: Vec<f64> = Vec::new();
    for r in (0..n).step_by(sample_step(n)) {
        let v = dequantize(t.ty, &bytes[r * row_bytes..(r + 1) * row_bytes], 1, d)?;
        norms.push(l2(&v));
    }
    Ok(median(norms))
}
