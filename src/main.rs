//! The `sse-gateway` binary: read the command line and the environment, bind, serve until
//! SIGTERM/SIGINT. Exit status 2 for a bad argument or setting, 1 when a listener cannot be bound.

use std::process::ExitCode;

use sse_gateway::cli::{self, Command};
use sse_gateway::{demo, log, log::Level, server, Config, Listeners};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("sse-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    // `sse-gateway demo`: a built-in backend double and a page at /_demo/ (see `demo`).
    let demo = match command {
        Command::Help => {
            print!("{}", cli::usage());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("{}", cli::version());
            return ExitCode::SUCCESS;
        }
        Command::Serve => None,
        Command::Demo => match demo::Setup::bind() {
            Ok(setup) => Some(setup),
            Err(err) => {
                eprintln!("sse-gateway: cannot bind the demo backend: {err}");
                return ExitCode::from(1);
            }
        },
    };
    disable_transparent_huge_pages();
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
        let listeners = match Listeners::bind(&config) {
            Ok(listeners) => listeners,
            Err(err) => {
                log!(Level::Error, "{err}");
                return ExitCode::from(1);
            }
        };
        let demo_state = demo.as_ref().map(demo::Setup::demo);
        let started = server::describe(&config, &listeners).and_then(|()| {
            if let Some(setup) = demo {
                let state = setup.demo();
                setup.spawn_backend()?;
                demo::announce(&config, &state, listeners.public.local_addr()?);
            }
            Ok(())
        });
        if let Err(err) = started {
            log!(Level::Error, "cannot start: {err}");
            return ExitCode::from(1);
        }
        server::run(config, demo_state, listeners, shutdown).await;
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
