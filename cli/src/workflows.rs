//! `aob workflow validate|publish|list|show`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use aob_model::Workflow;
use aob_model::definition::Compensate;
use aob_runtime::registry::Registry;
use serde_json::Value;

use crate::ctx::Ctx;
use crate::progress::{compact_json, one_line};

/// What checking one file came to: `ok: FILE (name, N steps)`, or one line per problem.
pub fn check_file(path: &Path) -> std::result::Result<(Workflow, String), Vec<String>> {
    match aob_model::load_file(path) {
        Ok(wf) => {
            let n = wf.steps.len();
            let line = format!(
                "ok: {} ({}, {n} step{})",
                path.display(),
                wf.name,
                if n == 1 { "" } else { "s" }
            );
            Ok((wf, line))
        }
        Err(aob_model::Error::Invalid { problems }) => {
            Err(problems.iter().map(|p| p.to_string()).collect())
        }
        Err(e) => Err(vec![e.to_string()]),
    }
}

/// Validates files; exit code 1 when any has a problem.
pub fn validate(files: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    for f in files {
        match check_file(f) {
            Ok((_, line)) => say!("{line}"),
            Err(problems) => {
                bad = true;
                for p in problems {
                    say!("{p}");
                }
            }
        }
    }
    if bad {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// How a publish went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Stored as a new version.
    New(u32),
    /// The latest version already holds this very definition; nothing was stored.
    Unchanged(u32),
}

/// Publishes a validated definition. A file without a version whose definition equals the
/// latest published one is not published again, so that republishing an unchanged file
/// does not mint versions.
pub async fn publish_workflow(
    js: &async_nats::jetstream::Context,
    tenant: &str,
    wf: &Workflow,
) -> Result<Published> {
    let registry = Registry::open(js).await?;
    if wf.version.is_none() {
        match registry.get(tenant, &wf.name, None).await {
            Ok((latest, v)) => {
                let mut same = wf.clone();
                same.version = Some(v);
                if latest == same {
                    return Ok(Published::Unchanged(v));
                }
            }
            Err(aob_runtime::Error::WorkflowNotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let v = registry.publish(tenant, wf).await?;
    Ok(Published::New(v))
}

/// `aob workflow publish FILE`.
pub async fn publish(ctx: &Ctx, file: &Path) -> Result<ExitCode> {
    let wf = match check_file(file) {
        Ok((wf, _)) => wf,
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!("error: {} is not valid; nothing published", file.display());
            return Ok(ExitCode::from(1));
        }
    };
    let client = ctx.connect().await?;
    let js = async_nats::jetstream::new(client);
    match publish_workflow(&js, &ctx.tenant, &wf)
        .await
        .with_context(|| format!("publishing {}", file.display()))?
    {
        Published::New(v) => say!("published {} v{v}", wf.name),
        Published::Unchanged(v) => {
            say!("unchanged: {} v{v} is already this definition", wf.name)
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `aob workflow list`.
pub async fn list(ctx: &Ctx) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let registry = Registry::open(&async_nats::jetstream::new(client)).await?;
    let all = registry.list(&ctx.tenant).await?;
    if all.is_empty() {
        say!("no workflows in tenant `{}`", ctx.tenant);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .into_iter()
        .map(|(name, v)| vec![name, format!("v{v}")])
        .collect();
    crate::out::text(&crate::table::render(&["NAME", "LATEST"], &rows));
    Ok(ExitCode::SUCCESS)
}

/// `aob workflow show NAME`.
pub async fn show(ctx: &Ctx, name: &str, version: Option<u32>, json: bool) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let registry = Registry::open(&async_nats::jetstream::new(client)).await?;
    let (wf, v) = registry.get(&ctx.tenant, name, version).await?;
    if json {
        say!("{}", serde_json::to_string_pretty(&wf)?);
    } else {
        crate::out::text(&summary(&wf, v));
    }
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => compact_json(other, 200),
    }
}

/// A YAML-like summary of a definition: its steps with their type, needs and options.
pub fn summary(wf: &Workflow, version: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "name: {}", wf.name);
    let _ = writeln!(out, "version: {version}");
    if let Some(d) = &wf.description {
        let _ = writeln!(out, "description: {}", one_line(d, 200));
    }
    if let Some(schema) = &wf.input {
        let _ = writeln!(out, "input: {}", compact_json(schema, 200));
    }
    if let Some(t) = &wf.timeout {
        let _ = writeln!(out, "timeout: {t}");
    }
    let _ = writeln!(out, "steps:");
    let compensations = wf.compensation_steps();
    for s in &wf.steps {
        let _ = writeln!(out, "  - id: {}", s.id);
        let _ = writeln!(out, "    type: {}", s.kind);
        if !s.needs.is_empty() {
            let _ = writeln!(out, "    needs: [{}]", s.needs.join(", "));
        }
        let trigger = serde_json::to_value(s.trigger)
            .ok()
            .map(|t| text(&t))
            .unwrap_or_default();
        if trigger != "all_success" && !trigger.is_empty() {
            let _ = writeln!(out, "    trigger: {trigger}");
        }
        if let Some(w) = &s.when {
            let _ = writeln!(out, "    when: {w}");
        }
        if let Some(f) = &s.for_each {
            let _ = writeln!(
                out,
                "    for_each: {} (concurrency {})",
                f.items, f.concurrency
            );
        }
        if let Some(l) = &s.loop_ {
            let _ = writeln!(
                out,
                "    loop: until {} (at most {} iterations)",
                l.until, l.max_iterations
            );
        }
        if let Some(r) = &s.retry {
            let b = &r.backoff;
            let _ = writeln!(
                out,
                "    retry: {} attempts, backoff {} ×{} up to {}",
                r.max_attempts, b.initial, b.multiplier, b.max
            );
        }
        if let Some(t) = &s.timeout {
            let _ = writeln!(out, "    timeout: {t}");
        }
        match &s.compensate {
            Some(Compensate::Step { step }) => {
                let _ = writeln!(out, "    compensate: step {step}");
            }
            Some(Compensate::Action { kind, .. }) => {
                let _ = writeln!(out, "    compensate: {kind} action");
            }
            None => {}
        }
        if compensations.contains(&s.id.as_str()) {
            let _ = writeln!(out, "    # compensation only: not in the forward path");
        }
        for (k, v) in &s.config {
            let _ = writeln!(out, "    {k}: {}", text(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lines() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.yaml");
        std::fs::write(
            &good,
            "name: pair\nsteps:\n  - id: a\n    type: transform\n    output: {n: 1}\n  - id: b\n    type: transform\n    needs: [a]\n    output: {x: \"{{ steps.a.output.n }}\"}\n",
        )
        .unwrap();
        let (wf, line) = check_file(&good).unwrap();
        assert_eq!(line, format!("ok: {} (pair, 2 steps)", good.display()));

        let s = summary(&wf, 1);
        assert!(
            s.contains("  - id: b\n    type: transform\n    needs: [a]\n"),
            "{s}"
        );

        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "name: pair\nsteps:\n  - id: a\n    type: nope\n    needs: [zzz]\n",
        )
        .unwrap();
        let problems = check_file(&bad).unwrap_err();
        assert!(problems.len() >= 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with(&bad.display().to_string())),
            "{problems:?}"
        );

        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, "name: [").unwrap();
        assert_eq!(check_file(&broken).unwrap_err().len(), 1);
    }
}
