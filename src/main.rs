//! The `sse-gateway` binary: read the environment, bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use sse_gateway::{log, log::Level, server, Config, Listeners};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sse-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    log::set_level(config.log_level);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(async {
        let listeners = match Listeners::bind(&config).and_then(|l| {
            server::describe(&config, &l)?;
            Ok(l)
        }) {
            Ok(listeners) => listeners,
            Err(err) => {
                log!(Level::Error, "cannot listen: {err}");
                return ExitCode::from(1);
            }
        };
        server::run(config, listeners, server::shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
