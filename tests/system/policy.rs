//! `aob policy` against a real server: test's exit codes, a push that compiles first and
//! reaches a running watch, and `ls`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aob_policy::{Input, Kind, Outcome, Policies, ToolRef};
use aob_tests::Stack;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

/// Runs `aob` against the stack's server; returns its exit code, standard output and error.
fn aob(s: &Stack, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = std::process::Command::new(aob_tests::binary("aob")?)
        .args(args)
        .env("NATS_URL", s.server.url())
        .env_remove("AOB_TENANT")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn refund(tenant: &str, amount: u32) -> String {
    format!(
        r#"{{"kind": "tool", "tenant": "{tenant}", "tool": {{"name": "payments.refund"}}, "arguments": {{"amount": {amount}}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_test_exit_codes_and_a_push_reaching_a_running_watch() -> anyhow::Result<()> {
    let s = Stack::bare().await?;
    let dir = examples();
    let dir = dir.to_str().unwrap_or_default();
    for (input, code, starts) in [
        (refund("acme", 10), 0, "allow"),
        (
            refund("globex", 10),
            1,
            "deny: tool payments.refund is not enabled for tenant globex (policy tool_tenants, version ",
        ),
        (
            refund("acme", 5000),
            2,
            "require_approval: refund of 5000 is above 1000 and needs approval (policy refund_approval, version ",
        ),
    ] {
        let (got, out, err) = aob(&s, &["policy", "test", dir, "--input", &input])?;
        assert_eq!(got, code, "{input}: {out}{err}");
        assert!(out.starts_with(starts), "{out}");
    }
    let (got, _, err) = aob(&s, &["policy", "test", dir, "--input", "{\"kind\": 1}"])?;
    assert_eq!(got, 3, "{err}");

    let store = aob_policy::open_bucket(&s.js).await?;
    let policies = Policies::from_kv(&store).await?;
    let task = policies.watch(store.clone());
    let mut rx = policies.subscribe();
    let globex_refund = Input {
        tool: Some(ToolRef {
            name: "payments.refund".into(),
        }),
        ..Input::new(Kind::Tool, "globex")
    };
    assert_eq!(policies.evaluate(&globex_refund).outcome, Outcome::Allow);

    // A file that does not compile is named with its line, and nothing is pushed.
    let tmp = tempfile::tempdir()?;
    let bad = tmp.path().join("bad.rego");
    std::fs::write(
        &bad,
        "package aob.policies.bad\n\ndeny contains \"x\" if { input.kind == }\n",
    )?;
    let good = dir.to_string() + "/_all/tool_tenants.rego";
    let bad = bad.to_str().unwrap_or_default();
    let (got, _, err) = aob(&s, &["policy", "push", "--all", &good, bad])?;
    assert_eq!(got, 1, "{err}");
    assert!(err.contains(&format!("{bad}:3:")), "{err}");
    assert!(err.contains("nothing pushed"), "{err}");
    assert!(store.get(aob_policy::ALL).await?.is_none());

    let (got, out, err) = aob(&s, &["policy", "push", "--all", &good])?;
    assert_eq!(got, 0, "{err}");
    assert!(
        out.starts_with("pushed tool_tenants.rego to _all (version "),
        "{out}"
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|snap| snap.version("globex") != "none"),
    )
    .await??;
    let d = policies.evaluate(&globex_refund);
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(out.contains(&d.version), "{out} vs {d:?}");

    let (got, out, _) = aob(&s, &["policy", "ls"])?;
    assert_eq!(got, 0);
    assert!(out.contains("_all"), "{out}");
    assert!(out.contains(&d.version), "{out}");
    assert!(out.contains("tool_tenants.rego"), "{out}");
    task.abort();
    Ok(())
}
