#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function_with("llm", aob_llm::handler::ENV_VARS, |client| async move {
        let config = aob_llm::config::Config::from_env()?;
        let secrets = aob_runtime::secrets::Secrets::from_env();
        let gateway = aob_llm::gateway::Gateway::open(&client, config, secrets).await?;
        Ok(aob_llm::handler::LlmHandler::new(std::sync::Arc::new(
            gateway,
        )))
    })
    .await?;
    Ok(())
}
