//! Every subject name AOB uses, in one place. The tenant comes first so that NATS
//! permissions and accounts can isolate tenants.

/// Start commands: `aob.<tenant>.cmd.start`.
pub fn start(tenant: &str) -> String {
    format!("aob.{tenant}.cmd.start")
}

/// Signals to a run (cancel, timers): `aob.<tenant>.cmd.signal.<run>`.
pub fn signal(tenant: &str, run: &str) -> String {
    format!("aob.{tenant}.cmd.signal.{run}")
}

/// Signals only AOB itself sends (timer firings, step timeouts):
/// `aob.<tenant>.cmd.internal.<run>`. Clients are granted `cmd.start` and `cmd.signal.*`,
/// never this subject, so no client can forge a timeout; the engine refuses a timer signal
/// arriving on [`signal`].
pub fn internal_signal(tenant: &str, run: &str) -> String {
    format!("aob.{tenant}.cmd.internal.{run}")
}

/// The internal-signal subject for a signal subject of the same run (timers stored before
/// internal signals existed name the client subject).
pub fn internal_for(subject: &str) -> Option<String> {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        ["aob", tenant, "cmd", "signal", run] => Some(internal_signal(tenant, run)),
        _ => None,
    }
}

/// Everything the steps of a run emit: `aob.<tenant>.stream.<run>.>`.
pub fn stream_of_run(tenant: &str, run: &str) -> String {
    format!("aob.{tenant}.stream.{run}.>")
}

/// What a running step emits (progress, streamed chunks): `aob.<tenant>.stream.<run>.<step>`,
/// core NATS only, captured by no stream.
pub fn stream(tenant: &str, run: &str, step: &str) -> String {
    format!("aob.{tenant}.stream.{run}.{step}")
}

/// Tasks for a node type: `aob.<tenant>.task.<type>`.
pub fn task(tenant: &str, node_type: &str) -> String {
    format!("aob.{tenant}.task.{node_type}")
}

/// Tasks for a node type, all tenants.
pub fn task_all_tenants(node_type: &str) -> String {
    format!("aob.*.task.{node_type}")
}

/// Step results of a run: `aob.<tenant>.result.<run>`.
pub fn result(tenant: &str, run: &str) -> String {
    format!("aob.{tenant}.result.{run}")
}

/// One history event of a run: `aob.<tenant>.run.<run>.<kind>`.
pub fn history(tenant: &str, run: &str, kind: &str) -> String {
    format!("aob.{tenant}.run.{run}.{kind}")
}

/// All history of a run.
pub fn history_of(tenant: &str, run: &str) -> String {
    format!("aob.{tenant}.run.{run}.>")
}

/// All history of a tenant.
pub fn history_of_tenant(tenant: &str) -> String {
    format!("aob.{tenant}.run.>")
}

/// `abort` events of every run: functions listen to stop in-flight work.
pub const ABORTS: &str = "aob.*.run.*.abort";

/// Audit records: `aob.<tenant>.audit`.
pub fn audit(tenant: &str) -> String {
    format!("aob.{tenant}.audit")
}

/// Audit records of every tenant.
pub const AUDIT_ALL_TENANTS: &str = "aob.*.audit";

/// Step results of every tenant and run: the engine also reads them as they are
/// published, before `AOB_RESULTS` stores them (a queue group, so one engine each).
pub const RESULTS_ALL_TENANTS: &str = "aob.*.result.*";

/// The core NATS queue group of the engines: each result read as published, and each
/// handoff, goes to one engine instance.
pub const ENGINE_QUEUE: &str = "aob-engine";

/// A step result handed to the engine directly: `aob.<tenant>.handoff.<run>`, a core NATS
/// request that no stream stores. The engine replies with a
/// [`HandoffReply`](aob_model::wire::HandoffReply) once the result is in the
/// run's stored state; a sender without that reply publishes the result to [`result`].
pub fn handoff(tenant: &str, run: &str) -> String {
    format!("aob.{tenant}.handoff.{run}")
}

/// Result handoffs of every tenant and run (the engines' queue group [`ENGINE_QUEUE`]).
pub const HANDOFFS_ALL_TENANTS: &str = "aob.*.handoff.*";

/// Core NATS request subject asking the audit sink to write its batch now. The reply, sent
/// once the objects are durable and the batch acknowledged, is JSON:
/// `{"files": [<object paths>], "rows": <n>, "pending": <records not yet acknowledged>}`.
pub const AUDIT_FLUSH: &str = "aob.audit.flush";

/// Subject of the parked message of [`crate::TASKS`]: no consumer reads it (see
/// [`crate::Topology::parked`]).
pub const PARK_TASKS: &str = "aob.park.tasks";

/// Subject of the parked message of [`crate::RESULTS`].
pub const PARK_RESULTS: &str = "aob.park.results";

/// Dead letters of a component: `aob.<tenant>.dlq.<component>`.
pub fn dlq(tenant: &str, component: &str) -> String {
    format!("aob.{tenant}.dlq.{component}")
}

/// Dead letters of a tenant.
pub fn dlq_of_tenant(tenant: &str) -> String {
    format!("aob.{tenant}.dlq.>")
}

/// The tenant token of an `aob.<tenant>.…` subject.
pub fn tenant_of(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    (parts.next() == Some("aob")).then_some(())?;
    parts.next().filter(|t| !t.is_empty())
}

/// True for a string usable as one subject token and KV key part: `[A-Za-z0-9_-]`, 1 to 128.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_is_the_second_token() {
        assert_eq!(tenant_of(&start("acme")), Some("acme"));
        assert_eq!(tenant_of("nats.acme.cmd"), None);
        assert!(is_token("run-01_AB"));
        assert!(!is_token("a.b") && !is_token("*") && !is_token(""));
    }

    #[test]
    fn audit_subjects() {
        assert_eq!(audit("acme"), "aob.acme.audit");
        assert_eq!(tenant_of(&audit("acme")), Some("acme"));
        // The flush request is core NATS: no stream may capture it.
        fn matches(filter: &str, subject: &str) -> bool {
            let (f, s): (Vec<_>, Vec<_>) =
                (filter.split('.').collect(), subject.split('.').collect());
            for (i, tok) in f.iter().enumerate() {
                match *tok {
                    ">" => return s.len() > i,
                    "*" if i < s.len() => {}
                    t if s.get(i) == Some(&t) => {}
                    _ => return false,
                }
            }
            f.len() == s.len()
        }
        assert!(matches(AUDIT_ALL_TENANTS, &audit("acme")));
        for stream in crate::Topology::default().streams() {
            for filter in &stream.subjects {
                assert!(
                    !matches(filter, AUDIT_FLUSH),
                    "{filter} captures {AUDIT_FLUSH}"
                );
            }
        }
    }
}
