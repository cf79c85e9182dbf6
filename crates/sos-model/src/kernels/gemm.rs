//! Matrix products on plain f32 buffers, sent straight to the `gemm` crate: one single-threaded
//! call (`gemm_raw`) behind two entry points, `gemm_st` for the small per-head products of the
//! attention and `matmul`, which splits a weight product's columns over the pool; and
//! `transpose_into`, which lays a weight out the way the forward's products read it.

use gemm::Parallelism;
use rayon::prelude::*;

/// A raw pointer handed to the threads of one `matmul`; each writes its own columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: `matmul` hands the pointer only to threads that write disjoint column ranges of one
// live buffer, and joins them all before the buffer's borrow ends.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared references to it are only used to reach those disjoint ranges.
unsafe impl Sync for SendPtr {}

/// Single-threaded `c (+)= a b` on strided operands, for the small per-head products of the
/// attention: element `(i, j)` of `c` is `c[i * ldc + j]`, of `a` is `a[i * a_s.0 + j * a_s.1]`,
/// of `b` is `b[i * b_s.0 + j * b_s.1]`, so transposed views cost nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_st(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    a_s: (usize, usize),
    b: &[f32],
    b_s: (usize, usize),
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "gemm_st: empty inner dimension");
    let last = |(rs, cs): (usize, usize), rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last((ldc, 1), m, n) < c.len() && last(a_s, m, k) < a.len() && last(b_s, k, n) < b.len(),
        "gemm_st shapes"
    );
    // SAFETY: the assert keeps every element the strides reach inside the slices.
    unsafe { gemm_raw(c.as_mut_ptr(), ldc, a.as_ptr(), a_s, b.as_ptr(), b_s, m, k, n, acc) }
}

/// The one call into `gemm`: `c (+)= a b` with element `(i, j)` of `c` at `c[i * ldc + j]`, of `a`
/// at `a[i * a_s.0 + j * a_s.1]`, of `b` at `b[i * b_s.0 + j * b_s.1]`, on one thread.
///
/// # Safety
/// Every element those strides reach for `i < m`, `j < n` (and `k`) must lie inside the
/// allocations behind the pointers, and no other thread may touch the elements of `c` written.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    a_s: (usize, usize),
    b: *const f32,
    b_s: (usize, usize),
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        acc,
        a,
        a_s.1 as isize,
        a_s.0 as isize,
        b,
        b_s.1 as isize,
        b_s.0 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// `c = a b`, or `c += a b` with `acc`, for `a: [m, k]` and `c: [m, n]` row-major with row
/// strides `lda` and `ldc` (so that a column block of a wider buffer can be read or written),
/// and `b: [k, n]` row-major, or stored transposed `[n, k]` when `b_t` (a `Linear` weight
/// `[out, in]` in its forward).
///
/// The columns are split evenly across the pool, each part a single-threaded `gemm`: gemm's own
/// split left a core idle for a third of some of these shapes (1.5 of 2 cores busy), and a
/// column split packs each weight column once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b_t: bool,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && lda >= k, "matmul strides");
    assert!(
        c.len() >= (m - 1) * ldc + n && a.len() >= (m - 1) * lda + k && b.len() >= k * n,
        "matmul shapes"
    );
    let (b_cs, b_rs) = if b_t { (k, 1) } else { (1, n) };
    // Column blocks of 16 (one AVX-512 register), as even as that allows; no part narrower than
    // `WIDE` when the product has few rows (see `WIDE`).
    let blocks = n.div_ceil(16);
    let mut parts = rayon::current_num_threads()
        .min(blocks)
        .min((m * n * k / (1 << 18)).max(1));
    if m < WIDE {
        // Parts of at least WIDE.div_ceil(16) blocks: 80 columns, the last at least 65.
        parts = parts.min((blocks / WIDE.div_ceil(16)).max(1));
    }
    let cp = SendPtr(c.as_mut_ptr());
    let run = |p: usize| {
        let (j0, j1) = (
            (blocks * p / parts * 16).min(n),
            (blocks * (p + 1) / parts * 16).min(n),
        );
        // Rebinding makes the closure capture the whole `SendPtr` (which is Sync), not its field.
        #[allow(clippy::redundant_locals)]
        let cp = cp;
        // SAFETY: the asserts above keep every element the strides reach inside the slices, and
        // the parts write disjoint column ranges of `c`.
        unsafe { gemm_raw(cp.0.add(j0), ldc, a.as_ptr(), (lda, 1), b.as_ptr().add(j0 * b_cs), (b_rs, b_cs), m, k, j1 - j0, acc) }
    };
    if parts == 1 {
        run(0);
    } else {
        (0..parts).into_par_iter().for_each(run);
    }
}

/// gemm sums a product of at most 64 rows and at most 64 columns in another order than a larger
/// one (over `k` in one block of up to 512, where a larger product splits `k` evenly), so a
/// product split by columns gets the bits of the whole only if no part of a short product is
/// 64 columns or fewer. `matmul` and `matmul_blocks` keep their parts at least this wide (a
/// product narrower than that stays whole), so that the way columns are split, by threads or
/// into blocks, never changes a result.
const WIDE: usize = 65;

/// `c (+)= a b`, `a: [m, k]` with row stride `lda`, `c: [m, n]` with row stride `ldc`, for a
/// `b: [k, n]` that is never whole in memory: `fill(j0, j1, buf)` writes its columns `j0..j1`
/// into `buf` as `[k, j1 - j0]`, row-major. Block after block of at least `block` columns (the
/// last takes the rest), each filled and then multiplied by `matmul` while it is in cache. The
/// bits are `matmul`'s on the whole `b` (`WIDE`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_blocks(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
    block: usize,
    mut fill: impl FnMut(usize, usize, &mut [f32]),
) {
    assert!(block >= WIDE, "matmul_blocks: blocks narrower than WIDE");
    if m == 0 || n == 0 {
        return;
    }
    let nb = (n / block).max(1);
    let mut buf = Vec::new();
    for i in 0..nb {
        let j0 = i * block;
        let j1 = if i + 1 == nb { n } else { j0 + block };
        buf.resize(k * (j1 - j0), 0.0);
        fill(j0, j1, &mut buf);
        matmul(&mut c[j0..], ldc, a, lda, &buf, m, k, j1 - j0, false, acc);
    }
}

/// Side of the square tiles `transpose_into` moves: 32 x 32 floats, 4 KB each way, in L1.
const TILE: usize = 32;

/// Writes `src: [rows, cols]` (row-major) transposed into the column block starting at `col` of
/// `dst: [cols, ld]`: `dst[c * ld + col + r] = src[r * cols + c]`. Tile by tile, so that both
/// sides are read and written a cache line at a time, and 8 x 8 blocks in AVX2 registers where
/// the CPU has them. On the calling thread: a block of `matmul_blocks` is too small to split.
pub(crate) fn transpose_into(dst: &mut [f32], ld: usize, col: usize, src: &[f32], rows: usize, cols: usize) {
    assert!(src.len() >= rows * cols && col + rows <= ld, "transpose_into shapes");
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(dst.len() >= (cols - 1) * ld + col + rows, "transpose_into shapes");
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    dst.chunks_mut(TILE * ld).take(cols.div_ceil(TILE)).enumerate().for_each(|(tc, band)| {
        let c0 = tc * TILE;
        let c1 = (c0 + TILE).min(cols);
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            let (mut r8, mut c8) = (r0, c0);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                (r8, c8) = (r1 - (r1 - r0) % 8, c1 - (c1 - c0) % 8);
                for r in (r0..r8).step_by(8) {
                    for c in (c0..c8).step_by(8) {
                        let at = (c - c0) * ld + col + r;
                        assert!(at + 7 * ld + 8 <= band.len() && (r + 7) * cols + c + 8 <= src.len());
                        // SAFETY: AVX2 is present; the assert keeps the 8 rows read and the 8
                        // rows written inside the slices.
                        unsafe { block8_avx2(band.as_mut_ptr().add(at), ld, src.as_ptr().add(r * cols + c), cols) };
                    }
                }
            }
            // What the 8 x 8 blocks left: the right part of the tile, then its bottom rows.
            let scalar = |band: &mut [f32], rs: std::ops::Range<usize>, cs: std::ops::Range<usize>| {
                for c in cs {
                    for r in rs.clone() {
                        band[(c - c0) * ld + col + r] = src[r * cols + c];
                    }
                }
            };
            scalar(band, r0..r1, c8..c1);
            scalar(band, r8..r1, c0..c8);
        }
    });
}

/// An 8 x 8 block: rows `src + i * cols` (8 floats each) become rows `dst + j * ld`.
/// SAFETY: the CPU has AVX2; the 8 rows at each pointer lie inside their allocations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block8_avx2(dst: *mut f32, ld: usize, src: *const f32, cols: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * cols)));
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
    });
    // u[4h + j]: column j (lower halves) and column j + 4 (upper halves) of rows 4h..4h + 4.
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (h, q, s) = (i / 4, (i / 2) % 2, i % 2);
        let (a, b) = (t[4 * h + q], t[4 * h + q + 2]);
        if s == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xEE>(a, b) }
    });
    for j in 0..8 {
        let (a, b) = (u[j % 4], u[4 + j % 4]);
        let v = if j < 4 { _mm256_permute2f128_ps::<0x20>(a, b) } else { _mm256_permute2f128_ps::<0x31>(a, b) };
        _mm256_storeu_ps(dst.add(j * ld), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However a short product's columns are split, by threads or into blocks, every element
    /// gets the bits of the whole product: widths around the splits' edges, inner dimensions
    /// over 512 (where gemm's order of summation depends on the shape), 1 to 8 threads.
    #[test]
    fn column_splits_do_not_change_a_product() {
        let (m, k) = (60, 576);
        let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0;
        let a: Vec<f32> = (0..m * k).map(val).collect();
        for n in [65, 130, 143, 160, 300] {
            let b: Vec<f32> = (0..k * n).map(|i| val(i + 17)).collect();
            let bits = |threads: usize, block: Option<usize>| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut c = vec![0f32; m * n];
                pool.install(|| match block {
                    None => matmul(&mut c, n, &a, k, &b, m, k, n, false, false),
                    Some(bl) => matmul_blocks(&mut c, n, &a, k, m, k, n, false, bl, |j0, j1, buf| {
                        for (r, row) in buf.chunks_exact_mut(j1 - j0).enumerate() {
                            row.copy_from_slice(&b[r * n + j0..r * n + j1]);
                        }
                    }),
                });
                c.into_iter().map(f32::to_bits).collect::<Vec<_>>()
            };
            let whole = bits(1, None);
            for threads in [2, 3, 8] {
                assert!(bits(threads, None) == whole, "n {n}, {threads} threads");
            }
            for block in [65, 80, 128] {
                assert!(bits(2, Some(block)) == whole, "n {n}, blocks of {block}");
            }
        }
    }

    /// Every element lands at its transposed place, inside a column block of a wider buffer, for
    /// shapes that leave part tiles on both sides; what lies outside the block is untouched.
    #[test]
    fn transpose_into_moves_every_element() {
        for (rows, cols, col, ld) in [(1, 1, 0, 1), (33, 70, 5, 40), (64, 32, 0, 64), (7, 100, 3, 12)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            // One row longer than the block: what lies past it stays untouched too.
            let mut dst = vec![-1f32; (cols + 1) * ld];
            transpose_into(&mut dst, ld, col, &src, rows, cols);
            for c in 0..=cols {
                for j in 0..ld {
                    let want = if c < cols && (col..col + rows).contains(&j) { src[(j - col) * cols + c] } else { -1.0 };
                    assert_eq!(dst[c * ld + j], want, "{rows}x{cols} at {col}: ({c}, {j})");
                }
            }
        }
    }
}
