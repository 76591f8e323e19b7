//! Compiling policy sets into one prepared Rego engine per tenant, and evaluating them.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use regorus::Engine;
use sha2::{Digest, Sha256};

use crate::{Decision, Error, Input, Outcome, Result};

/// The scope whose modules apply to every tenant (directory `_all/`, KV key `_all`).
pub const ALL: &str = "_all";

/// Every module lives under this package prefix; the next component is its id.
const PACKAGE_PREFIX: &str = "data.aob.policies.";

/// The two rules a module may define, in the order they are checked.
const RULES: [(&str, Outcome); 2] = [
    ("deny", Outcome::Deny),
    ("require_approval", Outcome::RequireApproval),
];

/// A runaway policy (a huge comprehension, a deep recursion) fails closed instead of
/// holding the caller; no sane admission policy needs this long.
const EVAL_LIMIT: Duration = Duration::from_secs(1);

/// One Rego file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Where it came from, used in error messages (a path, or `kv:<key>/<file>`).
    pub label: String,
    /// The Rego text.
    pub text: String,
}

/// Rego files by scope (`_all` or a tenant) and file name, as read from a directory or the
/// KV bucket, not compiled yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    scopes: BTreeMap<String, BTreeMap<String, Source>>,
}

impl PolicySet {
    /// An empty set: everything is allowed.
    pub fn new() -> Self {
        PolicySet::default()
    }

    /// Adds (or replaces) file `name` of `scope`.
    pub fn insert(&mut self, scope: &str, name: &str, source: Source) {
        self.scopes
            .entry(scope.to_string())
            .or_default()
            .insert(name.to_string(), source);
    }

    /// Replaces every file of `scope` (an empty map removes the scope).
    pub fn set_scope(&mut self, scope: &str, files: BTreeMap<String, Source>) {
        if files.is_empty() {
            self.scopes.remove(scope);
        } else {
            self.scopes.insert(scope.to_string(), files);
        }
    }

    /// Adds every file of `other`, replacing files of the same scope and name.
    pub fn merge(&mut self, other: &PolicySet) {
        for (scope, files) in &other.scopes {
            for (name, src) in files {
                self.insert(scope, name, src.clone());
            }
        }
    }

    /// The scopes (`_all` first, then tenants in order) with their files.
    pub fn scopes(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, Source>)> {
        self.scopes.iter().map(|(s, f)| (s.as_str(), f))
    }

    /// True when there is no file at all.
    pub fn is_empty(&self) -> bool {
        self.scopes.values().all(BTreeMap::is_empty)
    }

    /// The files that apply to `tenant`: those of `_all`, then the tenant's own.
    fn effective(&self, tenant: &str) -> Vec<(&str, &str, &Source)> {
        let mut out = Vec::new();
        for scope in [ALL, tenant] {
            if let Some((scope, files)) = self.scopes.get_key_value(scope) {
                out.extend(files.iter().map(|(n, s)| (scope.as_str(), n.as_str(), s)));
            }
            if tenant == ALL {
                break;
            }
        }
        out
    }

    /// Compiles the engine of every scope; the first bad file fails the whole set.
    pub fn compile(&self) -> Result<Compiled> {
        let mut tenants = BTreeMap::new();
        for scope in self.scopes.keys() {
            if scope != ALL {
                tenants.insert(
                    scope.clone(),
                    TenantPolicy::compile(&self.effective(scope))?,
                );
            }
        }
        Ok(Compiled {
            all: TenantPolicy::compile(&self.effective(ALL))?,
            tenants,
            set: self.clone(),
        })
    }
}

/// A compiled policy set: one prepared engine per tenant that has files of its own, and one
/// (the `_all` files only) for every other tenant.
#[derive(Clone)]
pub struct Compiled {
    all: TenantPolicy,
    tenants: BTreeMap<String, TenantPolicy>,
    set: PolicySet,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("all", &self.all.version)
            .field("tenants", &self.tenants.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Compiled {
    /// No policies: everything is allowed, version `none`.
    pub fn empty() -> Self {
        Compiled {
            all: TenantPolicy::none(),
            tenants: BTreeMap::new(),
            set: PolicySet::new(),
        }
    }

    fn tenant(&self, tenant: &str) -> &TenantPolicy {
        self.tenants.get(tenant).unwrap_or(&self.all)
    }

    /// The version of the policy set that applies to `tenant` (`none` without policies).
    pub fn version(&self, tenant: &str) -> &str {
        &self.tenant(tenant).version
    }

    /// The module ids that apply to `tenant`, sorted.
    pub fn policy_ids(&self, tenant: &str) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .tenant(tenant)
            .rules
            .iter()
            .map(|(id, _, _)| id.as_str())
            .collect();
        ids.dedup();
        ids
    }

    /// The source files this was compiled from.
    pub fn sources(&self) -> &PolicySet {
        &self.set
    }

    /// Evaluates the policies that apply to `input.tenant`.
    pub fn evaluate(&self, input: &Input) -> Decision {
        self.tenant(&input.tenant).evaluate(input)
    }
}

/// The prepared engine of one tenant and the rules to ask it.
#[derive(Clone)]
struct TenantPolicy {
    engine: Engine,
    /// (module id, rule path, outcome), sorted by id, deny before require_approval.
    rules: Vec<(String, String, Outcome)>,
    version: String,
}

impl TenantPolicy {
    fn none() -> Self {
        TenantPolicy {
            engine: Engine::new(),
            rules: Vec::new(),
            version: "none".to_string(),
        }
    }

    fn compile(files: &[(&str, &str, &Source)]) -> Result<Self> {
        if files.is_empty() {
            return Ok(TenantPolicy::none());
        }
        let mut engine = new_engine();
        let mut digest = Sha256::new();
        let mut ids = BTreeMap::<String, Vec<&str>>::new();
        for (scope, name, src) in files {
            for part in [scope.as_bytes(), name.as_bytes(), src.text.as_bytes()] {
                digest.update((part.len() as u64).to_le_bytes());
                digest.update(part);
            }
            let package = engine
                .add_policy(src.label.clone(), src.text.clone())
                .map_err(|e| compile_error(&src.label, &e))?;
            let id = module_id(&package).ok_or_else(|| Error::Package {
                file: src.label.clone(),
                found: package.trim_start_matches("data.").to_string(),
            })?;
            ids.entry(id.to_string()).or_default().push(&src.label);
        }
        // Rego reports undefined functions, unsafe variables and bad imports only when the
        // engine is first prepared; a trivial query prepares it without running any rule,
        // and every clone made for an evaluation starts prepared.
        engine
            .eval_bool_query("true".to_string(), false)
            .map_err(|e| compile_error(files[0].2.label.as_str(), &e))?;
        let mut rules = Vec::new();
        for (id, labels) in &ids {
            for (rule, outcome) in RULES {
                let mut declared = false;
                for label in labels {
                    declared |= engine
                        .has_declared_rule_rooted_at(label, rule)
                        .map_err(|e| compile_error(label, &e))?;
                }
                if declared {
                    rules.push((id.clone(), format!("{PACKAGE_PREFIX}{id}.{rule}"), outcome));
                }
            }
        }
        let hex: String = digest
            .finalize()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(TenantPolicy {
            engine,
            rules,
            version: hex,
        })
    }

    fn evaluate(&self, input: &Input) -> Decision {
        if self.rules.is_empty() {
            return Decision::allow(&self.version);
        }
        let deny = |id: Option<&str>, reason: String| Decision {
            outcome: Outcome::Deny,
            reason: Some(reason),
            policy_id: id.map(str::to_string),
            version: self.version.clone(),
        };
        let value = serde_json::to_value(input)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::from_value::<regorus::Value>(v).map_err(|e| e.to_string()));
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                return deny(
                    None,
                    format!("policy input could not be built (fail closed): {e}"),
                );
            }
        };
        // Evaluation needs `&mut Engine`; a clone of the prepared engine shares its parsed
        // modules and keeps concurrent evaluations apart without a lock.
        let mut engine = self.engine.clone();
        engine.set_input(value);
        let mut approval: Option<(String, String)> = None;
        for (id, path, outcome) in &self.rules {
            if *outcome == Outcome::RequireApproval && approval.is_some() {
                continue;
            }
            let reasons = match engine.eval_rule(path.clone()) {
                Ok(v) => v,
                Err(e) => {
                    return deny(
                        Some(id),
                        format!(
                            "policy {id} failed to evaluate (fail closed): {}",
                            one_line(&e.to_string())
                        ),
                    );
                }
            };
            let first = match first_reason(&reasons) {
                Ok(r) => r,
                Err(what) => {
                    return deny(
                        Some(id),
                        format!(
                            "policy {id} failed to evaluate (fail closed): {path} is {what}, not a set of strings"
                        ),
                    );
                }
            };
            if let Some(reason) = first {
                match outcome {
                    Outcome::Deny => return deny(Some(id), reason),
                    _ => approval = Some((id.clone(), reason)),
                }
            }
        }
        match approval {
            Some((id, reason)) => Decision {
                outcome: Outcome::RequireApproval,
                reason: Some(reason),
                policy_id: Some(id),
                version: self.version.clone(),
            },
            None => Decision::allow(&self.version),
        }
    }
}

fn new_engine() -> Engine {
    let mut engine = Engine::new();
    // A builtin that fails (`to_number("abc")`) is an error, not an undefined value that
    // would quietly let the action through.
    engine.set_strict_builtin_errors(true);
    if let Some(check_interval) = NonZeroU32::new(64) {
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: EVAL_LIMIT,
            check_interval,
        });
    }
    engine
}

/// `tool_tenants` from `data.aob.policies.tool_tenants`; `None` for any other package.
fn module_id(package: &str) -> Option<&str> {
    let id = package.strip_prefix(PACKAGE_PREFIX)?;
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(id)
}

/// The smallest string of a set (sets are ordered), or `None` for an empty or undefined one.
fn first_reason(v: &regorus::Value) -> std::result::Result<Option<String>, &'static str> {
    match v {
        regorus::Value::Undefined => Ok(None),
        regorus::Value::Set(s) => match s.iter().next() {
            None => Ok(None),
            Some(regorus::Value::String(r)) => Ok(Some(r.to_string())),
            // A non-string reason still denies: a policy author's type slip must not allow.
            Some(other) => Ok(Some(other.to_string())),
        },
        regorus::Value::Bool(_) => Err("a boolean"),
        regorus::Value::Array(_) => Err("an array"),
        regorus::Value::Object(_) => Err("an object"),
        regorus::Value::Number(_) => Err("a number"),
        regorus::Value::String(_) => Err("a string"),
        regorus::Value::Null => Err("null"),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turns regorus' message (`--> file:line:col`, the source line, a caret, `error: message`)
/// into an error naming the file, the line and the message.
fn compile_error(fallback_file: &str, e: &impl std::fmt::Display) -> Error {
    let text = e.to_string();
    let mut file = fallback_file.to_string();
    let mut line = None;
    let mut column = None;
    if let Some(at) = text.lines().find_map(|l| l.trim().strip_prefix("--> ")) {
        let mut parts = at.rsplitn(3, ':');
        let col = parts.next().and_then(|c| c.trim().parse().ok());
        let ln = parts.next().and_then(|l| l.trim().parse().ok());
        if let (Some(col), Some(ln), Some(f)) = (col, ln, parts.next()) {
            file = f.to_string();
            line = Some(ln);
            column = Some(col);
        }
    }
    let message = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| one_line(&text));
    Error::Compile {
        file,
        line,
        column,
        message,
        detail: text.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, Spend, ToolRef};
    use std::path::Path;

    fn examples() -> Compiled {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
        crate::read_dir(&dir).unwrap().compile().unwrap()
    }

    fn set(files: &[(&str, &str, &str)]) -> Result<Compiled> {
        let mut set = PolicySet::new();
        for (scope, name, text) in files {
            let label = format!("{scope}/{name}");
            set.insert(
                scope,
                name,
                Source {
                    label,
                    text: text.to_string(),
                },
            );
        }
        set.compile()
    }

    fn tool(tenant: &str, name: &str, arguments: serde_json::Value) -> Input {
        Input {
            tool: Some(ToolRef { name: name.into() }),
            arguments: Some(arguments),
            ..Input::new(Kind::Tool, tenant)
        }
    }

    fn model(tenant: &str, run_usd: f64) -> Input {
        Input {
            spend: Some(Spend {
                run_usd,
                ..Spend::default()
            }),
            ..Input::new(Kind::Model, tenant)
        }
    }

    #[test]
    fn the_refund_tool_is_only_for_listed_tenants() {
        let c = examples();
        let d = c.evaluate(&tool(
            "globex",
            "payments.refund",
            serde_json::json!({"amount": 5}),
        ));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_id.as_deref(), Some("tool_tenants"));
        assert_eq!(
            d.reason.as_deref(),
            Some("tool payments.refund is not enabled for tenant globex")
        );
        let d = c.evaluate(&tool(
            "acme",
            "payments.refund",
            serde_json::json!({"amount": 5}),
        ));
        assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
        assert_eq!(d.policy_id, None);
        let d = c.evaluate(&tool("globex", "search.web", serde_json::json!({})));
        assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    }

    #[test]
    fn a_model_call_is_denied_once_the_run_spent_its_cap() {
        let c = examples();
        assert_eq!(c.evaluate(&model("globex", 0.49)).outcome, Outcome::Allow);
        let d = c.evaluate(&model("globex", 0.50));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_id.as_deref(), Some("spend_cap"));
        assert_eq!(
            d.reason.as_deref(),
            Some("run spend $0.50 reached the cap of $0.50 per run")
        );
        // A model call without spend figures is not capped by this rule.
        assert_eq!(
            c.evaluate(&Input::new(Kind::Model, "globex")).outcome,
            Outcome::Allow
        );
    }

    #[test]
    fn a_large_refund_needs_approval_for_its_tenant_only() {
        let c = examples();
        let big = serde_json::json!({"amount": 1500});
        let d = c.evaluate(&tool("acme", "payments.refund", big.clone()));
        assert_eq!(d.outcome, Outcome::RequireApproval);
        assert_eq!(d.policy_id.as_deref(), Some("refund_approval"));
        assert_eq!(
            d.reason.as_deref(),
            Some("refund of 1500 is above 1000 and needs approval")
        );
        let small = serde_json::json!({"amount": 1000});
        assert_eq!(
            c.evaluate(&tool("acme", "payments.refund", small)).outcome,
            Outcome::Allow
        );
        // acme's own module is not another tenant's: globex is denied by `_all`, not asked.
        let d = c.evaluate(&tool("globex", "payments.refund", big));
        assert_eq!(d.policy_id.as_deref(), Some("tool_tenants"));
        assert_ne!(c.version("acme"), c.version("globex"));
        assert_eq!(c.version("globex"), c.version("initech"));
        assert_eq!(
            c.policy_ids("acme"),
            ["refund_approval", "spend_cap", "tool_tenants"]
        );
    }

    #[test]
    fn deny_wins_over_require_approval_whatever_the_module_order() {
        // `a_ask` sorts before `b_block`: the approval is seen first and must not win.
        let c = set(&[
            (
                ALL,
                "a.rego",
                "package aob.policies.a_ask\nrequire_approval contains \"ask\" if input.kind == \"tool\"\n",
            ),
            (
                ALL,
                "b.rego",
                "package aob.policies.b_block\ndeny contains \"blocked\" if input.tool.name == \"rm\"\n",
            ),
        ])
        .unwrap();
        let d = c.evaluate(&tool("t", "rm", serde_json::json!({})));
        assert_eq!(d.outcome, Outcome::Deny);
        assert_eq!(d.policy_id.as_deref(), Some("b_block"));
        assert_eq!(d.reason.as_deref(), Some("blocked"));
        let d = c.evaluate(&tool("t", "ls", serde_json::json!({})));
        assert_eq!(d.outcome, Outcome::RequireApproval);
        assert_eq!(d.policy_id.as_deref(), Some("a_ask"));
    }

    #[test]
    fn a_policy_that_fails_at_run_time_denies() {
        // Two values for one complete rule is an evaluation error, not a compile error.
        let c = set(&[(
            ALL,
            "conflict.rego",
            "package aob.policies.conflict\nlimit := 1 if input.kind == \"tool\"\nlimit := 2 if input.kind == \"tool\"\ndeny contains \"over\" if limit > 5\n",
        )])
        .unwrap();
        let d = c.evaluate(&tool("t", "x", serde_json::json!({})));
        assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
        assert_eq!(d.policy_id.as_deref(), Some("conflict"));
        let reason = d.reason.unwrap_or_default();
        assert!(
            reason.starts_with("policy conflict failed to evaluate (fail closed): "),
            "{reason}"
        );
        // A failing builtin fails closed too, rather than leaving the rule undefined.
        let c = set(&[(
            ALL,
            "num.rego",
            "package aob.policies.num\ndeny contains \"big\" if to_number(input.arguments.amount) > 10\n",
        )])
        .unwrap();
        let d = c.evaluate(&tool("t", "x", serde_json::json!({"amount": "lots"})));
        assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
        assert_eq!(d.policy_id.as_deref(), Some("num"));
        let d = c.evaluate(&tool("t", "x", serde_json::json!({"amount": "3"})));
        assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    }

    #[test]
    fn compile_errors_name_the_file_and_the_line() {
        let Err(Error::Compile {
            file,
            line,
            message,
            ..
        }) = set(&[(
            "acme",
            "bad.rego",
            "package aob.policies.bad\n\ndeny contains \"x\" if {\n  input.kind ==\n",
        )])
        else {
            panic!("compiled")
        };
        assert_eq!(file, "acme/bad.rego");
        assert!(line.is_some_and(|l| l >= 3), "{line:?}");
        assert!(!message.is_empty());
        // regorus finds unknown functions and unbound variables only while evaluating:
        // they compile, and then fail closed.
        for body in [
            "deny contains \"x\" if no_such_fn(input.kind)",
            "deny contains reason if input.kind == \"tool\"",
        ] {
            let c = set(&[(ALL, "f.rego", &format!("package aob.policies.f\n{body}\n"))]).unwrap();
            let d = c.evaluate(&tool("t", "x", serde_json::json!({})));
            assert_eq!(d.outcome, Outcome::Deny, "{body}: {d:?}");
            let reason = d.reason.unwrap_or_default();
            assert!(
                reason.starts_with("policy f failed to evaluate"),
                "{reason}"
            );
        }
        let err = set(&[(
            ALL,
            "p.rego",
            "package other\ndeny contains \"x\" if true\n",
        )]);
        assert!(
            matches!(err, Err(Error::Package { ref found, .. }) if found == "other"),
            "{err:?}"
        );
    }

    #[test]
    fn no_policies_allow_with_version_none() {
        let c = Compiled::empty();
        let d = c.evaluate(&tool("t", "x", serde_json::Value::Null));
        assert_eq!(d, Decision::allow("none"));
        assert_eq!(PolicySet::new().compile().unwrap().version("t"), "none");
    }

    /// Prints the cost of one evaluation (clone of the prepared engine, input conversion,
    /// three rules); `cargo test -p aob-policy --release evaluation_cost -- --nocapture`.
    #[test]
    fn evaluation_cost() {
        let c = examples();
        let input = tool(
            "acme",
            "payments.refund",
            serde_json::json!({"amount": 1500}),
        );
        let n = 2_000;
        let started = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(c.evaluate(&input).outcome, Outcome::RequireApproval);
        }
        let per = started.elapsed() / n;
        let engine = c.tenant("acme").engine.clone();
        let started = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(engine.clone());
        }
        let clone = started.elapsed() / n;
        println!("one evaluation: {per:?} (of which the engine clone: {clone:?})");
        assert!(per < Duration::from_millis(50), "{per:?}");
    }
}
