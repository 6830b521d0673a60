//! The `model-service` command: parses the configuration and runs a command on the library
//! (src/lib.rs; the wiring is `app`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use model_service::app::{self, Mode};
use model_service::config::{Cli, Command, Config, LogFormat};

// mimalloc serves every allocation of the process: Rust's through this declaration, and (its
// `override` feature: the binary exports malloc, free, posix_memalign, ...) libtorch's and the other
// C and C++ libraries' too. A lone request frees and allocates tensors of the whole catalog's
// scores and the stages' buffers; glibc consolidated and trimmed its heap for them each time
// (docs/measurement-history.md, "mimalloc for the whole process").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    model_service::logging::init(cli.config.log_format == LogFormat::Json);
    let result = cli.config.validate().map_err(anyhow::Error::from).and_then(|()| run(cli.command, cli.config));
    let ok = match result {
        Ok(ok) => ok,
        Err(e) => {
            eprintln!("model-service: {e:#}");
            false
        }
    };
    // Leave without running libtorch's static destructors: threads may still be inside libtorch
    // (a model load cut short by SIGTERM, an inference worker finishing a batch whose callers
    // have gone), and destroying its globals under them fails their work or crashes the process.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Write::flush(&mut std::io::stderr());
    // SAFETY: _exit ends the process; no Rust code runs after it.
    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
}

fn run(command: Command, cfg: Config) -> anyhow::Result<bool> {
    let runtime =
        || tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime");
    match command {
        Command::Check => app::check(&cfg).map(|()| true),
        Command::Serve { listen, ingest } => runtime()?.block_on(serve(cfg, Mode::Api { listen, ingest })),
        Command::Listen { ingest } => runtime()?.block_on(serve(cfg, Mode::Ops { listen: true, ingest })),
        Command::Ingest => runtime()?.block_on(serve(cfg, Mode::Ops { listen: false, ingest: true })),
        Command::Backfill { restart } => runtime()?.block_on(app::run_backfill(cfg, restart)),
        Command::Recommend { user_id, k } => runtime()?.block_on(app::recommend_once(cfg, user_id, k)),
    }
}

/// Binds first: a taken port fails in milliseconds, before any model starts loading.
async fn serve(cfg: Config, mode: Mode) -> anyhow::Result<bool> {
    let addr = cfg.http.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    app::run(cfg, mode, listener, app::shutdown_signal()).await.map(|()| true)
}
