//! The script: rules tried in order, each a condition on the request and a reply.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// What the double answers, rule by rule. Written in YAML or JSON (JSON is YAML).
///
/// ```yaml
/// rules:
///   - when: { contains: weather }
///     reply: { tool_calls: [{ name: get_weather, arguments: { city: Paris } }] }
///   - when: { has_tool_result: true }
///     reply: { text: "It is sunny in Paris." }
///   - when: { model: flaky-model }
///     times: 2
///     reply: { error: { status: 503, message: overloaded } }
/// default: { text: "Hello from the scripted provider." }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// Tried in order; the first that matches (and is not used up) answers.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The reply when no rule matches. Without one, the double echoes the last message:
    /// `scripted reply to: <text>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Reply>,
}

/// One rule: a condition and a reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// What the request must look like; empty matches every request.
    #[serde(default)]
    pub when: When,
    /// What to answer.
    pub reply: Reply,
    /// Answer this way at most this many times, then skip the rule (so "fail twice, then
    /// succeed" is a rule with `times: 2` followed by another). Default: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// Wait this long (milliseconds) before answering, to simulate latency or a hang.
    /// Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

/// The condition of a rule; every field given must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// The request's model name, exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A substring of the text of the last user or tool message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// A regular expression (Rust `regex` syntax) found in that text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Whether the last message carries a tool result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_tool_result: Option<bool>,
    /// Whether the request is streamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
}

/// A reply: text and/or tool calls, or an error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// The answer's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Tools the model asks to call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ScriptedToolCall>,
    /// Answer with an HTTP error instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ScriptedError>,
    /// Token counts to report instead of the counted ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ScriptedUsage>,
    /// `length` to say the answer was cut at `max_tokens`; default `stop` (or `tool_calls`
    /// when there are tool calls). Written in OpenAI's words; Anthropic's are derived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}

impl Reply {
    /// A text reply.
    pub fn text(text: impl Into<String>) -> Self {
        Reply {
            text: Some(text.into()),
            ..Reply::default()
        }
    }

    /// A reply that calls one tool.
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        Reply {
            tool_calls: vec![ScriptedToolCall {
                name: name.into(),
                arguments,
            }],
            ..Reply::default()
        }
    }

    /// An error reply with the protocol's error body around `message`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Reply {
            error: Some(ScriptedError {
                status,
                message: Some(message.into()),
                ..ScriptedError::default()
            }),
            ..Reply::default()
        }
    }
}

/// A tool call in a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedToolCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments (a JSON object).
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// An HTTP error reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedError {
    /// The status code (429, 500, 529, 400, ...).
    pub status: u16,
    /// The message inside the protocol's usual error body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The whole body instead (a string is sent as is, anything else as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// The `Retry-After` header's value (seconds or an HTTP date), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// The `retry-after-ms` header's value, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Token counts a rule reports instead of counting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedUsage {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
    /// Prompt tokens to report as read from the prompt cache.
    #[serde(default)]
    pub cached_input: u64,
}

impl Script {
    /// A script with these rules and no default.
    pub fn new(rules: Vec<Rule>) -> Self {
        Script {
            rules,
            default: None,
        }
    }

    /// Reads a script from YAML or JSON text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let script: Script = serde_yaml_ng::from_str(text).map_err(|e| Error::Script {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        script.compile(origin)?;
        Ok(script)
    }

    /// Reads a script file (YAML or JSON).
    pub fn load(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Script {
            origin: origin.clone(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &origin)
    }

    /// Checks the rules and compiles their regular expressions.
    pub(crate) fn compile(&self, origin: &str) -> Result<Vec<Option<regex::Regex>>> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let bad = |message: String| Error::Script {
                    origin: format!("{origin}: rules[{i}]"),
                    message,
                };
                if let Some(e) = &rule.reply.error
                    && !(400..=599).contains(&e.status)
                {
                    return Err(bad(format!(
                        "reply.error.status {} is not an HTTP error status (400-599)",
                        e.status
                    )));
                }
                rule.when
                    .regex
                    .as_deref()
                    .map(|r| {
                        regex::Regex::new(r).map_err(|e| {
                            bad(format!("when.regex is not a regular expression: {e}"))
                        })
                    })
                    .transpose()
            })
            .collect()
    }
}

impl Rule {
    /// A rule that always answers `reply`.
    pub fn always(reply: Reply) -> Self {
        Rule {
            reply,
            ..Rule::default()
        }
    }

    /// A rule with condition `when`.
    pub fn when(when: When, reply: Reply) -> Self {
        Rule {
            when,
            reply,
            ..Rule::default()
        }
    }

    /// Uses the rule at most `n` times.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Waits `ms` milliseconds before answering.
    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = Some(ms);
        self
    }
}

/// What a rule's condition is checked against, read from either protocol's request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inbound {
    pub model: String,
    /// Text of the last user or tool message.
    pub last_text: String,
    pub has_tool_result: bool,
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage`.
    pub include_usage: bool,
    /// Whitespace-separated words of every text in the request: the counted prompt tokens.
    pub input_words: u64,
}

impl When {
    pub(crate) fn matches(&self, regex: Option<&regex::Regex>, req: &Inbound) -> bool {
        self.model.as_ref().is_none_or(|m| *m == req.model)
            && self
                .contains
                .as_ref()
                .is_none_or(|s| req.last_text.contains(s.as_str()))
            && regex.is_none_or(|r| r.is_match(&req.last_text))
            && self
                .has_tool_result
                .is_none_or(|t| t == req.has_tool_result)
            && self.stream.is_none_or(|s| s == req.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_script_parses_and_bad_regex_names_the_rule() {
        let s = Script::parse(
            "rules:\n  - when: { contains: weather }\n    times: 2\n    reply: { tool_calls: [{ name: w, arguments: { city: Paris } }] }\ndefault: { text: hi }\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(s.rules[0].times, Some(2));
        assert_eq!(s.rules[0].reply.tool_calls[0].arguments["city"], "Paris");
        assert_eq!(s.default, Some(Reply::text("hi")));

        let e = Script::parse(
            "rules:\n  - when: { regex: '(' }\n    reply: { text: x }\n",
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.yaml: rules[0]") && e.contains("when.regex"),
            "{e}"
        );
        let e = Script::parse("rules:\n  - reply: { txt: x }\n", "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("txt"), "{e}");
    }

    #[test]
    fn every_given_field_must_hold() {
        let req = Inbound {
            model: "m".into(),
            last_text: "what is the weather".into(),
            has_tool_result: false,
            stream: true,
            include_usage: false,
            input_words: 4,
        };
        let w = |when: When| {
            let re = when.regex.as_deref().map(|r| regex::Regex::new(r).unwrap());
            when.matches(re.as_ref(), &req)
        };
        assert!(w(When::default()));
        assert!(w(When {
            model: Some("m".into()),
            contains: Some("weather".into()),
            ..When::default()
        }));
        assert!(!w(When {
            model: Some("m".into()),
            contains: Some("rain".into()),
            ..When::default()
        }));
        assert!(w(When {
            regex: Some("^what .* weather$".into()),
            ..When::default()
        }));
        assert!(!w(When {
            has_tool_result: Some(true),
            ..When::default()
        }));
        assert!(!w(When {
            stream: Some(false),
            ..When::default()
        }));
    }
}
