//! The `sse-gateway` binary: read the environment, bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use sse_gateway::{demo, log, log::Level, server, Config, Listeners};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    // `sse-gateway demo`: a built-in backend double and a page at /_demo/ (see `demo`).
    let demo = match std::env::args().nth(1).as_deref() {
        Some("demo") => match demo::Setup::bind() {
            Ok(setup) => Some(setup),
            Err(err) => {
                eprintln!("sse-gateway: cannot bind the demo backend: {err}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    let config = match demo
        .as_ref()
        .map_or_else(Config::from_env, demo::Setup::config)
    {
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
        .on_thread_park(sse_gateway::memory::on_thread_park)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(async {
        let shutdown = match server::shutdown_signal() {
            Ok(shutdown) => shutdown,
            Err(err) => {
                log!(Level::Error, "cannot install signal handlers: {err}");
                return ExitCode::from(1);
            }
        };
        let listeners = match Listeners::bind(&config).and_then(|l| {
            server::describe(&config, &l)?;
            if let Some(demo) = demo {
                demo.spawn_backend()?;
                demo::announce(&config, l.public.local_addr()?);
            }
            Ok(l)
        }) {
            Ok(listeners) => listeners,
            Err(err) => {
                log!(Level::Error, "cannot listen: {err}");
                return ExitCode::from(1);
            }
        };
        server::run(config, listeners, shutdown).await;
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
