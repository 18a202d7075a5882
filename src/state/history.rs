//! Run history: one JSON record per attempt, `history/<job>/<run_date>/<attempt>-<run id>.json`.
//!
//! Reading what is needed only: the records of one run date are one narrow prefix
//! ([`StateStore::runs_on`], checked before every run); the newest N records
//! ([`StateStore::recent`], `clvflow history --limit N`) are found from a listing of keys (run
//! ids begin with their start time) and only those N are read; the latest fire a job ran for
//! (catch-up) is one small pointer object, `scheduled/<job>.json`, kept up to date by
//! [`StateStore::put`]. A state store of years of nightly runs stays fast.
//!
//! A record that is not valid JSON (edited by hand) is skipped with a warning naming it.

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{RunRecord, StateStore, Status};
use crate::error::{Error, Result};

/// The latest fire of a job that a run was recorded for.
#[derive(Debug, Serialize, Deserialize)]
struct LastScheduled {
    scheduled_for: DateTime<Utc>,
}

/// A record's key: (run id, attempt) from its file name, and its path.
#[derive(Debug)]
struct Key {
    run_id: String,
    attempt: u32,
    path: Path,
}

fn parse_key(path: Path) -> Option<Key> {
    let name = path.filename()?.strip_suffix(".json")?;
    let (attempt, run_id) = name.split_once('-')?;
    Some(Key {
        attempt: attempt.parse().ok()?,
        run_id: run_id.to_string(),
        path,
    })
}

impl StateStore {
    fn record_key(r: &RunRecord) -> String {
        format!(
            "history/{}/{}/{:04}-{}.json",
            r.job, r.run_date, r.attempt, r.run_id
        )
    }

    /// Writes (or rewrites) one attempt's record; a record for a fire also moves the job's
    /// latest-fire pointer forward.
    pub async fn put(&self, r: &RunRecord) -> Result<()> {
        let body = serde_json::to_vec_pretty(r)
            .map_err(|e| Error::Internal(format!("serialise a run record: {e}")))?;
        self.store()
            .put(
                &self.path(&Self::record_key(r)),
                PutPayload::from(Bytes::from(body)),
            )
            .await
            .map_err(|e| self.err("write run history", e))?;
        if let Some(at) = r.scheduled_for
            && self.pointer(&r.job).await?.is_none_or(|p| p < at)
        {
            // Two daemons may race here; the pointer can then stay one fire behind, and
            // catch-up re-queues a fire that the history check under the lease finds done.
            let body = serde_json::to_vec(&LastScheduled { scheduled_for: at })
                .map_err(|e| Error::Internal(format!("serialise a pointer: {e}")))?;
            self.store()
                .put(
                    &self.path(&format!("scheduled/{}.json", r.job)),
                    PutPayload::from(Bytes::from(body)),
                )
                .await
                .map_err(|e| self.err("write the latest-fire pointer", e))?;
        }
        Ok(())
    }

    async fn pointer(&self, job: &str) -> Result<Option<DateTime<Utc>>> {
        let path = self.path(&format!("scheduled/{job}.json"));
        let bytes = match self.store().get(&path).await {
            Ok(g) => g
                .bytes()
                .await
                .map_err(|e| self.err("read the latest-fire pointer", e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("read the latest-fire pointer", e)),
        };
        match serde_json::from_slice::<LastScheduled>(&bytes) {
            Ok(p) => Ok(Some(p.scheduled_for)),
            Err(e) => {
                warn!(object = %path, error = %e, "the latest-fire pointer is not valid JSON; reading the history instead");
                Ok(None)
            }
        }
    }

    /// The latest fire time `job` recorded a run for, None when it never ran on schedule.
    pub async fn last_scheduled(&self, job: &str) -> Result<Option<DateTime<Utc>>> {
        if let Some(at) = self.pointer(job).await? {
            return Ok(Some(at));
        }
        // A state store written before the pointer existed (or with it damaged): read it all
        // once.
        let latest = self
            .history(Some(job))
            .await?
            .iter()
            .filter_map(|r| r.scheduled_for)
            .max();
        Ok(latest)
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<Key>> {
        let metas: Vec<_> = self
            .store()
            .list(Some(&self.path(prefix)))
            .try_collect()
            .await
            .map_err(|e| self.err("list run history", e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| parse_key(m.location))
            .collect())
    }

    /// Reads the records at `keys`, in that order; invalid ones are skipped with a warning.
    async fn read(&self, keys: Vec<Key>) -> Result<Vec<RunRecord>> {
        let store = self.loc.store.object_store.clone();
        let read: Vec<(Path, Bytes)> = futures::stream::iter(keys)
            .map(|k| {
                let store = store.clone();
                async move {
                    let bytes = store.get(&k.path).await?.bytes().await?;
                    Ok::<_, object_store::Error>((k.path, bytes))
                }
            })
            .buffered(16)
            .try_collect()
            .await
            .map_err(|e| self.err("read run history", e))?;
        Ok(read
            .into_iter()
            .filter_map(|(path, bytes)| match serde_json::from_slice(&bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(object = %path, error = %e, "skipping a run record that is not valid JSON");
                    None
                }
            })
            .collect())
    }

    /// The newest `limit` records (of `job` when given), newest first. Lists the keys, reads
    /// only the `limit` newest.
    pub async fn recent(&self, job: Option<&str>, limit: usize) -> Result<Vec<RunRecord>> {
        let prefix = job.map_or_else(|| "history".to_string(), |j| format!("history/{j}"));
        let mut keys = self.keys(&prefix).await?;
        keys.sort_by(|a, b| (&b.run_id, b.attempt).cmp(&(&a.run_id, a.attempt)));
        keys.truncate(limit);
        let mut records = self.read(keys).await?;
        records.sort_by_key(|r| std::cmp::Reverse((r.started_at, r.attempt)));
        Ok(records)
    }

    /// All records (of `job` when given), oldest first.
    pub async fn history(&self, job: Option<&str>) -> Result<Vec<RunRecord>> {
        let mut all = self.recent(job, usize::MAX).await?;
        all.reverse();
        Ok(all)
    }

    /// Records of one run date of one job, oldest first.
    pub async fn runs_on(&self, job: &str, date: NaiveDate) -> Result<Vec<RunRecord>> {
        let keys = self.keys(&format!("history/{job}/{date}")).await?;
        let mut records = self.read(keys).await?;
        records.sort_by_key(|a| (a.started_at, a.attempt));
        Ok(records)
    }

    /// Whether `job` has a succeeded run for `date`.
    pub async fn succeeded(&self, job: &str, date: NaiveDate) -> Result<bool> {
        Ok(self
            .runs_on(job, date)
            .await?
            .iter()
            .any(|r| r.status == Status::Succeeded))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::Trigger;
    use crate::storage::instrumented::{Instrumented, Op, StoreOps};
    use crate::storage::{Location, Store};

    fn state(ops: &'static StoreOps) -> StateStore {
        let store = Store {
            name: "state".into(),
            root: url::Url::parse("memory://state/").unwrap(),
            registry_url: url::Url::parse("memory://state").unwrap(),
            object_store: Instrumented::counted_in(
                Arc::new(object_store::memory::InMemory::new()),
                ops,
            ),
        };
        StateStore::at(Location {
            store,
            path: Path::from("clvflow"),
            url: "memory://state/clvflow".into(),
            written: "memory://state/clvflow".into(),
        })
    }

    fn record(job: &str, day: u32, started: &str, scheduled: bool) -> RunRecord {
        let started: DateTime<Utc> = started.parse().unwrap();
        let mut r = RunRecord::start(
            &format!("{}-abc{day:03}", started.format("%Y%m%dT%H%M%S")),
            job,
            NaiveDate::from_ymd_opt(2024, 1, 1).unwrap() + chrono::Duration::days(day.into()),
            (1, 1),
            if scheduled {
                Trigger::Schedule
            } else {
                Trigger::Manual
            },
            scheduled.then_some(started),
        );
        r.started_at = started;
        r.end(Status::Succeeded, None);
        r
    }

    /// Years of history: `history --limit 3` and catch-up read 3 and 1 objects, not every
    /// record (before: every record of the job, for both).
    #[tokio::test]
    async fn the_newest_records_and_the_last_fire_are_read_without_reading_the_rest() {
        let ops: &'static StoreOps = Box::leak(Box::default());
        let state = state(ops);
        let start: DateTime<Utc> = "2024-01-02T02:30:00Z".parse().unwrap();
        for day in 0..400u32 {
            let at = start + chrono::Duration::days(day.into());
            state
                .put(&record("a", day, &at.to_rfc3339(), day % 7 != 6))
                .await
                .unwrap();
        }
        // A backfill of an old date, started last: newest by start time, not by run date.
        let late = start + chrono::Duration::days(500);
        state
            .put(&record("a", 3, &late.to_rfc3339(), false))
            .await
            .unwrap();
        let gets = ops.count(Op::Get);
        let newest = state.recent(Some("a"), 3).await.unwrap();
        assert_eq!(ops.count(Op::Get) - gets, 3);
        assert_eq!(newest[0].started_at, late);
        assert_eq!(newest[1].run_date.to_string(), "2025-02-03"); // day 399
        assert!(
            newest
                .windows(2)
                .all(|w| w[0].started_at >= w[1].started_at)
        );

        let gets = ops.count(Op::Get);
        let last = state.last_scheduled("a").await.unwrap().unwrap();
        assert_eq!(ops.count(Op::Get) - gets, 1);
        // Every seventh day was a manual run; the pointer holds the last fire.
        let want = (0..400u32).rev().find(|d| d % 7 != 6).unwrap();
        assert_eq!(last, start + chrono::Duration::days(want.into()));
        assert_eq!(state.history(Some("a")).await.unwrap().len(), 401);
    }
}
