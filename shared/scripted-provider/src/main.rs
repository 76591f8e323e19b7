//! `aob-scripted-provider`: serves the scripted provider, a test double of a model
//! provider, on a port.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

/// A TEST DOUBLE of a model provider, not a model. It speaks the OpenAI chat-completions
/// protocol (POST /v1/chat/completions, /chat/completions) and Anthropic's Messages protocol
/// (POST /v1/messages), streamed or not, with tool calls, and answers from a script of rules
/// (YAML or JSON; see the crate's README). Without a script it echoes the last message.
/// `aob dev` uses it when no API key is configured. GET /_double/requests shows what it
/// received; POST /_double/script replaces the script.
#[derive(Debug, Parser)]
#[command(name = "aob-scripted-provider", version)]
struct Args {
    /// Port to listen on (0: a free one, printed at start).
    #[arg(long, default_value_t = 0, env = "AOB_SCRIPTED_PROVIDER_PORT")]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// The script file (YAML or JSON).
    #[arg(long, env = "AOB_SCRIPTED_PROVIDER_SCRIPT")]
    script: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let script = match &args.script {
        Some(path) => aob_scripted_provider::Script::load(path)?,
        None => aob_scripted_provider::Script::default(),
    };
    let provider = aob_scripted_provider::ScriptedProvider::bind(
        SocketAddr::new(args.host, args.port),
        script,
    )
    .await?;
    // The URL goes to standard output so a parent process can read the chosen port.
    println!("{}", provider.url());
    eprintln!(
        "aob-scripted-provider: a test double (not a model) on {0}: OpenAI base URL {0}/v1, Anthropic base URL {0}; Ctrl-C to stop",
        provider.url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
