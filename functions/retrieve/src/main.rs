#[tokio::main]
async fn main() -> anyhow::Result<()> {
    aob_runtime::run_function_with("retrieve", aob_retrieve::ENV_VARS, |client| async move {
        let url = std::env::var("AOB_KB_URL").map_err(|_| {
            aob_runtime::Error::Config(
                "AOB_KB_URL is not set: where are the knowledge bases' files?".into(),
            )
        })?;
        let js = async_nats::jetstream::new(client.clone());
        let kbs = aob_kb::store::Kbs::open(&js, &url)
            .await
            .map_err(|e| aob_runtime::Error::Config(e.to_string()))?;
        let models = aob_llm::config::Config::from_env()
            .map_err(|e| aob_runtime::Error::Config(e.to_string()))?;
        let secrets = std::sync::Arc::new(aob_runtime::secrets::Secrets::from_env());
        // The model gateway's budgets (its ledgers) also bound what embedding queries cost.
        let budgets = aob_llm::gateway::Gateway::open(
            &client,
            models.clone(),
            aob_runtime::secrets::Secrets::from_env(),
        )
        .await?;
        Ok(
            aob_retrieve::RetrieveHandler::new(kbs, aob_retrieve::Embedders::new(models, secrets))
                .with_budgets(std::sync::Arc::new(budgets)),
        )
    })
    .await?;
    Ok(())
}
