//! `aob audit tail | flush | ls`: follow decision records, ask the sink to write its batch
//! now, and list the Parquet files with their row counts.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;

use aob_model::audit::DecisionRecord;

use crate::ctx::Ctx;

/// Where the audit files are: `--url`, else `AOB_AUDIT_URL`, else `.aob/audit` (what `aob dev` uses).
pub fn audit_url(flag: Option<&str>) -> Result<String> {
    if let Some(u) = flag.map(str::trim).filter(|u| !u.is_empty()) {
        return Ok(u.to_string());
    }
    let dir = std::env::current_dir()
        .context("reading the current directory")?
        .join(".aob")
        .join("audit");
    let default = crate::ctx::file_url(&dir);
    aob_fn_audit::store_url(|k| std::env::var(k).ok(), Some(&default)).map_err(|e| anyhow!("{e}"))
}

/// One line of `aob audit tail`.
pub fn format_record(r: &DecisionRecord) -> String {
    let secs = r.finished_at_us.div_euclid(1_000_000);
    let micros = r.finished_at_us.rem_euclid(1_000_000);
    let time = humantime::format_rfc3339_micros(
        std::time::UNIX_EPOCH + Duration::new(secs.max(0) as u64, (micros * 1000) as u32),
    );
    let mut s = format!(
        "{time}  {:<16} {:<14} run {}",
        r.event_kind.as_str(),
        r.actor,
        r.run_id
    );
    if let Some(step) = &r.step_id {
        s.push_str(&format!(" step {step}"));
        if let Some(a) = r.attempt {
            s.push_str(&format!(" #{a}"));
        }
    }
    if let Some(d) = &r.decision {
        s.push_str(&format!("  {d}"));
    }
    if let Some(m) = &r.model {
        s.push_str(&format!("  model {m}"));
    }
    if let (Some(i), Some(o)) = (r.tokens_in, r.tokens_out) {
        s.push_str(&format!("  tokens {i}/{o}"));
    }
    if let Some(e) = &r.error_message {
        s.push_str(&format!("  error: {e}"));
    } else if let Some(why) = &r.reason {
        s.push_str(&format!("  ({why})"));
    }
    s
}

/// `aob audit tail`: records of the tenant as they are published (with `--all`, from the
/// start of the stream). Stops after `limit` records when given.
pub async fn cmd_tail(
    ctx: &Ctx,
    all: bool,
    run: Option<&str>,
    json: bool,
    limit: Option<usize>,
) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(aob_streams::AUDIT).await.map_err(|e| {
        anyhow!(
            "stream {}: {e} (run `aob streams apply`)",
            aob_streams::AUDIT
        )
    })?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: aob_streams::subjects::audit(&ctx.tenant),
            deliver_policy: if all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("following {}: {e}", aob_streams::AUDIT))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow!("following {}: {e}", aob_streams::AUDIT))?;
    let mut shown = 0usize;
    while limit.is_none_or(|l| shown < l) {
        let Some(msg) = messages.next().await else {
            break;
        };
        let msg = msg.map_err(|e| anyhow!("reading {}: {e}", aob_streams::AUDIT))?;
        let record = match serde_json::from_slice::<DecisionRecord>(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("(skipped a message that is not a decision record: {e})");
                continue;
            }
        };
        if run.is_some_and(|r| r != record.run_id) {
            continue;
        }
        if json {
            say!("{}", String::from_utf8_lossy(&msg.payload));
        } else {
            say!("{}", format_record(&record));
        }
        shown += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// `aob audit flush`: asks the running sink to write its batch now and waits for the answer.
pub async fn cmd_flush(ctx: &Ctx, timeout: Duration) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let reply = tokio::time::timeout(
        timeout,
        client.request(aob_streams::subjects::AUDIT_FLUSH, "".into()),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "the audit sink did not answer within {}",
            humantime::format_duration(timeout)
        )
    })?
    .map_err(|e| match e.kind() {
        async_nats::client::RequestErrorKind::NoResponders => anyhow!(
            "no audit sink is running on {} (start `aob dev` or the aob-audit function)",
            ctx.nats_url
        ),
        _ => anyhow!("asking the audit sink to flush: {e}"),
    })?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
        .with_context(|| "the audit sink's answer is not JSON")?;
    if let Some(err) = answer.get("error").and_then(|e| e.as_str()) {
        eprintln!("error: the audit sink could not flush: {err}");
        return Ok(ExitCode::from(1));
    }
    let aob_audit::sink::FlushReport { files, rows, .. } = serde_json::from_value(answer)
        .with_context(|| "the audit sink's answer is not a flush report")?;
    if files.is_empty() {
        say!("nothing to flush");
    } else {
        say!("flushed {rows} records into {} file(s):", files.len());
        for f in files {
            say!("  {f}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `aob audit ls`: the Parquet files under the audit URL, with row counts from their footers.
pub async fn cmd_ls(url: &str) -> Result<ExitCode> {
    let (store, prefix) = aob_audit::open(url).map_err(|e| anyhow!("{e}"))?;
    let files = aob_audit::list(&store, &prefix)
        .await
        .map_err(|e| anyhow!("listing {url}: {e}"))?;
    if files.is_empty() {
        say!("no audit files under {url}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::with_capacity(files.len());
    let (mut total_rows, mut total_bytes) = (0u64, 0u64);
    for f in &files {
        total_rows += f.rows;
        total_bytes += f.size;
        rows.push(vec![
            f.path.to_string(),
            f.rows.to_string(),
            f.size.to_string(),
        ]);
    }
    crate::out::text(&crate::table::render(&["file", "rows", "bytes"], &rows));
    say!(
        "{} file(s), {total_rows} rows, {total_bytes} bytes",
        files.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::audit::AuditKind;

    #[test]
    fn a_record_reads_as_one_line() {
        let mut r = DecisionRecord::new(
            "id".into(),
            "default",
            "01RUN",
            AuditKind::ModelCall,
            "fn.llm",
            1_763_683_200_000_123,
        );
        r.step_id = Some("summarize".into());
        r.attempt = Some(2);
        r.decision = Some("completed".into());
        r.model = Some("gpt-4o-mini".into());
        r.tokens_in = Some(1200);
        r.tokens_out = Some(85);
        assert_eq!(
            format_record(&r),
            "2025-11-21T00:00:00.000123Z  model_call       fn.llm         run 01RUN step summarize #2  completed  model gpt-4o-mini  tokens 1200/85"
        );
        r.error_message = Some("HTTP 429".into());
        assert!(format_record(&r).ends_with("error: HTTP 429"));
    }

    #[test]
    fn the_audit_url_comes_from_the_flag_first() {
        assert_eq!(audit_url(Some("s3://b/p")).unwrap(), "s3://b/p");
        if std::env::var_os("AOB_AUDIT_URL").is_none() {
            let u = audit_url(None).unwrap();
            assert!(
                u.starts_with("file://") && u.ends_with("/.aob/audit"),
                "{u}"
            );
        }
    }
}
