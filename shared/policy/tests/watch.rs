//! Live reload from the `AOB_POLICIES` bucket on a real nats-server.

use std::sync::Arc;
use std::time::Duration;

use aob_policy::{Bundle, Input, Kind, Outcome, Policies, Snapshot, ToolRef};
use aob_testkit::NatsServer;
use tokio::sync::watch;

const DENY_RM: &str =
    "package aob.policies.no_rm\ndeny contains \"rm is off\" if input.tool.name == \"rm\"\n";

fn bundle(file: &str, text: &str) -> bytes::Bytes {
    let b = Bundle {
        modules: [(file.to_string(), text.to_string())].into(),
    };
    serde_json::to_vec(&b).unwrap_or_default().into()
}

fn rm(tenant: &str) -> Input {
    Input {
        tool: Some(ToolRef { name: "rm".into() }),
        ..Input::new(Kind::Tool, tenant)
    }
}

async fn until(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    f: impl FnMut(&Arc<Snapshot>) -> bool,
) -> Arc<Snapshot> {
    match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f)).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("timed out waiting for {what}"),
    }
}

/// A running watch picks up a push without a restart; bad Rego pushed after it leaves the
/// previous set in force (with the error kept), and a deleted key takes its policies away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_picked_up_live_and_bad_rego_keeps_the_previous_set() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = async_nats::jetstream::new(server.connect().await?);
    aob_streams::Topology::default().apply(&js).await?;
    let store = aob_policy::open_bucket(&js).await?;

    let policies = Policies::from_kv(&store).await?;
    let task = policies.watch(store.clone());
    let mut rx = policies.subscribe();
    assert_eq!(policies.version("acme"), "none");
    assert_eq!(policies.evaluate(&rm("acme")).outcome, Outcome::Allow);

    store.put("acme", bundle("no_rm.rego", DENY_RM)).await?;
    let s = until(&mut rx, "the pushed version", |s| {
        s.version("acme") != "none"
    })
    .await;
    let good = s.version("acme").to_string();
    let d = policies.evaluate(&rm("acme"));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.reason.as_deref(), Some("rm is off"));
    assert_eq!(d.version, good);
    // Another tenant is not concerned by acme's key.
    assert_eq!(policies.evaluate(&rm("globex")).outcome, Outcome::Allow);

    let before = policies.snapshot().reloads;
    store
        .put(
            "acme",
            bundle(
                "no_rm.rego",
                "package aob.policies.no_rm\ndeny contains if {",
            ),
        )
        .await?;
    let s = until(&mut rx, "the rejected reload", |s| {
        s.reloads > before && s.error.is_some()
    })
    .await;
    let error = s.error.clone().unwrap_or_default();
    assert!(error.starts_with("kv:acme/no_rm.rego:"), "{error}");
    assert_eq!(policies.version("acme"), good);
    assert_eq!(policies.evaluate(&rm("acme")).outcome, Outcome::Deny);

    store.delete("acme").await?;
    until(&mut rx, "the deletion", |s| {
        s.version("acme") == "none" && s.error.is_none()
    })
    .await;
    assert_eq!(policies.evaluate(&rm("acme")).outcome, Outcome::Allow);

    // The task ends by itself once no handle of the policies is left.
    drop((policies, rx));
    store.put("acme", bundle("no_rm.rego", DENY_RM)).await?;
    tokio::time::timeout(Duration::from_secs(10), task).await??;
    Ok(())
}
