//! What every command needs: the tenant, where NATS is, and the payload store.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use aob_runtime::{Env, PayloadStore};

/// The file `aob dev` writes the server URL to, relative to the current directory.
pub const DEV_URL_FILE: &str = ".aob/nats.url";
/// The URL used when nothing else says where NATS is.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Tenant and connection settings of one command.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Tenant.
    pub tenant: String,
    /// NATS URL.
    pub nats_url: String,
    /// Where the URL came from, for error messages (`--nats-url/NATS_URL`, `.aob/nats.url`, `default`).
    pub url_source: String,
    /// Who is acting (`--as` / `AOB_USER`), when given.
    pub user: Option<String>,
}

impl Ctx {
    /// Checks the tenant and works out the NATS URL: the flag or `NATS_URL`, else the URL
    /// `aob dev` wrote to `.aob/nats.url`, else [`DEFAULT_URL`].
    pub fn new(tenant: &str, nats_url: Option<&str>) -> Result<Self> {
        if !aob_streams::subjects::is_token(tenant) {
            bail!("tenant `{tenant}` is not valid: use letters, digits, `_` or `-` (at most 128)");
        }
        let (nats_url, url_source) = match nats_url.map(str::trim).filter(|u| !u.is_empty()) {
            Some(u) => (u.to_string(), "--nats-url/NATS_URL".to_string()),
            None => match std::fs::read_to_string(DEV_URL_FILE) {
                Ok(u) if !u.trim().is_empty() => (u.trim().to_string(), DEV_URL_FILE.to_string()),
                _ => (DEFAULT_URL.to_string(), "default".to_string()),
            },
        };
        Ok(Ctx {
            tenant: tenant.to_string(),
            nats_url,
            url_source,
            user: None,
        })
    }

    /// Connects to NATS; the error says which URL was tried and where it came from.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        connect(&self.nats_url, &self.url_source).await
    }

    /// Opens the payload store (`AOB_PAYLOAD_URL`, default `file://<cwd>/.aob/payloads`).
    pub fn payloads(&self) -> Result<PayloadStore> {
        let env = Env::from_env()?;
        Ok(env.payloads()?)
    }
}

/// Connects to NATS at `url`; `source` says where the URL came from.
pub async fn connect(url: &str, source: &str) -> Result<async_nats::Client> {
    aob_runtime::nats_options()?
        .name("aob-cli")
        .connection_timeout(Duration::from_secs(5))
        .connect(aob_runtime::server_addrs(url)?)
        .await
        .map_err(|e| {
            let hint = if source == DEV_URL_FILE {
                format!(
                    " (from {DEV_URL_FILE}: is `aob dev` still running? delete the file if not)"
                )
            } else if source == "default" {
                " (default; start a server with `aob dev` or set NATS_URL)".to_string()
            } else {
                format!(" (from {source})")
            };
            // The error already quotes its cause; no chain needed.
            anyhow::anyhow!("cannot connect to NATS at {}{hint}: {e}", redact(url))
        })
}

/// A URL with its credentials hidden.
pub fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((scheme_user, host)) => {
            let scheme = scheme_user.split("://").next().unwrap_or("nats");
            format!("{scheme}://***@{host}")
        }
        None => url.to_string(),
    }
}

/// `file://<absolute dir>`.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_tokens() {
        assert!(Ctx::new("acme", Some("nats://x:4222")).is_ok());
        let err = Ctx::new("a.b", Some("nats://x:4222"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenant `a.b`"), "{err}");
    }

    #[test]
    fn explicit_urls_win() {
        let ctx = Ctx::new("default", Some(" nats://h:1 ")).unwrap();
        assert_eq!(ctx.nats_url, "nats://h:1");
        assert_eq!(redact("nats://u:p@h:1"), "nats://***@h:1");
    }
}
