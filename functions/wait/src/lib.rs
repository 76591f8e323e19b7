//! `aob-wait`: a durable wait. The step is parked as state: the handler sets a timer in
//! the `AOB_TIMERS` bucket holding the step's completed result, answers `waiting`, and the
//! timer service publishes the result when it is due. No message is held meanwhile.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aob_model::nodes::WaitConfig;
use aob_model::wire::{Outcome, StepError, StepResult, Task};
use aob_runtime::timers::{Timer, Timers};
use serde_json::{Value, json};

/// First instant (ms since the Unix epoch) that cannot be written as RFC 3339: year 10000.
const YEAR_10000_MS: u64 = 253_402_300_800_000;

/// The `wait` function.
#[derive(Debug, Clone)]
pub struct WaitHandler {
    timers: Timers,
}

impl WaitHandler {
    /// A handler setting its timers in `timers`.
    pub fn new(timers: Timers) -> Self {
        WaitHandler { timers }
    }
}

impl aob_runtime::Handler for WaitHandler {
    fn node_type(&self) -> &'static str {
        "wait"
    }

    async fn handle(
        &self,
        task: Task,
        _cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        let config: WaitConfig = aob_runtime::parse_config("wait", &task.config)?;
        match plan(&task, &config, aob_runtime::now_ms())? {
            Plan::Done { output } => Ok(Outcome::Completed { output }),
            Plan::Park { key, timer } => {
                self.timers.set(&key, &timer).await.map_err(|e| {
                    StepError::retryable(format!("setting the wait timer {key}: {e}"))
                })?;
                tracing::debug!(%key, due_ms = timer.due_ms, "wait parked");
                Ok(Outcome::Waiting {
                    until_ms: Some(timer.due_ms),
                    detail: None,
                })
            }
        }
    }
}

/// What a wait step does now.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Already due: complete at once with this output.
    Done {
        /// `{"waited_ms": 0, "until": <rfc3339>}`.
        output: Value,
    },
    /// Set this timer and answer `waiting`.
    Park {
        /// Timer key, `<tenant>.<run>.<attempt token>.wait`.
        key: String,
        /// The timer, whose body is the step's completed result.
        timer: Timer,
    },
}

/// Decides what a wait step does at `now_ms`: complete now, or park behind a timer.
pub fn plan(task: &Task, config: &WaitConfig, now_ms: u64) -> Result<Plan, StepError> {
    let due = due_ms(config, now_ms)?;
    let until = rfc3339(due);
    if due <= now_ms {
        return Ok(Plan::Done {
            output: json!({"waited_ms": 0, "until": until}),
        });
    }
    let result = StepResult {
        tenant: task.tenant.clone(),
        run_id: task.run_id.clone(),
        at: task.at.clone(),
        outcome: Outcome::Completed {
            output: json!({"waited_ms": due - now_ms, "until": until}),
        },
        duration_ms: 0,
    };
    let body = serde_json::to_value(&result)
        .map_err(|e| StepError::terminal(format!("cannot encode the wait result: {e}")))?;
    let timer = Timer {
        due_ms: due,
        subject: aob_streams::subjects::result(&task.tenant, &task.run_id),
        msg_id: aob_runtime::nats::result_msg_id(&result),
        body,
        // The result it publishes continues the step's trace.
        traceparent: aob_runtime::trace::current(),
    };
    let key = format!("{}.{}.{}.wait", task.tenant, task.run_id, task.at.token());
    Ok(Plan::Park { key, timer })
}

/// When a wait is due (ms since the Unix epoch): `now_ms + duration`, or `until`.
pub fn due_ms(config: &WaitConfig, now_ms: u64) -> Result<u64, StepError> {
    let due = match (&config.duration, &config.until) {
        (Some(d), None) => now_ms.saturating_add(d.as_millis()),
        (None, Some(until)) => parse_until(until)
            .map_err(|e| StepError::terminal(format!("invalid wait config: field `until`: {e}")))?,
        (None, None) => {
            return Err(StepError::terminal(
                "invalid wait config: field `duration`: a wait step needs `duration` or `until`",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(StepError::terminal(
                "invalid wait config: field `until`: give either `duration` or `until`, not both",
            ));
        }
    };
    if due >= YEAR_10000_MS {
        return Err(StepError::terminal(
            "invalid wait config: the wait would end after the year 9999",
        ));
    }
    Ok(due)
}

/// Parses an RFC 3339 time (`2026-12-01T09:00:00Z`, `…+02:00`, `2026-12-01 09:00:00`,
/// which is read as UTC) into ms since the Unix epoch.
pub fn parse_until(text: &str) -> Result<u64, String> {
    let s = text.trim().to_ascii_uppercase();
    let bad = |e: &dyn std::fmt::Display| {
        format!("`{text}` is not an RFC 3339 time ({e}); write it like `2026-12-01T09:00:00Z`")
    };
    let (base, offset_min) = split_offset(&s);
    let local = humantime::parse_rfc3339_weak(base).map_err(|e| bad(&e))?;
    let local_ms = local
        .duration_since(UNIX_EPOCH)
        .map_err(|e| bad(&e))?
        .as_millis();
    let utc_ms = i128::try_from(local_ms).map_err(|e| bad(&e))? - i128::from(offset_min) * 60_000;
    u64::try_from(utc_ms).map_err(|_| bad(&"before 1970"))
}

/// Splits a trailing `+HH:MM` / `-HH:MM` offset off a time; the offset in minutes.
fn split_offset(s: &str) -> (&str, i64) {
    let b = s.as_bytes();
    // At least `YYYY-MM-DDTHH:MM:SS` before the offset.
    if b.len() < 25 {
        return (s, 0);
    }
    let at = b.len() - 6;
    let sign = match b[at] {
        b'+' => 1,
        b'-' => -1,
        _ => return (s, 0),
    };
    let digit = |i: usize| b[i].is_ascii_digit().then(|| i64::from(b[i] - b'0'));
    let parts = (
        digit(at + 1),
        digit(at + 2),
        b[at + 3] == b':',
        digit(at + 4),
        digit(at + 5),
    );
    match parts {
        (Some(h1), Some(h2), true, Some(m1), Some(m2))
            if h1 * 10 + h2 < 24 && m1 * 10 + m2 < 60 =>
        {
            (&s[..at], sign * ((h1 * 10 + h2) * 60 + m1 * 10 + m2))
        }
        _ => (s, 0),
    }
}

/// RFC 3339 text (UTC, milliseconds) of a time in ms since the Unix epoch.
pub fn rfc3339(ms: u64) -> String {
    let t: SystemTime = UNIX_EPOCH + Duration::from_millis(ms.min(YEAR_10000_MS - 1));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::definition::Dur;
    use aob_model::wire::ErrorClass;

    /// 2026-01-01T00:00:00Z.
    const NOW: u64 = 1_767_225_600_000;

    fn task(config: Value) -> Task {
        let mut t = aob_testkit::task("wait", "pause", config, json!({}));
        t.at.item = Some(2);
        t
    }

    fn config(v: Value) -> WaitConfig {
        aob_runtime::parse_config("wait", &v).unwrap()
    }

    #[test]
    fn duration_is_added_to_now() {
        assert_eq!(
            due_ms(&config(json!({"duration": "1m 30s"})), NOW).unwrap(),
            NOW + 90_000
        );
        assert_eq!(
            due_ms(&config(json!({"duration": 2})), NOW).unwrap(),
            NOW + 2_000
        );
        let cfg = WaitConfig {
            duration: Some(Dur(Duration::from_millis(250))),
            until: None,
        };
        assert_eq!(due_ms(&cfg, NOW).unwrap(), NOW + 250);
    }

    #[test]
    fn until_is_parsed_as_rfc3339() {
        let at = |s: &str| due_ms(&config(json!({"until": s})), NOW).unwrap();
        assert_eq!(at("2026-01-01T00:00:10Z"), NOW + 10_000);
        assert_eq!(at("2026-01-01T00:00:10.5Z"), NOW + 10_500);
        assert_eq!(at("2026-01-01T00:00:10+00:00"), NOW + 10_000);
        assert_eq!(at("2026-01-01 00:00:10"), NOW + 10_000);
        assert_eq!(at("2026-01-01t00:00:10z"), NOW + 10_000);
        assert_eq!(at("2026-01-01T02:00:10+02:00"), NOW + 10_000);
        assert_eq!(at("2025-12-31T19:30:10.250-04:30"), NOW + 10_250);
    }

    #[test]
    fn bad_config_is_terminal() {
        for (cfg, field) in [
            (json!({"until": "tomorrow"}), "until"),
            (json!({"until": "2026-13-01T00:00:00Z"}), "until"),
            (json!({"until": "2026-01-01T00:00:00+25:00"}), "until"),
            (json!({}), "duration"),
            (
                json!({"duration": "1s", "until": "2026-01-01T00:00:00Z"}),
                "until",
            ),
        ] {
            let e = due_ms(&config(cfg.clone()), NOW).unwrap_err();
            assert_eq!(e.class, ErrorClass::Terminal, "{cfg}");
            assert!(
                e.message.contains(&format!("field `{field}`")),
                "{cfg}: {}",
                e.message
            );
        }
        let e = due_ms(&config(json!({"duration": "100000000 years"})), NOW).unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("9999"), "{}", e.message);

        let e = aob_runtime::parse_config::<WaitConfig>("wait", &json!({"duration": "soon"}))
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("field `duration`"), "{}", e.message);
        let e = aob_runtime::parse_config::<WaitConfig>("wait", &json!({"for": "1s"})).unwrap_err();
        assert!(e.message.contains("field `for`"), "{}", e.message);
    }

    #[test]
    fn past_times_complete_at_once() {
        let t = task(json!({"until": "2025-06-01T12:00:00Z"}));
        let cfg = config(t.config.clone());
        let p = plan(&t, &cfg, NOW).unwrap();
        assert_eq!(
            p,
            Plan::Done {
                output: json!({"waited_ms": 0, "until": "2025-06-01T12:00:00.000Z"})
            }
        );
        // Exactly now counts as due.
        let p = plan(&t, &config(json!({"duration": "0s"})), NOW).unwrap();
        assert!(matches!(p, Plan::Done { .. }), "{p:?}");
    }

    #[test]
    fn future_times_park_behind_a_timer() {
        let t = task(json!({"duration": "10s"}));
        let Plan::Park { key, timer } = plan(&t, &config(t.config.clone()), NOW).unwrap() else {
            panic!("expected a timer");
        };
        assert_eq!(key, format!("acme.run1.{}.wait", t.at.token()));
        assert_eq!(key, "acme.run1.pause-i2-l-1-a1.wait");
        assert_eq!(timer.due_ms, NOW + 10_000);
        assert_eq!(timer.subject, "aob.acme.result.run1");

        let result: StepResult = serde_json::from_value(timer.body.clone()).unwrap();
        assert_eq!(result.tenant, "acme");
        assert_eq!(result.run_id, "run1");
        assert_eq!(result.at, t.at);
        assert_eq!(result.duration_ms, 0);
        assert_eq!(
            result.outcome,
            Outcome::Completed {
                output: json!({"waited_ms": 10_000, "until": "2026-01-01T00:00:10.000Z"})
            }
        );
        assert_eq!(timer.msg_id, aob_runtime::nats::result_msg_id(&result));
        assert!(timer.msg_id.ends_with(".done"), "{}", timer.msg_id);
    }

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(rfc3339(NOW), "2026-01-01T00:00:00.000Z");
        assert_eq!(parse_until(&rfc3339(NOW + 1_234)).unwrap(), NOW + 1_234);
        assert_eq!(
            split_offset("2026-01-01T00:00:00-01:15"),
            ("2026-01-01T00:00:00", -75)
        );
        assert_eq!(
            split_offset("2026-01-01T00:00:00Z"),
            ("2026-01-01T00:00:00Z", 0)
        );
    }
}
