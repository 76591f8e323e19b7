//! Budgets that hold under concurrency. Each budget scope (a tenant for a period, a
//! workflow for a period, a run) has one ledger in the `AOB_LEDGER` bucket: what was spent
//! and what is held by calls in flight. Before a call the gateway reserves the call's worst
//! case in every scope that applies, by compare-and-set, so two instances can never both
//! take the last of a budget; after the call it settles the hold to the real cost. A hold
//! carries an expiry, so one left by a process that died is dropped by the next writer
//! instead of blocking the budget forever.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use crate::config::{Budget, Period};
use crate::kv::{StoreError, key_part, update};

/// Money and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Amount {
    /// US dollars.
    pub usd: f64,
    /// Tokens in and out.
    pub tokens: u64,
}

/// A hold for one call in flight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Hold {
    usd: f64,
    tokens: u64,
    until_ms: u64,
}

/// The stored value of one scope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Settled spending.
    pub spent: Amount,
    /// Calls in flight, by call id.
    #[serde(default)]
    holds: BTreeMap<String, Hold>,
}

impl Ledger {
    /// What the live holds add up to.
    pub fn held(&self, now_ms: u64) -> Amount {
        self.holds
            .values()
            .filter(|h| h.until_ms > now_ms)
            .fold(Amount::default(), |a, h| Amount {
                usd: a.usd + h.usd,
                tokens: a.tokens + h.tokens,
            })
    }
}

/// A budget without limits: the ledger only counts.
pub const UNLIMITED: Budget = Budget {
    usd: None,
    tokens: None,
    period: Period::Total,
};

/// One budget that applies to a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// Its ledger's key.
    pub key: String,
    /// How the error names it: `run 01J..`, `tenant acme (month 2026-12)`.
    pub name: String,
    /// The limit.
    pub budget: Budget,
}

impl Scope {
    /// The budget of tenant `tenant` for the period containing `now_ms`.
    pub fn tenant(tenant: &str, budget: Budget, now_ms: u64) -> Scope {
        let (period, label) = period_of(budget.period, now_ms);
        Scope {
            key: format!("tenant.{}.{period}", key_part(tenant)),
            name: format!("tenant {tenant}{label}"),
            budget,
        }
    }
    /// The budget of workflow `workflow` of `tenant`.
    pub fn workflow(tenant: &str, workflow: &str, budget: Budget, now_ms: u64) -> Scope {
        let (period, label) = period_of(budget.period, now_ms);
        Scope {
            key: format!(
                "workflow.{}.{}.{period}",
                key_part(tenant),
                key_part(workflow)
            ),
            name: format!("workflow {workflow} of tenant {tenant}{label}"),
            budget,
        }
    }
    /// The budget of one run.
    pub fn run(tenant: &str, run: &str, budget: Budget) -> Scope {
        Scope {
            key: format!("run.{}.{}", key_part(tenant), key_part(run)),
            name: format!("run {run}"),
            budget,
        }
    }
}

/// The key part and label of the period containing `now_ms`.
fn period_of(period: Period, now_ms: u64) -> (String, String) {
    let (y, m, d) = civil_from_days((now_ms / 86_400_000) as i64);
    match period {
        Period::Total => ("total".into(), String::new()),
        Period::Day => (
            format!("d{y:04}-{m:02}-{d:02}"),
            format!(" (day {y:04}-{m:02}-{d:02})"),
        ),
        Period::Month => (format!("m{y:04}-{m:02}"), format!(" (month {y:04}-{m:02})")),
    }
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian, UTC).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A call refused because it could exceed a budget.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "budget of {scope} would be exceeded: this call may cost up to {asked}, {spent} is spent and {held} is held by calls in flight, of {limit}"
)]
pub struct Refusal {
    /// The budget's name.
    pub scope: String,
    /// The limit, formatted (`$1.00`, `10000 tokens`).
    pub limit: String,
    /// Spent so far.
    pub spent: String,
    /// Held by calls in flight.
    pub held: String,
    /// This call's worst case.
    pub asked: String,
}

/// The ledgers in their bucket.
#[derive(Clone)]
pub struct Ledgers {
    kv: kv::Store,
    cache: std::sync::Arc<crate::kv::Cache>,
}

impl std::fmt::Debug for Ledgers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledgers")
    }
}

fn usd(v: f64) -> String {
    format!("${v:.6}")
}

impl Ledgers {
    /// Ledgers in `kv` (the `AOB_LEDGER` bucket).
    pub fn new(kv: kv::Store) -> Self {
        Ledgers {
            kv,
            cache: std::sync::Arc::default(),
        }
    }

    /// Holds `worst` for call `id` in every scope, or in none: a refusal releases the
    /// holds already taken. Holding again under the same id changes nothing, so a call
    /// delivered twice holds once.
    pub async fn reserve(
        &self,
        scopes: &[Scope],
        id: &str,
        worst: Amount,
        hold_for: Duration,
        now_ms: u64,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let until_ms = now_ms + hold_for.as_millis() as u64;
        for (i, scope) in scopes.iter().enumerate() {
            let got = update(&self.kv, &self.cache, &scope.key, |l: Option<Ledger>| {
                let mut l = l.unwrap_or_default();
                l.holds.retain(|_, h| h.until_ms > now_ms);
                if l.holds.contains_key(id) {
                    return Ok((Some(l), ()));
                }
                let held = l.held(now_ms);
                if let Some(limit) = scope.budget.usd
                    && l.spent.usd + held.usd + worst.usd > limit + 1e-12
                {
                    return Err(Refusal {
                        scope: scope.name.clone(),
                        limit: usd(limit),
                        spent: usd(l.spent.usd),
                        held: usd(held.usd),
                        asked: usd(worst.usd),
                    });
                }
                if let Some(limit) = scope.budget.tokens
                    && l.spent.tokens + held.tokens + worst.tokens > limit
                {
                    return Err(Refusal {
                        scope: scope.name.clone(),
                        limit: format!("{limit} tokens"),
                        spent: format!("{} tokens", l.spent.tokens),
                        held: format!("{} tokens", held.tokens),
                        asked: format!("{} tokens", worst.tokens),
                    });
                }
                l.holds.insert(
                    id.to_string(),
                    Hold {
                        usd: worst.usd,
                        tokens: worst.tokens,
                        until_ms,
                    },
                );
                Ok((Some(l), ()))
            })
            .await?;
            if let Err(refusal) = got {
                self.release(&scopes[..i], id).await?;
                return Ok(Err(refusal));
            }
        }
        Ok(Ok(()))
    }

    /// Replaces call `id`'s hold by what it really cost. Without a hold (settled already,
    /// or never held) nothing changes, so settling twice counts once.
    pub async fn settle(
        &self,
        scopes: &[Scope],
        id: &str,
        actual: Amount,
    ) -> Result<(), StoreError> {
        self.drop_hold(scopes, id, actual).await
    }

    /// Drops call `id`'s hold without spending (the call was not made).
    pub async fn release(&self, scopes: &[Scope], id: &str) -> Result<(), StoreError> {
        self.drop_hold(scopes, id, Amount::default()).await
    }

    /// Removes call `id`'s hold in every scope and counts `spent` where there was one.
    async fn drop_hold(&self, scopes: &[Scope], id: &str, spent: Amount) -> Result<(), StoreError> {
        for scope in scopes {
            update(&self.kv, &self.cache, &scope.key, |l: Option<Ledger>| {
                let Some(mut l) = l else {
                    return Ok::<_, ()>((None, ()));
                };
                if l.holds.remove(id).is_none() {
                    return Ok((None, ()));
                }
                l.spent.usd += spent.usd;
                l.spent.tokens += spent.tokens;
                Ok((Some(l), ()))
            })
            .await?
            .ok();
        }
        Ok(())
    }

    /// The ledger of one scope (empty when nothing was ever held).
    pub async fn get(&self, scope: &Scope) -> Result<Ledger, StoreError> {
        let e = self
            .kv
            .get(&scope.key)
            .await
            .map_err(|e| StoreError(format!("reading {}: {e}", scope.key)))?;
        match e {
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| StoreError(format!("{} holds unreadable JSON: {e}", scope.key))),
            None => Ok(Ledger::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-12-01T00:00:00Z
        let ms = 1_796_083_200_000;
        assert_eq!(period_of(Period::Day, ms).0, "d2026-12-01");
        assert_eq!(period_of(Period::Month, ms - 1).0, "m2026-11");
        assert_eq!(period_of(Period::Month, ms).0, "m2026-12");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
