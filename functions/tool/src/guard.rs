//! Rate limits (token buckets) and circuit breakers. Pure: every method takes the time, so
//! tests move a clock instead of sleeping.

use std::time::{Duration, Instant};

/// A token bucket holding up to `capacity` calls, refilled at `capacity` per minute.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `per_minute` calls.
    pub fn per_minute(per_minute: u32, now: Instant) -> Self {
        Bucket {
            capacity: f64::from(per_minute),
            tokens: f64::from(per_minute),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// `Ok` when a call may go now (without taking it), else how long until one may.
    pub fn check(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing * 60.0 / self.capacity))
        }
    }

    /// Takes one call; call after [`Bucket::check`] said yes.
    pub fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` in a row so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Calls are refused until `until`.
    Open {
        /// End of the cool-down.
        until: Instant,
    },
    /// The cool-down is over and one call (the probe) is out; others are refused until it
    /// answers.
    HalfOpen,
}

/// Why a breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Open: try again after this long.
    Open(Duration),
    /// A probe call is out; its answer decides.
    Probing,
}

/// What a call let through by [`Breaker::admit`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// An ordinary call.
    Call,
    /// The one call let through after the cool-down.
    Probe,
}

/// A circuit breaker: `threshold` consecutive failures open it for `cool_down`; then one
/// call is let through, and its outcome closes it or opens it again.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cool_down,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// Where it is.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go now.
    pub fn admit(&mut self, now: Instant) -> Result<Admission, Refusal> {
        match self.state {
            BreakerState::Closed { .. } => Ok(Admission::Call),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                Ok(Admission::Probe)
            }
            BreakerState::Open { until } => Err(Refusal::Open(until - now)),
            BreakerState::HalfOpen => Err(Refusal::Probing),
        }
    }

    /// A call let through ended well (or failed in a way that says nothing about the
    /// server's health).
    pub fn success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// A call let through failed.
    pub fn failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            _ => BreakerState::Open {
                until: now + self.cool_down,
            },
        };
    }

    /// A probe ended without an answer (cancelled): let the next call probe.
    pub fn abandon(&mut self, now: Instant) {
        if self.state == BreakerState::HalfOpen {
            self.state = BreakerState::Open { until: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_rate_and_says_when() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(2, t0);
        for _ in 0..2 {
            assert_eq!(b.check(t0), Ok(()));
            b.take(t0);
        }
        let wait = b.check(t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.check(later).unwrap_err(), Duration::from_secs(20));
        assert_eq!(b.check(t0 + Duration::from_secs(30)), Ok(()));
        // A long pause refills to the burst size, no more.
        let much_later = t0 + Duration::from_secs(3600);
        for _ in 0..2 {
            assert_eq!(b.check(much_later), Ok(()));
            b.take(much_later);
        }
        assert!(b.check(much_later).is_err());
    }

    #[test]
    fn a_breaker_opens_half_opens_and_closes() {
        let t0 = Instant::now();
        let cool = Duration::from_secs(30);
        let mut b = Breaker::new(3, cool);
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Ok(Admission::Call));
            b.failure(t0);
        }
        // A success resets the count.
        b.success();
        for _ in 0..3 {
            assert_eq!(b.admit(t0), Ok(Admission::Call));
            b.failure(t0);
        }
        assert_eq!(b.admit(t0), Err(Refusal::Open(cool)));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Err(Refusal::Open(Duration::from_secs(20))));
        let t2 = t0 + cool;
        assert_eq!(b.admit(t2), Ok(Admission::Probe));
        assert_eq!(b.admit(t2), Err(Refusal::Probing));
        // The probe fails: open again for a whole cool-down.
        b.failure(t2);
        assert_eq!(b.admit(t2), Err(Refusal::Open(cool)));
        let t3 = t2 + cool;
        assert_eq!(b.admit(t3), Ok(Admission::Probe));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert_eq!(b.admit(t3), Ok(Admission::Call));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(5));
        b.failure(t0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.abandon(t1);
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
    }
}
