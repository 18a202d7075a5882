//! The wrapper every configured object store is used through: one place that sees each
//! operation clvflow (and DataFusion's readers and writers) makes, and counts it by kind. The
//! counts are shared by all stores of a process ([`StoreOps::global`]) for logs, `/metrics`
//! and tests that check how much a command reads.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// The kinds of operation counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Head,
    Get,
    Put,
    /// A put with a precondition (create only if absent, update only if unchanged).
    ConditionalPut,
    Copy,
    Rename,
    Delete,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::List,
        Op::Head,
        Op::Get,
        Op::Put,
        Op::ConditionalPut,
        Op::Copy,
        Op::Rename,
        Op::Delete,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::List => "list",
            Op::Head => "head",
            Op::Get => "get",
            Op::Put => "put",
            Op::ConditionalPut => "conditional_put",
            Op::Copy => "copy",
            Op::Rename => "rename",
            Op::Delete => "delete",
        }
    }
}

/// Operation counters.
#[derive(Debug, Default)]
pub struct StoreOps {
    counts: [AtomicU64; 8],
    retries: [AtomicU64; 8],
}

impl StoreOps {
    /// The counters of the whole process.
    pub fn global() -> &'static StoreOps {
        static OPS: std::sync::OnceLock<StoreOps> = std::sync::OnceLock::new();
        OPS.get_or_init(StoreOps::default)
    }

    fn add(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a retry of an operation of kind `op` ([`super::retry`]).
    pub fn retried(&self, op: Op) {
        self.retries[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Retries of operations of kind `op` so far.
    pub fn retries(&self, op: Op) -> u64 {
        self.retries[op as usize].load(Ordering::Relaxed)
    }

    /// Retries of every kind so far.
    pub fn all_retries(&self) -> u64 {
        Op::ALL.iter().map(|&op| self.retries(op)).sum()
    }

    /// Operations of kind `op` so far.
    pub fn count(&self, op: Op) -> u64 {
        self.counts[op as usize].load(Ordering::Relaxed)
    }
}

/// An object store whose operations are counted (in [`StoreOps::global`] for the configured
/// stores).
#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn ObjectStore>,
    ops: &'static StoreOps,
}

impl Instrumented {
    /// `inner`, counted in the process's counters.
    pub fn wrap(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        Self::counted_in(inner, StoreOps::global())
    }

    /// `inner`, counted in `ops`.
    pub fn counted_in(inner: Arc<dyn ObjectStore>, ops: &'static StoreOps) -> Arc<dyn ObjectStore> {
        Arc::new(Self { inner, ops })
    }

    fn add(&self, op: Op) {
        self.ops.add(op);
    }
}

impl fmt::Display for Instrumented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Instrumented {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.add(match opts.mode {
            PutMode::Overwrite => Op::Put,
            _ => Op::ConditionalPut,
        });
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.add(Op::Put);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.add(if options.head { Op::Head } else { Op::Get });
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.add(Op::Get);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let ops = self.ops;
        let counted = locations
            .map(move |l| {
                ops.add(Op::Delete);
                l
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.add(Op::List);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.add(Op::List);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.add(Op::List);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.add(Op::Copy);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.add(Op::Rename);
        self.inner.rename_opts(from, to, options).await
    }
}
