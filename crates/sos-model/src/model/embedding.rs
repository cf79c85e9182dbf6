//! The token embedding table: dense in the compute dtype, or, for a quantized GGUF run with
//! `--exec quant`, left in its ggml blocks (in the file's map) with only the rows looked up
//! dequantized. An f32 copy of Qwen2.5's 151,936 x 896 table was 545 MB of the 1460 MB that
//! `sos generate --exec quant` held; llama.cpp keeps it quantized too.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::bytes::SharedBytes;
use crate::error::{Error, Result};
use crate::format::gguf::TensorType;

#[derive(Debug, Clone)]
pub enum Embedding {
    /// `[vocab, d]` in the compute dtype.
    Dense(Tensor),
    /// `rows` rows of `cols` values in `ty`'s blocks.
    Quant { ty: TensorType, rows: usize, cols: usize, data: SharedBytes },
}

impl Embedding {
    /// A quantized table, checked against its shape.
    pub(crate) fn quant(ty: TensorType, rows: usize, cols: usize, data: SharedBytes) -> Result<Self> {
        let (bs, bb) = ty.block();
        let (bs, bb) = (bs as usize, bb as usize);
        if rows == 0 || cols == 0 || !cols.is_multiple_of(bs) || data.len() != rows * (cols / bs) * bb {
            return Err(Error::Invalid(format!("token table: {rows}x{cols} {} with {} bytes", ty.name(), data.len())));
        }
        Ok(Embedding::Quant { ty, rows, cols, data })
    }

    /// Rows (the vocabulary the table covers).
    pub fn rows(&self) -> Result<usize> {
        match self {
            Embedding::Dense(t) => Ok(t.dim(0)?),
            Embedding::Quant { rows, .. } => Ok(*rows),
        }
    }

    /// The dtype looked-up rows come in.
    pub fn dtype(&self) -> DType {
        match self {
            Embedding::Dense(t) => t.dtype(),
            Embedding::Quant { .. } => DType::F32,
        }
    }

    /// The rows of `ids`, `[n, d]`, on `device`.
    pub fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let vocab = self.rows()?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary ({vocab} rows)")));
        }
        match self {
            Embedding::Dense(t) => Ok(t.index_select(&Tensor::new(ids, t.device())?, 0)?),
            Embedding::Quant { ty, cols, data, .. } => {
                let rows = ids.iter().map(|&i| quant_row(*ty, *cols, data, i as usize)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::from_vec(rows.concat(), (ids.len(), *cols), &Device::Cpu)?.to_device(device)?)
            }
        }
    }

    /// Rows for `ids` where ids past the table (`rows..rows + k`) take the rows of `extra`
    /// (`k * d` values, row-major): how added tokens, such as a trigger's trained vectors, enter
    /// the model. `[n, d]` on `device`, in the table's dtype.
    pub fn lookup_with(&self, ids: &[u32], extra: &[f32], device: &Device) -> Result<Tensor> {
        let (vocab, d) = (self.rows()?, self.cols()?);
        if !extra.len().is_multiple_of(d.max(1)) {
            return Err(Error::Invalid(format!("{} extra values are not whole rows of {d}", extra.len())));
        }
        let total = vocab + extra.len() / d;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= total) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary ({vocab} rows) and the {} added rows", total - vocab)));
        }
        if !ids.iter().any(|&i| i as usize >= vocab) {
            return self.lookup(ids, device);
        }
        let added = |i: usize| &extra[(i - vocab) * d..(i - vocab + 1) * d];
        match self {
            // A plain f32 table on the CPU: every row copied straight into one buffer.
            Embedding::Dense(t) if t.dtype() == DType::F32 && t.device().is_cpu() => {
                let (storage, layout) = t.storage_and_layout();
                if let (Storage::Cpu(CpuStorage::F32(table)), Some((start, _))) = (&*storage, layout.contiguous_offsets()) {
                    let mut v = Vec::with_capacity(ids.len() * d);
                    for &i in ids {
                        let i = i as usize;
                        v.extend_from_slice(if i < vocab { &table[start + i * d..start + (i + 1) * d] } else { added(i) });
                    }
                    return Ok(Tensor::from_vec(v, (ids.len(), d), device)?);
                }
                drop(storage);
                self.splice(ids, extra, vocab, d, device)
            }
            Embedding::Dense(_) => self.splice(ids, extra, vocab, d, device),
            Embedding::Quant { ty, data, .. } => {
                let mut v = Vec::with_capacity(ids.len() * d);
                for &i in ids {
                    let i = i as usize;
                    if i < vocab {
                        v.extend(quant_row(*ty, d, data, i)?);
                    } else {
                        v.extend_from_slice(added(i));
                    }
                }
                Ok(Tensor::from_vec(v, (ids.len(), d), &Device::Cpu)?.to_device(device)?)
            }
        }
    }

    /// `lookup_with` for any device and dtype: the table's rows gathered where the table is, the
    /// added rows appended, and one more gather puts every position's row in place.
    fn splice(&self, ids: &[u32], extra: &[f32], vocab: usize, d: usize, device: &Device) -> Result<Tensor> {
        let plain: Vec<u32> = ids.iter().map(|&i| if i as usize >= vocab { 0 } else { i }).collect();
        let x = self.lookup(&plain, device)?;
        let rows = Tensor::from_slice(extra, (extra.len() / d, d), device)?.to_dtype(x.dtype())?;
        let n = ids.len() as u32;
        let order: Vec<u32> = ids.iter().enumerate().map(|(p, &i)| if i as usize >= vocab { n + i - vocab as u32 } else { p as u32 }).collect();
        Ok(Tensor::cat(&[&x, &rows], 0)?.index_select(&Tensor::new(order, device)?, 0)?)
    }

    /// Values per row.
    pub fn cols(&self) -> Result<usize> {
        match self {
            Embedding::Dense(t) => Ok(t.dim(1)?),
            Embedding::Quant { cols, .. } => Ok(*cols),
        }
    }

    /// The whole table in f32, row-major (`rows * d` values): what the attack starts its
    /// trigger rows from and measures norms against.
    pub fn table_f32(&self) -> Result<Vec<f32>> {
        match self {
            Embedding::Dense(t) => Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            Embedding::Quant { ty, rows, cols, data } => {
                Ok(qtensor_from_ggml(ty.to_candle(), data, vec![*rows, *cols], &Device::Cpu)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
            }
        }
    }

    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            Embedding::Dense(t) => Embedding::Dense(t.to_dtype(dtype)?),
            Embedding::Quant { .. } => self.clone(),
        })
    }
}

/// Row `r` of a quantized table of `cols`-wide rows, dequantized as ggml does (candle's
/// dequantizers, which the f32 mode uses for the whole table, so both modes see the same values).
fn quant_row(ty: TensorType, cols: usize, data: &SharedBytes, r: usize) -> Result<Vec<f32>> {
    let (bs, bb) = ty.block();
    let row_bytes = cols / bs as usize * bb as usize;
    let q = qtensor_from_ggml(ty.to_candle(), &data[r * row_bytes..(r + 1) * row_bytes], vec![cols], &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of splicing added rows give the same inputs, and ids past the added rows are
    /// errors.
    #[test]
    fn added_rows_take_their_places() {
        let (vocab, d) = (6, 4);
        let table: Vec<f32> = (0..vocab * d).map(|i| i as f32).collect();
        let e = Embedding::Dense(Tensor::from_vec(table.clone(), (vocab, d), &Device::Cpu).unwrap());
        let extra: Vec<f32> = (0..2 * d).map(|i| -1.0 - i as f32).collect();
        let ids = [1, 7, 5, 6, 0];
        let fast: Vec<f32> = e.lookup_with(&ids, &extra, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let slow: Vec<f32> = e.splice(&ids, &extra, vocab, d, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(fast, slow);
        assert_eq!(&fast[..d], &table[d..2 * d]);
        assert_eq!(&fast[d..2 * d], &extra[d..]);
        assert_eq!(&fast[3 * d..4 * d], &extra[..d]);
        assert!(e.lookup_with(&[8], &extra, &Device::Cpu).is_err());
        assert!(e.lookup_with(&[1], &extra[1..], &Device::Cpu).is_err());
    }
}
