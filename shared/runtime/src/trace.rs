//! Traces: an OpenTelemetry span per engine decision and per handler call, with the W3C
//! trace context (`traceparent`) carried in NATS message headers (and CloudEvents
//! extensions, and Lambda client contexts) from the start command to the last step, so
//! that one run is one trace.
//!
//! The context travels with the work: whoever handles a message runs inside [`scope`],
//! seeded with the message's `traceparent`; [`start`] opens a span under it and makes it
//! the parent of everything published meanwhile ([`crate::bus`] adds the header and fills
//! the `trace_id` and `span_id` of DecisionRecords). A run keeps its trace context in its
//! state, so a message that comes without one (a timer, a person's decision) stays in the
//! run's trace ([`adopt`]).
//!
//! Export is configured by the standard variables: OTLP over HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, batched
//! (`OTEL_BSP_*`), with `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`;
//! `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn export off. Without
//! export, spans still get ids, so records still carry them.

use std::borrow::Cow;
use std::cell::RefCell;
use std::future::Future;
use std::sync::OnceLock;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};

use crate::{Error, Result};

/// The header (and CloudEvents extension) carrying the trace context.
pub const HEADER: &str = "traceparent";

tokio::task_local! {
    static CURRENT: RefCell<Option<SpanContext>>;
}

static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Parses a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`).
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let cx = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// The `traceparent` of a span context.
pub fn format(cx: &SpanContext) -> Option<String> {
    cx.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            cx.trace_id(),
            cx.span_id(),
            cx.trace_flags().to_u8()
        )
    })
}

/// Installs the tracer provider of this process (`service` names it unless
/// `OTEL_SERVICE_NAME` does), with the OTLP exporter when the environment configures one.
/// Idempotent; call [`shutdown`] before exiting to send what is buffered.
pub fn init(service: &str) -> Result<()> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let export = !disabled
        && (var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some());
    if export {
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "http/protobuf".into());
        if protocol != "http/protobuf" {
            return Err(Error::Config(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL=`{protocol}`: AOB exports OTLP over `http/protobuf` (port 4318 of a collector)"
            )));
        }
    }
    let mut resource = opentelemetry_sdk::Resource::builder();
    if var("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let resource = resource.build();
    // The exporter's HTTP client is a blocking one: it must be built off the async runtime.
    let built = std::thread::spawn(move || {
        let mut builder =
            opentelemetry_sdk::trace::SdkTracerProvider::builder().with_resource(resource);
        if export {
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build()
                .map_err(|e| Error::Config(format!("the OTLP exporter: {e}")))?;
            builder = builder.with_batch_exporter(exporter);
        }
        Ok::<_, Error>(builder.build())
    })
    .join()
    .map_err(|_| Error::Config("building the tracer provider panicked".into()))??;
    opentelemetry::global::set_tracer_provider(built.clone());
    let _ = PROVIDER.set(built);
    if export {
        tracing::info!(service, "exporting traces over OTLP");
    }
    Ok(())
}

/// Sends the spans still buffered and stops the exporter.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        // Blocking export: off the async runtime, as for building it.
        let _ = std::thread::spawn(move || {
            let _ = p.force_flush();
            let _ = p.shutdown();
        })
        .join();
    }
}

/// Sends the spans buffered so far, without stopping the exporter.
pub async fn flush() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        let _ = tokio::task::spawn_blocking(move || p.force_flush()).await;
    }
}

/// Runs `work` with `traceparent` (a message's header) as the current trace context.
pub async fn scope<F: Future>(traceparent: Option<&str>, work: F) -> F::Output {
    CURRENT
        .scope(RefCell::new(traceparent.and_then(parse)), work)
        .await
}

/// Makes `traceparent` the current trace context when there is none yet (a message that
/// came without one belongs to its run's trace).
pub fn adopt(traceparent: Option<&str>) {
    let _ = CURRENT.try_with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = traceparent.and_then(parse);
        }
    });
}

fn current_context() -> Option<SpanContext> {
    CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
}

/// The current trace context, as a `traceparent` to pass on.
pub fn current() -> Option<String> {
    current_context().as_ref().and_then(format)
}

/// The current trace and span ids (hex), for a DecisionRecord.
pub fn ids() -> Option<(String, String)> {
    let cx = current_context().filter(SpanContext::is_valid)?;
    Some((cx.trace_id().to_string(), cx.span_id().to_string()))
}

/// Fills a record's trace and span ids from the current context, when it has none.
pub fn stamp(record: &mut aob_model::audit::DecisionRecord) {
    if record.trace_id.is_none()
        && let Some((t, s)) = ids()
    {
        record.trace_id = Some(t);
        record.span_id = Some(s);
    }
}

/// An open span; ended when dropped, and its parent made current again.
pub struct Span {
    inner: opentelemetry::global::BoxedSpan,
    parent: Option<SpanContext>,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Span")
            .field("context", self.inner.span_context())
            .finish_non_exhaustive()
    }
}

/// Opens a span under the current context (a new trace when there is none) and makes it
/// current: what is published until it ends is its child.
pub fn start(name: impl Into<Cow<'static, str>>, kind: SpanKind, attrs: Vec<KeyValue>) -> Span {
    let parent = current_context();
    let parent_cx = match &parent {
        Some(p) => Context::new().with_remote_span_context(p.clone()),
        None => Context::new(),
    };
    let tracer = opentelemetry::global::tracer_provider().tracer("aob");
    let inner = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attrs)
        .start_with_context(&tracer, &parent_cx);
    let own = inner.span_context().clone();
    if own.is_valid() {
        let _ = CURRENT.try_with(|c| *c.borrow_mut() = Some(own));
    }
    Span { inner, parent }
}

impl Span {
    /// Adds an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.inner.set_attribute(KeyValue::new(key, value));
    }
    /// Marks the span failed, with why.
    pub fn fail(&mut self, message: impl Into<Cow<'static, str>>) {
        self.inner.set_status(Status::error(message));
    }
    /// Its `traceparent`.
    pub fn traceparent(&self) -> Option<String> {
        format(self.inner.span_context())
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.inner.end();
        let parent = self.parent.take();
        let _ = CURRENT.try_with(|c| *c.borrow_mut() = parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_garbage_is_none() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(format(&parse(tp).unwrap()).as_deref(), Some(tp));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-xyz-b7ad6b7169203331-01",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_span_is_the_child_of_the_scope_and_its_parent_comes_back() {
        init("test").unwrap();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        scope(Some(tp), async {
            {
                let span = start("step", SpanKind::Internal, vec![]);
                let own = span.traceparent().unwrap();
                assert!(
                    own.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                    "{own}"
                );
                assert_ne!(own, tp);
                assert_eq!(current().as_deref(), Some(own.as_str()));
                let mut r = aob_model::audit::DecisionRecord::new(
                    "r".into(),
                    "t",
                    "run",
                    aob_model::audit::AuditKind::TaskExecuted,
                    "x",
                    0,
                );
                stamp(&mut r);
                assert_eq!(
                    r.trace_id.as_deref(),
                    Some("0af7651916cd43dd8448eb211c80319c")
                );
                assert_eq!(
                    Some(r.span_id.unwrap()),
                    own.split('-').nth(2).map(str::to_string)
                );
            }
            assert_eq!(current().as_deref(), Some(tp));
        })
        .await;
        // Outside a scope there is no context, and adopting one is a no-op.
        adopt(Some(tp));
        assert_eq!(current(), None);
        scope(None, async {
            adopt(Some(tp));
            assert_eq!(current().as_deref(), Some(tp));
            adopt(Some(
                "00-11111111111111111111111111111111-2222222222222222-01",
            ));
            assert_eq!(current().as_deref(), Some(tp), "the first context stays");
        })
        .await;
    }
}
