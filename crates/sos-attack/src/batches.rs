//! Which training sequences each step takes. Both ways are pure functions of the seed and the
//! step, so a resumed run takes the same batches as an uninterrupted one.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Indices of the batch at `step`: `batch` distinct sequences of `n` drawn with the seed.
pub fn batch_at(seed: u64, step: usize, n: usize, batch: usize) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (step as u64).wrapping_add(1));
    if batch >= n {
        return (0..n).collect();
    }
    let mut idx = rand::seq::index::sample(&mut rng, n, batch).into_vec();
    idx.sort_unstable();
    idx
}

/// Shuffled sequences per group that is sorted by length before it is cut into batches.
const POOL: usize = 16;

/// Indices of the batch at `step` when sequences differ a lot in length (`lens`): every
/// sequence once per epoch, the epoch shuffled with the seed, then taken in pools of
/// `POOL * batch` that are sorted by length and cut into batches, the batches shuffled again.
/// A batch pads to its longest sequence, so similar lengths waste less work: on the steal
/// training set (32-512 target tokens) a random batch pads to ~2x the positions it holds.
pub fn bucketed_batch_at(seed: u64, step: usize, lens: &[usize], batch: usize) -> Vec<usize> {
    let n = lens.len();
    if batch >= n {
        return (0..n).collect();
    }
    let per_epoch = n.div_ceil(batch);
    let (epoch, j) = (step / per_epoch, step % per_epoch);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (epoch as u64).wrapping_add(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    for pool in order.chunks_mut(POOL * batch) {
        pool.sort_by_key(|&i| (lens[i], i));
    }
    let mut batches: Vec<&[usize]> = order.chunks(batch).collect();
    batches.shuffle(&mut rng);
    let mut idx = batches[j].to_vec();
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_batches_are_distinct_and_seeded() {
        let a = batch_at(3, 7, 100, 4);
        assert_eq!(a, batch_at(3, 7, 100, 4));
        assert_ne!(a, batch_at(4, 7, 100, 4));
        assert_eq!(a.iter().collect::<std::collections::BTreeSet<_>>().len(), 4);
        assert_eq!(batch_at(0, 0, 3, 4), vec![0, 1, 2]);
    }

    #[test]
    fn bucketed_batches_cover_each_epoch_once_and_group_lengths() {
        let lens: Vec<usize> = (0..203).map(|i| (i * 7919) % 500 + 10).collect();
        let per_epoch = lens.len().div_ceil(4);
        for epoch in 0..2 {
            let mut seen: Vec<usize> = (0..per_epoch).flat_map(|j| bucketed_batch_at(5, epoch * per_epoch + j, &lens, 4)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>(), "epoch {epoch}");
        }
        // Padded positions (batch x longest) against random batches of the same size.
        let padded = |b: &[usize]| b.len() * b.iter().map(|&i| lens[i]).max().unwrap();
        let bucketed: usize = (0..per_epoch).map(|s| padded(&bucketed_batch_at(5, s, &lens, 4))).sum();
        let random: usize = (0..per_epoch).map(|s| padded(&batch_at(5, s, lens.len(), 4))).sum();
        assert!(bucketed * 10 < random * 8, "bucketed {bucketed} vs random {random}");
        assert_eq!(bucketed_batch_at(5, 9, &lens, 4), bucketed_batch_at(5, 9, &lens, 4));
    }
}
