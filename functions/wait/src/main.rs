use std::sync::Arc;

use aob_runtime::nats::ServeConfig;
use aob_runtime::timers::Timers;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::init_logging();
    let env = aob_runtime::Env::from_env()?;
    let client = env.connect().await?;
    let payloads = env.payloads()?;
    let timers = Timers::open(&async_nats::jetstream::new(client.clone())).await?;
    let handler = Arc::new(aob_wait::WaitHandler::new(timers));
    aob_runtime::nats::serve(
        handler,
        client.clone(),
        payloads,
        ServeConfig::default(),
        aob_runtime::shutdown_on_signal(),
    )
    .await?;
    client.flush().await?;
    Ok(())
}
