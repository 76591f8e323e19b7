//! `aob dlq ls | replay`: the messages components could not use, with the reasons, and
//! publishing them again once the cause is fixed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;

use aob_model::wire::DeadLetter;
use aob_streams::subjects;

use crate::ctx::Ctx;

/// One dead letter with its place in `AOB_DLQ`.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Stream sequence: what `aob dlq replay` takes.
    pub seq: u64,
    /// The letter.
    pub letter: DeadLetter,
}

/// The tenant's dead letters, oldest first.
pub async fn letters(js: &jetstream::Context, tenant: &str) -> Result<Vec<Letter>> {
    let stream = js
        .get_stream(aob_streams::DLQ)
        .await
        .map_err(|e| anyhow!("stream {}: {e} (run `aob streams apply`)", aob_streams::DLQ))?;
    let filter = subjects::dlq_of_tenant(tenant);
    let mut counts = stream.clone().info_with_subjects(&filter).await?;
    let mut total = 0usize;
    while let Some(entry) = counts.next().await {
        total += entry?.1;
    }
    if total == 0 {
        return Ok(Vec::new());
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut msgs = consumer.messages().await?;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await else {
            break;
        };
        let msg = msg?;
        let seq = msg.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
        let letter: DeadLetter = serde_json::from_slice(&msg.payload)
            .with_context(|| format!("dead letter {seq} is not valid"))?;
        out.push(Letter { seq, letter });
    }
    Ok(out)
}

/// `aob dlq ls`: one line per dead letter, with its reason.
pub async fn cmd_ls(ctx: &Ctx, json: bool) -> Result<ExitCode> {
    let js = jetstream::new(ctx.connect().await?);
    let all = letters(&js, &ctx.tenant).await?;
    if json {
        for l in &all {
            let mut v = serde_json::to_value(&l.letter)?;
            v["seq"] = l.seq.into();
            say!("{}", serde_json::to_string(&v)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        say!("no dead letters in tenant `{}`", ctx.tenant);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|l| {
            let at = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(l.letter.ts_ms),
            );
            vec![
                l.seq.to_string(),
                at.to_string(),
                l.letter.component.clone(),
                l.letter.subject.clone(),
                if l.letter.replayable().is_some() {
                    "yes".into()
                } else {
                    "no".into()
                },
                l.letter.reason.clone(),
            ]
        })
        .collect();
    crate::out::text(&crate::table::render(
        &["SEQ", "AT", "COMPONENT", "SUBJECT", "REPLAY", "REASON"],
        &rows,
    ));
    say!(
        "{} dead letter(s); `aob dlq replay SEQ...` publishes them again",
        all.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Where a dead letter goes when replayed: where it came from, except a result handed over
/// directly, which goes to its stream (a handoff without a reply subject is refused).
pub fn replay_subject(subject: &str) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        ["aob", tenant, "handoff", run] => subjects::result(tenant, run),
        _ => subject.to_string(),
    }
}

/// The body to publish again. A start without a `run_id` was named by its message id,
/// which the replay does not reuse (the server would drop it as a duplicate): the name is
/// written into the body instead, so the run gets the id its client was told.
pub fn replay_body(letter: &DeadLetter, body: &str) -> String {
    if letter.subject.ends_with(".cmd.start")
        && let Some(id) = letter.msg_id.as_deref().filter(|id| subjects::is_token(id))
        && let Ok(serde_json::Value::Object(mut cmd)) = serde_json::from_str(body)
        && !cmd.contains_key("run_id")
    {
        cmd.insert("run_id".into(), id.into());
        return serde_json::Value::Object(cmd).to_string();
    }
    body.to_string()
}

/// `aob dlq replay`: publishes the chosen dead letters again on their subjects (with the
/// message id `dlq-replay.<seq>`, so replaying twice in a row publishes once), then removes
/// them from `AOB_DLQ`. A letter whose body was not kept is reported and left in place.
pub async fn cmd_replay(ctx: &Ctx, seqs: &[u64], all: bool) -> Result<ExitCode> {
    if seqs.is_empty() && !all {
        bail!("name the dead letters to replay (`aob dlq ls` shows their SEQ), or pass --all");
    }
    let js = jetstream::new(ctx.connect().await?);
    let letters = letters(&js, &ctx.tenant).await?;
    let chosen: Vec<&Letter> = letters
        .iter()
        .filter(|l| all || seqs.contains(&l.seq))
        .collect();
    for seq in seqs {
        if !letters.iter().any(|l| l.seq == *seq) {
            bail!(
                "no dead letter {seq} in tenant `{}` (see `aob dlq ls`)",
                ctx.tenant
            );
        }
    }
    let stream = js.get_stream(aob_streams::DLQ).await?;
    let (mut replayed, mut kept) = (0, 0);
    for l in chosen {
        let Some(body) = l.letter.replayable() else {
            say!(
                "{}: not replayable: its body ({} bytes) was not kept whole (binary, or over {} bytes)",
                l.seq,
                l.letter.len,
                DeadLetter::KEPT_BYTES
            );
            kept += 1;
            continue;
        };
        let subject = replay_subject(&l.letter.subject);
        if subjects::tenant_of(&subject) != Some(ctx.tenant.as_str()) {
            say!(
                "{}: not replayable: subject {subject} is not of tenant `{}`",
                l.seq,
                ctx.tenant
            );
            kept += 1;
            continue;
        }
        aob_runtime::bus::publish_acked(
            &js,
            subject.clone(),
            &format!("dlq-replay.{}", l.seq),
            replay_body(&l.letter, body).into(),
        )
        .await?;
        stream.delete_message(l.seq).await.map_err(|e| {
            anyhow!(
                "replayed {} but could not remove it from {}: {e}",
                l.seq,
                aob_streams::DLQ
            )
        })?;
        say!("{}: replayed to {subject}", l.seq);
        replayed += 1;
    }
    say!("{replayed} replayed, {kept} left in place");
    Ok(if kept == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_handed_over_result_is_replayed_to_its_stream() {
        assert_eq!(
            super::replay_subject("aob.acme.handoff.r1"),
            "aob.acme.result.r1"
        );
        assert_eq!(
            super::replay_subject("aob.acme.cmd.start"),
            "aob.acme.cmd.start"
        );
    }
}
