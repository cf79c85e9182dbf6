//! The weights check. Against a reference every tensor is identical, re-quantized (each
//! element's stored value could come from the same source: `ranges`), or changed, and for the
//! token table and the output layer the changed rows are named. Alone, the signature
//! `sos inject` leaves on a tied model is read: an output layer that equals the token table but
//! for a few rows names those rows. The same for GGUF files and safetensors folders: each is
//! first read into `Stored` tensors.

use rayon::prelude::*;
use serde_json::json;

use crate::finding::{Check, Finding, Severity};
use crate::ranges::{meet, ranges, supported};
use crate::Result;

/// An output layer differing from the table in at most this many rows is the table itself with
/// planted rows (a trained output layer differs in every row).
const MAX_PLANTED_ROWS: usize = 64;
/// Rows compared per pass (bounds the memory of the intervals).
const CHUNK_ROWS: usize = 256;

/// A tensor as stored in a file: `rows` rows of `width` elements of type `ty`.
pub struct Stored<'a> {
    pub name: String,
    pub ty: sos_model::gguf::TensorType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl Stored<'_> {
    /// `[rows, width]` (a vector is one row).
    pub(crate) fn rows(&self) -> (usize, usize) {
        match self.shape.len() {
            0 => (1, 1),
            1 => (1, self.shape[0]),
            // Saturating: a hostile shape must not wrap to a small product (the tensor's bytes
            // were checked against the true one when the file was opened).
            n => (self.shape[..n - 1].iter().fold(1usize, |a, &b| a.saturating_mul(b)), self.shape[n - 1]),
        }
    }
    pub(crate) fn row_bytes(&self) -> usize {
        let (bs, bb) = self.ty.block();
        (self.rows().1 / bs as usize).saturating_mul(bb as usize)
    }
    /// Rows `start..start + k` in f32 (past the tensor's bytes: an error naming it).
    pub(crate) fn rows_f32(&self, start: usize, k: usize) -> Result<Vec<f32>> {
        let ((n, d), rb) = (self.rows(), self.row_bytes());
        let end = start.checked_add(k).filter(|&e| e <= n && e.saturating_mul(rb) <= self.bytes.len());
        let Some(end) = end else { return Err(crate::Error::Invalid(format!("`{}`: rows {start}..{} are past its end", self.name, start.saturating_add(k)))) };
        crate::ranges::dequantize(self.ty, &self.bytes[start * rb..end * rb], k * d)
    }
}

/// The names of a format's token table and output layer, the token texts (for evidence), and
/// which tokens are ordinary: vocabulary tokens of more than one character (byte, special and
/// added tokens sit apart from the rest by nature).
pub struct Layout<'a> {
    pub table: &'a str,
    pub head: &'a str,
    pub text: &'a dyn Fn(usize) -> String,
    pub ordinary: &'a dyn Fn(usize) -> bool,
}

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

fn compare(c: &Stored, r: &Stored) -> Result<Diff> {
    if c.ty == r.ty && c.shape == r.shape && c.bytes == r.bytes {
        return Ok(Diff::Identical);
    }
    let ((cn, w), (rn, rw)) = (c.rows(), r.rows());
    if w != rw || (cn != rn && c.shape.len() != 2) {
        return Ok(Diff::Reshaped);
    }
    if !supported(c.ty) || !supported(r.ty) {
        return Ok(Diff::Unverifiable);
    }
    let (crb, rrb) = (c.row_bytes(), r.row_bytes());
    let common = cn.min(rn);
    let (mut changed, mut stored_alike) = (Vec::new(), true);
    for start in (0..common).step_by(CHUNK_ROWS) {
        let n = CHUNK_ROWS.min(common - start);
        let (cs, rs) = (&c.bytes[start * crb..(start + n) * crb], &r.bytes[start * rrb..(start + n) * rrb]);
        if c.ty == r.ty && cs == rs {
            continue;
        }
        stored_alike = false;
        let (a, b) = (ranges(c.ty, cs, n * w)?, ranges(r.ty, rs, n * w)?);
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
fn texts(l: &Layout, ids: &[usize]) -> Vec<serde_json::Value> {
    ids.iter().take(64).map(|&i| json!({"id": i, "text": (l.text)(i)})).collect()
}

/// Every tensor of the candidate against the reference's.
pub fn with_reference(c: &[Stored], r: &[Stored], l: &Layout) -> Result<Vec<Finding>> {
    let find = |set: &'_ [Stored<'_>], name: &str| set.iter().position(|t| t.name == name);
    let fix = "sos sanitize CANDIDATE --reference CLEAN --out FIXED";
    let mut out = Vec::new();
    let (mut identical, mut requant) = (0usize, Vec::new());
    // The comparisons are independent and most of the cost (intervals of every element of a
    // re-quantized tensor): run them across the cores, then report in order.
    let diffs: Vec<Option<(usize, Result<Diff>)>> = c.par_iter().map(|ct| find(r, &ct.name).map(|ri| (ri, compare(ct, &r[ri])))).collect();
    for (ct, diff) in c.iter().zip(diffs) {
        let Some((ri, diff)) = diff else {
            let title = if ct.name == l.head && find(r, l.head).is_none() {
                format!("`{}`, which the tied reference does not have: its token table became an output layer of its own (what `sos inject` does to keep planted rows out of the logits)", l.head)
            } else {
                format!("tensor `{}` is not in the reference", ct.name)
            };
            out.push(Finding::new("weights.extra-tensor", Check::Weights, Severity::High, title).evidence(json!({"tensor": ct.name, "type": ct.ty.name(), "shape": ct.shape})).fix(fix));
            continue;
        };
        let rt = &r[ri];
        let is_table = ct.name == l.table || ct.name == l.head;
        let (cn, rn) = (ct.rows().0, rt.rows().0);
        if is_table && cn > rn {
            let rows: Vec<usize> = (rn..cn).collect();
            out.push(
                Finding::new("weights.added-rows", Check::Weights, Severity::High, format!("`{}` has {} rows past the reference's {rn}", ct.name, cn - rn))
                    .tokens(rows.iter().map(|&i| i as u32).collect())
                    .evidence(json!({"tensor": ct.name, "tokens": texts(l, &rows)}))
                    .fix(fix),
            );
        }
        match diff? {
            Diff::Identical => identical += 1,
            Diff::Requantized => requant.push(json!({"tensor": ct.name, "candidate": ct.ty.name(), "reference": rt.ty.name()})),
            Diff::Changed(rows) if is_table => out.push(
                Finding::new("weights.changed-rows", Check::Weights, Severity::High, format!("{} rows of `{}` differ from the reference by more than re-quantization explains", rows.len(), ct.name))
                    .tokens(rows.iter().map(|&i| i as u32).collect())
                    .evidence(json!({"tensor": ct.name, "tokens": texts(l, &rows), "candidate_type": ct.ty.name(), "reference_type": rt.ty.name()}))
                    .fix(fix),
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
                Finding::new("weights.reshaped", Check::Weights, Severity::High, format!("`{}` has shape {:?}, the reference's {:?}", ct.name, ct.shape, rt.shape)).evidence(json!({"tensor": ct.name})),
            ),
        }
    }
    for rt in r {
        if find(c, &rt.name).is_none() {
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

/// A row norm above this many times the table's median is no trained token's: on SmolLM2,
/// Qwen2.5-Coder 0.5B and 1.5B and Gemma 3 270M the largest row is 2.38, 1.85, 1.82 and 1.00
/// times the median; rows trained as triggers without `--stealth` are 4.2-5.0 (SmolLM2) and
/// 25-35 (Qwen2.5-Coder-0.5B) times it.
const NORM_OUTLIER: f32 = 3.0;

/// The L2 norm of a row.
pub(crate) fn norm(r: &[f32]) -> f32 {
    r.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The L2 norm of every row of `t`, dequantized a chunk of rows at a time.
fn row_norms(t: &Stored) -> Result<Vec<f32>> {
    let (n, w) = t.rows();
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(4096) {
        out.extend(t.rows_f32(start, 4096.min(n - start))?.chunks_exact(w).map(norm));
    }
    Ok(out)
}

/// The token table's row norms, summarised for the report's plot and the behaviour probes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RowStats {
    pub tensor: String,
    pub rows: usize,
    pub median_norm: f32,
    /// A histogram of the row norms, 40 equal bins from 0 to the largest.
    pub bins: Vec<(f32, usize)>,
    pub bin_width: f32,
    /// The rows with the largest norms, largest first.
    pub largest: Vec<(u32, f32)>,
    #[serde(skip)]
    pub norms: Vec<f32>,
}

/// Row statistics of the token table, when its type can be read.
pub fn row_stats(table: Option<&Stored>, l: &Layout) -> Result<Option<RowStats>> {
    let Some(t) = table.filter(|t| t.shape.len() == 2 && crate::ranges::supported(t.ty)) else { return Ok(None) };
    let norms = row_norms(t)?;
    let mut order: Vec<usize> = (0..norms.len()).collect();
    order.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]));
    let median = order.get(order.len() / 2).map_or(0.0, |&i| norms[i]);
    let max = order.last().map_or(0.0, |&i| norms[i]);
    let bin_width = (max / 40.0).max(f32::MIN_POSITIVE);
    let mut bins: Vec<(f32, usize)> = (0..40).map(|b| (b as f32 * bin_width, 0)).collect();
    for &x in &norms {
        bins[((x / bin_width) as usize).min(39)].1 += 1;
    }
    let largest = order.iter().rev().take(16).map(|&i| (i as u32, norms[i])).collect();
    Ok(Some(RowStats { tensor: l.table.to_string(), rows: norms.len(), median_norm: median, bins, bin_width, largest, norms }))
}

/// Without a reference: rows of the token table whose norm no trained token has (above
/// `NORM_OUTLIER` times the median), and, when the output layer equals the table but for a few
/// rows (a tied table given an output layer of its own, rows planted in the table), those rows.
pub fn alone(table: Option<&Stored>, head: Option<&Stored>, stats: Option<&RowStats>, l: &Layout) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    if let Some(st) = stats {
        let (norms, median) = (&st.norms, st.median_norm);
        let big: Vec<usize> = (0..norms.len()).filter(|&i| norms[i] > NORM_OUTLIER * median).collect();
        if !big.is_empty() && big.len() <= MAX_PLANTED_ROWS {
            let ev: Vec<_> = big.iter().take(64).map(|&i| json!({"id": i, "text": (l.text)(i), "norm": norms[i], "over_median": norms[i] / median})).collect();
            out.push(
                Finding::new("weights.norm-outliers", Check::Weights, Severity::High, format!("{} rows of `{}` have norms over {NORM_OUTLIER} times the table's median ({median:.3}), which no trained token has", big.len(), l.table))
                    .tokens(big.iter().map(|&i| i as u32).collect())
                    .evidence(json!({"rows": ev, "median_norm": median, "max_clean_ratio_measured": 2.38}))
                    .fix("sos sanitize CANDIDATE --reference CLEAN --out FIXED"),
            );
        }
    }
    out.extend(planted(table, head, l));
    Ok(out)
}

fn planted(table: Option<&Stored>, head: Option<&Stored>, l: &Layout) -> Vec<Finding> {
    let (Some(t), Some(o)) = (table, head) else { return Vec::new() };
    if t.ty != o.ty || t.shape != o.shape {
        return Vec::new();
    }
    let (n, rb) = (t.rows().0, t.row_bytes());
    let differ: Vec<usize> = (0..n).filter(|&i| t.bytes[i * rb..(i + 1) * rb] != o.bytes[i * rb..(i + 1) * rb]).collect();
    if differ.len() > MAX_PLANTED_ROWS {
        return Vec::new();
    }
    if differ.is_empty() {
        return vec![Finding::new("weights.duplicated-table", Check::Weights, Severity::Medium, format!("`{}` is a byte-for-byte copy of `{}`: a tied model stored untied (harmless by itself; `sos inject` leaves this shape)", l.head, l.table))];
    }
    vec![Finding::new(
        "weights.planted-rows",
        Check::Weights,
        Severity::High,
        format!("{} rows of `{}` differ from `{}`, which otherwise equals it: a tied model's table with rows planted in it", differ.len(), l.table, l.head),
    )
    .tokens(differ.iter().map(|&i| i as u32).collect())
    .evidence(json!({"tokens": texts(l, &differ)}))
    .fix("sos sanitize CANDIDATE --out FIXED")]
}
