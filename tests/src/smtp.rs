//! A real SMTP server for the approval emails' tests: Python's `aiosmtpd`, which prints
//! every message it receives.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::audit::venv_bin;

/// `aiosmtpd` on a free port, killed on drop.
pub struct SmtpServer {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// `smtp://127.0.0.1:<port>`.
    pub url: String,
}

impl SmtpServer {
    /// Starts the server and waits until it answers.
    pub async fn start() -> Result<SmtpServer> {
        let python = venv_bin("python")?;
        let port = crate::audit::free_port()?;
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("received.txt");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(python)
            .args([
                "-u",
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::from(out))
            .stderr(Stdio::null())
            .spawn()
            .context("starting aiosmtpd (run scripts/setup)")?;
        let s = SmtpServer {
            child,
            log,
            _dir: dir,
            url: format!("smtp://127.0.0.1:{port}"),
        };
        crate::audit::listening(port, "aiosmtpd").await?;
        Ok(s)
    }

    /// Everything received so far, as the server printed it.
    pub fn received(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until what was received contains `needle`; returns it all.
    pub async fn wait_for(&self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let text = self.received();
            if text.contains(needle) {
                return Ok(text);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no message containing {needle:?} within {limit:?}; received: {text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
