#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::usage::Usage {
        name: "aob-engine",
        about: "The AOB engine: schedules the steps of runs and keeps their state, with the durable timer service.",
        vars: &aob_engine::Config::ENV_VARS,
    }
    .handle_args();
    aob_runtime::init_logging();
    let env = aob_runtime::Env::from_env()?;
    let cfg = aob_engine::Config::from_env()?;
    let client = env.connect().await?;
    aob_engine::run(
        client,
        env.payloads()?,
        cfg,
        aob_runtime::shutdown_on_signal(),
    )
    .await?;
    Ok(())
}
