//! The process's live heap, counted by the global allocator: what the memory pool cannot see.
//!
//! DataFusion's pool counts what operators reserve (hash tables, sort buffers, held step
//! results, the model steps' buffers), but a process also holds memory nobody reserves: the
//! Parquet readers' decoded pages and the batches in flight between operators, per partition,
//! the writers' encoders, Arrow arrays a query builds before it hands them over. At 96M order
//! rows that was a gigabyte beside a 2 GiB pool. [`Counting`] wraps the allocator the binary
//! uses and keeps the bytes currently allocated; the pool (`super::pool`) takes what it holds
//! beyond its reservations as held by one more consumer that cannot spill, so
//! `engine.memory_limit` bounds the process, not only the pool.
//!
//! The count is exact (every allocation and free, in the calling thread, no sampling), and
//! cheap: each thread adds to one of [`SHARDS`] counters on its own cache line, so two cores
//! do not fight over one. It is the bytes asked for: the allocator's own overhead (a few
//! percent with mimalloc) and the program's code are resident memory on top.
//!
//! Where the binary does not install [`Counting`] (the library's unit tests), [`live`] is
//! `None` and the pool counts its reservations only.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// Counters, one cache line each; a thread always adds to the same one.
const SHARDS: usize = 16;

#[repr(align(64))]
struct Shard(AtomicIsize);

static COUNTS: [Shard; SHARDS] = [const { Shard(AtomicIsize::new(0)) }; SHARDS];

/// Set when the binary installs [`Counting`] (the counters count from the first allocation
/// either way: this only says whether they count everything).
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // Const-initialised without a destructor: reading its address allocates nothing and
    // registers nothing, so the allocator may use it.
    static TAG: u8 = const { 0 };
}

#[inline]
fn shard() -> &'static AtomicIsize {
    let addr = TAG.with(|t| t as *const u8 as usize);
    // Threads' TLS blocks are far apart; the multiplicative hash spreads their high bits.
    let i = ((addr >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) % SHARDS;
    &COUNTS[i].0
}

#[inline]
fn add(bytes: isize) {
    shard().fetch_add(bytes, Ordering::Relaxed);
}

/// A global allocator that counts the bytes allocated through it (see the module docs).
pub struct Counting<A>(pub A);

// SAFETY: every call is forwarded to the wrapped allocator unchanged; the counters are
// atomics and allocate nothing.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

impl<A> Counting<A> {
    /// Marks the counter as the process's global allocator (the binary calls it first thing
    /// in `main`), so that [`live`] answers.
    pub fn install(&self) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Bytes allocated now by the whole process; `None` where the binary did not install
/// [`Counting`] as its global allocator.
pub fn live() -> Option<usize> {
    if !INSTALLED.load(Ordering::Relaxed) {
        return None;
    }
    let total: isize = COUNTS.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    Some(total.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_is_allocated_and_freed() {
        // The test binary's allocator is the system one, not `Counting`: count through a
        // local instance.
        let a = Counting(std::alloc::System);
        let before: isize = COUNTS.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        let layout = Layout::from_size_align(1 << 20, 8).unwrap();
        // SAFETY: a valid layout; the block is freed with the same layout below.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: p came from a.alloc with `layout`.
        let p = unsafe { a.realloc(p, layout, 3 << 20) };
        assert!(!p.is_null());
        let during: isize = COUNTS.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        // SAFETY: p is the realloc'ed block of 3 MiB.
        unsafe { a.dealloc(p, Layout::from_size_align(3 << 20, 8).unwrap()) };
        let after: isize = COUNTS.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        // Other tests run beside this one but allocate through the system allocator, not
        // through `a`: only this test moves the counters.
        assert_eq!(during - before, 3 << 20);
        assert_eq!(after, before);
    }
}
