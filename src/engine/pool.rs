//! The default memory pool: greedy while there is room, fair when memory runs short.
//!
//! DataFusion 55 has two pools, and each fails one of our two sizes of data:
//! - greedy (first come, first served) is fastest while everything fits, but when it is full a
//!   spilling operator that must grow a little to finish (a final aggregation merging its spill
//!   files, or emitting its groups) finds every byte taken by its 63 sibling partitions, which
//!   only give memory back when they themselves try to grow: at 96M order rows `orders_clean`
//!   failed after 38 s;
//! - fair gives each spilling operator `(limit - unspillable) / n` from the start: at 3.3M
//!   customers the 64 partitions of an aggregation get 1/64 of the limit each and spill data
//!   that greedy holds in memory (the job took 26 s instead of 17 s).
//!
//! [`BalancedPool`] does both: a spilling operator may grow as it likes while the pool is below
//! [`GREEDY_SHARE`] of its limit; above that line it may only grow up to its fair share, so the
//! partitions that took more spill at their next allocation and give the memory back, and every
//! partition can always reach its share (as under the fair pool). Operators that cannot spill
//! (hash join build sides, collected results) are served first come, first served up to the
//! limit, as in both DataFusion pools.
//!
//! The limit is the process's, not only the reservations': memory the process holds beyond what
//! is reserved (scan and decode buffers per partition, batches in flight, writers' encoders:
//! counted by the global allocator, `super::heap`) is taken as held by one more consumer that
//! cannot spill. So every spilling operator's share shrinks by it, the greedy line is reached
//! that much earlier, and an operator that cannot spill is refused when the process, not only
//! the pool, would pass the limit: a run either fits `engine.memory_limit` or fails with its
//! clear error, instead of growing past it until the kernel kills it. Where the allocator does
//! not count (the library's tests), only reservations count.
//!
//! The pool also keeps its high-water mark ([`BalancedPool::take_peak`]), which the step log
//! reports next to the process's peak RSS.

use std::fmt;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use std::sync::{Arc, Mutex, MutexGuard};

/// Share of the limit below which spilling operators grow without a cap.
pub const GREEDY_SHARE: f64 = 0.75;

/// Share of the limit the engine's pool leaves to the allocator: the pages it holds beyond the
/// live heap (size classes rounded up, freed pages not given back yet, partly used pages). At
/// 96M order rows under 2 GiB these were 700–800 MiB while the heap was at the limit; with an
/// eighth left the run kept inside a 2.5 GiB memory cgroup (README "Benchmarks").
pub const ALLOCATOR_SHARE: usize = 8;

/// ... but at least this much (or a quarter of the limit, if less): the pages beyond the live
/// heap do not shrink with the limit. At 3.3M customers under 1 GiB they were 260–360 MiB in
/// `clv_discounted`, `rfm` and `clv` (heap at its cap, freed pages given back at once), so with
/// an eighth (128 MiB) left the run was OOM-killed in a cgroup of 1 GiB + 256 MiB in 3 of 5
/// tries.
pub const ALLOCATOR_FLOOR: usize = 256 << 20;

/// What the engine's pool leaves to the allocator of `limit`: an eighth, at least
/// [`ALLOCATOR_FLOOR`] or a quarter of `limit`, whichever is less.
pub fn allocator_share(limit: usize) -> usize {
    (limit / ALLOCATOR_SHARE).max(ALLOCATOR_FLOOR.min(limit / 4))
}

/// Greedy below [`GREEDY_SHARE`] of the limit, fair above it (module docs). Clones share one
/// pool.
#[derive(Debug, Clone)]
pub struct BalancedPool {
    /// `engine.memory_limit`: what the pool reports (messages, sizes derived from it).
    limit: usize,
    /// What reservations and the live heap may take together: the limit, less the
    /// allocator's share for the engine's pool.
    heap_limit: usize,
    greedy_until: usize,
    state: Arc<Mutex<State>>,
    heap: Heap,
}

/// Where the pool learns the process's live heap bytes (`None`: not counted).
#[derive(Clone)]
pub struct Heap(Arc<dyn Fn() -> Option<usize> + Send + Sync>);

impl fmt::Debug for Heap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Heap({:?})", (self.0)())
    }
}

#[derive(Debug, Default)]
struct State {
    /// Registered consumers that can spill.
    spillers: usize,
    spillable: usize,
    unspillable: usize,
    /// The most reserved since the last [`BalancedPool::take_peak`].
    peak: usize,
    /// The most the process held (reservations and the memory outside them) at a request for
    /// memory since the last [`BalancedPool::take_peak`].
    process_peak: usize,
}

impl State {
    fn used(&self) -> usize {
        self.spillable + self.unspillable
    }

    fn note_peak(&mut self, outside: usize) {
        self.peak = self.peak.max(self.used());
        self.process_peak = self.process_peak.max(self.used().saturating_add(outside));
    }
}

impl BalancedPool {
    /// A pool of `limit` bytes for the process, counting its live heap ([`super::heap::live`])
    /// and leaving [`allocator_share`] of it to the allocator's pages beyond that heap.
    pub fn new(limit: usize) -> Self {
        let heap = Heap(Arc::new(super::heap::live));
        Self::with_limits(limit, limit - allocator_share(limit), heap)
    }

    /// A pool that learns the live heap from `heap` (tests give their own figures), all of
    /// `limit` for the heap.
    pub fn with_heap(limit: usize, heap: Heap) -> Self {
        Self::with_limits(limit, limit, heap)
    }

    fn with_limits(limit: usize, heap_limit: usize, heap: Heap) -> Self {
        Self {
            limit,
            heap_limit,
            greedy_until: (heap_limit as f64 * GREEDY_SHARE) as usize,
            state: Arc::new(Mutex::new(State::default())),
            heap,
        }
    }

    /// What the process holds beyond the reservations (0 when the heap is not counted, or
    /// when reservations are ahead of their allocations).
    fn outside(&self, state: &State) -> usize {
        (self.heap.0)().map_or(0, |live| live.saturating_sub(state.used()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The counters stay consistent under a panic elsewhere: every update is one statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most memory reserved since the last call (or since the pool was made), and starts a
    /// new measurement at what is reserved now.
    pub fn take_peak(&self) -> Peak {
        let mut state = self.lock();
        let outside = self.outside(&state);
        let used = state.used();
        let peak = Peak {
            pool: state.peak.max(used),
            process: state.process_peak.max(used.saturating_add(outside)),
        };
        state.peak = used;
        state.process_peak = used.saturating_add(outside);
        peak
    }

    /// What a spilling operator may hold when the pool is past its greedy share: the limit,
    /// less what cannot spill (reservations and the memory outside the pool), divided evenly.
    fn fair_share(&self, state: &State, outside: usize) -> usize {
        self.heap_limit
            .saturating_sub(state.unspillable.saturating_add(outside))
            / state.spillers.max(1)
    }

    fn refuse(
        &self,
        r: &MemoryReservation,
        additional: usize,
        state: &State,
        outside: usize,
    ) -> DataFusionError {
        DataFusionError::ResourcesExhausted(format!(
            "Failed to allocate additional {additional} bytes for {} with {} bytes already \
             allocated for this reservation - {} bytes remain available for the total pool \
             ({self}; the process holds {} MiB more outside it: scan, decode and write buffers, \
             data in flight)",
            r.consumer().name(),
            r.size(),
            self.heap_limit
                .saturating_sub(state.used().saturating_add(outside)),
            outside >> 20,
        ))
    }
}

impl MemoryPool for BalancedPool {
    fn name(&self) -> &str {
        "balanced"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            self.lock().spillers += 1;
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            let mut state = self.lock();
            state.spillers = state.spillers.saturating_sub(1);
        }
    }

    fn grow(&self, r: &MemoryReservation, additional: usize) {
        let mut state = self.lock();
        let outside = self.outside(&state);
        if r.consumer().can_spill() {
            state.spillable += additional;
        } else {
            state.unspillable += additional;
        }
        state.note_peak(outside);
    }

    fn shrink(&self, r: &MemoryReservation, shrink: usize) {
        let mut state = self.lock();
        if r.consumer().can_spill() {
            state.spillable = state.spillable.saturating_sub(shrink);
        } else {
            state.unspillable = state.unspillable.saturating_sub(shrink);
        }
    }

    fn try_grow(&self, r: &MemoryReservation, additional: usize) -> Result<()> {
        let mut state = self.lock();
        let outside = self.outside(&state);
        // What the process would hold: the reservations and what it holds beyond them.
        let after = state
            .used()
            .saturating_add(outside)
            .saturating_add(additional);
        if r.consumer().can_spill() {
            let within_share =
                r.size().saturating_add(additional) <= self.fair_share(&state, outside);
            // Within its share an operator always gets memory, as under DataFusion's fair pool
            // (which does not check the total either): the partitions above their shares are
            // refused at their next allocation and spill, so the total comes back under the limit.
            // An operator that holds nothing has nothing to spill: refused, it fails the query
            // (DataFusion's aggregation errors out), though the process has room. So it gets
            // memory while the process stays within the limit, whatever its share: with many
            // partitions and much held outside them the share can be smaller than one batch
            // (at 3.3M customers under 1 GiB, `cohort_daily`'s 64 aggregations failed in 2 of
            // 4 runs asking for 0.7 MB each with 201 MB left). Once it holds something, it is
            // held to its share and spills like the others.
            let first = r.size() == 0 && after <= self.heap_limit;
            if !(after <= self.greedy_until || within_share || first) {
                return Err(self.refuse(r, additional, &state, outside));
            }
            state.spillable += additional;
        } else {
            if after > self.heap_limit {
                return Err(self.refuse(r, additional, &state, outside));
            }
            state.unspillable += additional;
        }
        state.note_peak(outside);
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.lock().used()
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

impl fmt::Display for BalancedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "balanced(pool_size: {} MiB, heap and reservations up to {} MiB, greedy up to {} MiB)",
            self.limit >> 20,
            self.heap_limit >> 20,
            self.greedy_until >> 20
        )
    }
}

/// The engine's balanced pool, as a session config extension: lets a run read the pool's peak
/// behind the tracking wrapper that DataFusion sees.
#[derive(Debug)]
pub struct PoolPeak(pub BalancedPool);

/// High-water marks since the last [`BalancedPool::take_peak`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    /// Reserved.
    pub pool: usize,
    /// Held by the process (reserved, and the live heap beyond), as seen at requests for memory.
    pub process: usize,
}

/// The peak of `ctx`'s engine pool since the last call (see [`BalancedPool::take_peak`]);
/// `None` when the engine has no limit or another pool kind.
pub fn take_peak(ctx: &datafusion::prelude::SessionContext) -> Option<Peak> {
    ctx.state()
        .config()
        .get_extension::<PoolPeak>()
        .map(|p| p.0.take_peak())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A pool whose heap is not counted, all of `limit` for reservations.
    fn pool(limit: usize) -> Arc<dyn MemoryPool> {
        Arc::new(BalancedPool::with_heap(limit, Heap(Arc::new(|| None))))
    }

    /// A consumer that can spill (an aggregation's or a sort's partition).
    fn spiller(pool: &Arc<dyn MemoryPool>, name: &str) -> MemoryReservation {
        MemoryConsumer::new(name)
            .with_can_spill(true)
            .register(pool)
    }

    /// A heap figure the test sets as it goes.
    fn heap_counter() -> (Heap, Arc<AtomicUsize>) {
        let live = Arc::new(AtomicUsize::new(0));
        let seen = live.clone();
        (
            Heap(Arc::new(move || Some(seen.load(Ordering::Relaxed)))),
            live,
        )
    }

    #[test]
    fn grows_greedily_then_caps_spillers_at_their_share() {
        let pool = pool(1000);
        let a = spiller(&pool, "a");
        let b = spiller(&pool, "b");
        let c = spiller(&pool, "c");
        // Greedy up to 750: one partition may take far more than a third.
        a.try_grow(700).unwrap();
        a.try_grow(50).unwrap();
        // Past 750 it is held to 1000 / 3 = 333, so `a` must spill ...
        assert!(a.try_grow(1).is_err());
        // ... while the others still reach their shares (transiently above the limit, as fair).
        b.try_grow(300).unwrap();
        c.try_grow(333).unwrap();
        assert!(c.try_grow(1).is_err());
        // `a` spills and gives back; below the greedy line anyone grows again.
        a.shrink(750);
        assert_eq!(pool.reserved(), 633);
        b.try_grow(100).unwrap();
        assert_eq!(pool.reserved(), 733);
    }

    #[test]
    fn unspillable_consumers_are_first_come_first_served_and_shrink_the_shares() {
        let pool = pool(1000);
        let join = MemoryConsumer::new("join").register(&pool);
        let sort = spiller(&pool, "sort");
        join.try_grow(600).unwrap();
        assert!(join.try_grow(401).is_err());
        // Past the greedy line the spiller's share is what the join left: 400.
        sort.try_grow(150).unwrap();
        sort.try_grow(250).unwrap();
        let err = sort.try_grow(1).unwrap_err().to_string();
        assert!(err.contains("sort") && err.contains("balanced"), "{err}");
    }

    #[test]
    fn a_spiller_that_holds_nothing_gets_memory_while_the_process_fits() {
        let pool = pool(1000);
        let join = MemoryConsumer::new("join").register(&pool);
        let spillers: Vec<_> = (0..100).map(|i| spiller(&pool, &format!("s{i}"))).collect();
        // Past the greedy line the spillers' share is (1000 - 700) / 100 = 3.
        join.try_grow(700).unwrap();
        spillers[0].try_grow(60).unwrap();
        assert!(spillers[0].try_grow(1).is_err());
        // One that holds nothing cannot spill: it gets a batch's worth above its share ...
        spillers[1].try_grow(20).unwrap();
        // ... but once it holds something it is held to its share like the others.
        assert!(spillers[1].try_grow(1).is_err());
        // Not past the limit of the process, though.
        assert!(spillers[2].try_grow(221).is_err());
        spillers[2].try_grow(220).unwrap();
        assert_eq!(pool.reserved(), 1000);
    }

    /// A pool whose process holds `live` bytes of heap (set by the test as it goes).
    fn pool_with_heap(limit: usize) -> (Arc<dyn MemoryPool>, Arc<AtomicUsize>) {
        let (heap, live) = heap_counter();
        (Arc::new(BalancedPool::with_heap(limit, heap)), live)
    }

    #[test]
    fn memory_outside_the_reservations_counts_as_held_by_a_consumer_that_cannot_spill() {
        let (pool, live) = pool_with_heap(1000);
        let a = spiller(&pool, "a");
        let b = spiller(&pool, "b");
        // The process holds 300 unreserved (scan buffers): the greedy line (750) comes at 450
        // reserved, and past it each spiller's share is (1000 - 300) / 2 = 350.
        live.store(300, Ordering::Relaxed);
        a.try_grow(400).unwrap();
        live.store(700, Ordering::Relaxed);
        a.try_grow(50).unwrap();
        live.store(750, Ordering::Relaxed);
        let err = a.try_grow(1).unwrap_err().to_string();
        assert!(err.contains("outside it"), "{err}");
        b.try_grow(350).unwrap();
        live.store(1100, Ordering::Relaxed);
        assert!(b.try_grow(1).is_err());
        // What cannot spill is refused when the process would pass the limit, though the
        // reservations alone (800) leave room.
        let join = MemoryConsumer::new("join").register(&pool);
        assert!(join.try_grow(150).is_err());
        // Once the unreserved memory is gone, the same request fits.
        a.shrink(450);
        live.store(350, Ordering::Relaxed);
        join.try_grow(150).unwrap();
        assert_eq!(pool.reserved(), 500);
    }

    #[test]
    fn the_engines_pool_leaves_an_eighth_of_the_limit_to_the_allocator_at_least_256_mib() {
        const MIB: usize = 1 << 20;
        assert_eq!(allocator_share(8192 * MIB), 1024 * MIB);
        assert_eq!(allocator_share(2048 * MIB), 256 * MIB);
        assert_eq!(allocator_share(1024 * MIB), 256 * MIB);
        // Below 1 GiB a quarter: the floor never takes most of a small limit.
        assert_eq!(allocator_share(512 * MIB), 128 * MIB);
        assert_eq!(allocator_share(64 * MIB), 16 * MIB);

        let limit = 8192 * MIB;
        let pool: Arc<dyn MemoryPool> = Arc::new(BalancedPool::new(limit));
        // The limit it reports (messages, sizes derived from it) is the configured one.
        assert!(matches!(pool.memory_limit(), MemoryLimit::Finite(l) if l == limit));
        let join = MemoryConsumer::new("join").register(&pool);
        join.try_grow(7168 * MIB).unwrap();
        assert!(join.try_grow(1).is_err());
        // Spillers: greedy up to 3/4 of 7 GiB, then shares of 7 GiB.
        drop(join);
        let a = spiller(&pool, "a");
        a.try_grow(5376 * MIB).unwrap();
        a.try_grow(1792 * MIB).unwrap();
        assert!(a.try_grow(1).is_err());

        let pool: Arc<dyn MemoryPool> = Arc::new(BalancedPool::new(1024 * MIB));
        let join = MemoryConsumer::new("join").register(&pool);
        join.try_grow(768 * MIB).unwrap();
        assert!(join.try_grow(1).is_err());
    }

    #[test]
    fn reservations_ahead_of_their_allocations_leave_the_pool_as_it_was() {
        // Reserved but not yet allocated: the heap is below the reservations, nothing outside.
        let (pool, live) = pool_with_heap(1000);
        live.store(10, Ordering::Relaxed);
        let join = MemoryConsumer::new("join").register(&pool);
        join.try_grow(900).unwrap();
        join.try_grow(100).unwrap();
        assert!(join.try_grow(1).is_err());
    }

    #[test]
    fn keeps_its_high_water_marks() {
        let (heap, live) = heap_counter();
        let p = BalancedPool::with_heap(1000, heap);
        let dynp: Arc<dyn MemoryPool> = Arc::new(p.clone());
        let r = MemoryConsumer::new("r").register(&dynp);
        // 150 held outside the reservations when 400 are asked for: the process peaks at 550.
        live.store(150, Ordering::Relaxed);
        r.try_grow(400).unwrap();
        r.shrink(300);
        live.store(100, Ordering::Relaxed);
        assert_eq!(
            p.take_peak(),
            Peak {
                pool: 400,
                process: 550
            }
        );
        // A new measurement starts at what is held now.
        assert_eq!(
            p.take_peak(),
            Peak {
                pool: 100,
                process: 100
            }
        );
        drop(r);
        live.store(0, Ordering::Relaxed);
        assert_eq!(
            p.take_peak(),
            Peak {
                pool: 100,
                process: 100
            }
        );
        assert_eq!(
            p.take_peak(),
            Peak {
                pool: 0,
                process: 0
            }
        );
    }
}
