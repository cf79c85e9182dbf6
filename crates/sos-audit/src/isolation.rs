//! How alone each row of the token table is: the cosine with its nearest other row.
//!
//! A trained token sits near others (a word, its capitalised and spaced forms, its pieces). A
//! trigger vector is optimised for what it makes the model do, not to look like a token, and
//! lands alone whatever its norm: the reference-free signal that survives `--stealth`. Measured
//! (exact, every row; the ordinary tokens, see `isolated`): SmolLM2's loneliest ordinary token is
//! 0.84 of the 0.1 % quantile of the table's nearest cosines, Qwen2.5-Coder-0.5B's 0.80; the rows
//! of four trained triggers of SmolLM2 (backdoor, steal, copyright) 0.46-0.75 of it, of a
//! Qwen2.5-Coder-0.5B backdoor trigger 0.43-0.71. Norms do not enter a cosine, so `--stealth`
//! changes nothing here.
//!
//! The search is exact, all pairs (`N^2 d / 2` multiply-adds in blocks, each block one matrix
//! product): seconds for SmolLM2's 49k rows, minutes for a 152k-row table on two cores. Lower
//! bounds from cheaper searches (probe rows, random-projection trees, k-means buckets) were
//! measured too loose to spare most of that work: neighbours at a cosine of 0.3-0.5 are far
//! apart in 576-896 dimensions, and a tail quantile of lower bounds is not the table's.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::json;

use crate::finding::{Check, Finding, Severity};
use crate::weights::{Layout, Stored};
use crate::{Error, Result};

/// A row whose nearest cosine is below this fraction of the 0.1 % quantile of the ordinary
/// rows' is alone as no trained token of the measured tables is (see the module's numbers).
pub const ALONE: f32 = 0.78;
/// The quantile of the ordinary rows' nearest cosines the threshold is a fraction of: planted
/// rows fewer than a thousandth of the table cannot move it (49 rows of SmolLM2's, 152 of
/// Qwen's; an SOS trigger is a handful).
const TAIL: f64 = 0.001;
/// Rows per block of the all-pairs search (a block's products: 64 MB).
const BLOCK: usize = 4096;
/// More rows alone than this are not a few planted ones (a table with many untrained rows):
/// reported, not probed.
const MAX_ROWS: usize = 64;

/// A row and its nearest other row.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Nearest {
    pub id: u32,
    /// The other row with the largest cosine.
    pub neighbour: u32,
    pub cosine: f32,
}

/// What the search found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Isolation {
    /// `ALONE` times `tail`.
    pub threshold: f32,
    /// The 0.1 % quantile of the ordinary rows' nearest cosines.
    pub tail: f32,
    /// Ordinary rows whose nearest cosine is below `threshold`, loneliest first.
    pub alone: Vec<Nearest>,
    /// The 16 loneliest ordinary rows, for the report.
    pub loneliest: Vec<Nearest>,
    /// A histogram of the ordinary rows' nearest cosines: 40 bins of width 0.025 from -0.0.
    pub bins: Vec<(f32, usize)>,
    pub ordinary_rows: usize,
}

/// The nearest other row of every row of `t`, and the ordinary rows (`ordinary(id)`: a normal
/// vocabulary token of more than one character; byte and special tokens are alone by nature)
/// that are further from theirs than any trained token. All-zero rows have no direction and
/// are left out. `progress(done, total)` is called per block.
pub fn isolated(t: &Stored, ordinary: &dyn Fn(usize) -> bool, progress: &mut dyn FnMut(usize, usize)) -> Result<Isolation> {
    let (n, d) = t.rows();
    if n < 2 || d == 0 {
        return Ok(Isolation { threshold: 0.0, tail: 0.0, alone: Vec::new(), loneliest: Vec::new(), bins: Vec::new(), ordinary_rows: 0 });
    }
    let mut units = Vec::with_capacity(n * d);
    for start in (0..n).step_by(BLOCK) {
        units.extend(unit_rows(t, start, BLOCK.min(n - start))?);
    }
    let best = nearest_all(&units, d, progress)?;
    let zero = |i: usize| units[i * d..(i + 1) * d].iter().all(|&x| x == 0.0);
    let mut rows: Vec<Nearest> = (0..n).filter(|&i| !zero(i) && ordinary(i)).map(|i| Nearest { id: i as u32, neighbour: best[i].1, cosine: best[i].0 }).collect();
    rows.sort_by(|a, b| a.cosine.total_cmp(&b.cosine).then(a.id.cmp(&b.id)));
    let tail = rows.get(((rows.len().max(1) - 1) as f64 * TAIL) as usize).map_or(0.0, |r| r.cosine);
    let threshold = ALONE * tail;
    let mut bins: Vec<(f32, usize)> = (0..40).map(|b| (b as f32 * 0.025, 0)).collect();
    for r in &rows {
        bins[((r.cosine.max(0.0) / 0.025) as usize).min(39)].1 += 1;
    }
    Ok(Isolation {
        threshold,
        tail,
        alone: rows.iter().copied().take_while(|r| r.cosine < threshold).collect(),
        loneliest: rows.iter().copied().take(16).collect(),
        bins,
        ordinary_rows: rows.len(),
    })
}

/// The finding for the rows `iso` found alone: medium, since a cosine is evidence, not proof;
/// the behaviour tests probe the rows as a group and say what they do.
pub fn finding(iso: &Isolation, l: &Layout) -> Option<Finding> {
    if iso.alone.is_empty() {
        return None;
    }
    let rows: Vec<_> = iso
        .alone
        .iter()
        .take(MAX_ROWS)
        .map(|r| json!({"id": r.id, "text": (l.text)(r.id as usize), "nearest_cosine": r.cosine, "neighbour": r.neighbour, "neighbour_text": (l.text)(r.neighbour as usize)}))
        .collect();
    let many = iso.alone.len() > MAX_ROWS;
    let title = format!(
        "{} rows of `{}` are further from every other row than any trained token (nearest-row cosine under {:.3}: {ALONE} of the table's 0.1 % quantile, {:.3})",
        iso.alone.len(),
        l.table,
        iso.threshold,
        iso.tail
    );
    let f = Finding::new("weights.isolated-rows", Check::Weights, if many { Severity::Low } else { Severity::Medium }, title)
        .evidence(json!({"rows": rows, "threshold": iso.threshold, "tail_quantile": iso.tail, "ordinary_rows": iso.ordinary_rows}))
        .fix("confirm with --behavior quick (the rows are probed as a group); then sos sanitize CANDIDATE --reference CLEAN --out FIXED");
    Some(if many { f } else { f.tokens(iso.alone.iter().map(|r| r.id).collect()) })
}

/// The nearest other row (cosine, id) of every row of the unit rows `u`: every pair once, a
/// block pair per matrix product, each product's row and column maxima folded in.
fn nearest_all(u: &[f32], d: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(f32, u32)>> {
    let n = u.len() / d.max(1);
    let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
    let tensor = |s: usize| {
        let k = BLOCK.min(n - s);
        Tensor::from_slice(&u[s * d..(s + k) * d], (k, d), &Device::Cpu).map_err(err)
    };
    let mut best = vec![(f32::MIN, 0u32); n];
    let total = starts.len() * (starts.len() + 1) / 2;
    let mut done = 0;
    for (bi, &a) in starts.iter().enumerate() {
        let ta = tensor(a)?;
        for &b in &starts[bi..] {
            let tb = tensor(b)?;
            let kb = tb.dims()[0];
            let sims: Vec<f32> = ta.matmul(&tb.t().map_err(err)?).and_then(|p| p.flatten_all()?.to_vec1()).map_err(err)?;
            // Row maxima (rows of `a`) across the cores; column maxima (rows of `b`) by folding
            // the rows into one running maximum per column.
            let rows: Vec<(f32, u32)> = sims.par_chunks_exact(kb).enumerate().map(|(i, row)| arg_max(row, (a == b).then_some(i)).map_or((f32::MIN, 0), |(j, s)| (s, (b + j) as u32))).collect();
            for (i, r) in rows.into_iter().enumerate() {
                if r.0 > best[a + i].0 {
                    best[a + i] = r;
                }
            }
            if a != b {
                let mut col = vec![(f32::MIN, 0u32); kb];
                for (i, row) in sims.chunks_exact(kb).enumerate() {
                    for (c, &s) in col.iter_mut().zip(row) {
                        if s > c.0 {
                            *c = (s, (a + i) as u32);
                        }
                    }
                }
                for (j, c) in col.into_iter().enumerate() {
                    if c.0 > best[b + j].0 {
                        best[b + j] = c;
                    }
                }
            }
            done += 1;
            progress(done, total);
        }
    }
    Ok(best)
}

/// The largest element of `row` and its index, skipping index `skip`.
fn arg_max(row: &[f32], skip: Option<usize>) -> Option<(usize, f32)> {
    row.iter().enumerate().filter(|&(j, _)| Some(j) != skip).fold(None, |m, (j, &s)| match m {
        Some((_, b)) if b >= s => m,
        _ => Some((j, s)),
    })
}

fn err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("nearest-row search: {e}"))
}

/// Rows `start..start + k` of `t` in f32, each scaled to unit length (a zero row stays zero).
fn unit_rows(t: &Stored, start: usize, k: usize) -> Result<Vec<f32>> {
    let (n, d) = t.rows();
    let rb = t.row_bytes();
    if start + k > n || (start + k) * rb > t.bytes.len() {
        return Err(Error::Invalid(format!("`{}`: rows {start}..{} are past its end", t.name, start + k)));
    }
    let mut v = crate::ranges::dequantize(t.ty, &t.bytes[start * rb..(start + k) * rb], k * d)?;
    for r in v.chunks_exact_mut(d) {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            r.iter_mut().for_each(|x| *x /= norm);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use sos_model::gguf::TensorType;

    fn table(rows: &[Vec<f32>]) -> (Vec<u8>, Vec<usize>) {
        (rows.iter().flatten().flat_map(|x| x.to_le_bytes()).collect(), vec![rows.len(), rows[0].len()])
    }

    fn gauss(rng: &mut rand::rngs::StdRng, d: usize) -> Vec<f32> {
        // Sums of uniforms: near-Gaussian, direction uniform enough for a test.
        (0..d).map(|_| (0..4).map(|_| rng.gen::<f32>() - 0.5).sum()).collect()
    }

    #[test]
    fn blocked_search_is_the_brute_force_one() {
        // 5,000 rows cross a block boundary (4,096): pairs inside a block, across two, the
        // ragged last block.
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (n, d) = (5000, 6);
        let rows: Vec<Vec<f32>> = (0..n).map(|_| gauss(&mut rng, d)).collect();
        let (bytes, shape) = table(&rows);
        let t = Stored { name: "t".into(), ty: TensorType::F32, shape, bytes: &bytes };
        let u = unit_rows(&t, 0, n).unwrap();
        let mut calls = 0;
        let got = nearest_all(&u, d, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, 3, "two blocks: (0,0), (0,1), (1,1)");
        for i in (0..n).step_by(7) {
            let (mut best, mut at) = (f32::MIN, 0);
            for j in (0..n).filter(|&j| j != i) {
                let s: f32 = u[i * d..(i + 1) * d].iter().zip(&u[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
                if s > best {
                    (best, at) = (s, j);
                }
            }
            assert!((got[i].0 - best).abs() < 1e-5, "row {i}: {:?} vs {best} at {at}", got[i]);
        }
    }

    #[test]
    fn planted_rows_are_named_and_nothing_else() {
        // 1,200 words of ten forms each (a centre plus a little noise: every row has close
        // neighbours), three planted vectors, a byte-like row that is alone but not ordinary,
        // and a zero row.
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let d = 64;
        let mut rows = Vec::new();
        for _ in 0..1200 {
            let c = gauss(&mut rng, d);
            for _ in 0..10 {
                rows.push(c.iter().map(|x| x + 0.15 * (rng.gen::<f32>() - 0.5)).collect::<Vec<f32>>());
            }
        }
        let planted = [17usize, 5234, 11999];
        for &p in &planted {
            rows[p] = gauss(&mut rng, d);
        }
        rows.push(gauss(&mut rng, d)); // 12000: alone, but a byte token
        rows.push(vec![0.0; d]); // 12001: no direction
        let (bytes, shape) = table(&rows);
        let t = Stored { name: "token_embd.weight".into(), ty: TensorType::F32, shape, bytes: &bytes };
        let iso = isolated(&t, &|i| i != 12000, &mut |_, _| {}).unwrap();
        let mut ids: Vec<u32> = iso.alone.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, planted.map(|p| p as u32), "{iso:?}");
        assert!(iso.tail > 0.9 && (iso.threshold - ALONE * iso.tail).abs() < 1e-6);
        assert_eq!(iso.ordinary_rows, 12000);
        assert_eq!(iso.bins.iter().map(|b| b.1).sum::<usize>(), 12000);
        let text = |i: usize| format!("tok{i}");
        let l = Layout { table: "token_embd.weight", head: "output.weight", text: &text, ordinary: &|_| true };
        let f = finding(&iso, &l).unwrap();
        assert_eq!((f.id.as_str(), f.severity), ("weights.isolated-rows", Severity::Medium));
        let mut named = f.token_ids.clone();
        named.sort_unstable();
        assert_eq!(named, ids);
        // The same table without the planted rows: nothing.
        for &p in &planted {
            rows[p] = rows[if p == 11999 { p - 1 } else { p + 1 }].clone();
        }
        let (bytes, shape) = table(&rows);
        let t = Stored { name: "token_embd.weight".into(), ty: TensorType::F32, shape, bytes: &bytes };
        let iso = isolated(&t, &|i| i != 12000, &mut |_, _| {}).unwrap();
        assert!(iso.alone.is_empty() && finding(&iso, &l).is_none(), "{:?}", iso.alone);
    }
}
