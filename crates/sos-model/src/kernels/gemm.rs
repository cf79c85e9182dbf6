//! Matrix products on plain f32 buffers, sent straight to the `gemm` crate: one single-threaded
//! call (`gemm_raw`) behind two entry points, `gemm_st` for the small per-head products of the
//! attention and `matmul`, which splits a weight product's columns over the pool.

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
    // Column blocks of 16 (one AVX-512 register), as even as that allows.
    let blocks = n.div_ceil(16);
    let parts = rayon::current_num_threads()
        .min(blocks)
        .min((m * n * k / (1 << 18)).max(1));
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
