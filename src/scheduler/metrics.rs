//! Run metrics for Prometheus, and the small HTTP endpoint (`/healthz`, `/metrics`) that
//! `clvflow schedule --listen ADDR` serves. Plain HTTP/1.1 on a TCP listener: two fixed routes
//! do not need a web framework in the build.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::state::Status;
use crate::storage::instrumented::{Op, StoreOps};

#[derive(Debug, Default)]
struct JobMetrics {
    running: i64,
    by_status: BTreeMap<String, u64>,
    seconds_sum: f64,
    seconds_count: u64,
    last_success_unix: Option<i64>,
}

/// Counters per job.
#[derive(Debug, Default)]
pub struct Metrics {
    jobs: Mutex<BTreeMap<String, JobMetrics>>,
}

impl Metrics {
    fn with(&self, job: &str, f: impl FnOnce(&mut JobMetrics)) {
        if let Ok(mut m) = self.jobs.lock() {
            f(m.entry(job.to_string()).or_default());
        }
    }

    pub fn started(&self, job: &str) {
        self.with(job, |m| m.running += 1);
    }

    pub fn finished(&self, job: &str, status: Status, took: Duration) {
        self.with(job, |m| {
            if status != Status::Skipped {
                m.running -= 1;
                m.seconds_sum += took.as_secs_f64();
                m.seconds_count += 1;
            }
            *m.by_status.entry(status.to_string()).or_default() += 1;
            if status == Status::Succeeded {
                m.last_success_unix = Some(chrono::Utc::now().timestamp());
            }
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let Ok(jobs) = self.jobs.lock() else { return s };
        s.push_str("# HELP clvflow_runs_total Finished run attempts by job and status.\n# TYPE clvflow_runs_total counter\n");
        for (job, m) in jobs.iter() {
            for (status, n) in &m.by_status {
                let _ = writeln!(
                    s,
                    "clvflow_runs_total{{job=\"{job}\",status=\"{status}\"}} {n}"
                );
            }
        }
        s.push_str("# HELP clvflow_runs_running Attempts running now.\n# TYPE clvflow_runs_running gauge\n");
        for (job, m) in jobs.iter() {
            let _ = writeln!(
                s,
                "clvflow_runs_running{{job=\"{job}\"}} {}",
                m.running.max(0)
            );
        }
        s.push_str("# HELP clvflow_run_duration_seconds Duration of finished attempts.\n# TYPE clvflow_run_duration_seconds summary\n");
        for (job, m) in jobs.iter() {
            let _ = writeln!(
                s,
                "clvflow_run_duration_seconds_sum{{job=\"{job}\"}} {}",
                m.seconds_sum
            );
            let _ = writeln!(
                s,
                "clvflow_run_duration_seconds_count{{job=\"{job}\"}} {}",
                m.seconds_count
            );
        }
        s.push_str("# HELP clvflow_last_success_timestamp_seconds When the job last succeeded.\n# TYPE clvflow_last_success_timestamp_seconds gauge\n");
        for (job, m) in jobs.iter() {
            if let Some(t) = m.last_success_unix {
                let _ = writeln!(
                    s,
                    "clvflow_last_success_timestamp_seconds{{job=\"{job}\"}} {t}"
                );
            }
        }
        s.push_str("# HELP clvflow_store_operations_total Object-store operations of this process by kind.\n# TYPE clvflow_store_operations_total counter\n");
        let ops = StoreOps::global();
        for op in Op::ALL {
            let _ = writeln!(
                s,
                "clvflow_store_operations_total{{op=\"{}\"}} {}",
                op.name(),
                ops.count(op)
            );
        }
        s.push_str("# HELP clvflow_store_retries_total Object-store operations sent again after a transient fault, by kind.\n# TYPE clvflow_store_retries_total counter\n");
        for op in Op::ALL {
            let _ = writeln!(
                s,
                "clvflow_store_retries_total{{op=\"{}\"}} {}",
                op.name(),
                ops.retries(op)
            );
        }
        s
    }
}

/// Serves `/healthz` and `/metrics` on `addr` until `stop`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((mut sock, _)) = accepted else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                // Read up to the end of the request head: a client may send it in pieces.
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout_at(deadline, sock.read(&mut buf[n..])).await {
                        Ok(Ok(read)) if read > 0 => n += read,
                        _ => break,
                    }
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body, ctype) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                    "/metrics" => ("200 OK", metrics.render(), "text/plain; version=0.0.4"),
                    _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(local)
}
