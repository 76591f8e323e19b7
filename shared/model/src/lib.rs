//! The AOB data model: workflow definitions (YAML or JSON) and their validation, the
//! expression and template languages, the messages on the bus, and run state.

pub mod audit;
pub mod definition;
pub mod expr;
pub mod nodes;
pub mod state;
pub mod validate;
pub mod wire;

use std::path::Path;

pub use definition::{Step, Workflow};
pub use validate::Problem;

/// What can go wrong reading a definition.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not a workflow (syntax, wrong types, missing fields).
    #[error("{file}{}: {message}", location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Parse {
        /// The file.
        file: String,
        /// Line and column, when known.
        location: Option<(usize, usize)>,
        /// What is wrong.
        message: String,
    },
    /// The workflow parsed but breaks rules (each problem names file, step and field).
    #[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The problems, all of them.
        problems: Vec<Problem>,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses a definition from text; JSON when it starts with `{`, YAML otherwise.
pub fn parse(text: &str, file: &str) -> Result<Workflow> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        serde_json::from_str(text).map_err(|e| Error::Parse {
            file: file.to_string(),
            location: Some((e.line(), e.column())),
            message: e.to_string(),
        })
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| Error::Parse {
            file: file.to_string(),
            location: e.location().map(|l| (l.line(), l.column())),
            message: strip_location(&e.to_string()),
        })
    }
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Parses and validates a definition from text.
pub fn load_str(text: &str, file: &str) -> Result<Workflow> {
    let wf = parse(text, file)?;
    let problems = validate::check(&wf, file);
    if problems.is_empty() {
        Ok(wf)
    } else {
        Err(Error::Invalid { problems })
    }
}

/// Reads, parses and validates a definition file.
pub fn load_file(path: &Path) -> Result<Workflow> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        file: file.clone(),
        source,
    })?;
    load_str(&text, &file)
}

/// JSON Schema of the definition format (published as `schemas/workflow.schema.json`).
pub fn definition_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Workflow)).unwrap_or_default();
    // Steps carry type-specific fields beside the common ones; describe each type's.
    let types = nodes::REGISTRY
        .iter()
        .map(|t| (t.name, serde_json::to_value((t.schema)())));
    let mut all_of = Vec::new();
    for (kind, cfg) in types {
        let Ok(mut cfg) = cfg else { continue };
        let props = cfg.get_mut("properties").cloned().unwrap_or_default();
        if let Some(defs) = cfg.get("$defs").and_then(|d| d.as_object())
            && let Some(root_defs) = schema.get_mut("$defs").and_then(|d| d.as_object_mut())
        {
            for (k, v) in defs {
                root_defs.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        all_of.push(serde_json::json!({
            "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
            "then": {"properties": props}
        }));
    }
    if let Some(step) = schema.pointer_mut("/$defs/Step")
        && let Some(obj) = step.as_object_mut()
    {
        obj.insert("allOf".into(), serde_json::Value::Array(all_of));
        if let Some(t) = obj.get_mut("properties").and_then(|p| p.get_mut("type")) {
            t["enum"] = serde_json::json!(nodes::names());
        }
    }
    schema
}

#[cfg(test)]
mod tests;
