//! Publishing on JetStream with deterministic message ids, and dead letters.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;

use aob_model::audit::DecisionRecord;
use aob_model::wire::DeadLetter;

use crate::{Error, Result, now_ms};

/// Publishes with a `Nats-Msg-Id`; await the returned future for the server's ack.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    body: Bytes,
) -> Result<PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    if let Some(tp) = crate::trace::current() {
        headers.insert(crate::trace::HEADER, tp.as_str());
    }
    js.publish_with_headers(subject.clone(), headers, body)
        .await
        .map_err(|e| Error::Nats(format!("publishing to {subject}: {e}")))
}

/// Publishes and waits for the server's ack.
pub async fn publish_acked(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    body: Bytes,
) -> Result<()> {
    let subj = subject.clone();
    publish(js, subject, msg_id, body)
        .await?
        .await
        .map_err(|e| Error::Nats(format!("publishing to {subj}: {e}")))?;
    Ok(())
}

/// Publishes a decision record on `aob.<tenant>.audit`, its `record_id` as the message id,
/// with the current trace and span ids when it has none; await the returned future for the
/// server's ack.
pub async fn publish_record(
    js: &jetstream::Context,
    record: &DecisionRecord,
) -> Result<PublishAckFuture> {
    let stamped;
    let record = if record.trace_id.is_none() && crate::trace::ids().is_some() {
        let mut r = record.clone();
        crate::trace::stamp(&mut r);
        stamped = r;
        &stamped
    } else {
        record
    };
    let body = serde_json::to_vec(record)
        .map_err(|e| Error::Payload(format!("audit record {}: {e}", record.record_id)))?;
    publish(
        js,
        aob_streams::subjects::audit(&record.tenant),
        &record.record_id,
        body.into(),
    )
    .await
}

/// Records a message a component could not use on `aob.<tenant>.dlq.<component>`.
/// The tenant is taken from the subject (`unknown` when it has none).
pub async fn dead_letter(
    js: &jetstream::Context,
    component: &str,
    subject: &str,
    body: &[u8],
    reason: &str,
) {
    dead_letter_with_id(js, component, subject, body, reason, None).await;
}

/// Like [`dead_letter`], keeping the message's own `Nats-Msg-Id` (a start without a
/// `run_id` is named by it, and `aob dlq replay` keeps that name).
pub async fn dead_letter_with_id(
    js: &jetstream::Context,
    component: &str,
    subject: &str,
    body: &[u8],
    reason: &str,
    msg_id: Option<&str>,
) {
    let tenant = aob_streams::subjects::tenant_of(subject)
        .filter(|t| aob_streams::subjects::is_token(t))
        .unwrap_or("unknown");
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
    let letter = DeadLetter {
        component: component.to_string(),
        subject: subject.to_string(),
        reason: reason.to_string(),
        body: text,
        len: body.len(),
        ts_ms: now_ms(),
        original: (body.len() <= DeadLetter::KEPT_BYTES)
            .then(|| std::str::from_utf8(body).ok().map(str::to_string))
            .flatten(),
        msg_id: msg_id.map(str::to_string),
    };
    tracing::warn!(component, subject, reason, "dead-lettered a message");
    let Ok(bytes) = serde_json::to_vec(&letter) else {
        return;
    };
    let dlq = aob_streams::subjects::dlq(tenant, component.replace('.', "_").as_str());
    if let Err(e) = publish_acked(js, dlq, &ulid::Ulid::new().to_string(), bytes.into()).await {
        tracing::error!("could not dead-letter a message from {subject}: {e}");
    }
}
