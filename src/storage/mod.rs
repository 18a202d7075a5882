//! Where data lives: the object stores named in `config.yaml`, one builder per URL scheme, and
//! the resolution of a job URL to a [`Location`] (store and path). A job URL belongs to the store
//! whose URL is its longest prefix, so jobs never carry endpoints or credentials; those come
//! from config and the standard environment. Also [`listing`] (the one place files are listed
//! and a `ListingTable` is built) and [`footer`] (a Parquet file's schema and row count).

pub mod delta;
pub mod footer;
pub mod instrumented;
pub mod listing;
pub mod retry;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, RetryConfig};
use url::Url;

use crate::config::Problem;
use crate::config::project::StoreSpec;

/// A configured store, ready to use.
#[derive(Debug, Clone)]
pub struct Store {
    pub name: String,
    /// `file:///abs/root/`, `s3://bucket/`, ...: what job URLs are matched against.
    pub root: Url,
    /// The URL DataFusion registers the store under (`s3://bucket`, `file://`).
    pub registry_url: Url,
    pub object_store: Arc<dyn ObjectStore>,
}

/// A URL in a store: the store and the path inside it.
#[derive(Debug, Clone)]
pub struct Location {
    pub store: Store,
    /// Path inside the object store (no leading slash; for `file://` relative to `/`).
    pub path: Path,
    /// The original URL with relative `file://` paths made absolute (what DataFusion reads).
    pub url: String,
    /// The URL as the user wrote it (`file://./data/exports/orders/`), for messages.
    pub written: String,
}

impl Location {
    /// A child folder or file of this location.
    pub fn child(&self, rel: &str) -> Location {
        let rel = rel.trim_matches('/');
        let mut url = self.url.trim_end_matches('/').to_string();
        let mut written = self.written.trim_end_matches('/').to_string();
        let mut path = self.path.to_string();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            url.push('/');
            url.push_str(part);
            written.push('/');
            written.push_str(part);
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
        }
        Location {
            store: self.store.clone(),
            path: Path::from(path),
            url,
            written,
        }
    }

    /// How to name `path` (an object of this location's store) in a message: below this
    /// location, as the user wrote the location (`file://./data/exports/orders/x.parquet`);
    /// elsewhere, as a full URL (`file:///abs/x.parquet`, `s3://bucket/x.parquet`).
    pub fn show(&self, path: &Path) -> String {
        let base = self.path.as_ref();
        let full = path.as_ref();
        let below = if base.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(base)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        match below {
            Some(rest) => {
                let rest = rest.trim_start_matches('/');
                let head = self.written.trim_end_matches('/');
                if rest.is_empty() {
                    self.written.clone()
                } else {
                    format!("{head}/{rest}")
                }
            }
            None if self.store.root.scheme() == "file" => format!("file:///{full}"),
            None => format!("{}{full}", self.store.root),
        }
    }

    /// A `file://` location for a local folder outside the configured stores (the state folder).
    pub fn local_folder(dir: &FsPath) -> crate::error::Result<Location> {
        let unusable = || {
            crate::error::Error::Usage(format!(
                "{} is not a usable local folder (an absolute path in UTF-8)",
                dir.display()
            ))
        };
        let url = Url::from_directory_path(dir).map_err(|_| unusable())?;
        let registry_url = Url::parse("file://").map_err(|_| unusable())?;
        let store = Store {
            name: "state".into(),
            root: url.clone(),
            registry_url,
            object_store: instrumented::Instrumented::wrap(Arc::new(LocalFileSystem::new())),
        };
        Ok(Location {
            store,
            path: Path::from_absolute_path(dir).map_err(|_| unusable())?,
            url: url.to_string(),
            written: url.to_string(),
        })
    }

    /// Whether this location and `other` are the same folder or one is inside the other.
    pub fn overlaps(&self, other: &Location) -> bool {
        if self.store.registry_url != other.store.registry_url {
            return false;
        }
        let (a, b) = (self.path.as_ref(), other.path.as_ref());
        let inside = |outer: &str, inner: &str| {
            outer.is_empty()
                || inner == outer
                || inner
                    .strip_prefix(outer)
                    .is_some_and(|r| r.starts_with('/'))
        };
        inside(a, b) || inside(b, a)
    }

    /// The same location as a folder URL (ending in `/`), as DataFusion wants for directories.
    pub fn dir_url(&self) -> String {
        format!("{}/", self.url.trim_end_matches('/'))
    }

    /// The parent folder and the last segment of the path (None at a store root).
    pub fn split_last(&self) -> Option<(Location, String)> {
        let path = self.path.to_string();
        let cut = path.rfind('/')?;
        let name = path[cut + 1..].to_string();
        let url = self.url.trim_end_matches('/');
        let ucut = url.rfind('/')?;
        let written = self.written.trim_end_matches('/');
        let written = written
            .rfind('/')
            .map_or(written, |w| &written[..w])
            .to_string();
        Some((
            Location {
                store: self.store.clone(),
                path: Path::from(&path[..cut]),
                url: url[..ucut].to_string(),
                written,
            },
            name,
        ))
    }
}

/// Builds the store `name` from its spec. `base` is the folder of `config.yaml`. A problem is
/// at a field under the store (`url`, `options.aws_foo`).
pub fn build(name: &str, spec: &StoreSpec, base: &FsPath) -> Result<Store, Problem> {
    let err = |field: &str, message: String| Problem::new(field, message);
    if let Some(rel) = spec.url.strip_prefix("file://") {
        let root = absolute(base, rel);
        let root_url = Url::from_directory_path(&root).map_err(|_| {
            err(
                "url",
                format!("`{}` is not a usable local folder", spec.url),
            )
        })?;
        let registry_url = Url::parse("file://").map_err(|e| err("url", e.to_string()))?;
        return Ok(Store {
            name: name.to_string(),
            root: root_url,
            registry_url,
            object_store: instrumented::Instrumented::wrap(Arc::new(LocalFileSystem::new())),
        });
    }
    let url = Url::parse(&spec.url).map_err(|e| {
        err(
            "url",
            format!(
                "`{}` is not a URL ({e}); write e.g. s3://bucket or file://./data",
                spec.url
            ),
        )
    })?;
    let bucket = url
        .host_str()
        .ok_or_else(|| err("url", format!("`{}` names no bucket", spec.url)))?
        .to_string();
    let retry = RetryConfig {
        max_retries: spec.max_retries,
        retry_timeout: spec.retry_timeout.0,
        ..RetryConfig::default()
    };
    let object_store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&bucket)
                .with_allow_http(spec.allow_http)
                .with_retry(retry.clone());
            if let Some(e) = &spec.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &spec.region {
                b = b.with_region(r);
            }
            for (k, v) in &spec.options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|_| {
                    err(&format!("options.{k}"), format!("unknown S3 option `{k}`"))
                })?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err("url", hint(e, spec)))?)
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&bucket)
                .with_retry(retry.clone());
            for (k, v) in &spec.options {
                let key: GoogleConfigKey = k.parse().map_err(|_| {
                    err(&format!("options.{k}"), format!("unknown GCS option `{k}`"))
                })?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err("url", hint(e, spec)))?)
        }
        "az" | "abfs" | "abfss" => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(&bucket)
                .with_retry(retry.clone());
            for (k, v) in &spec.options {
                let key: AzureConfigKey = k.parse().map_err(|_| {
                    err(
                        &format!("options.{k}"),
                        format!("unknown Azure option `{k}`"),
                    )
                })?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err("url", hint(e, spec)))?)
        }
        other => {
            return Err(err(
                "url",
                format!("unsupported scheme `{other}://`; use file://, s3://, gs:// or az://"),
            ));
        }
    };
    let registry_url = Url::parse(&format!("{}://{bucket}", url.scheme()))
        .map_err(|e| err("url", e.to_string()))?;
    let root = Url::parse(&format!("{}://{bucket}/", url.scheme()))
        .map_err(|e| err("url", e.to_string()))?;
    Ok(Store {
        name: name.to_string(),
        root,
        registry_url,
        object_store: instrumented::Instrumented::wrap(retry::Retrying::wrap(
            object_store,
            retry::Policy {
                max_retries: spec.max_retries,
                timeout: spec.retry_timeout.0,
            },
        )),
    })
}

fn hint(e: object_store::Error, spec: &StoreSpec) -> String {
    let mut msg = format!("cannot configure store: {e}");
    if spec
        .endpoint
        .as_deref()
        .is_some_and(|x| x.starts_with("http://"))
        && !spec.allow_http
    {
        msg.push_str("; the endpoint is plain HTTP: set `allow_http: true` on this store");
    }
    msg
}

fn absolute(base: &FsPath, rel: &str) -> PathBuf {
    let p = FsPath::new(rel);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    // Normalise `.` and `..` without touching the filesystem (the folder may not exist yet).
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// All stores of a config, and URL resolution against them.
#[derive(Debug, Clone, Default)]
pub struct Stores {
    pub stores: Vec<Store>,
    base: PathBuf,
}

impl Stores {
    pub fn new(stores: Vec<Store>, base: PathBuf) -> Self {
        Self { stores, base }
    }

    /// Resolves a job URL to its store and path, or says what to change.
    pub fn resolve(&self, url: &str) -> Result<Location, String> {
        let normalized = if let Some(rel) = url.strip_prefix("file://") {
            let abs = absolute(&self.base, rel);
            let mut s = Url::from_file_path(&abs)
                .map_err(|_| format!("`{url}` is not a usable local path"))?
                .to_string();
            if url.ends_with('/') && !s.ends_with('/') {
                s.push('/');
            }
            s
        } else {
            url.to_string()
        };
        let best = self
            .stores
            .iter()
            .filter(|s| {
                let root = s.root.as_str();
                normalized.starts_with(root) || format!("{normalized}/") == root
            })
            .max_by_key(|s| s.root.as_str().len());
        let Some(store) = best else {
            let known: Vec<String> = self
                .stores
                .iter()
                .map(|s| format!("{} ({})", s.name, s.root))
                .collect();
            return Err(format!(
                "`{url}` is in no store of config.yaml; add a store whose url is a prefix of it (configured: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        let rest = &normalized[store.root.as_str().len().min(normalized.len())..];
        let path = if store.root.scheme() == "file" {
            let full = Url::parse(&normalized).map_err(|e| e.to_string())?;
            let fs = full
                .to_file_path()
                .map_err(|_| format!("`{url}` is not a local path"))?;
            Path::from_absolute_path(&fs).map_err(|e| e.to_string())?
        } else {
            Path::parse(rest.trim_end_matches('/')).map_err(|e| format!("`{url}`: {e}"))?
        };
        Ok(Location {
            store: store.clone(),
            path,
            url: normalized,
            written: url.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> StoreSpec {
        StoreSpec {
            url: url.into(),
            endpoint: None,
            region: None,
            allow_http: false,
            max_retries: 10,
            retry_timeout: crate::config::types::DurationSpec(std::time::Duration::from_secs(180)),
            options: Default::default(),
        }
    }

    #[test]
    fn relative_file_urls_resolve_against_the_config_folder() {
        let base = PathBuf::from("/proj");
        let s = build("local", &spec("file://./data"), &base).unwrap();
        let stores = Stores::new(vec![s], base);
        let loc = stores.resolve("file://./data/exports/orders/").unwrap();
        assert_eq!(loc.url, "file:///proj/data/exports/orders/");
        assert_eq!(loc.path.as_ref(), "proj/data/exports/orders");
        assert!(stores.resolve("file://./elsewhere/x").is_err());
        let (parent, name) = loc.split_last().unwrap();
        assert_eq!(name, "orders");
        assert_eq!(
            parent.child("_clvflow/orders").url,
            "file:///proj/data/exports/_clvflow/orders"
        );
        assert_eq!(parent.written, "file://./data/exports");
    }

    /// A file under a local input is named as the user wrote the input's URL; anything else
    /// with its full URL, never as a path without its leading `/`.
    #[test]
    fn messages_name_files_as_written_or_by_full_url() {
        let base = PathBuf::from("/proj");
        let s = build("local", &spec("file://./data"), &base).unwrap();
        let stores = Stores::new(vec![s], base);
        let loc = stores.resolve("file://./data/exports/orders/").unwrap();
        let file = Path::from("proj/data/exports/orders/m=1/part-0.parquet");
        assert_eq!(
            loc.show(&file),
            "file://./data/exports/orders/m=1/part-0.parquet"
        );
        assert_eq!(
            loc.show(&Path::from("proj/data/other/x.parquet")),
            "file:///proj/data/other/x.parquet"
        );
        assert_eq!(
            loc.show(&Path::from("proj/data/exports/ordersx/y")),
            "file:///proj/data/exports/ordersx/y"
        );
    }

    #[test]
    fn overlapping_tables_are_told_apart_from_siblings() {
        let base = PathBuf::from("/proj");
        let s = build("local", &spec("file://./data"), &base).unwrap();
        let stores = Stores::new(vec![s], base);
        let at = |u: &str| stores.resolve(u).unwrap();
        let marts = at("file://./data/marts/clv/");
        assert!(marts.overlaps(&at("file://./data/marts/clv")));
        assert!(marts.overlaps(&at("file://./data/marts/clv/fit/")));
        assert!(at("file://./data/marts/").overlaps(&marts));
        assert!(!marts.overlaps(&at("file://./data/marts/clv_fit/")));
    }

    #[test]
    fn s3_urls_pick_their_bucket() {
        let mut sp = spec("s3://warehouse");
        sp.endpoint = Some("http://127.0.0.1:9000".into());
        sp.region = Some("us-east-1".into());
        sp.allow_http = true;
        let s = build("wh", &sp, FsPath::new("/")).unwrap();
        let stores = Stores::new(vec![s], PathBuf::from("/"));
        let loc = stores.resolve("s3://warehouse/marts/cv/").unwrap();
        assert_eq!(loc.path.as_ref(), "marts/cv");
        assert!(
            stores
                .resolve("s3://other/x")
                .unwrap_err()
                .contains("no store")
        );
    }
}
