#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function(aob_validate::ValidateHandler::new()).await?;
    Ok(())
}
