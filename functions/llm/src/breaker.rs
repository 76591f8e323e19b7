//! A circuit breaker per provider, and the latency each model is observed to answer in.
//! Both are per instance: a breaker reflects what this instance sees of the provider, and
//! opens within a few calls wherever the provider fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is out; others wait for its outcome.
    HalfOpen,
}

/// Why a call may not go to a provider now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("circuit breaker of provider {provider} is open after {failures} failures in a row; next trial in {}", humantime::format_duration(*.retry_after))]
pub struct Open {
    /// The provider.
    pub provider: String,
    /// Failures that opened it.
    pub failures: u32,
    /// When a trial call may go.
    pub retry_after: Duration,
}

/// Breakers by provider name.
#[derive(Debug, Default)]
pub struct Breakers {
    states: Mutex<HashMap<String, State>>,
}

impl Breakers {
    /// May a call go to `provider` now? A call let through an expired open breaker is the
    /// half-open trial.
    pub fn admit(&self, provider: &str, cfg: &BreakerConfig) -> Result<(), Open> {
        let Ok(mut states) = self.states.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let state = states
            .entry(provider.to_string())
            .or_insert(State::Closed { failures: 0 });
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now >= until => {
                *state = State::HalfOpen;
                Ok(())
            }
            State::Open { until } => Err(Open {
                provider: provider.to_string(),
                failures: cfg.failures,
                retry_after: until - now,
            }),
            State::HalfOpen => Err(Open {
                provider: provider.to_string(),
                failures: cfg.failures,
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Records a call's outcome: a success closes the breaker, a failure counts (and
    /// reopens a half-open one at once).
    pub fn record(&self, provider: &str, cfg: &BreakerConfig, ok: bool) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let state = states
            .entry(provider.to_string())
            .or_insert(State::Closed { failures: 0 });
        let open = State::Open {
            until: Instant::now() + cfg.cool_down.0,
        };
        *state = match (*state, ok) {
            (_, true) => State::Closed { failures: 0 },
            (State::HalfOpen, false) => open,
            (State::Closed { failures }, false) if failures + 1 >= cfg.failures => open,
            (State::Closed { failures }, false) => State::Closed {
                failures: failures + 1,
            },
            (s @ State::Open { .. }, false) => s,
        };
    }

    /// `open`, `half_open` or `closed`.
    pub fn state(&self, provider: &str) -> &'static str {
        match self
            .states
            .lock()
            .ok()
            .and_then(|s| s.get(provider).copied())
        {
            Some(State::Open { .. }) => "open",
            Some(State::HalfOpen) => "half_open",
            _ => "closed",
        }
    }
}

/// Observed latency per model: an exponentially weighted average of successful calls.
#[derive(Debug, Default)]
pub struct Latency {
    ewma_ms: Mutex<HashMap<String, f64>>,
}

impl Latency {
    /// Records one successful call.
    pub fn observe(&self, model: &str, took: Duration) {
        if let Ok(mut m) = self.ewma_ms.lock() {
            let ms = took.as_secs_f64() * 1000.0;
            m.entry(model.to_string())
                .and_modify(|v| *v = 0.8 * *v + 0.2 * ms)
                .or_insert(ms);
        }
    }
    /// The average, if any call was seen; unseen models sort first so they get measured.
    pub fn of(&self, model: &str) -> Option<f64> {
        self.ewma_ms.lock().ok().and_then(|m| m.get(model).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::definition::Dur;

    #[test]
    fn opens_after_failures_half_opens_after_the_cool_down_and_closes_on_success() {
        let b = Breakers::default();
        let cfg = BreakerConfig {
            failures: 2,
            cool_down: Dur(Duration::from_millis(30)),
        };
        b.record("p", &cfg, false);
        assert!(b.admit("p", &cfg).is_ok());
        b.record("p", &cfg, false);
        let open = b.admit("p", &cfg).unwrap_err();
        assert_eq!(open.provider, "p");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.admit("p", &cfg).is_ok(), "the trial call");
        assert_eq!(b.state("p"), "half_open");
        assert!(b.admit("p", &cfg).is_err(), "one trial at a time");
        b.record("p", &cfg, false);
        assert_eq!(b.state("p"), "open", "a failed trial reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.admit("p", &cfg).is_ok());
        b.record("p", &cfg, true);
        assert_eq!(b.state("p"), "closed");
    }
}
