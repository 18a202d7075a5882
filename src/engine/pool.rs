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

/// Greedy below [`GREEDY_SHARE`] of the limit, fair above it (module docs). Clones share one
/// pool.
#[derive(Debug, Clone)]
pub struct BalancedPool {
    limit: usize,
    greedy_until: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Registered consumers that can spill.
    spillers: usize,
    spillable: usize,
    unspillable: usize,
    /// The most reserved since the last [`BalancedPool::take_peak`].
    peak: usize,
}

impl State {
    fn used(&self) -> usize {
        self.spillable + self.unspillable
    }

    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.used());
    }
}

impl BalancedPool {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            greedy_until: (limit as f64 * GREEDY_SHARE) as usize,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The counters stay consistent under a panic elsewhere: every update is one statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most memory reserved since the last call (or since the pool was made), and starts a
    /// new measurement at what is reserved now.
    pub fn take_peak(&self) -> usize {
        let mut state = self.lock();
        let peak = state.peak.max(state.used());
        state.peak = state.used();
        peak
    }

    /// What a spilling operator may hold when the pool is past its greedy share.
    fn fair_share(&self, state: &State) -> usize {
        self.limit.saturating_sub(state.unspillable) / state.spillers.max(1)
    }

    fn refuse(&self, r: &MemoryReservation, additional: usize, state: &State) -> DataFusionError {
        DataFusionError::ResourcesExhausted(format!(
            "Failed to allocate additional {additional} bytes for {} with {} bytes already \
             allocated for this reservation - {} bytes remain available for the total pool \
             ({self})",
            r.consumer().name(),
            r.size(),
            self.limit.saturating_sub(state.used()),
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
        if r.consumer().can_spill() {
            state.spillable += additional;
        } else {
            state.unspillable += additional;
        }
        state.note_peak();
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
        let after = state.used().saturating_add(additional);
        if r.consumer().can_spill() {
            let within_share = r.size().saturating_add(additional) <= self.fair_share(&state);
            // Within its share an operator always gets memory, as under DataFusion's fair pool
            // (which does not check the total either): the partitions above their shares are
            // refused at their next allocation and spill, so the total comes back under the limit.
            if !(after <= self.greedy_until || within_share) {
                return Err(self.refuse(r, additional, &state));
            }
            state.spillable += additional;
        } else {
            if after > self.limit {
                return Err(self.refuse(r, additional, &state));
            }
            state.unspillable += additional;
        }
        state.note_peak();
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
            "balanced(pool_size: {} MiB, greedy up to {} MiB)",
            self.limit >> 20,
            self.greedy_until >> 20
        )
    }
}

/// The engine's balanced pool, as a session config extension: lets a run read the pool's peak
/// behind the tracking wrapper that DataFusion sees.
#[derive(Debug)]
pub struct PoolPeak(pub BalancedPool);

/// The peak of `ctx`'s engine pool since the last call (see [`BalancedPool::take_peak`]);
/// `None` when the engine has no limit or another pool kind.
pub fn take_peak(ctx: &datafusion::prelude::SessionContext) -> Option<usize> {
    ctx.state()
        .config()
        .get_extension::<PoolPeak>()
        .map(|p| p.0.take_peak())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(limit: usize) -> Arc<dyn MemoryPool> {
        Arc::new(BalancedPool::new(limit))
    }

    #[test]
    fn grows_greedily_then_caps_spillers_at_their_share() {
        let pool = pool(1000);
        let a = MemoryConsumer::new("a")
            .with_can_spill(true)
            .register(&pool);
        let b = MemoryConsumer::new("b")
            .with_can_spill(true)
            .register(&pool);
        let c = MemoryConsumer::new("c")
            .with_can_spill(true)
            .register(&pool);
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
        let sort = MemoryConsumer::new("sort")
            .with_can_spill(true)
            .register(&pool);
        join.try_grow(600).unwrap();
        assert!(join.try_grow(401).is_err());
        // Past the greedy line the spiller's share is what the join left: 400.
        sort.try_grow(150).unwrap();
        sort.try_grow(250).unwrap();
        let err = sort.try_grow(1).unwrap_err().to_string();
        assert!(err.contains("sort") && err.contains("balanced"), "{err}");
    }

    #[test]
    fn keeps_its_high_water_mark() {
        let p = BalancedPool::new(1000);
        let dynp: Arc<dyn MemoryPool> = Arc::new(p.clone());
        let r = MemoryConsumer::new("r").register(&dynp);
        r.try_grow(400).unwrap();
        r.shrink(300);
        assert_eq!(p.take_peak(), 400);
        // A new measurement starts at what is held now.
        assert_eq!(p.take_peak(), 100);
        drop(r);
        assert_eq!(p.take_peak(), 100);
        assert_eq!(p.take_peak(), 0);
    }
}
