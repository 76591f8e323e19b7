use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function_with("agent", aob_agent::ENV_VARS, |client| async move {
        let config = aob_llm::config::Config::from_env()?;
        let secrets = aob_runtime::secrets::Secrets::from_env();
        let gateway = aob_llm::gateway::Gateway::open(&client, config, secrets).await?;
        let tools = aob_tool::gateway::Gateway::from_env()?;
        // Knowledge bases as tools when AOB_KB_URL says where they are.
        let retrieve = match std::env::var("AOB_KB_URL") {
            Ok(url) if !url.trim().is_empty() => {
                let js = async_nats::jetstream::new(client.clone());
                let kbs = aob_kb::store::Kbs::open(&js, &url)
                    .await
                    .map_err(|e| aob_runtime::Error::Config(e.to_string()))?;
                let models = aob_llm::config::Config::from_env()?;
                let secrets = Arc::new(aob_runtime::secrets::Secrets::from_env());
                Some(aob_retrieve::RetrieveHandler::new(
                    kbs,
                    aob_retrieve::Embedders::new(models, secrets),
                ))
            }
            _ => None,
        };
        let recorder = gateway.recorder().clone();
        Ok(aob_agent::AgentHandler::new(
            Arc::new(gateway),
            Arc::new(aob_agent::knowledge::WithKnowledge::new(
                Arc::new(tools),
                retrieve,
            )),
            recorder,
        ))
    })
    .await?;
    Ok(())
}
