//! `clvflow cluster scheduler|executor`: Ballista's processes with clvflow's functions and stores.

use super::ClusterCommand;
use crate::error::Error;
use crate::project::Project;

/// `clvflow cluster scheduler|executor`.
pub async fn run(project: &Project, process: ClusterCommand) -> anyhow::Result<()> {
    use crate::engine::processes;
    match process {
        ClusterCommand::Scheduler {
            bind,
            external_host,
            executor_timeout,
        } => processes::scheduler(&project.stores, bind, external_host, executor_timeout).await?,
        ClusterCommand::Executor {
            scheduler,
            bind,
            grpc_port,
            external_host,
            slots,
            work_dir,
            memory_pool_size,
        } => {
            let (host, port) = scheduler
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--scheduler `{scheduler}`: write HOST:PORT, e.g. 127.0.0.1:50050"
                    ))
                })?;
            let grpc_port = match grpc_port {
                Some(p) => p,
                None => bind.port().checked_add(1).ok_or_else(|| {
                    Error::Usage("--bind: the port is the highest; set --grpc-port".into())
                })?,
            };
            processes::executor(
                &project.stores,
                processes::ExecutorOptions {
                    scheduler_host: host,
                    scheduler_port: port,
                    bind,
                    grpc_port,
                    external_host,
                    slots,
                    work_dir,
                    memory_pool_size: memory_pool_size.map(|b| b.0),
                },
            )
            .await?
        }
    }
    Ok(())
}
