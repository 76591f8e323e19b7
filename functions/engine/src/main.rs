#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::init_logging();
    let env = aob_runtime::Env::from_env()?;
    let client = env.connect().await?;
    aob_engine::run(
        client,
        env.payloads()?,
        aob_engine::Config::default(),
        aob_runtime::shutdown_on_signal(),
    )
    .await?;
    Ok(())
}
