//! Published workflow definitions in the `AOB_WORKFLOWS` bucket.
//!
//! Keys: `<tenant>.<name>.v<N>` holds version N (created once, never changed) and
//! `<tenant>.<name>.latest` holds the highest published N.

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

use aob_model::Workflow;

use crate::{Error, Result};

/// The workflow registry.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

fn version_key(tenant: &str, name: &str, version: u32) -> String {
    format!("{tenant}.{name}.v{version}")
}

fn latest_key(tenant: &str, name: &str) -> String {
    format!("{tenant}.{name}.latest")
}

impl Registry {
    /// Binds to the `AOB_WORKFLOWS` bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Self> {
        let kv = js
            .get_key_value(aob_streams::WORKFLOWS)
            .await
            .map_err(|e| Error::Topology(format!("bucket {}: {e}", aob_streams::WORKFLOWS)))?;
        Ok(Registry { kv })
    }

    /// Publishes a validated definition. Without a version it becomes latest + 1. Publishing
    /// the same definition under an existing version again is a no-op; a different one is
    /// refused. Returns the version.
    pub async fn publish(&self, tenant: &str, wf: &Workflow) -> Result<u32> {
        let latest = self.latest(tenant, &wf.name).await?;
        let version = wf.version.unwrap_or(latest.map_or(1, |(v, _)| v + 1));
        let mut stored = wf.clone();
        stored.version = Some(version);
        let body = serde_json::to_vec(&stored).map_err(|e| Error::Payload(e.to_string()))?;
        let key = version_key(tenant, &wf.name, version);
        match self.kv.create(&key, body.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let (existing, _) = self.get(tenant, &wf.name, Some(version)).await?;
                if existing != stored {
                    return Err(Error::VersionExists {
                        tenant: tenant.to_string(),
                        name: wf.name.clone(),
                        version,
                    });
                }
                return Ok(version);
            }
            Err(e) => return Err(Error::Nats(format!("writing {key}: {e}"))),
        }
        // Move the latest pointer forward by compare-and-set.
        loop {
            let latest = self.latest(tenant, &wf.name).await?;
            let res = match latest {
                Some((v, _)) if v >= version => return Ok(version),
                Some((_, rev)) => self
                    .kv
                    .update(
                        latest_key(tenant, &wf.name),
                        version.to_string().into(),
                        rev,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision),
                None => self
                    .kv
                    .create(latest_key(tenant, &wf.name), version.to_string().into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists),
            };
            match res {
                Ok(()) => return Ok(version),
                Err(true) => continue,
                Err(false) => {
                    return Err(Error::Nats(format!(
                        "moving the latest version of {}",
                        wf.name
                    )));
                }
            }
        }
    }

    async fn latest(&self, tenant: &str, name: &str) -> Result<Option<(u32, u64)>> {
        let entry = self
            .kv
            .entry(latest_key(tenant, name))
            .await
            .map_err(|e| Error::Nats(format!("reading latest version of {name}: {e}")))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map(|v| (v, e.revision))
            }))
    }

    /// A definition: the given version, or the latest. Returns it with its version.
    pub async fn get(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<(Workflow, u32)> {
        let not_found = || Error::WorkflowNotFound {
            tenant: tenant.to_string(),
            name: name.to_string(),
            version,
        };
        if !aob_streams::subjects::is_token(name) {
            return Err(not_found());
        }
        let version = match version {
            Some(v) => v,
            None => self.latest(tenant, name).await?.ok_or_else(not_found)?.0,
        };
        let body = self
            .kv
            .get(version_key(tenant, name, version))
            .await
            .map_err(|e| Error::Nats(format!("reading {name} v{version}: {e}")))?
            .ok_or_else(not_found)?;
        let wf = serde_json::from_slice(&body)
            .map_err(|e| Error::Payload(format!("stored {name} v{version}: {e}")))?;
        Ok((wf, version))
    }

    /// Workflows of a tenant with their latest version, by name.
    pub async fn list(&self, tenant: &str) -> Result<Vec<(String, u32)>> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| Error::Nats(format!("listing workflows: {e}")))?;
        let prefix = format!("{tenant}.");
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| Error::Nats(format!("listing workflows: {e}")))?;
            if let Some(name) = k
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".latest"))
                && let Some((v, _)) = self.latest(tenant, name).await?
            {
                out.push((name.to_string(), v));
            }
        }
        out.sort();
        Ok(out)
    }
}
