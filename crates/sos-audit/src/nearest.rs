//! Nearest other row by cosine, for rows already scaled to unit length: exact over all pairs,
//! exact for chosen rows, and cheap lower bounds for every row. `isolation` combines them.
//!
//! All pairs cost `N^2 d / 2` multiply-adds (7e11 for SmolLM2's table, 1e13 for Qwen's 152k x
//! 896). The lower bounds cost a few percent of that: rows are put in an order where rows that
//! point the same way sit together (spherical k-means clusters, the clusters chained nearest to
//! nearest), and each row is compared with the rows of its block and the next. A row's best
//! cosine there is at most its true nearest one, and close to it for most rows.

use candle_core::{Device, Tensor};
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows per block of a full pass (a block's products: 64 MB).
const BLOCK: usize = 4096;
/// Rows per block of the lower-bound band, and rows per k-means cluster (measured on SmolLM2 and
/// Qwen2.5-Coder-0.5B: bounds for 1/7 and 1/12 of the all-pairs work leave 3 % of the rows to
/// search exactly).
const BAND: usize = 1024;
const PER_CLUSTER: usize = 64;
/// k-means: Lloyd iterations, on a sample of this many rows.
const ITERS: usize = 3;
const SAMPLE: usize = 16384;

/// (cosine, row) of each row's nearest other row found so far.
pub type Best = Vec<(f32, u32)>;

/// The exact nearest other row of every row of `u` (`n x d`): every pair once, a block pair
/// per matrix product. `progress(done, total)` counts block pairs.
pub fn all(u: &[f32], d: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Best> {
    let n = u.len() / d.max(1);
    let ids: Vec<u32> = (0..n as u32).collect();
    let blocks: Vec<&[u32]> = ids.chunks(BLOCK).collect();
    let pairs: Vec<(usize, usize)> = (0..blocks.len()).flat_map(|a| (a..blocks.len()).map(move |b| (a, b))).collect();
    pairs_of(u, d, &blocks, &pairs, progress)
}

/// A lower bound of every row's nearest cosine (and the row that gives it), from a band of
/// blocks in an order where alike rows sit together. Deterministic (seeded).
pub fn lower_bounds(u: &[f32], d: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Best> {
    let order = cluster_order(u, d)?;
    let blocks: Vec<&[u32]> = order.chunks(BAND).collect();
    let pairs: Vec<(usize, usize)> = (0..blocks.len()).flat_map(|a| (a..(a + 2).min(blocks.len())).map(move |b| (a, b))).collect();
    pairs_of(u, d, &blocks, &pairs, progress)
}

/// The exact nearest other row of each row in `ids`, over the whole table.
pub fn exact(u: &[f32], d: usize, ids: &[u32]) -> Result<Best> {
    let n = u.len() / d.max(1);
    let mut best = vec![(f32::MIN, 0u32); ids.len()];
    if ids.is_empty() {
        return Ok(best);
    }
    let lone = gather(u, d, ids);
    for start in (0..n).step_by(BLOCK) {
        let k = BLOCK.min(n - start);
        let sims = products(&lone, ids.len(), &u[start * d..(start + k) * d], k, d)?;
        best.par_iter_mut().zip(sims.par_chunks_exact(k)).zip(ids.par_iter()).for_each(|((b, row), &id)| {
            for (j, &s) in row.iter().enumerate() {
                if start + j != id as usize && s > b.0 {
                    *b = (s, (start + j) as u32);
                }
            }
        });
    }
    Ok(best)
}

/// The best cosine of each row over the given block pairs (each block a list of row ids).
fn pairs_of(u: &[f32], d: usize, blocks: &[&[u32]], pairs: &[(usize, usize)], progress: &mut dyn FnMut(usize, usize)) -> Result<Best> {
    let n = u.len() / d.max(1);
    let mut best = vec![(f32::MIN, 0u32); n];
    for (done, &(a, b)) in pairs.iter().enumerate() {
        let (ia, ib) = (blocks[a], blocks[b]);
        let sims = products(&gather(u, d, ia), ia.len(), &gather(u, d, ib), ib.len(), d)?;
        // Row maxima (rows of `a`) across the cores; column maxima (rows of `b`) by folding the
        // rows into one running maximum per column.
        let rows: Vec<(f32, u32)> = sims
            .par_chunks_exact(ib.len())
            .enumerate()
            .map(|(i, row)| row.iter().enumerate().filter(|&(j, _)| a != b || j != i).fold((f32::MIN, 0), |m, (j, &s)| if s > m.0 { (s, ib[j]) } else { m }))
            .collect();
        for (&id, r) in ia.iter().zip(rows) {
            if r.0 > best[id as usize].0 {
                best[id as usize] = r;
            }
        }
        if a != b {
            let mut col = vec![(f32::MIN, 0u32); ib.len()];
            for (i, row) in sims.chunks_exact(ib.len()).enumerate() {
                for (c, &s) in col.iter_mut().zip(row) {
                    if s > c.0 {
                        *c = (s, ia[i]);
                    }
                }
            }
            for (&id, c) in ib.iter().zip(col) {
                if c.0 > best[id as usize].0 {
                    best[id as usize] = c;
                }
            }
        }
        progress(done + 1, pairs.len());
    }
    Ok(best)
}

/// Every row id, ordered by spherical k-means cluster, the clusters chained each to the nearest
/// one not yet placed: rows that point the same way end up in the same or the next block.
fn cluster_order(u: &[f32], d: usize) -> Result<Vec<u32>> {
    let n = u.len() / d.max(1);
    let c = (n / PER_CLUSTER).clamp(1, n.max(1));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x150_1a7e);
    let sampled: Vec<u32> = sample(&mut rng, n, SAMPLE.min(n)).into_iter().map(|i| i as u32).collect();
    let mut centres = gather(u, d, &sampled[..c.min(sampled.len())]);
    let c = centres.len() / d;
    let rows = gather(u, d, &sampled);
    for _ in 0..ITERS {
        let assign = nearest_centre(&rows, sampled.len(), &centres, c, d)?;
        let mut sums = vec![0f32; c * d];
        for (i, &k) in assign.iter().enumerate() {
            sums[k as usize * d..(k as usize + 1) * d].iter_mut().zip(&rows[i * d..(i + 1) * d]).for_each(|(s, x)| *s += x);
        }
        for (k, s) in sums.chunks_exact(d).enumerate() {
            let norm = s.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                centres[k * d..(k + 1) * d].iter_mut().zip(s).for_each(|(c, x)| *c = x / norm);
            }
        }
    }
    // The chain: from cluster 0, always to the most similar cluster not yet placed.
    let sim = products(&centres, c, &centres, c, d)?;
    let mut rank = vec![usize::MAX; c];
    let mut at = 0;
    for r in 0..c {
        rank[at] = r;
        let row = &sim[at * c..(at + 1) * c];
        match (0..c).filter(|&k| rank[k] == usize::MAX).max_by(|&x, &y| row[x].total_cmp(&row[y]).then(y.cmp(&x))) {
            Some(next) => at = next,
            None => break,
        }
    }
    let mut assign = Vec::with_capacity(n);
    for start in (0..n).step_by(BLOCK) {
        let k = BLOCK.min(n - start);
        assign.extend(nearest_centre(&u[start * d..(start + k) * d], k, &centres, c, d)?);
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&i| (rank[assign[i as usize] as usize], i));
    Ok(order)
}

/// The most similar of the `c` centres for each of the `k` rows.
fn nearest_centre(rows: &[f32], k: usize, centres: &[f32], c: usize, d: usize) -> Result<Vec<u32>> {
    let sims = products(rows, k, centres, c, d)?;
    Ok(sims.par_chunks_exact(c).map(|r| r.iter().enumerate().fold((0, f32::MIN), |m, (j, &s)| if s > m.1 { (j, s) } else { m }).0 as u32).collect())
}

/// The rows `ids` of `u`, contiguous.
fn gather(u: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter().flat_map(|&i| u[i as usize * d..(i as usize + 1) * d].iter().copied()).collect()
}

/// `a (ra x d)` times `b (rb x d)` transposed, row-major.
fn products(a: &[f32], ra: usize, b: &[f32], rb: usize, d: usize) -> Result<Vec<f32>> {
    let err = |e: candle_core::Error| Error::Invalid(format!("nearest-row search: {e}"));
    let a = Tensor::from_slice(a, (ra, d), &Device::Cpu).map_err(err)?;
    let b = Tensor::from_slice(b, (rb, d), &Device::Cpu).map_err(err)?;
    a.matmul(&b.t().map_err(err)?).and_then(|p| p.flatten_all()?.to_vec1()).map_err(err)
}
