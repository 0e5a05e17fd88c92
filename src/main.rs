//! The `sse-gateway` binary: read the environment, bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use sse_gateway::{log, log::Level, server, Config, Listeners};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
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

/// mimalloc asks for transparent huge pages on its segments (`madvise(MADV_HUGEPAGE)`), so one
/// touched byte can make 2 MiB resident. Tens of thousands of streams each touching a few small,
/// scattered allocations is the worst case for that: measured here, 19 KiB/stream with THP against
/// a fraction of that without. The flag covers every later page fault of the process.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
