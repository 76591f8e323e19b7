//! Secrets a function uses at call time, and the redaction that keeps them out of run
//! state, history, payloads and the audit trail.
//!
//! A step names a secret with `${secrets.NAME}` ([`aob_model::nodes::secret_refs`]); the
//! reference is what rendering, the task, the run state and the audit record carry. Only a
//! handler substitutes the value, just before the value leaves the process, from a
//! [`Secrets`] source: a file `NAME` in `AOB_SECRETS_DIR` (one file per secret, as a
//! Kubernetes secret volume mounts them), else the environment variable `AOB_SECRET_<NAME>`.
//! Sources are read on every lookup, so a rotated secret is used from the next call on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use aob_model::nodes::{is_secret_name, secret_refs};
use aob_model::wire::StepError;
use serde_json::Value;

/// Directory holding one file per secret.
pub const DIR_VAR: &str = "AOB_SECRETS_DIR";
/// Prefix of the environment variables holding secrets.
pub const ENV_PREFIX: &str = "AOB_SECRET_";
/// What a redacted value is replaced with.
pub const REDACTED: &str = "***";

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No source holds the secret.
    #[error("secret `{name}` is not set (looked for {looked})")]
    Missing {
        /// The secret's name.
        name: String,
        /// Where it was looked for.
        looked: String,
    },
    /// The secret's file exists but cannot be read.
    #[error("secret `{name}`: cannot read {path}: {reason}")]
    Unreadable {
        /// The secret's name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A reference that does not parse.
    #[error("{0}")]
    Malformed(String),
}

impl From<Error> for StepError {
    /// A missing or malformed secret needs a change of configuration, so it is terminal;
    /// an unreadable file may be a volume still being mounted, so it is retried.
    fn from(e: Error) -> Self {
        match e {
            Error::Unreadable { .. } => StepError::retryable(e.to_string()),
            _ => StepError::terminal(e.to_string()),
        }
    }
}

/// A secret's value. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Default)]
struct Sources {
    dir: Option<PathBuf>,
    env: bool,
    fixed: BTreeMap<String, Secret>,
}

/// Where secrets come from; a cheap, cloneable handle a handler (or a later handler
/// context) carries. `Debug` names the sources and never a value.
#[derive(Clone, Default)]
pub struct Secrets {
    sources: Arc<Sources>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("dir", &self.sources.dir)
            .field("env", &self.sources.env)
            .field("fixed", &self.sources.fixed.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    /// No secrets at all: every lookup is [`Error::Missing`].
    pub fn none() -> Self {
        Secrets::default()
    }

    /// The deployment's sources: `AOB_SECRETS_DIR` when set, then `AOB_SECRET_<NAME>`.
    pub fn from_env() -> Self {
        let dir = std::env::var_os(DIR_VAR)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        Secrets {
            sources: Arc::new(Sources {
                dir,
                env: true,
                fixed: BTreeMap::new(),
            }),
        }
    }

    /// Files in `dir` only.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Self {
        Secrets {
            sources: Arc::new(Sources {
                dir: Some(dir.into()),
                ..Sources::default()
            }),
        }
    }

    /// Fixed values, for embedding and tests.
    pub fn from_values<I, K, V>(values: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Secrets {
            sources: Arc::new(Sources {
                fixed: values
                    .into_iter()
                    .map(|(k, v)| (k.into(), Secret(v.into())))
                    .collect(),
                ..Sources::default()
            }),
        }
    }

    /// The value of one secret.
    pub fn get(&self, name: &str) -> Result<Secret, Error> {
        if !is_secret_name(name) {
            return Err(Error::Malformed(format!("`{name}` is not a secret name")));
        }
        let s = &self.sources;
        if let Some(v) = s.fixed.get(name) {
            return Ok(v.clone());
        }
        if let Some(dir) = &s.dir {
            let path = dir.join(name);
            match std::fs::read(&path) {
                // Files written with `echo` end in a newline that is not part of the value.
                Ok(bytes) => {
                    let text = String::from_utf8(bytes).map_err(|_| Error::Unreadable {
                        name: name.to_string(),
                        path: path.clone(),
                        reason: "not UTF-8".into(),
                    })?;
                    let value = text
                        .strip_suffix("\r\n")
                        .or_else(|| text.strip_suffix('\n'))
                        .unwrap_or(&text);
                    return Ok(Secret(value.to_string()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Unreadable {
                        name: name.to_string(),
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
        if s.env
            && let Ok(v) = std::env::var(format!("{ENV_PREFIX}{name}"))
        {
            return Ok(Secret(v));
        }
        let mut looked = Vec::new();
        if let Some(dir) = &s.dir {
            looked.push(format!("file {}", dir.join(name).display()));
        }
        if s.env {
            looked.push(format!("environment variable {ENV_PREFIX}{name}"));
        }
        if looked.is_empty() {
            looked.push("no secret source is configured".into());
        }
        Err(Error::Missing {
            name: name.to_string(),
            looked: looked.join(", "),
        })
    }

    /// `text` with every `${secrets.NAME}` replaced by its value, and the values used (for
    /// [`scrub`]). Text without references comes back unchanged with no values.
    pub fn substitute(&self, text: &str) -> Result<(String, Vec<Secret>), Error> {
        let refs = secret_refs(text).map_err(Error::Malformed)?;
        if refs.is_empty() {
            return Ok((text.to_string(), Vec::new()));
        }
        let mut out = String::with_capacity(text.len());
        let mut used = Vec::with_capacity(refs.len());
        let mut last = 0;
        for r in refs {
            let value = self.get(r.name)?;
            out.push_str(&text[last..r.span.start]);
            out.push_str(value.expose());
            last = r.span.end;
            used.push(value);
        }
        out.push_str(&text[last..]);
        Ok((out, used))
    }
}

/// True for headers that carry credentials: the usual ones, and any whose name mentions a
/// token, secret, key or password.
pub fn is_sensitive_header(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie" | "x-api-key"
    ) || ["token", "secret", "key", "password"]
        .iter()
        .any(|w| n.contains(w))
}

/// A header value as it may be recorded: a sensitive header's value becomes `***`, keeping
/// the names of the secrets it references so an auditor sees which one was used.
pub fn redact_header(name: &str, value: &str) -> String {
    if !is_sensitive_header(name) {
        return value.to_string();
    }
    match secret_refs(value) {
        Ok(refs) if !refs.is_empty() => {
            let names: Vec<String> = refs
                .iter()
                .map(|r| format!("${{secrets.{}}}", r.name))
                .collect();
            format!("{REDACTED} ({})", names.join(", "))
        }
        _ => REDACTED.to_string(),
    }
}

/// A step config as it may be recorded: the values of sensitive `headers` redacted.
pub fn redact_config(config: &Value) -> Value {
    let mut out = config.clone();
    if let Some(Value::Object(headers)) = out.get_mut("headers") {
        for (name, value) in headers.iter_mut() {
            if let Value::String(v) = value {
                *v = redact_header(name, v);
            }
        }
    }
    out
}

/// Replaces every occurrence of the given secret values in the strings (and object keys)
/// of `value` with `***`: an endpoint that echoes a credential must not put it in the
/// step's output.
pub fn scrub(value: &mut Value, secrets: &[Secret]) {
    let secrets: Vec<&str> = secrets
        .iter()
        .map(Secret::expose)
        .filter(|s| !s.is_empty())
        .collect();
    if !secrets.is_empty() {
        scrub_with(value, &secrets);
    }
}

/// [`scrub`] for one string.
pub fn scrub_str(text: &str, secrets: &[Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().map(Secret::expose).filter(|s| !s.is_empty()) {
        if out.contains(s) {
            out = out.replace(s, REDACTED);
        }
    }
    out
}

fn scrub_with(value: &mut Value, secrets: &[&str]) {
    let clean = |s: &str| {
        let mut out = s.to_string();
        for secret in secrets {
            if out.contains(secret) {
                out = out.replace(secret, REDACTED);
            }
        }
        out
    };
    match value {
        Value::String(s) if secrets.iter().any(|x| s.contains(x)) => *s = clean(s),
        Value::Array(items) => items.iter_mut().for_each(|v| scrub_with(v, secrets)),
        Value::Object(map) => {
            if map.keys().any(|k| secrets.iter().any(|x| k.contains(x))) {
                let old = std::mem::take(map);
                for (k, v) in old {
                    map.insert(clean(&k), v);
                }
            }
            map.values_mut().for_each(|v| scrub_with(v, secrets));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_substituted_from_fixed_values() {
        let s = Secrets::from_values([("API_TOKEN", "t0k3n"), ("USER", "ada")]);
        let (text, used) = s
            .substitute("Bearer ${secrets.API_TOKEN} for ${ secrets.USER }")
            .unwrap();
        assert_eq!(text, "Bearer t0k3n for ada");
        assert_eq!(used.len(), 2);
        let (text, used) = s.substitute("plain ${HOME}").unwrap();
        assert_eq!((text.as_str(), used.len()), ("plain ${HOME}", 0));
    }

    #[test]
    fn references_survive_rendering() {
        let cfg = json!({"url": "http://x/{{ input.id }}", "headers": {
            "authorization": "Bearer ${secrets.API_TOKEN}",
            "x-mixed": "{{ input.id }}:${ secrets.API_TOKEN }"
        }});
        let out = crate::render_config("http", &cfg, &json!({"input": {"id": 7}})).unwrap();
        assert_eq!(out["url"], "http://x/7");
        assert_eq!(
            out["headers"]["authorization"],
            "Bearer ${secrets.API_TOKEN}"
        );
        assert_eq!(out["headers"]["x-mixed"], "7:${ secrets.API_TOKEN }");
    }

    #[test]
    fn a_missing_secret_is_terminal_and_names_it() {
        let s = Secrets::from_values([("OTHER", "v")]);
        let e = s.substitute("${secrets.API_TOKEN}").unwrap_err();
        assert!(matches!(&e, Error::Missing { name, .. } if name == "API_TOKEN"));
        let step: StepError = e.into();
        assert_eq!(step.class, aob_model::wire::ErrorClass::Terminal);
        assert!(step.message.contains("`API_TOKEN`"), "{}", step.message);
        assert!(matches!(
            s.substitute("${secrets.A-B}").unwrap_err(),
            Error::Malformed(_)
        ));
    }

    #[test]
    fn files_are_read_on_every_lookup_without_their_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("DB_PASSWORD"), "hunter2\n").unwrap();
        let s = Secrets::from_dir(dir.path());
        assert_eq!(s.get("DB_PASSWORD").unwrap().expose(), "hunter2");
        std::fs::write(dir.path().join("DB_PASSWORD"), "rotated").unwrap();
        assert_eq!(s.get("DB_PASSWORD").unwrap().expose(), "rotated");
        let e = s.get("NOPE").unwrap_err();
        assert!(e.to_string().contains("NOPE"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn debug_never_shows_a_value() {
        let s = Secrets::from_values([("API_TOKEN", "t0k3n")]);
        let shown = format!("{s:?} {:?}", s.get("API_TOKEN").unwrap());
        assert!(!shown.contains("t0k3n"), "{shown}");
        assert!(shown.contains("API_TOKEN"), "{shown}");
    }

    #[test]
    fn sensitive_headers_are_recognised() {
        for h in [
            "Authorization",
            "proxy-authorization",
            "Cookie",
            "set-cookie",
            "X-Api-Key",
            "x-auth-token",
            "X-Client-Secret",
            "api_key",
            "x-db-password",
        ] {
            assert!(is_sensitive_header(h), "{h}");
        }
        for h in ["content-type", "accept", "x-request-id", "user-agent"] {
            assert!(!is_sensitive_header(h), "{h}");
        }
    }

    #[test]
    fn configs_are_redacted_for_the_record() {
        let cfg = json!({
            "url": "http://x",
            "headers": {
                "authorization": "Bearer ${secrets.API_TOKEN}",
                "x-api-key": "literal-key",
                "accept": "application/json"
            }
        });
        let out = redact_config(&cfg);
        assert_eq!(
            out["headers"],
            json!({
                "authorization": "*** (${secrets.API_TOKEN})",
                "x-api-key": "***",
                "accept": "application/json"
            })
        );
        assert_eq!(out["url"], "http://x");
        assert_eq!(redact_config(&json!({"output": 1})), json!({"output": 1}));
    }

    #[test]
    fn echoed_values_are_scrubbed() {
        let used = [Secret("t0k3n".into())];
        let mut v = json!({"echo": "Bearer t0k3n", "t0k3n": ["x t0k3n y", 1]});
        scrub(&mut v, &used);
        assert_eq!(v, json!({"echo": "Bearer ***", "***": ["x *** y", 1]}));
        assert_eq!(scrub_str("a t0k3n", &used), "a ***");
    }
}
