//! replace-token on a GGUF file: the rows of `k` existing tokens overwritten with the trained
//! rows, quantized to the table's own type. The vocabulary is untouched, so the file's metadata
//! stays byte for byte what it was; only the token table changes, and a tied table gains an
//! output layer of its own holding the original rows.

use sos_model::gguf::{Gguf, Value, Writer};

use crate::rows::{median_row_norm, store_rows, Planted, OUTPUT, TOKEN_TABLE};
use crate::{Error, Result};

/// `g` with the table rows of `ids` (whose texts are `texts`) replaced by `rows`
/// (`[ids.len(), d]`, row-major). The output layer keeps every original row, so the model's
/// logits are the original's and it emits the chosen tokens only as often as before; a tied
/// table gets an output layer of its own (the table's bytes as they were; the table's size once
/// more in the file), since its replaced rows would otherwise also be logits.
pub fn replace_tokens(g: &Gguf, ids: &[u32], texts: &[String], rows: &[f32]) -> Result<(Writer, Planted)> {
    let bad = |msg: String| Error::File { path: g.path.clone(), msg };
    let n_vocab = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map_or(0, <[Value]>::len);
    let table = g.tensor_info(TOKEN_TABLE).ok_or_else(|| bad(format!("no token table ({TOKEN_TABLE})")))?;
    let [n, d] = table.shape()[..] else { return Err(bad(format!("{TOKEN_TABLE} is not a matrix"))) };
    for (i, &id) in ids.iter().enumerate() {
        if id as usize >= n.min(n_vocab) {
            return Err(Error::Invalid(format!("token {id} is outside the vocabulary of {}", n.min(n_vocab))));
        }
        if ids[..i].contains(&id) {
            return Err(Error::Invalid(format!("token {id} is chosen twice")));
        }
    }
    if ids.len() != texts.len() {
        return Err(Error::Invalid(format!("{} ids for {} texts", ids.len(), texts.len())));
    }
    let ty = table.ty;
    let (new_rows, reports) = store_rows(ty, rows, d, ids, texts)?;
    let old = g.tensor_bytes(table);
    let rb = old.len() / n;
    let mut grown = old.to_vec();
    for (i, &id) in ids.iter().enumerate() {
        let at = id as usize * rb;
        grown[at..at + rb].copy_from_slice(&new_rows[i * rb..(i + 1) * rb]);
    }
    let mut w = Writer::copy_of(g)?;
    w.replace_tensor(TOKEN_TABLE, &[n, d], ty, grown);
    let output_layer = if g.tensor_info(OUTPUT).is_none() {
        w.tensor(OUTPUT, &[n, d], ty, old.to_vec());
        "added"
    } else {
        "unchanged"
    };
    let table_median_norm = median_row_norm(g)?;
    Ok((w, Planted { ids: ids.to_vec(), rows: reports, table_type: ty, output_layer, table_median_norm }))
}
