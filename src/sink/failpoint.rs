//! Named points in the commit protocol where tests can make a run fail, abort, or stall (so a
//! test can SIGKILL it at a known moment). Set `CLVFLOW_FAILPOINT=<name>:<action>`, where action
//! is `error`, `abort`, `sleep` (an hour) or `delay` (three seconds, then on). Unset (always, in production) it costs one env lookup.

use std::time::Duration;

use crate::error::{Error, Result};

/// After every output of a run is staged, before the first commit marker is written.
pub const AFTER_STAGING: &str = "after-staging";
/// After the commit marker, before any file is published.
pub const AFTER_COMMIT: &str = "after-commit";
/// After the first data file was moved into the table.
pub const MID_PUBLISH: &str = "mid-publish";
/// After `published.json` names the new version, before the replaced files are deleted.
pub const AFTER_PUBLISHED: &str = "after-published";

/// Delta outputs: after the run's files were moved into the table folder, before the commit.
pub const DELTA_FILES_IN: &str = "delta-files-in";
/// Delta outputs: after the commit, before the run's staging folder is deleted.
pub const DELTA_COMMITTED: &str = "delta-committed";

/// Acts on the failpoint `name` if it is set.
pub async fn hit(name: &str) -> Result<()> {
    let Ok(spec) = std::env::var("CLVFLOW_FAILPOINT") else {
        return Ok(());
    };
    let Some((point, action)) = spec.split_once(':') else {
        return Ok(());
    };
    if point != name {
        return Ok(());
    }
    // Tests wait for this line before they kill the process.
    eprintln!("clvflow failpoint {name} reached");
    match action {
        "error" => Err(Error::Cancelled(format!("failpoint {name}"))),
        "abort" => std::process::abort(),
        "sleep" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        "delay" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(())
        }
        _ => Ok(()),
    }
}
