#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function_with("tool", aob_tool::ENV_VARS, |client| async move {
        let guard = aob_llm::policy::Guard::open(&client).await?;
        Ok(aob_tool::ToolHandler::new()?.with_guard(guard))
    })
    .await?;
    Ok(())
}
