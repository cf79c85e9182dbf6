//! The threads of one decode step, ggml's way: every member runs the whole step, takes its share
//! of each piece of work, and meets the others at a spinning barrier before it reads their
//! shares. `model/decode/` uses it; this file holds only the synchronisation and its contracts.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A wait this long at a barrier means a member was descheduled (a phase lasts microseconds):
/// the machine's cores are busy with other work.
const SLOW_WAIT: Duration = Duration::from_millis(1);

/// The barrier of one crew. Members spin (a phase lasts microseconds), then yield. A member that
/// fails poisons it, so that the others return instead of waiting for it forever.
pub(crate) struct Barrier {
    size: usize,
    arrived: AtomicUsize,
    phase: AtomicUsize,
    poisoned: AtomicBool,
    /// Some wait lasted `SLOW_WAIT` or more.
    slow: AtomicBool,
    /// The member that failed first, whose error the step reports.
    pub(crate) culprit: AtomicUsize,
}

impl Barrier {
    pub(crate) fn new(size: usize) -> Self {
        Barrier {
            size,
            arrived: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            culprit: AtomicUsize::new(usize::MAX),
        }
    }

    /// Whether a member waited `SLOW_WAIT` or more at some phase.
    pub(crate) fn was_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// Returns once every member has arrived. Everything a member wrote before arriving is
    /// visible to every member after: the arrivals are a release sequence on `arrived` that the
    /// last member acquires and publishes with its release of `phase`.
    pub(crate) fn wait(&self) -> Result<()> {
        let phase = self.phase.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.size {
            self.arrived.store(0, Ordering::Relaxed);
            self.phase.fetch_add(1, Ordering::Release);
        } else {
            let mut spins = 0u32;
            let mut since: Option<Instant> = None;
            while self.phase.load(Ordering::Acquire) == phase {
                if self.poisoned.load(Ordering::Acquire) {
                    return Err(Error::Invalid("decode: another thread of the step failed".into()));
                }
                if spins < 1 << 16 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    let t = *since.get_or_insert_with(Instant::now);
                    if t.elapsed() >= SLOW_WAIT {
                        self.slow.store(true, Ordering::Relaxed);
                    }
                    std::thread::yield_now();
                }
            }
        }
        Ok(())
    }

    pub(crate) fn poison(&self, member: usize) {
        let _ = self.culprit.compare_exchange(usize::MAX, member, Ordering::AcqRel, Ordering::Acquire);
        self.poisoned.store(true, Ordering::Release);
    }
}

/// Poisons the barrier when a member leaves its step early, by error or panic.
pub(crate) struct PoisonOnDrop<'a>(pub(crate) &'a Barrier, pub(crate) usize);

impl Drop for PoisonOnDrop<'_> {
    fn drop(&mut self) {
        self.0.poison(self.1);
    }
}

/// How the calling thread takes part in a step.
pub(crate) enum Team<'a> {
    /// Alone: each product fans out over the rayon pool.
    Solo,
    /// Member `index` of `size` threads that run the step in lockstep.
    Member { index: usize, size: usize, barrier: &'a Barrier },
}

impl Team<'_> {
    /// This thread's part of `0..n`, cut at multiples of `align`.
    pub(crate) fn share(&self, n: usize, align: usize) -> Range<usize> {
        match *self {
            Team::Solo => 0..n,
            Team::Member { index, size, .. } => {
                let cut = |i: usize| if i == size { n } else { n * i / size / align * align };
                cut(index)..cut(index + 1)
            }
        }
    }

    pub(crate) fn sync(&self) -> Result<()> {
        match self {
            Team::Solo => Ok(()),
            Team::Member { barrier, .. } => barrier.wait(),
        }
    }

    pub(crate) fn leads(&self) -> bool {
        matches!(self, Team::Solo | Team::Member { index: 0, .. })
    }
}

/// A buffer that the members write in disjoint parts and read whole after a barrier.
pub(crate) struct Shared<'a> {
    ptr: *mut f32,
    pub(crate) len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: all access goes through `part` and `whole`, whose contracts keep concurrent writes
// disjoint and put a barrier between a write and any other member's read.
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    pub(crate) fn new(buf: &'a mut [f32]) -> Self {
        Shared { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: PhantomData }
    }

    /// SAFETY: until the next barrier, no other member reads or writes any of `r`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part(&self, r: Range<usize>) -> &mut [f32] {
        assert!(r.start <= r.end && r.end <= self.len, "shared buffer: {r:?} out of 0..{}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len())
    }

    /// SAFETY: until the next barrier, no member writes any of it.
    pub(crate) unsafe fn whole(&self) -> &[f32] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that fails releases the others: they return an error instead of waiting.
    #[test]
    fn poisoned_barrier_releases_the_waiting_members() {
        let barrier = Barrier::new(3);
        std::thread::scope(|s| {
            let waiters: Vec<_> = (0..2).map(|_| s.spawn(|| barrier.wait())).collect();
            drop(PoisonOnDrop(&barrier, 2));
            for w in waiters {
                assert!(w.join().unwrap().is_err());
            }
        });
        assert_eq!(barrier.culprit.load(Ordering::Acquire), 2);
        // A healthy barrier lets all members through, phase after phase.
        let barrier = Barrier::new(3);
        let done = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..100 {
                        barrier.wait().unwrap();
                    }
                    done.fetch_add(1, Ordering::AcqRel);
                });
            }
        });
        assert_eq!(done.load(Ordering::Acquire), 3);
    }
}
