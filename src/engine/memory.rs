//! Memory: what the process holds, what it gives back, and what runs may take.
//!
//! - Figures for run logs and benchmarks: resident set size (RSS) now, its peak since the last
//!   reset (per step), and its peak over the whole process, from Linux's `/proc/self`.
//!   Elsewhere (or if /proc is unreadable) every figure is `None` and nothing else changes.
//! - [`release`] returns freed memory to the OS between steps; [`watch_pressure`] has the
//!   allocator return it at once while the process is near `engine.memory_limit`;
//!   [`set_huge_pages`] switches transparent huge pages for the process.
//! - [`reserve`]: a model step's large buffers, taken from the same memory pool as DataFusion's
//!   operators (one pool per process, shared by every run: see `crate::engine`), so that
//!   `engine.memory_limit` counts them too.
//!
//! Resetting the kernel's peak (to measure one step) also resets what `getrusage` and
//! `/usr/bin/time` report for the process, so every reset first folds the peak so far into
//! [`max_rss`]: that is the process's true peak. Benchmarks also sample RSS from outside.
//!
//! Also the real in-memory size of step results: batches that DataFusion emits are often slices
//! of one large buffer, and Arrow's `get_array_memory_size` counts a shared buffer once per
//! slice; [`batches_bytes`] counts each buffer once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{Array, ArrayData, RecordBatch};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::prelude::SessionContext;

fn status_value(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns memory the allocator holds free to the operating system (mimalloc's `mi_collect`
/// with force: the calling thread's free pages, and purges of free memory program-wide). Called
/// between steps, when a step's working memory (hash tables, sort buffers) has just been freed:
/// otherwise it stays resident until reused, and the next step's allocations, of other sizes,
/// reuse only part of it while adding their own.
pub fn release() {
    // SAFETY: mi_collect has no preconditions; it only frees memory nothing refers to.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Resident memory now, in bytes, from `/proc/self/statm` (cheaper to read than `status`: the
/// pressure watch reads it every 10 ms).
pub fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    #[cfg(target_os = "linux")]
    // SAFETY: sysconf reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    #[cfg(not(target_os = "linux"))]
    let page = 4096;
    Some(pages * page)
}

/// The watch's decision for a reading: `Some(true)` turns eager purging on, `Some(false)` off,
/// `None` leaves it as it is (between the two lines nothing changes: no flapping).
fn pressure_turn(tight: bool, resident: u64, on: u64, off: u64) -> Option<bool> {
    match tight {
        false if resident > on => Some(true),
        true if resident < off => Some(false),
        _ => None,
    }
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc 3's `mimalloc.h`;
/// libmimalloc-sys has no constant for it): how long freed memory is kept before it is given
/// back to the OS, in ms (1000 by default in mimalloc 3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Resident memory above this share of `engine.memory_limit` turns eager purging on ...
const PRESSURE_ON: f64 = 0.8;
/// ... and below this share, off again.
const PRESSURE_OFF: f64 = 0.6;

/// Watches the process's resident memory against `limit` (once per process, on a thread of
/// its own, every 10 ms) and, while it is above [`PRESSURE_ON`] of it, has the allocator give
/// freed memory back to the OS at once instead of after its purge delay.
///
/// Why: mimalloc keeps freed pages for reuse (a second by default), which is fast while memory
/// is plentiful, but at 96M order rows the spilling steps churn through so much memory that
/// the kept pages came to 0.7-1.1 GiB on top of a heap the pool held under a 2 GiB limit
/// (`mi_collect` from another thread gives little of it back). Purging at once costs page
/// faults when the memory is used again: measured on the first seven steps of the shipped
/// job at 96M order rows, peak RSS 2672 -> 2402 MiB and 213 -> 279 s. So it is only on while
/// the process is near its limit: at the benchmark size (10M order rows) with the shipped
/// config it does not turn on.
pub fn watch_pressure(limit: u64) {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| {
        // SAFETY: reading an option has no preconditions.
        let relaxed = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        let (on, off) = (
            (limit as f64 * PRESSURE_ON) as u64,
            (limit as f64 * PRESSURE_OFF) as u64,
        );
        let spawned = std::thread::Builder::new()
            .name("clvflow-memory".into())
            .spawn(move || {
                let mut tight = false;
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    let Some(resident) = rss() else {
                        return;
                    };
                    match pressure_turn(tight, resident, on, off) {
                        Some(true) => {
                            // SAFETY: options are plain values the allocator reads at its next
                            // purge decision; setting one at run time is what the API is for.
                            unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
                            release();
                            tracing::debug!(resident_mb = resident >> 20, limit_mb = limit >> 20,
                                            "memory pressure: freed memory goes back to the OS at once");
                        }
                        Some(false) => {
                            // SAFETY: as above.
                            unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, relaxed) };
                            tracing::debug!(resident_mb = resident >> 20, "memory pressure over");
                        }
                        None => continue,
                    }
                    tight = !tight;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory watch: freed memory is kept as the allocator likes");
        }
    });
}

/// Allows or forbids transparent huge pages for the whole process (Linux `prctl`
/// `PR_SET_THP_DISABLE`; it applies to memory mapped before the call too, the next time a page
/// is first touched). mimalloc asks for huge pages for its arenas; forbidding them means each
/// fresh 4 KiB page is cleared when first touched instead of 2 MiB at once. Returns whether the
/// kernel took the setting (`false` elsewhere than Linux, or on kernels without it).
pub fn set_huge_pages(on: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes one integer flag and touches no memory of ours.
        let disable = libc::c_ulong::from(!on);
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disable, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = on;
        false
    }
}

/// Peak resident memory since the process started or since [`reset_peak`], in bytes.
pub fn peak_rss() -> Option<u64> {
    status_value("VmHWM:").map(|k| k * 1024)
}

/// The highest peak seen before the last reset.
static FOLDED: AtomicU64 = AtomicU64::new(0);

/// Starts a new peak measurement (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), after
/// folding the peak so far into [`max_rss`]. Returns whether it could.
pub fn reset_peak() -> bool {
    if let Some(p) = peak_rss() {
        FOLDED.fetch_max(p, Ordering::Relaxed);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory of the whole process so far, in bytes, resets notwithstanding.
pub fn max_rss() -> Option<u64> {
    peak_rss().map(|p| p.max(FOLDED.load(Ordering::Relaxed)))
}

/// Takes `bytes` from the session's memory pool for `what` (e.g. "clv step `clv`: model
/// buffers"), held until the reservation is dropped. Fails with DataFusion's "resources
/// exhausted" error, which names the pool's largest consumers, when the pool is full.
pub fn reserve(
    ctx: &SessionContext,
    what: String,
    bytes: usize,
) -> datafusion::error::Result<MemoryReservation> {
    let pool = &ctx.runtime_env().memory_pool;
    let reservation = MemoryConsumer::new(what).register(pool);
    reservation.try_grow(bytes)?;
    Ok(reservation)
}

fn add_buffers(data: &ArrayData, seen: &mut HashSet<usize>, total: &mut u64) {
    for buffer in data.buffers() {
        if seen.insert(buffer.data_ptr().as_ptr() as usize) {
            *total += buffer.capacity() as u64;
        }
    }
    if let Some(nulls) = data.nulls() {
        let b = nulls.buffer();
        if seen.insert(b.data_ptr().as_ptr() as usize) {
            *total += b.capacity() as u64;
        }
    }
    for child in data.child_data() {
        add_buffers(child, seen, total);
    }
}

/// Memory held by `batches`, each underlying buffer counted once.
pub fn batches_bytes<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> u64 {
    let mut counter = BufferCounter::default();
    for batch in batches {
        counter.add(batch);
    }
    counter.total
}

/// [`batches_bytes`] as batches arrive: [`BufferCounter::add`] returns what a batch adds to the
/// batches before it (0 for a slice of a buffer already counted).
#[derive(Default)]
pub struct BufferCounter {
    seen: HashSet<usize>,
    total: u64,
}

impl BufferCounter {
    pub fn add(&mut self, batch: &RecordBatch) -> u64 {
        let before = self.total;
        for column in batch.columns() {
            add_buffers(&column.to_data(), &mut self.seen, &mut self.total);
        }
        self.total - before
    }
}

/// Runs `df` and collects its partitions, counting the batches against the session's memory
/// pool as they arrive (as `what`): a result larger than the pool fails when the pool is full,
/// not after all of it is held. The count is given back when this returns; the caller counts
/// what it keeps.
pub async fn collect_counted(
    ctx: &SessionContext,
    what: &str,
    df: datafusion::prelude::DataFrame,
) -> datafusion::error::Result<Vec<Vec<RecordBatch>>> {
    use datafusion::error::DataFusionError;
    use futures::StreamExt;
    let pool = &ctx.runtime_env().memory_pool;
    let streams = df.execute_stream_partitioned().await?;
    // One task per partition, as DataFusion's own collect: each partition's last operators
    // run in the task that polls it. The first error ends the others (the set aborts them).
    let mut tasks = tokio::task::JoinSet::new();
    let n = streams.len();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let reservation = MemoryConsumer::new(what.to_string()).register(pool);
        tasks.spawn(async move {
            let (mut counter, mut batches) = (BufferCounter::default(), Vec::new());
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                reservation.try_grow(counter.add(&batch) as usize)?;
                batches.push(batch);
            }
            Ok::<_, DataFusionError>((i, batches, reservation))
        });
    }
    // A finished partition's count is held until every partition is in.
    let (mut parts, mut held) = (vec![Vec::new(); n], Vec::with_capacity(n));
    while let Some(done) = tasks.join_next().await {
        let (i, batches, reservation) =
            done.map_err(|e| DataFusionError::External(Box::new(e)))??;
        parts[i] = batches;
        held.push(reservation);
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use std::sync::Arc;

    /// Whether transparent huge pages are allowed for this process (`THP_enabled` in
    /// /proc/self/status; `None` where the kernel does not report it).
    #[cfg(target_os = "linux")]
    fn huge_pages() -> Option<bool> {
        status_value("THP_enabled:").map(|v| v != 0)
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn huge_pages_are_turned_off_and_on_for_the_process() {
        // Kernels before 5.0 do not report the flag; every kernel we run on does.
        if huge_pages().is_none() {
            eprintln!("skipped: /proc/self/status has no THP_enabled");
            return;
        }
        assert!(set_huge_pages(false));
        assert_eq!(huge_pages(), Some(false));
        assert!(set_huge_pages(true));
        assert_eq!(huge_pages(), Some(true));
    }

    #[test]
    fn slices_of_one_buffer_count_once() {
        let a = Int64Array::from_iter_values(0..100_000);
        let batch = RecordBatch::try_from_iter([("v", Arc::new(a) as _)]).unwrap();
        let slices: Vec<RecordBatch> = (0..10).map(|i| batch.slice(i * 10_000, 10_000)).collect();
        let naive: usize = slices.iter().map(|b| b.get_array_memory_size()).sum();
        assert_eq!(batches_bytes(&slices), 800_000);
        assert!(naive >= 10 * 800_000, "{naive}");
    }

    /// A session whose pool holds `limit` bytes, with a table `t` of 100,000 integers (800 KB)
    /// in 4 partitions.
    fn session_with(limit: usize) -> SessionContext {
        use datafusion::execution::memory_pool::GreedyMemoryPool;
        use datafusion::execution::runtime_env::RuntimeEnvBuilder;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(limit)))
            .build_arc()
            .unwrap();
        let ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
        let part = |k: i64| {
            let a = Int64Array::from_iter_values((0..25_000).map(|i| i * 4 + k));
            vec![RecordBatch::try_from_iter([("v", Arc::new(a) as _)]).unwrap()]
        };
        let parts: Vec<_> = (0..4).map(part).collect();
        let table = datafusion::datasource::MemTable::try_new(parts[0][0].schema(), parts).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    #[tokio::test]
    async fn a_collected_result_is_counted_as_it_arrives() {
        // Fits: every row back, and nothing left reserved.
        let ctx = session_with(16 << 20);
        let df = ctx.sql("SELECT v * 2 AS w FROM t").await.unwrap();
        let parts = collect_counted(&ctx, "step `s`: its result", df)
            .await
            .unwrap();
        let rows: usize = parts.iter().flatten().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 100_000);
        assert_eq!(ctx.runtime_env().memory_pool.reserved(), 0);
        // 800 KB of results in a 256 KB pool: fails naming what, and gives everything back.
        let ctx = session_with(256 << 10);
        let df = ctx.sql("SELECT v * 2 AS w FROM t").await.unwrap();
        let err = collect_counted(&ctx, "step `s`: its result", df)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Resources exhausted") && err.contains("step `s`: its result"),
            "{err}"
        );
        assert_eq!(ctx.runtime_env().memory_pool.reserved(), 0);
    }

    #[test]
    fn the_pressure_watch_turns_on_above_one_line_and_off_below_the_other() {
        let (on, off) = (800, 600);
        assert_eq!(pressure_turn(false, 801, on, off), Some(true));
        assert_eq!(pressure_turn(false, 800, on, off), None);
        // Between the lines nothing changes, either way.
        assert_eq!(pressure_turn(true, 700, on, off), None);
        assert_eq!(pressure_turn(false, 700, on, off), None);
        assert_eq!(pressure_turn(true, 599, on, off), Some(false));
    }

    #[test]
    fn the_purge_delay_option_is_the_one_mimalloc_documents() {
        // mimalloc 3's default purge delay is 1000 ms; another option at that index would
        // read differently (unless the environment sets it).
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reading an option has no preconditions.
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 1000);
        }
    }

    #[test]
    fn peak_is_measured_where_proc_exists() {
        if rss().is_none() {
            return; // not Linux
        }
        assert!(reset_peak());
        let before = peak_rss().unwrap();
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let high = peak_rss().unwrap();
        assert!(high >= before + (60 << 20));
        drop(big);
        // A new measurement starts low; the process maximum keeps the earlier peak.
        // (The kernel updates its high-water mark lazily: it may read a little lower later.)
        assert!(reset_peak());
        assert!(
            max_rss().unwrap() + (4 << 20) >= high,
            "{high} {:?}",
            max_rss()
        );
        assert!(
            peak_rss().unwrap() + (32 << 20) < high,
            "the new measurement starts low"
        );
    }
}
