//! Conditions are CEL (`when`, `for_each.items`, `loop.until`, `validate.assert`);
//! templates are MiniJinja (`{{ input.name }}` inside string fields).
//!
//! Both read the same run context, a JSON object with `input`, `steps.<id>.output`,
//! `steps.<id>.status`, `run` (`id`, `workflow`, `version`, `tenant`), and inside a
//! step `item` (for_each) and `iteration` (loop).

use std::sync::{Arc, OnceLock};

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// An expression or template that failed to parse or evaluate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    /// What went wrong, with the offending source quoted.
    pub message: String,
}

fn err(message: String) -> ExprError {
    ExprError { message }
}

/// A compiled CEL expression.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<cel::Program>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Expr {
    /// Compiles CEL source.
    pub fn parse(source: &str) -> Result<Expr, ExprError> {
        let program = cel::Program::compile(source).map_err(|e| {
            err(format!(
                "`{source}` is not a valid CEL expression: {}",
                one_line(&e.to_string())
            ))
        })?;
        Ok(Expr {
            source: source.into(),
            program: Arc::new(program),
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against a JSON context object; each top-level key becomes a variable.
    pub fn eval(&self, context: &Value) -> Result<Value, ExprError> {
        let mut ctx = cel::Context::default();
        if let Value::Object(map) = context {
            for (k, v) in map {
                ctx.add_variable(k.as_str(), v)
                    .map_err(|e| err(format!("cannot pass `{k}` to CEL: {e}")))?;
            }
        }
        let out = self
            .program
            .execute(&ctx)
            .map_err(|e| err(format!("`{}` failed: {e}", self.source)))?;
        out.json().map_err(|e| {
            err(format!(
                "`{}` gave a value that is not JSON: {e}",
                self.source
            ))
        })
    }

    /// Evaluates to a boolean; any other type is an error.
    pub fn eval_bool(&self, context: &Value) -> Result<bool, ExprError> {
        match self.eval(context)? {
            Value::Bool(b) => Ok(b),
            other => Err(err(format!(
                "`{}` must be true or false, but gave {}",
                self.source,
                short(&other)
            ))),
        }
    }

    /// Evaluates to a list; any other type is an error.
    pub fn eval_list(&self, context: &Value) -> Result<Vec<Value>, ExprError> {
        match self.eval(context)? {
            Value::Array(items) => Ok(items),
            other => Err(err(format!(
                "`{}` must give a list, but gave {}",
                self.source,
                short(&other)
            ))),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.floor_char_boundary(80)])
    } else {
        s
    }
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env
    })
}

/// True when a string holds template syntax.
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// If `s` is exactly one `{{ expression }}`, that expression.
fn whole_expression(s: &str) -> Option<&str> {
    let t = s.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

/// Checks that a template string parses.
pub fn check_template(s: &str) -> Result<(), ExprError> {
    if !is_template(s) {
        return Ok(());
    }
    let res = match whole_expression(s) {
        Some(e) => env().compile_expression(e).map(|_| ()),
        None => env().template_from_str(s).map(|_| ()),
    };
    res.map_err(|e| err(format!("template `{s}` does not parse: {e}")))
}

/// Renders one template string; a single `{{ expression }}` keeps its JSON type.
pub fn render_str(s: &str, context: &Value) -> Result<Value, ExprError> {
    if !is_template(s) {
        return Ok(Value::String(s.to_string()));
    }
    let ctx = minijinja::Value::from(minijinja::value::Serde(context));
    if let Some(e) = whole_expression(s) {
        let expr = env()
            .compile_expression(e)
            .map_err(|e| err(format!("template `{s}` does not parse: {e}")))?;
        let out = expr
            .eval(ctx)
            .map_err(|e| err(format!("template `{s}` failed: {e}")))?;
        return serde_json::to_value(&out)
            .map_err(|e| err(format!("template `{s}` gave a value that is not JSON: {e}")));
    }
    env()
        .render_str(s, ctx)
        .map(Value::String)
        .map_err(|e| err(format!("template `{s}` failed: {e}")))
}

/// Renders every string inside a JSON value (object keys are left alone).
pub fn render(value: &Value, context: &Value) -> Result<Value, ExprError> {
    Ok(match value {
        Value::String(s) => render_str(s, context)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, context))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map {
                out.insert(k.clone(), render(v, context)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Visits every template string inside a JSON value with its JSON path (`body.user`).
pub fn each_string<'a>(value: &'a Value, path: &str, f: &mut dyn FnMut(&str, &'a str)) {
    match value {
        Value::String(s) => f(path, s),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                each_string(v, &format!("{path}[{i}]"), f);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                each_string(v, &p, f);
            }
        }
        _ => {}
    }
}

/// Step ids an expression or template reads through `steps.<id>`.
pub fn referenced_steps(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = source.as_bytes();
    let mut from = 0;
    while let Some(pos) = source[from..].find("steps") {
        let start = from + pos;
        from = start + 5;
        let before_ok = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b'.');
        if !before_ok {
            continue;
        }
        let rest = &source[start + 5..];
        let id = if let Some(r) = rest.strip_prefix('.') {
            r.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        } else if let Some(r) = rest.strip_prefix("[\"").or_else(|| rest.strip_prefix("['")) {
            r.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        } else {
            continue;
        };
        if !id.is_empty() && !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cel_reads_the_context() {
        let ctx = json!({"input": {"n": 3}, "steps": {"a": {"output": {"ok": true}}}});
        assert!(
            Expr::parse("input.n > 2 && steps.a.output.ok")
                .unwrap()
                .eval_bool(&ctx)
                .unwrap()
        );
        assert_eq!(
            Expr::parse("[1, 2, input.n]")
                .unwrap()
                .eval_list(&ctx)
                .unwrap(),
            vec![json!(1), json!(2), json!(3)]
        );
    }

    #[test]
    fn cel_errors_name_the_expression() {
        let e = Expr::parse("input.n >").unwrap_err();
        assert!(e.message.contains("input.n >"), "{e}");
        let e = Expr::parse("input.n")
            .unwrap()
            .eval_bool(&json!({"input": {"n": 1}}))
            .unwrap_err();
        assert!(e.message.contains("must be true or false"), "{e}");
    }

    #[test]
    fn templates_keep_types_for_single_expressions() {
        let ctx = json!({"input": {"xs": [1, 2], "name": "ada"}});
        assert_eq!(render_str("{{ input.xs }}", &ctx).unwrap(), json!([1, 2]));
        assert_eq!(
            render_str("hi {{ input.name }}", &ctx).unwrap(),
            json!("hi ada")
        );
        assert_eq!(
            render(&json!({"a": ["{{ input.name }}", 3]}), &ctx).unwrap(),
            json!({"a": ["ada", 3]})
        );
        assert!(render_str("{{ input.missing.deeper }}", &ctx).is_err());
        assert!(check_template("{{ input. }}").is_err());
    }

    #[test]
    fn finds_referenced_steps() {
        assert_eq!(
            referenced_steps("steps.a.output > steps.b_2.output && mysteps.c"),
            vec!["a", "b_2"]
        );
        assert_eq!(referenced_steps("{{ steps['x'].output }}"), vec!["x"]);
    }
}
