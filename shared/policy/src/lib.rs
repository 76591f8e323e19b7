//! Rego policies, evaluated in-process before every step, model call and tool call.
//!
//! A policy module is `package aob.policies.<id>` (Rego v1) and may define the sets
//! `deny` and `require_approval` of reason strings. [`Policies::evaluate`] asks every module
//! that applies to the input's tenant and returns a [`Decision`]: deny wins over
//! require_approval, which wins over allow; a module that fails to evaluate denies (fail
//! closed). See the crate README for the contract and the sources (a directory,
//! `AOB_POLICY_DIR`, and the `AOB_POLICIES` bucket, reloaded live by [`Policies::watch`]).

mod compile;
mod input;
mod source;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio::sync::watch;

pub use compile::{ALL, Compiled, PolicySet, Source};
pub use input::{Decision, Input, Kind, ModelRef, Outcome, RunRef, Spend, StepRef, ToolRef};
pub use source::{Bundle, is_scope, parse_bundle, read_dir, read_kv};

/// The environment variable naming the policy directory.
pub const DIR_ENV: &str = "AOB_POLICY_DIR";

/// What can go wrong loading policies. Evaluation never fails: it denies.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A Rego file does not parse or compile.
    #[error("{file}:{}: {message}", location(*line, *column))]
    Compile {
        /// The file (a path, or `kv:<key>/<file>`).
        file: String,
        /// Line, when the compiler named one.
        line: Option<u32>,
        /// Column, when the compiler named one.
        column: Option<u32>,
        /// The compiler's message.
        message: String,
        /// The compiler's full text, with the offending line and a caret.
        detail: String,
    },
    /// A module's package is not `aob.policies.<id>`.
    #[error("{file}: package `{found}` is not `aob.policies.<id>` (id: letters, digits, `_`, `-`)")]
    Package {
        /// The file.
        file: String,
        /// The package it declares.
        found: String,
    },
    /// A file or folder could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A policy folder is not laid out as expected.
    #[error("{}: {message}", path.display())]
    Layout {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value in the bucket is not a policy bundle.
    #[error("{bucket} key `{key}`: {message}", bucket = aob_streams::POLICIES)]
    Bundle {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The NATS server refused or did not answer.
    #[error("{what}: {message}")]
    Nats {
        /// What was being done.
        what: String,
        /// The server's answer.
        message: String,
    },
}

fn location(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{l}:{c}"),
        (Some(l), None) => l.to_string(),
        _ => "?".to_string(),
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The policies in force, and how the last reload went.
#[derive(Debug)]
pub struct Snapshot {
    /// The compiled policies.
    pub compiled: Compiled,
    /// The error of the last reload, if it failed (the policies above stayed in force).
    pub error: Option<String>,
    /// How many reloads were attempted since start, successful or not.
    pub reloads: u64,
}

impl Snapshot {
    /// The version of the policy set of `tenant`.
    pub fn version(&self, tenant: &str) -> &str {
        self.compiled.version(tenant)
    }
}

/// The policy sets of all tenants, cheap to clone and share between tasks; reloaded in
/// place by [`Policies::watch`].
#[derive(Clone)]
pub struct Policies {
    state: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Files from the directory, kept under the bucket's on every reload.
    base: Arc<PolicySet>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("compiled", &self.state.borrow().compiled)
            .finish()
    }
}

impl Policies {
    /// No policies: everything is allowed with version `none`.
    pub fn none() -> Self {
        Policies::with(PolicySet::new(), Compiled::empty())
    }

    fn with(base: PolicySet, compiled: Compiled) -> Self {
        let snapshot = Arc::new(Snapshot {
            compiled,
            error: None,
            reloads: 0,
        });
        Policies {
            state: Arc::new(watch::Sender::new(snapshot)),
            base: Arc::new(base),
        }
    }

    /// Compiles a set read elsewhere (the CLI's local files).
    pub fn from_set(set: PolicySet) -> Result<Self> {
        let compiled = set.compile()?;
        Ok(Policies::with(set, compiled))
    }

    /// Loads `<dir>/_all/*.rego` and `<dir>/<tenant>/*.rego`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Policies::from_set(read_dir(dir)?)
    }

    /// Loads every key of the bucket once; [`Policies::watch`] keeps it current.
    pub async fn from_kv(store: &kv::Store) -> Result<Self> {
        Policies::load(None, Some(store)).await
    }

    /// Loads the directory's files, if any, and the bucket's, if any; a bucket key's file
    /// replaces the directory's file of the same scope and name.
    pub async fn load(dir: Option<&Path>, store: Option<&kv::Store>) -> Result<Self> {
        let base = match dir {
            Some(d) => read_dir(d)?,
            None => PolicySet::new(),
        };
        let mut set = base.clone();
        if let Some(store) = store {
            set.merge(&read_kv(store).await?);
        }
        let compiled = set.compile()?;
        Ok(Policies::with(base, compiled))
    }

    /// What a function does at start: the directory of `AOB_POLICY_DIR` (if set), the
    /// bucket, and a watch that reloads on every change of the bucket. The returned task
    /// stops when every handle of these policies is dropped.
    pub async fn from_env(js: &jetstream::Context) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        let dir = std::env::var_os(DIR_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        let store = open_bucket(js).await?;
        let policies = Policies::load(dir.as_deref(), Some(&store)).await?;
        let task = policies.watch(store);
        Ok((policies, task))
    }

    /// Evaluates the policies of `input.tenant` (its own and `_all`). Never fails: a policy
    /// that cannot be evaluated denies, with a reason saying so.
    pub fn evaluate(&self, input: &Input) -> Decision {
        let snapshot = self.state.borrow().clone();
        snapshot.compiled.evaluate(input)
    }

    /// The version of `tenant`'s policy set (`none` when it has no policies).
    pub fn version(&self, tenant: &str) -> String {
        self.state.borrow().version(tenant).to_string()
    }

    /// The policies in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// Changes as they happen: `rx.wait_for(|s| s.version("acme") != old)`.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.state.subscribe()
    }

    /// Reloads from the bucket on every change, without a restart. A bucket whose files do
    /// not compile leaves the policies in force as they were; the error is logged and kept
    /// in [`Snapshot::error`]. The task ends when every handle of these policies is dropped
    /// (or when it is aborted).
    pub fn watch(&self, store: kv::Store) -> tokio::task::JoinHandle<()> {
        let state = Arc::downgrade(&self.state);
        let base = self.base.clone();
        tokio::spawn(watch_bucket(state, base, store))
    }
}

/// Opens the `AOB_POLICIES` bucket made by the topology.
pub async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store> {
    js.get_key_value(aob_streams::POLICIES)
        .await
        .map_err(|e| Error::Nats {
            what: format!(
                "opening bucket {} (apply the topology: `aob streams apply`)",
                aob_streams::POLICIES
            ),
            message: e.to_string(),
        })
}

async fn watch_bucket(
    state: Weak<watch::Sender<Arc<Snapshot>>>,
    base: Arc<PolicySet>,
    store: kv::Store,
) {
    // Backoff between attempts to watch again after the server went away.
    let mut pause = Duration::from_millis(100);
    loop {
        // Watch first, then read: a change made in between is seen by the watch and only
        // causes one more reload, never a missed one.
        let mut changes = match store.watch_all().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(bucket = aob_streams::POLICIES, "policy watch: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if !reload(&state, &base, &store).await {
            return;
        }
        pause = Duration::from_millis(100);
        while let Some(change) = changes.next().await {
            if let Err(e) = change {
                tracing::warn!(bucket = aob_streams::POLICIES, "policy watch: {e}");
                break;
            }
            if !reload(&state, &base, &store).await {
                return;
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// Reads the bucket and swaps the compiled set in if it compiles. False once nobody holds
/// the policies any more.
async fn reload(
    state: &Weak<watch::Sender<Arc<Snapshot>>>,
    base: &PolicySet,
    store: &kv::Store,
) -> bool {
    let loaded = match read_kv(store).await {
        Ok(kv_set) => {
            let mut set = base.clone();
            set.merge(&kv_set);
            set.compile()
        }
        Err(e) => Err(e),
    };
    let Some(state) = state.upgrade() else {
        return false;
    };
    state.send_modify(|current| {
        let reloads = current.reloads + 1;
        *current = Arc::new(match loaded {
            Ok(compiled) => {
                tracing::info!(
                    bucket = aob_streams::POLICIES,
                    version = compiled.version(ALL),
                    "policies reloaded"
                );
                Snapshot {
                    compiled,
                    error: None,
                    reloads,
                }
            }
            Err(e) => {
                tracing::error!(
                    bucket = aob_streams::POLICIES,
                    "policies not reloaded, the previous ones stay in force: {e}"
                );
                Snapshot {
                    compiled: current.compiled.clone(),
                    error: Some(e.to_string()),
                    reloads,
                }
            }
        });
    });
    true
}
