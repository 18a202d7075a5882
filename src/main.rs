//! The `clvflow` binary: parse arguments, run, print the error chain, exit 0 / 1 / 2.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc (measured faster than glibc's malloc on our aggregations), counting the live heap
/// for `engine.memory_limit` (see `clvflow::engine::heap`).
#[global_allocator]
static GLOBAL: clvflow::engine::heap::Counting<mimalloc::MiMalloc> =
    clvflow::engine::heap::Counting(mimalloc::MiMalloc);

fn main() -> ExitCode {
    GLOBAL.install();
    let cli = clvflow::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(clvflow::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let config = e
                .downcast_ref::<clvflow::Error>()
                .is_some_and(clvflow::Error::is_config);
            if config {
                eprintln!("{e}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    }
}
