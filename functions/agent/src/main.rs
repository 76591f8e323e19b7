use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function_with("agent", aob_agent::ENV_VARS, |client| async move {
        let config = aob_llm::config::Config::from_env()?;
        let secrets = aob_runtime::secrets::Secrets::from_env();
        let gateway = aob_llm::gateway::Gateway::open(&client, config, secrets).await?;
        let tools = aob_tool::gateway::Gateway::from_env()?;
        let recorder = gateway.recorder().clone();
        Ok(aob_agent::AgentHandler::new(
            Arc::new(gateway),
            Arc::new(tools),
            recorder,
        ))
    })
    .await?;
    Ok(())
}
