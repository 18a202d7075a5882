//! Where step results go that the memory limit does not let a run hold: scratch Parquet files
//! on local disk, and the share of the memory pool that results held in memory may take.
//!
//! One [`ResultSpace`] per engine (so per process), reachable from every session as a config
//! extension ([`ResultSpace::of`]):
//! - results held in memory may take at most `engine.result_memory` together (default: three
//!   quarters of `engine.memory_limit`; [`ResultSpace::may_hold`]); the rest stays for DataFusion's
//!   operators and the model steps' buffers. A result that would pass that line is written to scratch files instead
//!   (`crate::steps::spill`);
//! - scratch files live under `<spill_dir or the OS temp folder>/clvflow-scratch/<pid>-<n>/`,
//!   one folder per result, removed when the result is dropped (after its last reader) and the
//!   process's folder when the engine goes. A process that was killed cannot clean up: the next
//!   engine removes the folders of processes that no longer run (Linux: no `/proc/<pid>`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};

/// The memory step results may hold, and the scratch folder for those that do not fit.
#[derive(Debug)]
pub struct ResultSpace {
    /// Bytes results held in memory may take together; `None`: no limit.
    hold_limit: Option<usize>,
    /// Bytes of tables above which a `split_by` step runs split (`crate::steps::sql::split`).
    split_above: Option<usize>,
    held: AtomicUsize,
    root: PathBuf,
    next: AtomicU64,
}

impl ResultSpace {
    /// The space of an engine whose held results may take `hold_limit` bytes together
    /// (`None`: unlimited), with scratch folders under `base`. Removes what dead processes left
    /// there.
    pub fn new(hold_limit: Option<usize>, base: &Path) -> Self {
        let parent = base.join("clvflow-scratch");
        remove_stale(&parent);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self {
            hold_limit,
            split_above: None,
            held: AtomicUsize::new(0),
            root: parent.join(format!("{}-{nanos}", std::process::id())),
            next: AtomicU64::new(0),
        }
    }

    /// This space, with `split_by` steps split above `bytes` of tables (`None`: never).
    pub fn with_split_above(mut self, bytes: Option<usize>) -> Self {
        self.split_above = bytes;
        self
    }

    /// Bytes of tables above which a `split_by` step runs split; `None`: never.
    pub fn split_above(&self) -> Option<usize> {
        self.split_above
    }

    /// The space of `ctx`'s engine; `None` for a session not made by an engine (tests).
    pub fn of(ctx: &SessionContext) -> Option<Arc<Self>> {
        ctx.state().config().get_extension::<Self>()
    }

    /// Whether `bytes` more of results may be held in memory.
    pub fn may_hold(&self, bytes: usize) -> bool {
        self.hold_limit
            .is_none_or(|l| self.held.load(Ordering::Relaxed) + bytes <= l)
    }

    /// The share of results held in memory; `None`: unlimited.
    pub fn hold_limit(&self) -> Option<usize> {
        self.hold_limit
    }

    /// Counts `bytes` of results as held until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> HeldBytes {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        HeldBytes {
            space: self.clone(),
            bytes,
        }
    }

    /// A new, empty folder for the scratch files of `what` (a table name), removed when the
    /// returned guard is dropped.
    pub fn folder(&self, what: &str) -> Result<ScratchDir> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let safe: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let path = self.root.join(format!("{n:04}-{safe}"));
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io(&path, "create a scratch folder for a step result", e))?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ResultSpace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Result bytes counted as held; given back on drop.
#[derive(Debug)]
pub struct HeldBytes {
    space: Arc<ResultSpace>,
    bytes: usize,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.space.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A scratch folder, removed with its files on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(folder = %self.path.display(), error = %e, "could not remove a scratch folder");
        }
    }
}

/// Removes the folders under `parent` named `<pid>-…` of processes that no longer run. Only
/// where the process table can be read (Linux `/proc`); elsewhere nothing is removed.
fn remove_stale(parent: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(folder = %entry.path().display(), "removed the scratch files of a process that ended without cleaning up")
                }
                Err(e) => {
                    tracing::warn!(folder = %entry.path().display(), error = %e, "could not remove stale scratch files")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_results_take_at_most_half_the_limit_and_folders_go_when_dropped() {
        let base =
            std::env::temp_dir().join(format!("clvflow-scratch-test-{}", std::process::id()));
        let space = Arc::new(ResultSpace::new(Some(50), &base));
        assert!(space.may_hold(50));
        let held = space.hold(40);
        assert!(space.may_hold(10) && !space.may_hold(11));
        drop(held);
        assert!(space.may_hold(50));
        let dir = space.folder("orders clean").unwrap();
        let path = dir.path().to_path_buf();
        assert!(path.is_dir() && path.to_string_lossy().ends_with("orders_clean"));
        drop(dir);
        assert!(!path.exists());
        // A folder of a process that does not run (pid 0 is never a user process) is removed
        // by the next engine; the engine's own folder goes with it.
        let stale = base.join("clvflow-scratch").join("0-1");
        std::fs::create_dir_all(&stale).unwrap();
        let other = ResultSpace::new(None, &base);
        assert!(!stale.exists() || !Path::new("/proc/self").exists());
        assert!(other.may_hold(usize::MAX / 2));
        drop((space, other));
        let _ = std::fs::remove_dir_all(&base);
    }
}
