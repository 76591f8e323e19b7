//! `aob policy push|ls|test`: Rego policies in the `AOB_POLICIES` bucket, and trying them
//! locally.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use aob_policy::{ALL, Bundle, Decision, Input, Outcome, PolicySet, Source};
use serde_json::Value;

use crate::ctx::Ctx;

/// Exit code of `aob policy test` when the policies allow.
pub const EXIT_ALLOW: u8 = 0;
/// ... when they deny.
pub const EXIT_DENY: u8 = 1;
/// ... when they require an approval.
pub const EXIT_APPROVAL: u8 = 2;
/// ... when a file or the input is wrong, so nothing was decided.
pub const EXIT_ERROR: u8 = 3;

/// The exit code of a decision.
pub fn exit_code(d: &Decision) -> u8 {
    match d.outcome {
        Outcome::Allow => EXIT_ALLOW,
        Outcome::Deny => EXIT_DENY,
        Outcome::RequireApproval => EXIT_APPROVAL,
    }
}

/// Reads Rego files given on the command line: `(file name, source labelled with its path)`.
fn read_files(files: &[PathBuf]) -> Result<BTreeMap<String, Source>> {
    let mut out = BTreeMap::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.ends_with(".rego"))
            .with_context(|| format!("{}: a policy file's name ends in .rego", path.display()))?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the file", path.display()))?;
        let src = Source {
            label: path.display().to_string(),
            text,
        };
        if out.insert(name.to_string(), src).is_some() {
            bail!("{}: two files named {name} were given", path.display());
        }
    }
    Ok(out)
}

/// Reads what `aob policy test` was given: Rego files (applied to every tenant) and
/// directories laid out as `AOB_POLICY_DIR` (`_all/` and tenant folders).
pub fn local_set(paths: &[PathBuf]) -> Result<PolicySet> {
    let mut set = PolicySet::new();
    let (dirs, files): (Vec<&PathBuf>, Vec<&PathBuf>) = paths.iter().partition(|p| p.is_dir());
    for d in dirs {
        set.merge(&aob_policy::read_dir(d)?);
    }
    let files: Vec<PathBuf> = files.into_iter().cloned().collect();
    for (name, src) in read_files(&files)? {
        set.insert(ALL, &name, src);
    }
    Ok(set)
}

/// The compile error's full text (with the offending line) when there is one.
fn explain(e: &aob_policy::Error) -> String {
    match e {
        aob_policy::Error::Compile {
            detail, message, ..
        } => {
            // The detail ends with the message that the first line already gave.
            let snippet = detail
                .trim_end()
                .strip_suffix(message.as_str())
                .and_then(|d| d.trim_end().strip_suffix("error:"))
                .unwrap_or(detail);
            format!("{e}\n{}", snippet.trim_end())
        }
        _ => e.to_string(),
    }
}

/// `aob policy test FILE... --input JSON`: the decision, and an exit code saying it.
pub fn cmd_test(ctx: &Ctx, paths: &[PathBuf], input: Option<&str>, json: bool) -> ExitCode {
    match test(ctx, paths, input) {
        Ok(d) => {
            if json {
                say!("{}", serde_json::to_string(&d).unwrap_or_default());
            } else {
                say!("{}", describe(&d));
            }
            ExitCode::from(exit_code(&d))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn test(ctx: &Ctx, paths: &[PathBuf], input: Option<&str>) -> Result<Decision> {
    let mut value = crate::input::parse_input(input)?;
    // The tenant picks the policy set; the global --tenant fills it in when left out.
    if let Value::Object(map) = &mut value {
        map.entry("tenant")
            .or_insert_with(|| Value::String(ctx.tenant.clone()));
    }
    let input: Input = serde_json::from_value(value).context(
        "--input is not a policy input (see shared/policy/README.md: kind, tenant, user, run, step, model, tool, arguments, spend)",
    )?;
    let set = local_set(paths)?;
    let compiled = set.compile().map_err(|e| anyhow::anyhow!(explain(&e)))?;
    Ok(compiled.evaluate(&input))
}

/// `deny: <reason> (policy <id>, version <v>)`.
pub fn describe(d: &Decision) -> String {
    let mut s = d.outcome.to_string();
    if let Some(r) = &d.reason {
        s.push_str(": ");
        s.push_str(r);
    }
    match &d.policy_id {
        Some(id) => s.push_str(&format!(" (policy {id}, version {})", d.version)),
        None => s.push_str(&format!(" (version {})", d.version)),
    }
    s
}

/// `aob policy push FILE... [--all] [--replace]`.
pub async fn cmd_push(ctx: &Ctx, files: &[PathBuf], all: bool, replace: bool) -> Result<ExitCode> {
    let scope = if all { ALL } else { ctx.tenant.as_str() };
    let pushed = read_files(files)?;
    let client = ctx.connect().await?;
    let js = async_nats::jetstream::new(client);
    let store = aob_policy::open_bucket(&js).await?;
    let mut current = aob_policy::read_kv(&store).await?;
    let entry = store
        .entry(scope)
        .await
        .with_context(|| format!("reading key {scope} of {}", aob_streams::POLICIES))?
        .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
    let old = match &entry {
        Some(e) => aob_policy::parse_bundle(scope, &e.value)?,
        None => Bundle::default(),
    };
    let mut bundle = if replace {
        Bundle::default()
    } else {
        old.clone()
    };
    let mut files_now: BTreeMap<String, Source> = old.sources(scope);
    if replace {
        files_now.clear();
    }
    for (name, src) in &pushed {
        bundle.modules.insert(name.clone(), src.text.clone());
        files_now.insert(name.clone(), src.clone());
    }
    // The whole bucket is compiled as it will be, so a module clashing with another
    // scope's is refused here rather than by every function's reload.
    current.set_scope(scope, files_now);
    let compiled = match current.compile() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", explain(&e));
            eprintln!("nothing pushed");
            return Ok(ExitCode::from(1));
        }
    };
    let names: Vec<&str> = pushed.keys().map(String::as_str).collect();
    let version = compiled.version(scope);
    if bundle == old && entry.is_some() {
        say!(
            "unchanged: {scope} already has {} (version {version})",
            names.join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let value = serde_json::to_vec(&bundle)?;
    // Compare-and-set: two admins pushing at once must not drop each other's files.
    let written = match &entry {
        Some(e) => store
            .update(scope, value.into(), e.revision)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => store
            .create(scope, value.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = written {
        bail!(
            "writing key {scope} of {}: {e} (changed meanwhile? run the command again)",
            aob_streams::POLICIES
        );
    }
    say!(
        "pushed {} to {scope} (version {version}, {} file{} in {scope})",
        names.join(", "),
        bundle.modules.len(),
        if bundle.modules.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

/// `aob policy ls`: every key of the bucket with its files and the version in force.
pub async fn cmd_ls(ctx: &Ctx) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = async_nats::jetstream::new(client);
    let store = aob_policy::open_bucket(&js).await?;
    let set = aob_policy::read_kv(&store).await?;
    if set.is_empty() {
        say!(
            "no policies in {} (push some with `aob policy push FILE...`)",
            aob_streams::POLICIES
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (compiled, code) = match set.compile() {
        Ok(c) => (Some(c), ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: the bucket's policies do not compile: {e}");
            (None, ExitCode::from(1))
        }
    };
    let rows: Vec<Vec<String>> = set
        .scopes()
        .map(|(scope, files)| {
            let version = compiled
                .as_ref()
                .map_or("-".to_string(), |c| c.version(scope).to_string());
            let names: Vec<&str> = files.keys().map(String::as_str).collect();
            vec![scope.to_string(), version, names.join(", ")]
        })
        .collect();
    crate::out::text(&crate::table::render(&["SCOPE", "VERSION", "FILES"], &rows));
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
    }

    fn run(paths: &[PathBuf], input: &str) -> u8 {
        let ctx = Ctx::new("acme", Some("nats://unused:1")).unwrap();
        match test(&ctx, paths, Some(input)) {
            Ok(d) => exit_code(&d),
            Err(_) => EXIT_ERROR,
        }
    }

    #[test]
    fn test_exit_codes_follow_the_decision() {
        let dir = [examples()];
        let refund = |tenant: &str, amount: u32| {
            format!(
                r#"{{"kind": "tool", "tenant": "{tenant}", "tool": {{"name": "payments.refund"}}, "arguments": {{"amount": {amount}}}}}"#
            )
        };
        assert_eq!(run(&dir, &refund("acme", 10)), EXIT_ALLOW);
        assert_eq!(run(&dir, &refund("globex", 10)), EXIT_DENY);
        assert_eq!(run(&dir, &refund("acme", 5000)), EXIT_APPROVAL);
        // The tenant comes from --tenant when the input leaves it out.
        assert_eq!(
            run(
                &dir,
                r#"{"kind": "tool", "tool": {"name": "payments.refund"}, "arguments": {"amount": 5000}}"#
            ),
            EXIT_APPROVAL
        );
        assert_eq!(run(&dir, r#"{"kind": "nope"}"#), EXIT_ERROR);
    }

    #[test]
    fn files_apply_to_every_tenant_and_bad_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("cap.rego");
        std::fs::copy(examples().join("_all/spend_cap.rego"), &good).unwrap();
        let input = r#"{"kind": "model", "tenant": "x", "spend": {"run_usd": 0.7}}"#;
        assert_eq!(run(std::slice::from_ref(&good), input), EXIT_DENY);

        let bad = tmp.path().join("bad.rego");
        std::fs::write(&bad, "package aob.policies.bad\n\ndeny contains x if {\n").unwrap();
        let ctx = Ctx::new("acme", Some("nats://unused:1")).unwrap();
        let err = format!(
            "{:#}",
            test(&ctx, &[good, bad.clone()], Some(input)).unwrap_err()
        );
        assert!(err.starts_with(&format!("{}:", bad.display())), "{err}");
    }
}
