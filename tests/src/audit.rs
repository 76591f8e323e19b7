//! Audit test support: an S3-compatible server (moto, from PyPI), DuckDB queries (the
//! `duckdb` Python package), and the audit sink as a child process that tests can kill.
//! `scripts/setup` installs both Python packages in the project's virtualenv.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::Value;

/// A program from the project's virtualenv (`~/.cache/aob/venv/bin`), or `AOB_VENV`'s.
pub fn venv_bin(name: &str) -> Result<PathBuf> {
    let venv = aob_testkit::venv_dir().context("neither AOB_VENV nor HOME is set")?;
    let p = venv.join("bin").join(name);
    if !p.is_file() {
        bail!("{} is missing: run `scripts/setup`", p.display());
    }
    Ok(p)
}

/// Waits until something listens on local `port` (a server a test started), at most 10 s.
pub async fn listening(port: u16, what: &str) -> Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not listen on port {port} within 10 s")
}

/// A free local port.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a DuckDB query and returns its rows as JSON arrays.
pub fn duckdb(sql: &str) -> Result<Vec<Vec<Value>>> {
    let python = venv_bin("python")?;
    let out = Command::new(python)
        .args([
            "-c",
            "import duckdb, json, sys\n\
             rows = duckdb.sql(sys.argv[1]).fetchall()\n\
             print(json.dumps([list(r) for r in rows], default=str))",
            sql,
        ])
        .output()
        .context("running python with duckdb")?;
    if !out.status.success() {
        bail!(
            "duckdb failed on `{sql}`:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("duckdb output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `read_parquet(...)` over every audit file under a local directory.
pub fn trail(dir: &Path) -> String {
    format!(
        "read_parquet('{}/**/*.parquet', hive_partitioning = true)",
        dir.display()
    )
}

/// A moto S3 server on a free port, killed on drop.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl S3Server {
    /// Starts `moto_server` and waits until it answers.
    pub async fn start() -> Result<S3Server> {
        let bin = venv_bin("moto_server")?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting moto_server")?;
        let s = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        listening(port, "moto_server").await?;
        Ok(s)
    }

    /// Environment for a process that talks to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Creates a bucket (an S3 `CreateBucket`, which is a PUT on the bucket's path).
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let res = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .context("creating a bucket")?;
        if !res.status().is_success() {
            bail!("creating bucket {bucket}: HTTP {}", res.status());
        }
        Ok(())
    }

    /// A client of one bucket, configured explicitly.
    pub fn store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        let s = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_region("us-east-1")
            .build()?;
        Ok(Arc::new(s))
    }

    /// Copies every object of a bucket into `dir`, keeping the paths (DuckDB reads local files).
    pub async fn download(&self, bucket: &str, dir: &Path) -> Result<usize> {
        let store = self.store(bucket)?;
        let metas: Vec<_> = store.list(None).collect().await;
        let mut n = 0;
        for m in metas {
            let m = m?;
            let bytes = store.get(&m.location).await?.bytes().await?;
            let to = dir.join(m.location.as_ref());
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&to, &bytes)?;
            n += 1;
        }
        Ok(n)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `aob-audit` sink as a child process.
pub struct SinkProcess {
    child: Child,
}

impl SinkProcess {
    /// Starts the sink binary against `nats_url`, writing to `audit_url`, with extra environment.
    pub fn start(nats_url: &str, audit_url: &str, env: &[(&str, String)]) -> Result<SinkProcess> {
        let bin = crate::binary("aob-audit")?;
        let mut cmd = Command::new(bin);
        cmd.env("NATS_URL", nats_url)
            .env("AOB_AUDIT_URL", audit_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(SinkProcess {
            child: cmd.spawn().context("starting aob-audit")?,
        })
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to end by itself (a failpoint), up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the sink did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asks the sink to flush until it reports nothing pending (every record published so far
/// is in an object), retrying while it is still starting; gives up after `limit`.
pub async fn drain(client: &async_nats::Client, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match flush(client).await {
            Ok((_, _, 0)) => return Ok(()),
            Ok((_, _, pending)) => last = format!("{pending} records pending"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the audit sink did not drain within {limit:?}: {last}")
}

/// Asks the running sink to flush; returns `(rows, files, pending)` of its answer.
pub async fn flush(client: &async_nats::Client) -> Result<(usize, Vec<String>, u64)> {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(aob_streams::subjects::AUDIT_FLUSH, "".into()),
    )
    .await
    .context("the sink did not answer the flush in 30 s")??;
    let v: Value = serde_json::from_slice(&reply.payload)?;
    if let Some(e) = v.get("error") {
        bail!("the sink could not flush: {e}");
    }
    let aob_audit::sink::FlushReport {
        files,
        rows,
        pending,
    } = serde_json::from_value(v)?;
    Ok((rows, files, pending))
}

/// An audit sink writing to a temporary folder, running until [`LocalSink::stop`].
pub struct LocalSink {
    /// The records, as `read_parquet(...)` for DuckDB.
    pub trail: String,
    _dir: tempfile::TempDir,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::result::Result<(), String>>,
}

impl LocalSink {
    /// Starts the sink on `client`.
    pub fn start(client: &async_nats::Client) -> Result<LocalSink> {
        let dir = tempfile::tempdir()?;
        let url = format!("file://{}", dir.path().display());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                aob_fn_audit::run(client, &url, aob_audit::sink::SinkConfig::default(), stop)
                    .await
                    .map_err(|e| e.to_string())
            })
        };
        Ok(LocalSink {
            trail: trail(dir.path()),
            _dir: dir,
            stop,
            task,
        })
    }

    /// Runs `sql` once every record published so far is written; `TRAIL` in it stands for
    /// the records.
    pub async fn query(&self, client: &async_nats::Client, sql: &str) -> Result<Vec<Vec<Value>>> {
        drain(client, Duration::from_secs(60)).await?;
        duckdb(&sql.replace("TRAIL", &self.trail))
    }

    /// Stops the sink; an error if it failed.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await?.map_err(|e| anyhow::anyhow!(e))
    }
}
