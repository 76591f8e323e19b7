// Audit records are many small allocations freed on another thread than the one that
// made them; mimalloc handles that pattern better than the system allocator (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::usage::Usage {
        name: "aob-audit",
        about: "The AOB audit sink: batches DecisionRecords from AOB_AUDIT into Parquet files in object storage, every record once (see functions/audit/README.md for its settings).",
        vars: &[(
            "AOB_AUDIT_URL",
            "where the Parquet files go: file:///dir, s3://bucket/prefix, gs://..., az://... (required)",
        )],
    }
    .handle_args();
    aob_runtime::init_logging();
    let env = aob_runtime::Env::from_env()?;
    let url = aob_fn_audit::store_url(|k| std::env::var(k).ok(), None)?;
    let cfg = aob_fn_audit::SinkConfig::from_env()?;
    let client = env.connect().await?;
    let shutdown = aob_runtime::shutdown_on_signal();
    let js = async_nats::jetstream::new(client.clone());
    let lag: aob_runtime::telemetry::Extra = std::sync::Arc::new(move || {
        let js = js.clone();
        Box::pin(async move {
            let lag = aob_runtime::telemetry::consumer_lag(
                &js,
                &[(aob_streams::AUDIT, aob_streams::AUDIT_SINK)],
            )
            .await;
            lag + &aob_audit::sink::metrics()
        })
    });
    aob_runtime::telemetry::serve_from_env(&client, Some(lag), shutdown.clone()).await?;
    aob_fn_audit::run(client.clone(), &url, cfg, shutdown).await?;
    client.flush().await?;
    Ok(())
}
