//! `aob-audit`: the audit sink as a service. It moves decision records from the
//! `AOB_AUDIT` stream into Parquet objects (`file://`, `s3://`, `gs://`, `az://`), every record
//! exactly once even when the process is killed; see [`aob_audit::sink`] and the README.

use tokio_util::sync::CancellationToken;

pub use aob_audit::SinkConfig;

/// The environment variable naming the object store.
pub const URL_VAR: &str = "AOB_AUDIT_URL";

/// The store URL from `AOB_AUDIT_URL` (read through `get`), or `default` when unset.
pub fn store_url(
    get: impl Fn(&str) -> Option<String>,
    default: Option<&str>,
) -> aob_audit::Result<String> {
    match get(URL_VAR).filter(|v| !v.trim().is_empty()) {
        Some(url) => Ok(url.trim().to_string()),
        None => default.map(str::to_string).ok_or_else(|| {
            aob_audit::Error::Config(format!(
                "{URL_VAR} is not set: set it to where the audit Parquet files go, e.g. \
                 {URL_VAR}=file:///var/lib/aob/audit or {URL_VAR}=s3://bucket/audit (S3 settings \
                 come from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...)"
            ))
        }),
    }
}

/// Opens the store at `url` and serves the sink until `shutdown` (then flushes and returns).
pub async fn run(
    client: async_nats::Client,
    url: &str,
    cfg: SinkConfig,
    shutdown: CancellationToken,
) -> aob_audit::Result<()> {
    let (store, prefix) = aob_audit::open(url)?;
    tracing::info!(url, "audit store opened");
    aob_audit::sink::serve(client, store, prefix, cfg, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_required_and_the_error_says_how_to_set_it() {
        let e = store_url(|_| None, None).unwrap_err().to_string();
        assert!(
            e.contains("AOB_AUDIT_URL is not set") && e.contains("s3://"),
            "{e}"
        );
        assert_eq!(
            store_url(|_| None, Some("file:///tmp/a")).unwrap(),
            "file:///tmp/a"
        );
        assert_eq!(
            store_url(|_| Some(" s3://b/p ".into()), None).unwrap(),
            "s3://b/p"
        );
    }
}
