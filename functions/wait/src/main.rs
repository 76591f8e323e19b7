#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function_with("wait", &[], |client| async move {
        let timers = aob_runtime::timers::Timers::open(&async_nats::jetstream::new(client)).await?;
        Ok(aob_wait::WaitHandler::new(timers))
    })
    .await?;
    Ok(())
}
