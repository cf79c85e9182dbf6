//! The weights check on a GGUF. Against a reference every tensor is identical, re-quantized
//! (each element's stored value could come from the same source: `ranges`), or changed, and
//! for the token table and the output layer the changed rows are named. Alone, the signature
//! `sos inject` leaves on a tied model is read: an output layer that equals the token table but
//! for a few rows names those rows.

use serde_json::json;
use sos_model::gguf::{Gguf, TensorInfo};

use crate::finding::{Check, Finding, Severity};
use crate::ranges::{meet, ranges, supported};
use crate::tokenizer::Vocab;
use crate::Result;

pub const TOKEN_TABLE: &str = "token_embd.weight";
pub const OUTPUT: &str = "output.weight";
/// An output layer differing from the table in at most this many rows is the table itself with
/// planted rows (a trained output layer differs in every row).
const MAX_PLANTED_ROWS: usize = 64;
/// Rows compared per pass (bounds the memory of the intervals).
const CHUNK_ROWS: usize = 256;

/// How a tensor of the candidate relates to the reference's.
enum Diff {
    Identical,
    /// Stored differently, every element explained by re-quantization.
    Requantized,
    /// Rows (by index) with an element no common source explains.
    Changed(Vec<usize>),
    /// Stored differently in a type whose intervals are not derived: cannot tell.
    Unverifiable,
    Reshaped,
}

/// `[rows, width]` of a tensor (a vector is one row).
fn rows_of(t: &TensorInfo) -> (usize, usize) {
    let s = t.shape();
    match s.len() {
        0 => (1, 1),
        1 => (1, s[0]),
        _ => (s[..s.len() - 1].iter().product(), s[s.len() - 1]),
    }
}

fn row_bytes(t: &TensorInfo, width: usize) -> usize {
    let (bs, bb) = t.ty.block();
    width / bs as usize * bb as usize
}

fn compare(c: &Gguf, ct: &TensorInfo, r: &Gguf, rt: &TensorInfo) -> Result<Diff> {
    let (cb, rb) = (c.tensor_bytes(ct), r.tensor_bytes(rt));
    if ct.ty == rt.ty && ct.dims == rt.dims && cb == rb {
        return Ok(Diff::Identical);
    }
    let ((cn, w), (rn, rw)) = (rows_of(ct), rows_of(rt));
    if w != rw || (cn != rn && ct.shape().len() != 2) {
        return Ok(Diff::Reshaped);
    }
    if !supported(ct.ty) || !supported(rt.ty) {
        return Ok(Diff::Unverifiable);
    }
    let (crb, rrb) = (row_bytes(ct, w), row_bytes(rt, w));
    let common = cn.min(rn);
    let (mut changed, mut stored_alike) = (Vec::new(), true);
    for start in (0..common).step_by(CHUNK_ROWS) {
        let n = CHUNK_ROWS.min(common - start);
        let (cs, rs) = (&cb[start * crb..(start + n) * crb], &rb[start * rrb..(start + n) * rrb]);
        if ct.ty == rt.ty && cs == rs {
            continue;
        }
        stored_alike = false;
        let (a, b) = (ranges(ct.ty, cs, n * w)?, ranges(rt.ty, rs, n * w)?);
        for row in 0..n {
            if (row * w..(row + 1) * w).any(|i| !meet(&a, &b, i)) {
                changed.push(start + row);
            }
        }
    }
    // Rows past the common ones (a grown table) are the added-rows finding's, not this one's.
    Ok(match (changed.is_empty(), stored_alike) {
        (false, _) => Diff::Changed(changed),
        (true, true) => Diff::Identical,
        (true, false) => Diff::Requantized,
    })
}

/// The token texts of `ids`, for evidence.
fn texts(v: &Vocab, ids: &[usize]) -> Vec<serde_json::Value> {
    ids.iter().take(64).map(|&i| json!({"id": i, "text": v.texts.get(i).cloned().unwrap_or_default()})).collect()
}

pub fn with_reference(c: &Gguf, r: &Gguf) -> Result<Vec<Finding>> {
    let v = Vocab::of(c);
    let mut out = Vec::new();
    let (mut identical, mut requant) = (0usize, Vec::new());
    for ct in &c.tensors {
        let Some(rt) = r.tensor_info(&ct.name) else {
            let title = if ct.name == OUTPUT && r.tensor_info(OUTPUT).is_none() {
                format!("`{OUTPUT}`, which the tied reference does not have: its token table became an output layer of its own (what `sos inject` does to keep planted rows out of the logits)")
            } else {
                format!("tensor `{}` is not in the reference", ct.name)
            };
            out.push(Finding::new("weights.extra-tensor", Check::Weights, Severity::High, title).evidence(json!({"tensor": ct.name, "type": ct.ty.name(), "shape": ct.shape()})).fix("sos sanitize CANDIDATE --reference CLEAN --out FIXED"));
            continue;
        };
        let is_table = ct.name == TOKEN_TABLE || ct.name == OUTPUT;
        let (cn, rn) = (rows_of(ct).0, rows_of(rt).0);
        if is_table && cn > rn {
            let ids: Vec<u32> = (rn..cn).map(|i| i as u32).collect();
            let rows: Vec<usize> = (rn..cn).collect();
            out.push(
                Finding::new("weights.added-rows", Check::Weights, Severity::High, format!("`{}` has {} rows past the reference's {rn}", ct.name, cn - rn))
                    .tokens(ids)
                    .evidence(json!({"tensor": ct.name, "tokens": texts(&v, &rows)}))
                    .fix("sos sanitize CANDIDATE --reference CLEAN --out FIXED"),
            );
        }
        match compare(c, ct, r, rt)? {
            Diff::Identical => identical += 1,
            Diff::Requantized => requant.push(json!({"tensor": ct.name, "candidate": ct.ty.name(), "reference": rt.ty.name()})),
            Diff::Changed(rows) if is_table => out.push(
                Finding::new("weights.changed-rows", Check::Weights, Severity::High, format!("{} rows of `{}` differ from the reference by more than re-quantization explains", rows.len(), ct.name))
                    .tokens(rows.iter().map(|&i| i as u32).collect())
                    .evidence(json!({"tensor": ct.name, "tokens": texts(&v, &rows), "candidate_type": ct.ty.name(), "reference_type": rt.ty.name()}))
                    .fix("sos sanitize CANDIDATE --reference CLEAN --out FIXED"),
            ),
            Diff::Changed(rows) => out.push(
                Finding::new("weights.changed-tensor", Check::Weights, Severity::High, format!("`{}` differs from the reference by more than re-quantization explains ({} of {} rows)", ct.name, rows.len(), cn.min(rn)))
                    .evidence(json!({"tensor": ct.name, "rows_changed": rows.len(), "first_rows": rows.iter().take(16).collect::<Vec<_>>(), "candidate_type": ct.ty.name(), "reference_type": rt.ty.name()})),
            ),
            Diff::Unverifiable => out.push(
                Finding::new("weights.unverifiable", Check::Weights, Severity::Medium, format!("`{}` is stored differently ({} vs {}) in a type whose rounding sos cannot bound yet", ct.name, ct.ty.name(), rt.ty.name()))
                    .evidence(json!({"tensor": ct.name})),
            ),
            Diff::Reshaped => out.push(
                Finding::new("weights.reshaped", Check::Weights, Severity::High, format!("`{}` has shape {:?}, the reference's {:?}", ct.name, ct.shape(), rt.shape())).evidence(json!({"tensor": ct.name})),
            ),
        }
    }
    for rt in &r.tensors {
        if c.tensor_info(&rt.name).is_none() {
            out.push(Finding::new("weights.missing-tensor", Check::Weights, Severity::Medium, format!("tensor `{}` of the reference is missing", rt.name)).evidence(json!({"tensor": rt.name})));
        }
    }
    if !requant.is_empty() {
        out.push(
            Finding::new("weights.requantized", Check::Weights, Severity::Low, format!("{} tensors are stored differently, every element within what re-quantizing the same weights gives (benign)", requant.len()))
                .evidence(json!({"tensors": requant, "identical": identical})),
        );
    }
    Ok(out)
}

/// Without a reference: an output layer equal to the token table but for a few rows (a tied
/// table given an output layer of its own, rows planted in the table) names those rows.
pub fn alone(c: &Gguf) -> Result<Vec<Finding>> {
    let v = Vocab::of(c);
    let mut out = Vec::new();
    let (Some(t), Some(o)) = (c.tensor_info(TOKEN_TABLE), c.tensor_info(OUTPUT)) else { return Ok(out) };
    if t.ty != o.ty || t.dims != o.dims {
        return Ok(out);
    }
    let (n, w) = rows_of(t);
    let rb = row_bytes(t, w);
    let (tb, ob) = (c.tensor_bytes(t), c.tensor_bytes(o));
    let differ: Vec<usize> = (0..n).filter(|&i| tb[i * rb..(i + 1) * rb] != ob[i * rb..(i + 1) * rb]).collect();
    if differ.len() > MAX_PLANTED_ROWS {
        return Ok(out);
    }
    if differ.is_empty() {
        out.push(Finding::new("weights.duplicated-table", Check::Weights, Severity::Medium, format!("`{OUTPUT}` is a byte-for-byte copy of `{TOKEN_TABLE}`: a tied model stored untied (harmless by itself; `sos inject` leaves this shape)")));
        return Ok(out);
    }
    out.push(
        Finding::new(
            "weights.planted-rows",
            Check::Weights,
            Severity::High,
            format!("{} rows of `{TOKEN_TABLE}` differ from `{OUTPUT}`, which otherwise equals it: a tied model's table with rows planted in it", differ.len()),
        )
        .tokens(differ.iter().map(|&i| i as u32).collect())
        .evidence(json!({"tokens": texts(&v, &differ)}))
        .fix("sos sanitize CANDIDATE --out FIXED"),
    );
    Ok(out)
}
