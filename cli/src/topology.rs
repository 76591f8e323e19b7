//! `aob streams apply|diff`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use aob_streams::{Drift, Topology};

use crate::ctx::Ctx;

/// The topology with `replicas`.
pub fn topology(replicas: u16) -> Topology {
    Topology {
        replicas: usize::from(replicas),
        ..Topology::default()
    }
}

/// One line per change made by `apply`.
pub fn applied_line(d: &Drift) -> String {
    if d.change == "missing" {
        format!("created {}", d.object)
    } else {
        format!("updated {}: {}", d.object, d.change)
    }
}

/// Applies the topology and prints what changed.
pub async fn apply(ctx: &Ctx, replicas: u16) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = async_nats::jetstream::new(client);
    let changes = topology(replicas)
        .apply(&js)
        .await
        .context("applying the topology")?;
    if changes.is_empty() {
        say!("in sync: nothing to change");
    }
    for d in &changes {
        say!("{}", applied_line(d));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints drift; exit code 1 when there is some.
pub async fn diff(ctx: &Ctx, replicas: u16) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = async_nats::jetstream::new(client);
    let drift = topology(replicas)
        .diff(&js)
        .await
        .context("comparing the topology")?;
    if drift.is_empty() {
        say!("in sync");
        return Ok(ExitCode::SUCCESS);
    }
    for d in &drift {
        say!("{d}");
    }
    say!(
        "{} difference(s); `aob streams apply` fixes them",
        drift.len()
    );
    Ok(ExitCode::from(1))
}
