//! The token embedding table: dense in the compute dtype, or, for a quantized GGUF run with
//! `--exec quant`, left in its ggml blocks (in the file's map) with only the rows looked up
//! dequantized. An f32 copy of Qwen2.5's 151,936 x 896 table was 545 MB of the 1460 MB that
//! `sos generate --exec quant` held; llama.cpp keeps it quantized too.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{DType, Device, Tensor};

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

    /// The whole table in f32, row-major (`rows * d` values): what the attack starts its
    /// trigger rows from and measures norms against.
    pub fn table_f32(&self) -> Result<Vec<f32>> {
        match self {
            Embedding::Dense(t) => Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            Embedding::Quant { ty, rows, cols, data } => Ok((0..*rows).map(|r| quant_row(*ty, *cols, data, r)).collect::<Result<Vec<_>>>()?.concat()),
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
