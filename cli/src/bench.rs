//! `aob bench`: throughput and latency of runs. Not written yet.

use anyhow::Result;

use crate::ctx::Ctx;

/// Arguments of `aob bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {}

/// Runs the benchmark.
pub async fn run(args: BenchArgs, ctx: &Ctx) -> Result<()> {
    let _ = (args, ctx);
    say!("aob bench: not yet implemented");
    Ok(())
}
