//! The double against the providers' official Python clients (PyPI `openai` and
//! `anthropic`, installed by `scripts/setup`), in both modes, with tool calls: if those
//! clients parse every reply, so will anything written against the real APIs.

use std::path::Path;
use std::process::Stdio;

use aob_scripted_provider::{Requests, Script, ScriptedProvider};

const SCRIPT: &str = r#"
rules:
  - when: { model: limited }
    reply: { error: { status: 429, message: "slow down", retry_after: "7" } }
  - when: { has_tool_result: true }
    reply: { text: "It is sunny in Paris." }
  - when: { contains: weather }
    reply: { tool_calls: [{ name: get_weather, arguments: { city: Paris, days: 2 } }] }
  - when: { contains: long }
    reply: { text: "Once upon a", finish_reason: length }
default: { text: "Hello there, this is the scripted provider speaking." }
"#;

#[tokio::test]
async fn official_python_clients_parse_every_reply() {
    let Some(python) = aob_testkit::venv_dir()
        .map(|v| v.join("bin/python"))
        .filter(|p| p.is_file())
    else {
        eprintln!(
            "SKIPPED: no python in the project's virtualenv ($AOB_VENV or ~/.cache/aob/venv); run scripts/setup"
        );
        return;
    };
    let double = ScriptedProvider::start(Script::parse(SCRIPT, "conformance script").unwrap())
        .await
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(double.url())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{stdout}\n{stderr}",
        python.display(),
        script.display(),
        out.status
    );
    assert!(
        stdout.contains("conformance: all checks passed"),
        "{stdout}"
    );

    // Every call reached the double once: the clients were told not to retry.
    let Requests {
        total, by_model, ..
    } = double.requests();
    let calls = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(calls > 20, "{stdout}");
    assert_eq!(by_model.get("limited"), Some(&2), "{by_model:?}");
    assert_eq!(by_model.get("gpt-test"), Some(&7), "{by_model:?}");
    assert_eq!(by_model.get("claude-test"), Some(&6), "{by_model:?}");
    assert_eq!(total, 15);
}
