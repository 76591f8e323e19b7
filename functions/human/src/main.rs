#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let notifier = aob_human::Notifier::from_env();
    aob_runtime::run_function(aob_human::HumanHandler::new(notifier)).await?;
    Ok(())
}
