//! Where policy files come from: a directory tree, or the `AOB_POLICIES` bucket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::compile::{ALL, PolicySet, Source};
use crate::{Error, Result};

/// The value stored under a KV key (`<tenant>` or `_all`): Rego files by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Rego text by file name (`spend_cap.rego`).
    pub modules: BTreeMap<String, String>,
}

impl Bundle {
    /// The files of `key`, labelled `kv:<key>/<file>` for error messages.
    pub fn sources(&self, key: &str) -> BTreeMap<String, Source> {
        self.modules
            .iter()
            .map(|(name, text)| {
                let src = Source {
                    label: format!("kv:{key}/{name}"),
                    text: text.clone(),
                };
                (name.clone(), src)
            })
            .collect()
    }
}

/// True for `_all` and for a tenant name (letters, digits, `_`, `-`; at most 128).
pub fn is_scope(s: &str) -> bool {
    s == ALL || aob_streams::subjects::is_token(s)
}

/// Reads `<dir>/_all/*.rego` and `<dir>/<tenant>/*.rego`. Other files, and folders whose
/// name starts with `.`, are ignored; a folder whose name is not a tenant name is an error.
pub fn read_dir(dir: &Path) -> Result<PolicySet> {
    let read = |path: &Path| -> Result<std::fs::ReadDir> {
        std::fs::read_dir(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut set = PolicySet::new();
    let mut scopes: Vec<PathBuf> = Vec::new();
    for entry in read(dir)? {
        let path = entry
            .map_err(|source| Error::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        if path.is_dir() {
            scopes.push(path);
        }
    }
    scopes.sort();
    for scope_dir in scopes {
        let Some(scope) = scope_dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if scope.starts_with('.') {
            continue;
        }
        if !is_scope(scope) {
            return Err(Error::Layout {
                path: scope_dir.clone(),
                message: "a policy folder is `_all` or a tenant name (letters, digits, `_`, `-`)"
                    .into(),
            });
        }
        for entry in read(&scope_dir)? {
            let path = entry
                .map_err(|source| Error::Read {
                    path: scope_dir.clone(),
                    source,
                })?
                .path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with(".rego") || !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            let label = path.display().to_string();
            set.insert(scope, name, Source { label, text });
        }
    }
    Ok(set)
}

/// Reads every key of the bucket. A value that is not a [`Bundle`] is an error naming its key.
pub async fn read_kv(store: &kv::Store) -> Result<PolicySet> {
    let nats = |what: &str| {
        let what = format!("{what} in {}", aob_streams::POLICIES);
        move |e: String| Error::Nats { what, message: e }
    };
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| nats("listing keys")(e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| nats("listing keys")(e.to_string()))?;
    let mut set = PolicySet::new();
    for key in keys {
        let Some(value) = store
            .get(&key)
            .await
            .map_err(|e| nats(&format!("reading key {key}"))(e.to_string()))?
        else {
            continue;
        };
        let bundle = parse_bundle(&key, &value)?;
        set.set_scope(&key, bundle.sources(&key));
    }
    Ok(set)
}

/// Parses the value of KV key `key`.
pub fn parse_bundle(key: &str, value: &[u8]) -> Result<Bundle> {
    if !is_scope(key) {
        return Err(Error::Bundle {
            key: key.to_string(),
            message: "a key is `_all` or a tenant name".into(),
        });
    }
    serde_json::from_slice(value).map_err(|e| Error::Bundle {
        key: key.to_string(),
        message: format!("{e}; expected {{\"modules\": {{\"<file>.rego\": \"<rego text>\"}}}}"),
    })
}
