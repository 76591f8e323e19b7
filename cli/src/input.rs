//! Reading a run input given on the command line: inline JSON, `@file.json`, or `@-` (stdin).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

/// How much of bad JSON is quoted back in an error.
const QUOTE: usize = 120;

/// Parses `--input`: `@path` reads the file (`@-` reads stdin), anything else is JSON text.
/// No input at all means `{}`.
pub fn parse_input(arg: Option<&str>) -> Result<Value> {
    match arg {
        None => Ok(Value::Object(Default::default())),
        Some("@-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("--input @-: reading standard input")?;
            parse_json(&text, "standard input")
        }
        Some(arg) => match arg.strip_prefix('@') {
            Some(path) => read_input_file(Path::new(path)),
            None => parse_json(arg, "--input"),
        },
    }
}

/// Reads a JSON input file.
pub fn read_input_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--input @{}: cannot read the file", path.display()))?;
    parse_json(&text, &format!("--input @{}", path.display()))
}

/// Parses JSON text; the error names where the text came from and quotes it.
pub fn parse_json(text: &str, source: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        let quoted = crate::progress::one_line(text.trim(), QUOTE);
        anyhow!("{source} is not valid JSON ({e}): `{quoted}`")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inline_json() {
        assert_eq!(parse_input(Some(r#"{"n": 1}"#)).unwrap(), json!({"n": 1}));
        assert_eq!(parse_input(Some("[1,2]")).unwrap(), json!([1, 2]));
        assert_eq!(parse_input(None).unwrap(), json!({}));
    }

    #[test]
    fn bad_inline_json_is_named() {
        let err = parse_input(Some("{name: ada}")).unwrap_err().to_string();
        assert!(err.starts_with("--input is not valid JSON"), "{err}");
        assert!(err.contains("`{name: ada}`"), "{err}");
        assert!(err.contains("line 1 column 2"), "{err}");
    }

    #[test]
    fn file_input() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("in.json");
        std::fs::write(&good, r#"{"name": "Ada"}"#).unwrap();
        let arg = format!("@{}", good.display());
        assert_eq!(parse_input(Some(&arg)).unwrap(), json!({"name": "Ada"}));

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"name\": }\n").unwrap();
        let err = parse_input(Some(&format!("@{}", bad.display())))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("--input @{} is not valid JSON", bad.display())),
            "{err}"
        );
        assert!(err.contains("`{\"name\": }`"), "{err}");

        let missing = dir.path().join("missing.json");
        let err = format!(
            "{:#}",
            parse_input(Some(&format!("@{}", missing.display()))).unwrap_err()
        );
        assert!(err.contains("cannot read the file"), "{err}");
        assert!(err.contains("missing.json"), "{err}");
    }
}
