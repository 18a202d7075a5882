//! Opening Delta Lake tables through clvflow's own object stores.
//!
//! deltalake is handed the configured store (endpoint, region, `allow_http`, credentials from
//! the environment, clvflow's retries) with `with_storage_backend`, never its own S3 client:
//! no AWS SDK in the build, no DynamoDB lock. Its default log store commits a version by a
//! create-only put of `_delta_log/<v>.json` (`If-None-Match: *` on S3, create-if-absent on the
//! local filesystem), which is all Delta's protocol needs for concurrent writers; that log store
//! is registered for the schemes of cloud stores, which deltalake only knows with its own
//! cloud features.

use std::sync::Arc;

use deltalake_core::logstore::{
    LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
};
use deltalake_core::{DeltaResult, DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

use super::Location;
use crate::error::{Error, Result};

/// The Delta log folder of a table.
pub const LOG_FOLDER: &str = "_delta_log";

/// Which version of a table to open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Version {
    #[default]
    Latest,
    Number(u64),
    /// The latest version committed at or before this instant.
    AsOf(chrono::DateTime<chrono::Utc>),
}

/// deltalake's commit-by-conditional-put log store, for any scheme.
struct ConditionalPut;

impl LogStoreFactory for ConditionalPut {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// The table's URL as deltalake wants it (a folder URL).
pub fn table_url(loc: &Location) -> Result<Url> {
    Url::parse(&loc.dir_url())
        .map_err(|e| Error::Usage(format!("{} is not a usable table URL: {e}", loc.written)))
}

/// A builder of the table at `loc` on the location's own store.
pub fn builder(loc: &Location) -> Result<DeltaTableBuilder> {
    let url = table_url(loc)?;
    if let Ok(scheme) = Url::parse(&format!("{}://", url.scheme())) {
        let factories = logstore_factories();
        if !factories.contains_key(&scheme) {
            factories.insert(scheme, Arc::new(ConditionalPut));
        }
    }
    let builder = DeltaTableBuilder::from_url(url.clone())
        .map_err(|e| err(loc, "open the table", e))?
        .with_storage_backend(loc.store.object_store.clone(), url);
    Ok(builder)
}

/// Whether anything is stored below `loc` (one listed object is enough).
async fn holds_any(loc: &Location, what: &str) -> Result<bool> {
    use futures::StreamExt;
    let mut listing = loc.store.object_store.list(Some(&loc.path));
    match listing.next().await {
        None => Ok(false),
        Some(Ok(_)) => Ok(true),
        Some(Err(e)) => Err(Error::store(&loc.url, format!("list {what}"), e)),
    }
}

/// Whether the folder holds a Delta log.
pub async fn is_delta(loc: &Location) -> Result<bool> {
    holds_any(&loc.child(LOG_FOLDER), "the Delta log").await
}

/// Whether the folder holds nothing at all.
pub async fn is_empty(loc: &Location) -> Result<bool> {
    Ok(!holds_any(loc, "the table folder").await?)
}

/// Opens the table at `version`; `None` when the folder holds no Delta log.
pub async fn open(loc: &Location, version: &Version) -> Result<Option<DeltaTable>> {
    if !is_delta(loc).await? {
        return Ok(None);
    }
    let builder = builder(loc)?;
    let builder = match version {
        Version::Latest => builder,
        Version::Number(v) => builder.with_version(*v),
        Version::AsOf(t) => builder.with_timestamp(*t),
    };
    let what = match version {
        Version::Latest => "load the latest version".to_string(),
        Version::Number(v) => format!("load version {v}"),
        Version::AsOf(t) => format!("load the version as of {}", t.to_rfc3339()),
    };
    builder
        .load()
        .await
        .map(Some)
        .map_err(|e| err(loc, &what, e))
}

/// A deltalake error on the table at `loc`.
pub fn err(loc: &Location, action: &str, e: DeltaTableError) -> Error {
    Error::Delta {
        url: loc.written.clone(),
        action: action.to_string(),
        source: Box::new(e),
    }
}
