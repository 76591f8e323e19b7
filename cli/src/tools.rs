//! `aob tools list`: every tool of the tools file, with its description and arguments. Each
//! MCP server is connected to (stdio servers are spawned) and asked for its tools; one that
//! cannot be reached is listed with its error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use serde_json::{Value, json};

use aob_http::{HttpHandler, Policy};
use aob_runtime::secrets::Secrets;
use aob_tool::{Gateway, ToolInfo, ToolsConfig};

/// The tools of one source: an MCP server, or the HTTP tools.
#[derive(Debug)]
pub struct Listing {
    /// `mcp:<server>` or `http`.
    pub source: String,
    /// Its tools, or why they could not be listed.
    pub tools: Result<Vec<ToolInfo>, String>,
}

/// Lists every source of `gw`, the MCP servers at once.
pub async fn listings(gw: &Gateway) -> Vec<Listing> {
    let servers = gw.servers();
    let mut out: Vec<Listing> = futures::future::join_all(servers.iter().map(|s| async move {
        Listing {
            source: format!("mcp:{s}"),
            tools: gw.list_source(Some(s)).await.map_err(|e| e.to_string()),
        }
    }))
    .await;
    if !gw.http_tools().is_empty() {
        out.push(Listing {
            source: "http".into(),
            tools: gw.list_source(None).await.map_err(|e| e.to_string()),
        });
    }
    out
}

/// The arguments of an input schema in one line: `timezone: string, limit?: integer`
/// (`?` marks an optional one).
pub fn arguments(schema: &Value) -> String {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return String::new();
    };
    props
        .iter()
        .map(|(name, p)| {
            let kind = match p.get("type") {
                Some(Value::String(t)) => t.clone(),
                Some(Value::Array(ts)) => ts
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("|"),
                _ if p.get("enum").is_some() => "enum".into(),
                _ => "any".into(),
            };
            let opt = if required.contains(&name.as_str()) {
                ""
            } else {
                "?"
            };
            format!("{name}{opt}: {kind}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first line of a description, cut to `max` characters.
fn short(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() <= max {
        return line.to_string();
    }
    let mut s: String = line.chars().take(max - 1).collect();
    s.push('…');
    s
}

/// The listings as a table: one row per tool, one per source that failed (its error
/// follows the table, where a long message does not widen the columns).
pub fn table(listings: &[Listing]) -> String {
    let mut rows = Vec::new();
    let mut errors = String::new();
    for l in listings {
        match &l.tools {
            Ok(tools) => {
                for t in tools {
                    rows.push(vec![
                        t.name.clone(),
                        short(t.description.as_deref().unwrap_or(""), 60),
                        arguments(&t.input_schema),
                    ]);
                }
            }
            Err(e) => {
                let name = l.source.strip_prefix("mcp:").unwrap_or(&l.source);
                rows.push(vec![
                    format!("{name}.*"),
                    "(not listed: see the error below)".into(),
                    String::new(),
                ]);
                errors.push_str(&format!("error: {e}\n"));
            }
        }
    }
    let mut out = crate::table::render(&["TOOL", "DESCRIPTION", "ARGUMENTS"], &rows);
    if !errors.is_empty() {
        out.push('\n');
        out.push_str(&errors);
    }
    out
}

/// The listings as JSON: `{"tools": [...], "errors": [{"source", "error"}]}`.
pub fn to_json(listings: &[Listing]) -> Value {
    let mut tools = Vec::new();
    let mut errors = Vec::new();
    for l in listings {
        match &l.tools {
            Ok(ts) => tools.extend(ts.iter().map(|t| json!(t))),
            Err(e) => errors.push(json!({"source": l.source, "error": e})),
        }
    }
    json!({"tools": tools, "errors": errors})
}

/// `aob tools list`: exit code 1 when a server could not be listed.
pub async fn cmd_list(config: Option<&Path>, json: bool) -> Result<ExitCode> {
    let path: PathBuf = match config.map(Path::to_path_buf).or_else(ToolsConfig::env_path) {
        Some(p) => p,
        None => {
            return Err(anyhow!(
                "no tools file: set AOB_TOOLS or pass --config FILE"
            ));
        }
    };
    let config = ToolsConfig::load(&path)?;
    let http = HttpHandler::with(
        Policy::from_env().map_err(|e| anyhow!("{e}"))?,
        Secrets::from_env(),
    )?;
    let gw = Gateway::new(config, http, Secrets::from_env())?;
    let found = listings(&gw).await;
    gw.shutdown().await;
    if json {
        say!("{}", serde_json::to_string_pretty(&to_json(&found))?);
    } else {
        crate::out::text(&table(&found));
    }
    let failed = found.iter().any(|l| l.tools.is_err());
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_is_listed_with_its_error() {
        let config = ToolsConfig::parse(
            r#"
mcp:
  gone:
    command: /nonexistent/aob-no-such-mcp-server
http:
  lookup_order:
    description: Looks an order up by id
    url: "http://127.0.0.1:1/orders/{{ args.id }}"
    input_schema: { type: object, required: [id], properties: { id: { type: string }, verbose: { type: boolean } } }
"#,
            Path::new("tools.yaml"),
        )
        .unwrap();
        let http = HttpHandler::with(Policy::default(), Secrets::none()).unwrap();
        let gw = Gateway::new(config, http, Secrets::none()).unwrap();
        let found = listings(&gw).await;
        let text = table(&found);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TOOL"), "{text}");
        assert!(
            lines[1].starts_with("gone.*")
                && lines[1].contains("(not listed: see the error below)"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("lookup_order")
                && lines[2].contains("Looks an order up by id")
                && lines[2].ends_with("id: string, verbose?: boolean"),
            "{text}"
        );
        assert!(
            lines[4].starts_with(
                "error: MCP server `gone`: cannot start `/nonexistent/aob-no-such-mcp-server`"
            ),
            "{text}"
        );
        assert!(
            lines[4].starts_with(
                "error: MCP server `gone`: cannot start `/nonexistent/aob-no-such-mcp-server`"
            ),
            "{text}"
        );
        let j = to_json(&found);
        assert_eq!(j["tools"][0]["model_name"], "lookup_order");
        assert_eq!(j["errors"][0]["source"], "mcp:gone");
    }
}
