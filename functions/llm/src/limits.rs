//! Rate limits that hold across every instance of the gateway: requests and tokens per
//! minute per provider, model and tenant, counted in the `AOB_LIMITS` bucket by
//! compare-and-set, one key per scope and minute (entries expire after two minutes).
//! A fixed window can let through up to twice the limit across a minute boundary; in
//! exchange a check costs one read and one write, whichever instance makes it.

use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use crate::config::Limits;
use crate::kv::{StoreError, key_part, update};

/// One limited scope.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// Its key prefix.
    pub key: String,
    /// How errors name it: `model fast`, `provider openai`, `tenant acme`.
    pub name: String,
    /// Its limits.
    pub limits: Limits,
}

impl Scope {
    /// A scope of `kind` (`model`, `provider`, `tenant`) named `name`.
    pub fn new(kind: &str, name: &str, limits: Limits) -> Scope {
        Scope {
            key: format!("{kind}.{}", key_part(name)),
            name: format!("{kind} {name}"),
            limits,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Count {
    requests: u64,
    tokens: u64,
}

/// A call refused by a rate limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rate limit of {scope} reached: {used} of {limit} this minute; try again in {}", humantime::format_duration(*.retry_after))]
pub struct Exhausted {
    /// The scope.
    pub scope: String,
    /// `requests per minute` or `tokens per minute`, with its value.
    pub limit: String,
    /// What is used this minute.
    pub used: u64,
    /// When the window turns.
    pub retry_after: Duration,
}

/// The shared windows.
#[derive(Clone)]
pub struct Windows {
    kv: kv::Store,
    cache: std::sync::Arc<crate::kv::Cache>,
}

impl std::fmt::Debug for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Windows")
    }
}

impl Windows {
    /// Windows in `kv` (the `AOB_LIMITS` bucket).
    pub fn new(kv: kv::Store) -> Self {
        Windows {
            kv,
            cache: std::sync::Arc::default(),
        }
    }

    /// Counts one request of up to `tokens` tokens in every scope, or refuses it. A
    /// refusal by a later scope takes back what the earlier ones counted.
    pub async fn acquire(
        &self,
        scopes: &[Scope],
        tokens: u64,
        now_ms: u64,
    ) -> Result<Result<(), Exhausted>, StoreError> {
        let minute = now_ms / 60_000;
        let retry_after = Duration::from_millis(60_000 - now_ms % 60_000);
        for (i, s) in scopes.iter().enumerate() {
            if !s.limits.is_set() {
                continue;
            }
            let key = format!("{}.{minute}", s.key);
            let got = update(&self.kv, &self.cache, &key, |c: Option<Count>| {
                let mut c = c.unwrap_or_default();
                if let Some(rpm) = s.limits.requests_per_minute
                    && c.requests + 1 > rpm
                {
                    return Err(Exhausted {
                        scope: s.name.clone(),
                        limit: format!("{rpm} requests per minute"),
                        used: c.requests,
                        retry_after,
                    });
                }
                if let Some(tpm) = s.limits.tokens_per_minute
                    && c.tokens + tokens > tpm
                {
                    return Err(Exhausted {
                        scope: s.name.clone(),
                        limit: format!("{tpm} tokens per minute"),
                        used: c.tokens,
                        retry_after,
                    });
                }
                c.requests += 1;
                c.tokens += tokens;
                Ok((Some(c), ()))
            })
            .await?;
            if let Err(e) = got {
                self.give_back(&scopes[..i], 1, tokens, minute).await?;
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    /// Corrects the tokens counted for a call once its real use is known (`counted` at
    /// acquire time, `used` really).
    pub async fn correct(
        &self,
        scopes: &[Scope],
        counted: u64,
        used: u64,
        acquired_ms: u64,
    ) -> Result<(), StoreError> {
        if counted > used {
            self.give_back(scopes, 0, counted - used, acquired_ms / 60_000)
                .await?;
        } else if used > counted {
            self.add(scopes, used - counted, acquired_ms / 60_000)
                .await?;
        }
        Ok(())
    }

    async fn add(&self, scopes: &[Scope], tokens: u64, minute: u64) -> Result<(), StoreError> {
        for s in scopes
            .iter()
            .filter(|s| s.limits.tokens_per_minute.is_some())
        {
            let key = format!("{}.{minute}", s.key);
            update(&self.kv, &self.cache, &key, |c: Option<Count>| {
                let mut c = c.unwrap_or_default();
                c.tokens += tokens;
                Ok::<_, ()>((Some(c), ()))
            })
            .await?
            .ok();
        }
        Ok(())
    }

    async fn give_back(
        &self,
        scopes: &[Scope],
        requests: u64,
        tokens: u64,
        minute: u64,
    ) -> Result<(), StoreError> {
        for s in scopes.iter().filter(|s| s.limits.is_set()) {
            let key = format!("{}.{minute}", s.key);
            update(&self.kv, &self.cache, &key, |c: Option<Count>| {
                let Some(mut c) = c else {
                    return Ok::<_, ()>((None, ()));
                };
                c.requests = c.requests.saturating_sub(requests);
                c.tokens = c.tokens.saturating_sub(tokens);
                Ok((Some(c), ()))
            })
            .await?
            .ok();
        }
        Ok(())
    }
}
