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

/// Runs a given engine and the timer service until `shutdown`. The timer service is
/// supervised: if it fails or panics, the engine drains and this returns the error, so a
/// process never goes on without retries, timeouts and waits.
pub async fn run_with<S: store::RunStore>(
    engine: Arc<Engine<S>>,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<(), service::Error> {
    let js = async_nats::jetstream::new(client);
    let timers = engine.timers().clone();
    let t_shutdown = shutdown.clone();
    let lease = engine.config().timer_lease.clone();
    let mut timer_task =
        tokio::spawn(async move { timers.serve_with(js, t_shutdown, lease).await });
    let serving = engine.serve(shutdown.clone());
    tokio::pin!(serving);
    let timer_failure = tokio::select! {
        res = &mut serving => {
            shutdown.cancel();
            let _ = timer_task.await;
            return res;
        }
        t = &mut timer_task => match t {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("timer service panicked: {e}")),
        },
    };
    if timer_failure.is_none() && shutdown.is_cancelled() {
        return serving.await;
    }
    let why = timer_failure.unwrap_or_else(|| "timer service stopped".to_string());
    tracing::error!("{why}; stopping the engine");
    shutdown.cancel();
    serving.await?;
    Err(service::Error::Runtime(aob_runtime::Error::Nats(format!(
        "the timer service stopped: {why}"
    ))))
}
