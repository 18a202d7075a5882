//! Retries of transient faults that object_store's own client leaves to the caller, for the
//! remote stores (S3, GCS, Azure); one layer under [`super::instrumented::Instrumented`], so
//! every operation of clvflow and of DataFusion's readers and writers goes through it.
//!
//! object_store 0.13 retries a request that fails before its answer (connection refused, 5xx,
//! timeouts of idempotent requests) and a GET body that breaks while streaming. It does not
//! retry:
//! - a LIST page whose body breaks half-way ("Error getting list response body"): the listing
//!   resumes after the last key it returned (`list_with_offset`, S3 lists in key order);
//! - a conditional put (`If-None-Match: *` / `If-Match`) whose answer was lost: it is not
//!   idempotent, so the client gives up; and when the client or we send it again, the write that
//!   did land makes the second one fail with "already exists" / "precondition". A conditional put
//!   that fails that way after any attempt reads the object back: if it holds exactly our bytes,
//!   the write was ours and succeeded (a commit marker or lease names its run and holder, so equal
//!   bytes are our write); else the conflict is real and is returned;
//! - a bulk delete whose answer was lost: deletes are idempotent, the batch is sent again;
//! - the same for copies (a create-only copy whose target exists with the source's size and
//!   e-tag was ours).
//!
//! Which errors are transient: object_store's `Generic` errors (transport and body errors)
//! except an HTTP 4xx answer (other than 408/429) and except an error after which the client
//! already spent its own retries. Each retry waits a backoff (100 ms doubling to 15 s, with
//! jitter), is logged at debug with the operation, path and attempt, and counted per operation
//! in [`super::instrumented::StoreOps`] (`/metrics`: `clvflow_store_retries_total`). A store's
//! `max_retries` and `retry_timeout` bound the retries of one operation, as they bound the
//! client's.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    Result,
};

use super::instrumented::{Op, StoreOps};

/// How many times, and for how long, one operation is retried.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_retries: usize,
    pub timeout: Duration,
}

impl Policy {
    /// The wait before retry number `attempt` (0-based), or `None` when the budget is spent.
    fn wait(&self, attempt: usize, started: Instant) -> Option<Duration> {
        if attempt >= self.max_retries {
            return None;
        }
        let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(8));
        let capped = base.min(Duration::from_secs(15));
        // Jitter (50-100 %), so that the tasks of one scan do not retry in step.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let wait = capped.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0);
        (started.elapsed() + wait <= self.timeout).then_some(wait)
    }
}

/// Whether `e` is a fault worth sending the request again for (module docs).
pub fn transient(e: &Error) -> bool {
    if !matches!(e, Error::Generic { .. }) {
        return false;
    }
    let text = crate::error::chain(e);
    if text.contains(" retries, max_retries:") {
        return false; // the client spent its retries on it already
    }
    match text.find("non-2xx status code: ") {
        Some(i) => {
            let code = text.get(i + 21..i + 24).unwrap_or("");
            code.starts_with('5') || code == "408" || code == "429"
        }
        None => true,
    }
}

/// A remote store whose transient faults are retried (module docs).
#[derive(Debug)]
pub struct Retrying {
    inner: Arc<dyn ObjectStore>,
    policy: Policy,
    ops: &'static StoreOps,
}

impl Retrying {
    pub fn wrap(inner: Arc<dyn ObjectStore>, policy: Policy) -> Arc<dyn ObjectStore> {
        Self::counted_in(inner, policy, StoreOps::global())
    }

    pub fn counted_in(
        inner: Arc<dyn ObjectStore>,
        policy: Policy,
        ops: &'static StoreOps,
    ) -> Arc<dyn ObjectStore> {
        Arc::new(Self { inner, policy, ops })
    }

    /// Runs `call` until it succeeds, fails with an error that is not transient, or the budget
    /// is spent (each retry waits and is counted as one of `op` on `what`).
    async fn again<T, F, Fut>(&self, op: Op, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !pause(self.policy, self.ops, op, what, &e, attempt, started).await {
                        return Err(e);
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Whether `location` holds exactly `payload`: a conditional put that "failed" because its
    /// own earlier attempt landed.
    async fn holds(&self, location: &Path, payload: &PutPayload) -> Option<PutResult> {
        // Through the retrying get: a fault while checking must not turn our write into a
        // conflict.
        let got = self.get_opts(location, GetOptions::default()).await.ok()?;
        let (e_tag, version) = (got.meta.e_tag.clone(), got.meta.version.clone());
        let bytes = got.bytes().await.ok()?;
        let want: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
        (bytes.as_ref() == want.as_slice()).then_some(PutResult { e_tag, version })
    }

    /// Whether `to` is a copy of `from` (same size and e-tag).
    async fn is_copy(&self, from: &Path, to: &Path) -> bool {
        match (
            ObjectStoreExt::head(self, from).await,
            ObjectStoreExt::head(self, to).await,
        ) {
            (Ok(a), Ok(b)) => a.size == b.size && a.e_tag.is_some() && a.e_tag == b.e_tag,
            _ => false,
        }
    }
}

async fn pause(
    policy: Policy,
    ops: &'static StoreOps,
    op: Op,
    what: &str,
    e: &Error,
    attempt: usize,
    started: Instant,
) -> bool {
    if !transient(e) {
        return false;
    }
    let Some(wait) = policy.wait(attempt, started) else {
        return false;
    };
    ops.retried(op);
    tracing::debug!(op = op.name(), path = what, attempt = attempt + 1, wait_ms = wait.as_millis() as u64,
                    error = %e, "object store: transient fault, retrying");
    tokio::time::sleep(wait).await;
    true
}

impl fmt::Display for Retrying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

/// A listing that resumes after the last key it returned when a page fails.
fn resuming_list(
    inner: Arc<dyn ObjectStore>,
    policy: Policy,
    ops: &'static StoreOps,
    prefix: Option<Path>,
    offset: Option<Path>,
) -> BoxStream<'static, Result<ObjectMeta>> {
    struct State {
        stream: BoxStream<'static, Result<ObjectMeta>>,
        last: Option<Path>,
        attempt: usize,
        started: Instant,
        done: bool,
    }
    let open = {
        let inner = inner.clone();
        let prefix = prefix.clone();
        move |after: Option<&Path>| match after {
            Some(o) => inner.list_with_offset(prefix.as_ref(), o),
            None => inner.list(prefix.as_ref()),
        }
    };
    let state = State {
        stream: open(offset.as_ref()),
        last: offset,
        attempt: 0,
        started: Instant::now(),
        done: false,
    };
    let what = prefix.as_ref().map(|p| p.to_string()).unwrap_or_default();
    futures::stream::unfold(state, move |mut st| {
        let open = open.clone();
        let what = what.clone();
        async move {
            if st.done {
                return None;
            }
            loop {
                match st.stream.next().await {
                    None => return None,
                    Some(Ok(meta)) => {
                        st.last = Some(meta.location.clone());
                        return Some((Ok(meta), st));
                    }
                    Some(Err(e)) => {
                        if pause(policy, ops, Op::List, &what, &e, st.attempt, st.started).await {
                            st.attempt += 1;
                            st.stream = open(st.last.as_ref());
                            continue;
                        }
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        }
    })
    .boxed()
}

#[async_trait]
impl ObjectStore for Retrying {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let conditional = !matches!(opts.mode, PutMode::Overwrite);
        let op = if conditional {
            Op::ConditionalPut
        } else {
            Op::Put
        };
        let put = self.again(op, location.as_ref(), || {
            self.inner.put_opts(location, payload.clone(), opts.clone())
        });
        match put.await {
            Err(e @ (Error::AlreadyExists { .. } | Error::Precondition { .. })) if conditional => {
                match self.holds(location, &payload).await {
                    Some(r) => {
                        tracing::debug!(path = %location,
                            "object store: a conditional put's earlier attempt had landed");
                        Ok(r)
                    }
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // The parts are retried by the client; a multipart upload is only used by DataFusion's
        // writers for large files, whose whole write clvflow repeats on failure.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        self.again(op, location.as_ref(), || {
            self.inner.get_opts(location, options.clone())
        })
        .await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.again(Op::Get, location.as_ref(), || {
            self.inner.get_ranges(location, ranges)
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (inner, policy, ops) = (self.inner.clone(), self.policy, self.ops);
        // In batches of S3's bulk delete; a batch that hit a transient fault is sent again
        // whole (deleting an absent key succeeds).
        locations
            .chunks(1000)
            .then(move |chunk| {
                let inner = inner.clone();
                async move {
                    let (paths, mut out): (Vec<_>, Vec<_>) =
                        chunk.into_iter().partition(|r| r.is_ok());
                    let paths: Vec<Path> = paths.into_iter().filter_map(|r| r.ok()).collect();
                    let what = paths.first().map(|p| p.to_string()).unwrap_or_default();
                    let started = Instant::now();
                    let mut attempt = 0;
                    loop {
                        let batch =
                            futures::stream::iter(paths.clone().into_iter().map(Ok::<_, Error>));
                        let results: Vec<Result<Path>> =
                            inner.delete_stream(batch.boxed()).collect().await;
                        // Any transient fault sends the batch again, also when another key
                        // of it failed for good (that error comes back on the retry).
                        let fault = results
                            .iter()
                            .filter_map(|r| r.as_ref().err())
                            .find(|e| transient(e));
                        if let Some(e) = fault
                            && pause(policy, ops, Op::Delete, &what, e, attempt, started).await
                        {
                            attempt += 1;
                            continue;
                        }
                        out.extend(results);
                        return futures::stream::iter(out);
                    }
                }
            })
            .flatten()
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        resuming_list(
            self.inner.clone(),
            self.policy,
            self.ops,
            prefix.cloned(),
            None,
        )
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        resuming_list(
            self.inner.clone(),
            self.policy,
            self.ops,
            prefix.cloned(),
            Some(offset.clone()),
        )
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let what = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.again(Op::List, &what, || self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let create = matches!(options.mode, CopyMode::Create);
        let copy = self.again(Op::Copy, to.as_ref(), || {
            self.inner.copy_opts(from, to, options.clone())
        });
        match copy.await {
            // A create-only copy whose earlier attempt landed: the target is the source.
            Err(e @ Error::AlreadyExists { .. }) if create => {
                if self.is_copy(from, to).await {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            r => r,
        }
    }

    // rename_opts: the trait's copy + delete, through the retrying methods above.
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(text: &str) -> Error {
        Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        }
    }

    #[test]
    fn transport_and_body_errors_are_transient_answers_and_spent_retries_are_not() {
        assert!(transient(&generic(
            "Error getting list response body: HTTP error: request or response body error"
        )));
        assert!(transient(&generic(
            "Error performing PUT http://x/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable: "
        )));
        assert!(transient(&generic(
            "... non-2xx status code: 429 Too Many Requests"
        )));
        assert!(!transient(&generic(
            "Error performing GET http://x/b/k in 1ms - Server returned non-2xx status code: 400 Bad Request: "
        )));
        assert!(!transient(&generic(
            "Error performing GET http://x in 3s, after 10 retries, max_retries: 10, retry_timeout: 180s  - HTTP error"
        )));
        assert!(!transient(&Error::NotFound {
            path: "k".into(),
            source: "gone".into()
        }));
        assert!(!transient(&Error::AlreadyExists {
            path: "k".into(),
            source: "there".into()
        }));
    }

    #[test]
    fn the_backoff_grows_and_stays_inside_the_budget() {
        let p = Policy {
            max_retries: 3,
            timeout: Duration::from_secs(60),
        };
        let now = Instant::now();
        let w: Vec<Duration> = (0..3).map(|a| p.wait(a, now).unwrap()).collect();
        assert!(w[0] >= Duration::from_millis(50) && w[0] <= Duration::from_millis(100));
        assert!(w[2] >= Duration::from_millis(200) && w[2] <= Duration::from_millis(400));
        assert!(p.wait(3, now).is_none(), "max_retries spent");
        let short = Policy {
            max_retries: 10,
            timeout: Duration::from_millis(10),
        };
        assert!(
            short.wait(0, now).is_none(),
            "the wait would pass retry_timeout"
        );
    }
}
