//! `aob bridge http|lambda`: tasks from NATS run on functions served elsewhere (see
//! [`aob_runtime::remote`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use futures::future::BoxFuture;

use aob_model::wire::Task;
use aob_runtime::remote::{HttpInvoke, Invoke, Reply, Unanswered};

use crate::ctx::Ctx;

/// Splits `TYPE=TARGET` pairs, checking the types: known, run by functions, named once.
fn pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in items {
        let Some((t, target)) = item.split_once('=') else {
            bail!("--{flag} `{item}`: expected TYPE=TARGET, e.g. transform=...");
        };
        let (t, target) = (t.trim(), target.trim());
        if aob_model::nodes::node_type(t).is_none() || aob_model::nodes::ENGINE_TYPES.contains(&t) {
            let known: Vec<&str> = aob_model::nodes::names()
                .into_iter()
                .filter(|n| !aob_model::nodes::ENGINE_TYPES.contains(n))
                .collect();
            bail!(
                "--{flag} `{item}`: `{t}` is not a node type run by a function (one of: {})",
                known.join(", ")
            );
        }
        if target.is_empty() {
            bail!("--{flag} `{item}`: the target is empty");
        }
        if out.iter().any(|(o, _)| o == t) {
            bail!("--{flag}: `{t}` is routed twice");
        }
        out.push((t.to_string(), target.to_string()));
    }
    Ok(out)
}

async fn serve(ctx: &Ctx, routes: Vec<(String, Arc<dyn Invoke>)>) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let payloads = ctx.payloads()?;
    let shutdown = aob_runtime::shutdown_on_signal();
    let js = async_nats::jetstream::new(client.clone());
    let consumers: Vec<String> = routes
        .iter()
        .map(|(t, _)| aob_streams::function_consumer(t))
        .collect();
    let extra: aob_runtime::telemetry::Extra = Arc::new(move || {
        let (js, consumers) = (js.clone(), consumers.clone());
        Box::pin(async move {
            let pairs: Vec<(&str, &str)> = consumers
                .iter()
                .map(|c| (aob_streams::TASKS, c.as_str()))
                .collect();
            aob_runtime::telemetry::consumer_lag(&js, &pairs).await
        })
    });
    aob_runtime::telemetry::serve_from_env(&client, Some(extra), shutdown.clone()).await?;
    aob_runtime::remote::serve_bridge(client.clone(), payloads, routes, shutdown).await?;
    client.flush().await?;
    Ok(ExitCode::SUCCESS)
}

/// `aob bridge http`.
pub async fn cmd_http(ctx: &Ctx, routes: &[String]) -> Result<ExitCode> {
    let mut invokers: Vec<(String, Arc<dyn Invoke>)> = Vec::new();
    for (t, url) in pairs("route", routes)? {
        let invoke = HttpInvoke::new(&t, &url)?;
        invokers.push((t, Arc::new(invoke)));
    }
    serve(ctx, invokers).await
}

/// `aob bridge http --broker`.
pub async fn cmd_broker(
    ctx: &Ctx,
    broker: &str,
    listen: &str,
    types: &[String],
) -> Result<ExitCode> {
    let all: Vec<String> = aob_model::nodes::names()
        .into_iter()
        .filter(|n| !aob_model::nodes::ENGINE_TYPES.contains(n))
        .map(str::to_string)
        .collect();
    let types = if types.is_empty() {
        all
    } else {
        let items: Vec<String> = types.iter().map(|t| format!("{t}={broker}")).collect();
        pairs("type", &items)?.into_iter().map(|(t, _)| t).collect()
    };
    let key = std::env::var(aob_runtime::remote::BRIDGE_KEY_VAR).unwrap_or_default();
    if key.trim().len() < 16 {
        bail!(
            "--broker needs {} (at least 16 characters, the same for every replica of the bridge): it vouches for the replies the broker delivers",
            aob_runtime::remote::BRIDGE_KEY_VAR
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}"))?;
    let client = ctx.connect().await?;
    let payloads = ctx.payloads()?;
    let shutdown = aob_runtime::shutdown_on_signal();
    aob_runtime::telemetry::serve_from_env(&client, None, shutdown.clone()).await?;
    aob_runtime::remote::serve_broker(
        client.clone(),
        payloads,
        types,
        broker,
        key.trim().as_bytes(),
        listener,
        shutdown,
    )
    .await?;
    client.flush().await?;
    Ok(ExitCode::SUCCESS)
}

/// `aob bridge lambda`.
pub async fn cmd_lambda(
    ctx: &Ctx,
    functions: &[String],
    endpoint_url: Option<&str>,
) -> Result<ExitCode> {
    let pairs = pairs("function", functions)?;
    aob_runtime::init_tls();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let config = loader.load().await;
    if config.region().is_none() {
        bail!("no AWS region: set AWS_REGION (or a profile's region)");
    }
    // Synchronous invocations of long steps: no client-side timeout shorter than a step.
    let client = aws_sdk_lambda::Client::new(&config);
    let mut invokers: Vec<(String, Arc<dyn Invoke>)> = Vec::new();
    for (t, function) in pairs {
        invokers.push((
            t,
            Arc::new(LambdaInvoke {
                client: client.clone(),
                function,
            }),
        ));
    }
    serve(ctx, invokers).await.context("bridging to Lambda")
}

/// Invokes one Lambda function per task, synchronously.
struct LambdaInvoke {
    client: aws_sdk_lambda::Client,
    function: String,
}

/// How long a throttled invocation waits when Lambda does not say.
const THROTTLED_DELAY: Duration = Duration::from_secs(1);

impl Invoke for LambdaInvoke {
    fn target(&self) -> String {
        format!("lambda:{}", self.function)
    }
    fn invoke<'a>(
        &'a self,
        _task: &'a Task,
        body: &'a [u8],
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, std::result::Result<Reply, Unanswered>> {
        Box::pin(async move {
            let mut req = self
                .client
                .invoke()
                .function_name(&self.function)
                .invocation_type(aws_sdk_lambda::types::InvocationType::RequestResponse)
                .payload(aws_sdk_lambda::primitives::Blob::new(body.to_vec()));
            if let Some(tp) = traceparent {
                // The trace context rides in the client context, which the function sees.
                let cc = serde_json::json!({"custom": {"traceparent": tp}}).to_string();
                req = req.client_context(base64::engine::general_purpose::STANDARD.encode(cc));
            }
            let out = match req.send().await {
                Ok(out) => out,
                Err(e) => {
                    use aws_sdk_lambda::operation::invoke::InvokeError;
                    let retry_after = match e.as_service_error() {
                        Some(InvokeError::TooManyRequestsException(t)) => Some(
                            t.retry_after_seconds()
                                .and_then(|s| s.parse().ok())
                                .map_or(THROTTLED_DELAY, Duration::from_secs),
                        ),
                        _ => None,
                    };
                    return Err(Unanswered {
                        reason: format!(
                            "invoking {}: {}",
                            self.function,
                            aws_sdk_lambda::error::DisplayErrorContext(&e)
                        ),
                        retry_after,
                    });
                }
            };
            let payload = out.payload().map(|b| b.as_ref()).unwrap_or_default();
            if let Some(kind) = out.function_error() {
                let text = String::from_utf8_lossy(&payload[..payload.len().min(512)]);
                return Err(Unanswered {
                    reason: format!("{} failed ({kind}): {text}", self.function),
                    retry_after: None,
                });
            }
            serde_json::from_slice::<Reply>(payload).map_err(|e| Unanswered {
                reason: format!("{} answered with no reply: {e}", self.function),
                retry_after: None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_known_function_types_once() {
        let ok = pairs("route", &["llm=http://a".into(), "tool = http://b".into()]).unwrap();
        assert_eq!(ok[1], ("tool".into(), "http://b".into()));
        let e = pairs("route", &["workflow=http://a".into()]).unwrap_err();
        assert!(
            e.to_string().contains("not a node type run by a function"),
            "{e}"
        );
        let e = pairs("route", &["lmm=http://a".into()]).unwrap_err();
        assert!(e.to_string().contains("`lmm`"), "{e}");
        let e = pairs("route", &["llm".into()]).unwrap_err();
        assert!(e.to_string().contains("TYPE=TARGET"), "{e}");
        let e = pairs("route", &["llm=http://a".into(), "llm=http://b".into()]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
