//! `aob`: see `aob --help`.

use std::process::ExitCode;

use clap::Parser;

// As in `aob-audit`: `aob dev` runs the audit sink in this process.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = aob_cli::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = aob_runtime::trace::init("aob") {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let code = match runtime.block_on(aob_cli::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    };
    aob_runtime::trace::shutdown();
    code
}
