//! The tools file (`AOB_TOOLS`): which MCP servers to use, which HTTP tools exist, and
//! the limits and breaker settings that guard them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aob_model::definition::Dur;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Variable naming the tools file.
pub const TOOLS_VAR: &str = "AOB_TOOLS";

/// Call timeout of an MCP server that sets none.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    /// MCP servers by name; their tools are `<server>.<tool>`.
    #[serde(default)]
    pub mcp: BTreeMap<String, McpServerConfig>,
    /// HTTP tools by name (the name is the tool's).
    #[serde(default)]
    pub http: BTreeMap<String, HttpToolConfig>,
    /// Calls per minute per tool and per tenant; nothing is limited by default.
    #[serde(default)]
    pub limits: Limits,
    /// When a server or HTTP tool is taken out of use after failures.
    #[serde(default)]
    pub breaker: BreakerConfig,
}

/// One MCP server: `command` (spawned, spoken to over stdio) or `url` (streamable HTTP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// Program to spawn (looked up on `PATH`).
    #[serde(default)]
    pub command: Option<String>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to its environment; `${secrets.NAME}` in a value is replaced by the
    /// secret when the server is spawned.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Endpoint of a streamable-HTTP server.
    #[serde(default)]
    pub url: Option<String>,
    /// Headers sent to a streamable-HTTP server; `${secrets.NAME}` in a value is replaced
    /// by the secret when connecting.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest wait for one call's answer (default `30s`); a timeout is retryable.
    #[serde(default)]
    pub call_timeout: Option<Dur>,
}

impl McpServerConfig {
    /// The call timeout in force.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout.map_or(DEFAULT_CALL_TIMEOUT, |d| d.0)
    }
}

/// An HTTP tool: a request whose `url`, `headers` and `body` are templates over `args`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToolConfig {
    /// What it does, for a model choosing tools.
    #[serde(default)]
    pub description: Option<String>,
    /// URL template (`https://orders.example/api/orders/{{ args.id }}`).
    pub url: String,
    /// HTTP method (default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Header templates; `${secrets.NAME}` in a value is replaced by the secret when sent.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body template: a string is sent as text, other JSON as JSON.
    #[serde(default)]
    pub body: Option<Value>,
    /// Request time limit (default `30s`).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// JSON Schema of the arguments (default: any object).
    #[serde(default = "any_object")]
    pub input_schema: Value,
}

fn default_method() -> String {
    "GET".into()
}

fn any_object() -> Value {
    serde_json::json!({"type": "object"})
}

/// Calls per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Calls allowed per minute; a burst of this many is allowed.
    pub per_minute: u32,
}

/// Rate limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// By tool name (`time.get_current_time`, `lookup_order`).
    #[serde(default)]
    pub tools: BTreeMap<String, Rate>,
    /// By tenant, over all its calls.
    #[serde(default)]
    pub tenants: BTreeMap<String, Rate>,
}

/// Circuit breaker settings, one breaker per MCP server and per HTTP tool.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed calls (retryable failures: the server unreachable, dead, timing
    /// out, answering 5xx) that open the breaker (default 5).
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long an open breaker refuses calls before letting one through (default `30s`).
    #[serde(default = "default_cool_down")]
    pub cool_down: Dur,
}

fn default_failures() -> u32 {
    5
}

fn default_cool_down() -> Dur {
    Dur(Duration::from_secs(30))
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: default_failures(),
            cool_down: default_cool_down(),
        }
    }
}

/// How a server is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// A child process over stdio.
    Stdio {
        /// Program.
        command: String,
        /// Arguments.
        args: Vec<String>,
    },
    /// Streamable HTTP.
    Http {
        /// Endpoint.
        url: String,
    },
}

impl ToolsConfig {
    /// Reads and checks a tools file (YAML or JSON).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        ToolsConfig::parse(&text, path)
    }

    /// The file named by `AOB_TOOLS`, or an empty configuration (no tools) when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var_os(TOOLS_VAR) {
            Some(p) if !p.is_empty() => ToolsConfig::load(Path::new(&p)),
            _ => Ok(ToolsConfig::default()),
        }
    }

    /// Parses and checks the text of a tools file; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let err = |message: String| Error::Config {
            file: file.to_path_buf(),
            message,
        };
        let config: ToolsConfig = serde_yaml_ng::from_str(text).map_err(|e| err(e.to_string()))?;
        config.check().map_err(err)?;
        Ok(config)
    }

    /// Checks what serde cannot: names, one transport per server, HTTP tool fields, that
    /// limits name configured tools.
    pub fn check(&self) -> std::result::Result<(), String> {
        for (name, server) in &self.mcp {
            check_name(name).map_err(|e| format!("mcp.{name}: {e}"))?;
            server.transport(name)?;
        }
        for (name, tool) in &self.http {
            check_name(name).map_err(|e| format!("http.{name}: {e}"))?;
            if self.mcp.contains_key(name) {
                return Err(format!(
                    "http.{name}: an MCP server has the same name; give the HTTP tool another"
                ));
            }
            let mut fields = Map::new();
            fields.insert("url".into(), Value::String(tool.url.clone()));
            fields.insert("method".into(), Value::String(tool.method.clone()));
            fields.insert("headers".into(), serde_json::json!(tool.headers));
            if let Some(b) = &tool.body {
                fields.insert("body".into(), b.clone());
            }
            aob_model::nodes::check_config("http", &fields)
                .map_err(|(field, message)| format!("http.{name}.{field}: {message}"))?;
            for (field, value) in [("url", Value::String(tool.url.clone()))]
                .into_iter()
                .chain(tool.body.clone().map(|b| ("body", b)))
            {
                let mut bad = None;
                aob_model::expr::each_string(&value, field, &mut |path, s| {
                    if bad.is_none()
                        && let Err(e) = aob_model::expr::check_template(s)
                    {
                        bad = Some(format!("http.{name}.{path}: {e}"));
                    }
                });
                if let Some(b) = bad {
                    return Err(b);
                }
            }
            if !tool.input_schema.is_object() {
                return Err(format!(
                    "http.{name}.input_schema: a JSON Schema object is needed"
                ));
            }
            jsonschema::validator_for(&tool.input_schema)
                .map_err(|e| format!("http.{name}.input_schema: not a valid JSON Schema: {e}"))?;
        }
        for (tool, rate) in &self.limits.tools {
            if rate.per_minute == 0 {
                return Err(format!(
                    "limits.tools.{tool}.per_minute: must be at least 1"
                ));
            }
            let known = match tool.split_once('.') {
                Some((server, _)) => self.mcp.contains_key(server),
                None => self.http.contains_key(tool),
            };
            if !known {
                return Err(format!(
                    "limits.tools.{tool}: no such tool is configured (MCP tools are `<server>.<tool>`, HTTP tools their plain name)"
                ));
            }
        }
        for (tenant, rate) in &self.limits.tenants {
            if rate.per_minute == 0 {
                return Err(format!(
                    "limits.tenants.{tenant}.per_minute: must be at least 1"
                ));
            }
        }
        if self.breaker.failures == 0 {
            return Err("breaker.failures: must be at least 1".into());
        }
        Ok(())
    }

    /// The path `AOB_TOOLS` names, if set.
    pub fn env_path() -> Option<PathBuf> {
        std::env::var_os(TOOLS_VAR)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }
}

impl McpServerConfig {
    /// How the server `name` is reached; an error when the entry gives both or neither.
    pub fn transport(&self, name: &str) -> std::result::Result<Transport, String> {
        match (&self.command, &self.url) {
            (Some(command), None) => {
                if !self.headers.is_empty() {
                    return Err(format!(
                        "mcp.{name}.headers: headers are for `url` servers; a `command` server takes `env`"
                    ));
                }
                Ok(Transport::Stdio {
                    command: command.clone(),
                    args: self.args.clone(),
                })
            }
            (None, Some(url)) => {
                if !self.args.is_empty() || !self.env.is_empty() {
                    return Err(format!(
                        "mcp.{name}: `args` and `env` are for `command` servers, not `url` ones"
                    ));
                }
                let parsed = url::Url::parse(url)
                    .map_err(|e| format!("mcp.{name}.url: `{url}` is not a URL: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!(
                        "mcp.{name}.url: `{url}` is not an http or https URL"
                    ));
                }
                Ok(Transport::Http { url: url.clone() })
            }
            (Some(_), Some(_)) => Err(format!(
                "mcp.{name}: give either `command` (stdio) or `url` (streamable HTTP), not both"
            )),
            (None, None) => Err(format!(
                "mcp.{name}: give `command` (stdio) or `url` (streamable HTTP)"
            )),
        }
    }
}

/// Server and HTTP tool names: letters, digits, `_` and `-`, starting with a letter, and
/// no `__`, which separates server and tool in model-safe names.
fn check_name(name: &str) -> std::result::Result<(), String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !name.contains("__")
        && name.len() <= 32;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (letters, digits, `_` and `-`, starting with a letter, no `__`, at most 32 characters)"
        ))
    }
}

/// The longest model-safe name.
pub const MODEL_NAME_MAX: usize = 64;

/// The model-safe name (`[A-Za-z0-9_-]{1,64}`) of a qualified tool name: `time.get_current_time`
/// → `time__get_current_time`, `lookup_order` → `lookup_order`. Characters outside the
/// set become `_`; a name that would be longer than 64 characters, or that had to be
/// changed, is cut and ends with 8 hex digits of its hash so that names stay distinct.
/// [`qualified_name`] reverses it for names that needed no change; the gateway resolves
/// the others from its listing.
pub fn model_name(qualified: &str) -> String {
    let joined = match qualified.split_once('.') {
        Some((server, tool)) => format!("{server}__{tool}"),
        None => qualified.to_string(),
    };
    let clean: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == joined && !clean.is_empty() && clean.len() <= MODEL_NAME_MAX {
        return clean;
    }
    let hash = aob_model::audit::sha256_hex(qualified.as_bytes());
    let keep: String = clean.chars().take(MODEL_NAME_MAX - 9).collect();
    format!("{keep}_{}", &hash[..8])
}

/// The qualified name of a model-safe name that [`model_name`] did not have to change:
/// `time__get_current_time` → `time.get_current_time`, `lookup_order` → `lookup_order`.
pub fn qualified_name(model: &str) -> String {
    match model.split_once("__") {
        Some((server, tool)) => format!("{server}.{tool}"),
        None => model.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ToolsConfig> {
        ToolsConfig::parse(text, Path::new("tools.yaml"))
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(
            r#"
mcp:
  time:
    command: mcp-server-time
    args: ["--local-timezone", "UTC"]
    env: { }
    call_timeout: 30s
  docs:
    url: http://127.0.0.1:8931/mcp
    headers: { Authorization: "Bearer ${secrets.DOCS_TOKEN}" }
http:
  lookup_order:
    description: Looks an order up by id
    url: "https://orders.example/api/orders/{{ args.id }}"
    method: GET
    headers: { }
    input_schema: { type: object, required: [id], properties: { id: { type: string } } }
limits:
  tools: { "time.get_current_time": { per_minute: 100 } }
  tenants: { acme: { per_minute: 1000 } }
breaker: { failures: 5, cool_down: 30s }
"#,
        )
        .unwrap();
        assert_eq!(
            c.mcp["time"].transport("time").unwrap(),
            Transport::Stdio {
                command: "mcp-server-time".into(),
                args: vec!["--local-timezone".into(), "UTC".into()]
            }
        );
        assert_eq!(c.mcp["time"].call_timeout(), Duration::from_secs(30));
        assert_eq!(c.http["lookup_order"].method, "GET");
        assert_eq!(c.limits.tenants["acme"].per_minute, 1000);
        assert_eq!(c.breaker.cool_down.0, Duration::from_secs(30));
    }

    #[test]
    fn unknown_fields_name_the_file_and_the_field() {
        let e = parse("mcp:\n  time:\n    command: x\n    timeout: 5s\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tools.yaml"), "{e}");
        assert!(e.contains("unknown field `timeout`"), "{e}");
        let e = parse("servers: {}\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `servers`"), "{e}");
    }

    #[test]
    fn servers_need_exactly_one_transport() {
        let e = parse("mcp:\n  a:\n    args: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mcp.a: give `command`"), "{e}");
        let e = parse("mcp:\n  a:\n    command: x\n    url: http://h/mcp\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");
        let e = parse("mcp:\n  a:\n    url: ftp://h/mcp\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mcp.a.url"), "{e}");
    }

    #[test]
    fn names_and_limits_are_checked() {
        let e = parse("mcp:\n  a__b:\n    command: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a__b` is not a valid name"), "{e}");
        let e =
            parse("mcp:\n  a:\n    command: x\nlimits:\n  tools: { \"b.t\": { per_minute: 3 } }\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("limits.tools.b.t: no such tool"), "{e}");
        let e = parse("http:\n  t:\n    url: \"http://h/{{ args.x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.t.url"), "{e}");
        let e = parse("http:\n  t:\n    url: \"http://h/${secrets.X}\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.t.url"), "{e}");
    }

    #[test]
    fn model_names_round_trip() {
        assert_eq!(
            model_name("time.get_current_time"),
            "time__get_current_time"
        );
        assert_eq!(
            qualified_name("time__get_current_time"),
            "time.get_current_time"
        );
        assert_eq!(model_name("lookup_order"), "lookup_order");
        assert_eq!(qualified_name("lookup_order"), "lookup_order");
        let odd = model_name("fs.read/file");
        assert!(odd.starts_with("fs__read_file_"), "{odd}");
        assert_ne!(odd, model_name("fs.read_file"));
        let long = model_name(&format!("s.{}", "x".repeat(100)));
        assert_eq!(long.len(), MODEL_NAME_MAX);
        let safe = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        assert!(safe(&odd) && safe(&long));
    }
}
