//! The engine: the only stateful part of AOB. [`machine`] is the pure scheduling logic,
//! [`service`] the I/O around it, [`store`] the compare-and-set run store.

pub mod machine;
pub mod service;
pub mod store;

pub use service::{Config, Engine, Metrics};

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Runs the engine and the timer service until `shutdown`, then drains.
pub async fn run(
    client: async_nats::Client,
    payloads: aob_runtime::PayloadStore,
    cfg: Config,
    shutdown: CancellationToken,
) -> Result<(), service::Error> {
    let engine = Arc::new(Engine::connect(client.clone(), payloads, cfg).await?);
    run_with(engine, client, shutdown).await
}

/// Runs a given engine and the timer service until `shutdown`.
pub async fn run_with<S: store::RunStore>(
    engine: Arc<Engine<S>>,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<(), service::Error> {
    let js = async_nats::jetstream::new(client);
    let timers = engine.timers().clone();
    let t_shutdown = shutdown.clone();
    let timer_task = tokio::spawn(async move { timers.serve(js, t_shutdown).await });
    let res = engine.serve(shutdown.clone()).await;
    shutdown.cancel();
    if let Ok(Err(e)) = timer_task.await {
        tracing::warn!("timer service: {e}");
    }
    res
}
