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
//! The result is exact (`nearest`): every row gets a lower bound of its nearest cosine from a
//! cheap pass; the rows whose bound is lowest are searched over the whole table, as many as it
//! takes to prove the tail quantile and every row under the threshold. Tables of up to 16k rows
//! are searched over all pairs.

use serde_json::json;

use crate::finding::{Check, Finding, Severity};
use crate::nearest;
use crate::weights::{self, Layout, Stored};
use crate::Result;

/// A row whose nearest cosine is below this fraction of the 0.1 % quantile of the ordinary
/// rows' is alone as no trained token of the measured tables is (see the module's numbers).
pub const ALONE: f32 = 0.78;
/// The quantile of the ordinary rows' nearest cosines the threshold is a fraction of: planted
/// rows fewer than a thousandth of the table cannot move it (49 rows of SmolLM2's, 152 of
/// Qwen's; an SOS trigger is a handful).
const TAIL: f64 = 0.001;
/// Rows dequantized at a time.
const BLOCK: usize = 4096;
/// Tables up to this many rows are searched over all pairs (the bounds would save little).
const ALL_PAIRS: usize = 16384;
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
    /// A histogram of the ordinary rows' nearest cosines: 40 bins of width 0.025 from 0 (rows
    /// not searched exactly, all above the tail, are counted at their lower bound).
    pub bins: Vec<(f32, usize)>,
    pub ordinary_rows: usize,
    /// Rows whose nearest row was searched over the whole table.
    pub searched_exactly: usize,
}

/// The nearest other row of the ordinary rows of `t` (`ordinary(id)`: a normal vocabulary token
/// of more than one character; byte and special tokens are alone by nature), and those further
/// from theirs than any trained token. All-zero rows have no direction and are left out.
/// `progress(done, total)` is called per block of work.
pub fn isolated(t: &Stored, ordinary: &dyn Fn(usize) -> bool, progress: &mut dyn FnMut(usize, usize)) -> Result<Isolation> {
    isolated_with(t, ordinary, progress, ALL_PAIRS)
}

fn isolated_with(t: &Stored, ordinary: &dyn Fn(usize) -> bool, progress: &mut dyn FnMut(usize, usize), all_pairs: usize) -> Result<Isolation> {
    let (n, d) = t.rows();
    let empty = Isolation { threshold: 0.0, tail: 0.0, alone: Vec::new(), loneliest: Vec::new(), bins: Vec::new(), ordinary_rows: 0, searched_exactly: 0 };
    if n < 2 || d == 0 {
        return Ok(empty);
    }
    let mut units = Vec::with_capacity(n * d);
    for start in (0..n).step_by(BLOCK) {
        units.extend(unit_rows(t, start, BLOCK.min(n - start))?);
    }
    let zero = |i: usize| units[i * d..(i + 1) * d].iter().all(|&x| x == 0.0);
    let mut ids: Vec<u32> = (0..n as u32).filter(|&i| !zero(i as usize) && ordinary(i as usize)).collect();
    if ids.is_empty() {
        return Ok(empty);
    }
    let rank = ((ids.len() - 1) as f64 * TAIL) as usize;
    let (best, searched) = if n <= all_pairs {
        (nearest::all(&units, d, progress)?, n)
    } else {
        // Bounds for all, then the exact search over the rows with the lowest bounds, doubling
        // until the tail's value is at most the lowest bound left: every row not searched is
        // then above the tail, and so above the threshold.
        let mut best = nearest::lower_bounds(&units, d, progress)?;
        ids.sort_by(|&a, &b| best[a as usize].0.total_cmp(&best[b as usize].0).then(a.cmp(&b)));
        let (mut done, mut want) = (0, (4 * (rank + 1)).max(512));
        loop {
            let upto = want.min(ids.len());
            for (&id, e) in ids[done..upto].iter().zip(nearest::exact(&units, d, &ids[done..upto])?) {
                best[id as usize] = e;
            }
            done = upto;
            let mut searched: Vec<f32> = ids[..done].iter().map(|&i| best[i as usize].0).collect();
            searched.sort_by(f32::total_cmp);
            let left = ids.get(done).map_or(f32::INFINITY, |&i| best[i as usize].0);
            if done == ids.len() || searched.get(rank).is_some_and(|&v| v <= left) {
                break;
            }
            want *= 2;
        }
        (best, done)
    };
    let mut rows: Vec<Nearest> = ids.iter().map(|&i| Nearest { id: i, neighbour: best[i as usize].1, cosine: best[i as usize].0 }).collect();
    rows.sort_by(|a, b| a.cosine.total_cmp(&b.cosine).then(a.id.cmp(&b.id)));
    let tail = rows[rank].cosine;
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
        searched_exactly: searched,
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

/// Rows `start..start + k` of `t` in f32, each scaled to unit length (a zero row stays zero).
fn unit_rows(t: &Stored, start: usize, k: usize) -> Result<Vec<f32>> {
    let mut v = t.rows_f32(start, k)?;
    for r in v.chunks_exact_mut(t.rows().1) {
        let n = weights::norm(r);
        if n > 0.0 {
            r.iter_mut().for_each(|x| *x /= n);
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

    /// `n` words of ten forms each: a centre plus uniform noise of width `spread` per element.
    fn words(rng: &mut rand::rngs::StdRng, n: usize, d: usize, spread: f32) -> Vec<Vec<f32>> {
        let mut rows = Vec::with_capacity(10 * n);
        for _ in 0..n {
            let c = gauss(rng, d);
            for _ in 0..10 {
                rows.push(c.iter().map(|x| x + spread * (rng.gen::<f32>() - 0.5)).collect());
            }
        }
        rows
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
        let got = nearest::all(&u, d, &mut |_, _| calls += 1).unwrap();
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
    fn bounds_then_exact_search_is_the_all_pairs_answer() {
        // 20,000 rows in 2,000 loose groups plus a few planted ones: the bounds are below the
        // truth for every row, and the bounded search gives all pairs' tail, rows and histogram.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let d = 64;
        let mut rows = words(&mut rng, 2000, d, 0.8);
        for p in [5, 777, 19_999] {
            rows[p] = gauss(&mut rng, d);
        }
        let (bytes, shape) = table(&rows);
        let t = Stored { name: "t".into(), ty: TensorType::F32, shape, bytes: &bytes };
        let u = unit_rows(&t, 0, rows.len()).unwrap();
        let (lb, all) = (nearest::lower_bounds(&u, d, &mut |_, _| {}).unwrap(), nearest::all(&u, d, &mut |_, _| {}).unwrap());
        assert!(lb.iter().zip(&all).all(|(l, a)| l.0 <= a.0 + 1e-6));
        assert!(lb.iter().zip(&all).filter(|(l, a)| (l.0 - a.0).abs() < 1e-6).count() > rows.len() / 2, "the bounds find most nearest rows");
        let ordinary = |i: usize| i % 97 != 0;
        let exact = isolated_with(&t, &ordinary, &mut |_, _| {}, usize::MAX).unwrap();
        let bounded = isolated_with(&t, &ordinary, &mut |_, _| {}, 0).unwrap();
        assert!(bounded.searched_exactly < rows.len() / 2, "{}", bounded.searched_exactly);
        assert_eq!((bounded.tail, bounded.threshold), (exact.tail, exact.threshold));
        assert_eq!(bounded.alone, exact.alone);
        assert_eq!(bounded.loneliest, exact.loneliest);
        let mut named: Vec<u32> = exact.alone.iter().map(|r| r.id).collect();
        named.sort_unstable();
        assert_eq!(named, [5, 777, 19_999], "tail {} threshold {}", exact.tail, exact.threshold);
    }

    #[test]
    fn planted_rows_are_named_and_nothing_else() {
        // 1,200 words of ten forms each (a centre plus a little noise: every row has close
        // neighbours), three planted vectors, a byte-like row that is alone but not ordinary,
        // and a zero row.
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let d = 64;
        let mut rows = words(&mut rng, 1200, d, 0.15);
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
