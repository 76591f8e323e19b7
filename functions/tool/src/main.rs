#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function(aob_tool::ToolHandler::new()?).await?;
    Ok(())
}
