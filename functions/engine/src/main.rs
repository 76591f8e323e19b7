/// The engine's counters and its consumers' lag, for `/metrics`.
fn metrics(
    engine: &std::sync::Arc<aob_engine::Engine>,
    client: &async_nats::Client,
) -> aob_runtime::telemetry::Extra {
    let (m, js) = (
        engine.metrics.clone(),
        async_nats::jetstream::new(client.clone()),
    );
    std::sync::Arc::new(move || {
        let (m, js) = (m.clone(), js.clone());
        Box::pin(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut out = String::from("# TYPE aob_engine_events_total counter\n");
            for (name, v) in [
                ("events", &m.events),
                ("cas_conflicts", &m.cas_conflicts),
                ("rejected", &m.rejected),
                ("dead_letters", &m.dead_letters),
                ("handoffs", &m.handoffs),
                ("held", &m.held),
                ("retried", &m.retried),
            ] {
                out.push_str(&format!("aob_engine_{name}_total {}\n", v.load(Relaxed)));
            }
            out.push_str(
                &aob_runtime::telemetry::consumer_lag(
                    &js,
                    &[
                        (aob_streams::CMD, aob_streams::ENGINE_CMD),
                        (aob_streams::RESULTS, aob_streams::ENGINE_RESULTS),
                    ],
                )
                .await,
            );
            out
        })
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::usage::Usage {
        name: "aob-engine",
        about: "The AOB engine: schedules the steps of runs and keeps their state, with the durable timer service.",
        vars: &aob_engine::Config::ENV_VARS,
    }
    .handle_args();
    aob_runtime::init_logging();
    aob_runtime::trace::init("aob-engine")?;
    let env = aob_runtime::Env::from_env()?;
    let cfg = aob_engine::Config::from_env()?;
    let client = env.connect().await?;
    let shutdown = aob_runtime::shutdown_on_signal();
    let engine = std::sync::Arc::new(
        aob_engine::Engine::connect(client.clone(), env.payloads()?, cfg).await?,
    );
    aob_runtime::telemetry::serve_from_env(
        &client,
        Some(metrics(&engine, &client)),
        shutdown.clone(),
    )
    .await?;
    aob_engine::run_with(engine, client, shutdown).await?;
    aob_runtime::trace::shutdown();
    Ok(())
}
