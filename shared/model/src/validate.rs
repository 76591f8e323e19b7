//! Static checks of a workflow definition. Every problem names the file, the step and
//! the field, and all problems are reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::definition::{Compensate, OnFailure, Step, Workflow};
use crate::expr::{self, Expr};
use crate::nodes;

/// One thing wrong with a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// File (or source name) of the definition.
    pub file: String,
    /// Step id, when the problem is in a step.
    pub step: Option<String>,
    /// Field path within the step (or the workflow), e.g. `retry.max_attempts`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        if let Some(step) = &self.step {
            write!(f, "step `{step}`: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

struct Checker<'a> {
    file: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn add(&mut self, step: Option<&str>, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            step: step.map(str::to_string),
            field: field.to_string(),
            message: message.into(),
        });
    }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_step_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// Checks a parsed workflow; `file` names it in the problems.
pub fn check(wf: &Workflow, file: &str) -> Vec<Problem> {
    let mut c = Checker {
        file,
        problems: Vec::new(),
    };
    if !valid_name(&wf.name, 64) {
        c.add(
            None,
            "name",
            format!(
                "`{}` is not a valid workflow name: use letters, digits, `_` or `-` (at most 64)",
                wf.name
            ),
        );
    }
    if wf.version == Some(0) {
        c.add(None, "version", "versions start at 1");
    }
    if let Some(schema) = &wf.input
        && let Err(e) = jsonschema::validator_for(schema)
    {
        c.add(None, "input", format!("not a valid JSON Schema: {e}"));
    }
    if wf.steps.is_empty() {
        c.add(None, "steps", "a workflow needs at least one step");
    }

    // Ids.
    let mut seen = BTreeSet::new();
    for s in &wf.steps {
        if !valid_step_id(&s.id) {
            c.add(Some(&s.id), "id", "a step id starts with a letter or `_` and holds only letters, digits and `_` (so `steps.<id>` works in expressions)");
        }
        if !seen.insert(s.id.as_str()) {
            c.add(Some(&s.id), "id", "duplicate step id");
        }
    }
    let ids: BTreeMap<&str, &Step> = wf.steps.iter().map(|s| (s.id.as_str(), s)).collect();
    let compensation: BTreeSet<&str> = wf.compensation_steps().into_iter().collect();

    for s in &wf.steps {
        check_step(&mut c, s, &ids);
    }
    if let Some(OnFailure::RollbackTo(to)) = &wf.on_failure
        && (!ids.contains_key(to.as_str()) || compensation.contains(to.as_str()))
    {
        c.add(
            None,
            "on_failure.rollback_to",
            format!("there is no step `{to}` in the forward path"),
        );
    }

    // Cycles: report each once, with its path.
    if let Some(cycle) = find_cycle(&wf.steps, &ids) {
        let first = cycle.first().cloned().unwrap_or_default();
        c.add(
            Some(&first),
            "needs",
            format!("dependency cycle: {}", cycle.join(" -> ")),
        );
        return c.problems;
    }

    // Ancestors, for checking that expressions only read steps that ran before.
    let ancestors = ancestors(&wf.steps, &ids);
    for s in &wf.steps {
        let own = ancestors.get(s.id.as_str()).cloned().unwrap_or_default();
        for (field, source) in expressions_of(s) {
            for r in expr::referenced_steps(&source) {
                if !ids.contains_key(r.as_str()) {
                    c.add(
                        Some(&s.id),
                        &field,
                        format!("reads `steps.{r}`, but there is no step `{r}`"),
                    );
                } else if r != s.id && !own.contains(r.as_str()) {
                    c.add(Some(&s.id), &field, format!("reads `steps.{r}`, but `{r}` is not among this step's needs (directly or through them), so it may not have run"));
                } else if r == s.id && s.loop_.is_none() {
                    c.add(
                        Some(&s.id),
                        &field,
                        "a step can read its own output only in `loop.until`",
                    );
                }
            }
        }
    }

    // Unreachable steps: a constant-false `when`, a need on a compensation-only step, or a
    // need on an unreachable step.
    let mut unreachable: BTreeMap<&str, String> = BTreeMap::new();
    for s in topo_order(&wf.steps, &ids) {
        if compensation.contains(s.id.as_str()) {
            continue;
        }
        let why = if s.when.as_deref().map(str::trim) == Some("false") {
            Some("its `when` is always false".to_string())
        } else if let Some(n) = s.needs.iter().find(|n| compensation.contains(n.as_str())) {
            Some(format!("it needs `{n}`, which only runs as a compensation"))
        } else {
            s.needs
                .iter()
                .find(|n| unreachable.contains_key(n.as_str()))
                .map(|n| format!("it needs `{n}`, which can never run"))
        };
        if let Some(why) = why {
            let field = if why.starts_with("its `when`") {
                "when"
            } else {
                "needs"
            };
            c.add(Some(&s.id), field, format!("step can never run: {why}"));
            unreachable.insert(s.id.as_str(), why);
        }
    }
    c.problems
}

fn check_step(c: &mut Checker<'_>, s: &Step, ids: &BTreeMap<&str, &Step>) {
    let id = Some(s.id.as_str());
    if let Err((field, msg)) = nodes::check_config(&s.kind, &s.config) {
        c.add(id, &field, msg);
    }
    let mut needs = BTreeSet::new();
    for n in &s.needs {
        if !ids.contains_key(n.as_str()) {
            c.add(
                id,
                "needs",
                format!("needs `{n}`, but there is no step `{n}`"),
            );
        } else if n == &s.id {
            c.add(id, "needs", "a step cannot need itself");
        }
        if !needs.insert(n) {
            c.add(id, "needs", format!("`{n}` is listed twice"));
        }
    }
    if s.trigger != crate::definition::Trigger::AllSuccess && s.needs.is_empty() {
        c.add(id, "trigger", "a trigger rule needs `needs`");
    }
    if let Some(r) = &s.retry {
        if r.max_attempts == 0 {
            c.add(id, "retry.max_attempts", "must be at least 1");
        }
        if !(r.backoff.multiplier >= 1.0 && r.backoff.multiplier.is_finite()) {
            c.add(
                id,
                "retry.backoff.multiplier",
                "must be a number of at least 1.0",
            );
        }
        if r.backoff.initial > r.backoff.max {
            c.add(
                id,
                "retry.backoff.initial",
                "is larger than `retry.backoff.max`",
            );
        }
    }
    if let Some(t) = &s.timeout
        && t.0.is_zero()
    {
        c.add(id, "timeout", "must be longer than zero");
    }
    if let Some(fe) = &s.for_each
        && fe.concurrency == 0
    {
        c.add(id, "for_each.concurrency", "must be at least 1");
    }
    if let Some(l) = &s.loop_ {
        if l.max_iterations == 0 {
            c.add(id, "loop.max_iterations", "must be at least 1");
        }
        if s.for_each.is_some() {
            c.add(
                id,
                "loop",
                "a step cannot have both `loop` and `for_each`; put the loop in a step of its own",
            );
        }
    }
    match &s.compensate {
        Some(Compensate::Step { step }) => {
            if !ids.contains_key(step.as_str()) {
                c.add(id, "compensate.step", format!("there is no step `{step}`"));
            } else if step == &s.id {
                c.add(id, "compensate.step", "a step cannot compensate itself");
            } else if let Some(other) = ids.get(step.as_str())
                && matches!(other.kind.as_str(), "human" | "workflow")
            {
                c.add(id, "compensate.step", format!("`{step}` is a `{}` step; a compensation runs a function (transform, http, tool, ...)", other.kind));
            }
        }
        Some(Compensate::Action { kind, .. }) if matches!(kind.as_str(), "human" | "workflow") => {
            c.add(id, "compensate.type", format!("a compensation runs a function (transform, http, tool, ...), not a `{kind}` step"));
        }
        Some(Compensate::Action { kind, config }) => {
            if let Err((field, msg)) = nodes::check_config(kind, config) {
                let f = if field.is_empty() {
                    "compensate".to_string()
                } else {
                    format!("compensate.{field}")
                };
                c.add(id, &f, msg);
            }
        }
        None => {}
    }
    if matches!(s.kind.as_str(), "human" | "workflow")
        && (s.for_each.is_some() || s.loop_.is_some())
    {
        c.add(
            id,
            if s.for_each.is_some() {
                "for_each"
            } else {
                "loop"
            },
            format!(
                "a `{}` step runs once: put it in a sub-workflow to repeat it",
                s.kind
            ),
        );
    }
    if let Some(OnFailure::RollbackTo(to)) = &s.on_failure {
        if !ids.contains_key(to.as_str()) {
            c.add(
                id,
                "on_failure.rollback_to",
                format!("there is no step `{to}`"),
            );
        } else if to != &s.id && !upstream(s, ids).contains(to.as_str()) {
            c.add(id, "on_failure.rollback_to", format!("`{to}` is not among this step's needs (directly or through them): the checkpoint before it must come before this step"));
        }
    }
    // Expressions and templates must parse.
    for (field, source) in expressions_of(s) {
        let res = if field.starts_with("when")
            || field.starts_with("for_each")
            || field.starts_with("loop")
            || field.starts_with("assert")
            || field == "expr"
        {
            Expr::parse(&source).map(|_| ())
        } else {
            expr::check_template(&source)
        };
        if let Err(e) = res {
            c.add(id, &field, e.message);
        }
    }
}

/// Every step `s` needs, directly or through others.
fn upstream<'a>(s: &'a Step, ids: &BTreeMap<&'a str, &'a Step>) -> BTreeSet<&'a str> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<&str> = s.needs.iter().map(String::as_str).collect();
    while let Some(n) = todo.pop() {
        if out.insert(n)
            && let Some(st) = ids.get(n)
        {
            todo.extend(st.needs.iter().map(String::as_str));
        }
    }
    out
}

/// Every expression (CEL) and template of a step, with its field path.
pub fn expressions_of(s: &Step) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(w) = &s.when {
        out.push(("when".to_string(), w.clone()));
    }
    if let Some(fe) = &s.for_each {
        out.push(("for_each.items".to_string(), fe.items.clone()));
    }
    if let Some(l) = &s.loop_ {
        out.push(("loop.until".to_string(), l.until.clone()));
    }
    let kind = nodes::node_type(&s.kind);
    for (k, v) in &s.config {
        match kind.map_or(nodes::Field::Template, |t| t.field(k)) {
            nodes::Field::Assertions => {
                if let Ok(list) = serde_json::from_value::<Vec<nodes::Assertion>>(v.clone()) {
                    for (i, a) in list.iter().enumerate() {
                        out.push((format!("{k}[{i}]"), a.expr().to_string()));
                    }
                }
            }
            nodes::Field::Cel => {
                if let Some(e) = v.as_str() {
                    out.push((k.clone(), e.to_string()));
                }
            }
            // Data (a JSON Schema), not a template.
            nodes::Field::Data => {}
            nodes::Field::Template | nodes::Field::Prompt => {
                expr::each_string(v, k, &mut |path, text| {
                    if expr::is_template(text) {
                        out.push((path.to_string(), text.to_string()));
                    }
                })
            }
        }
    }
    out
}

/// Step ids a step's expressions and templates read (for building its task context).
pub fn reads(s: &Step) -> BTreeSet<String> {
    expressions_of(s)
        .into_iter()
        .flat_map(|(_, src)| expr::referenced_steps(&src))
        .collect()
}

fn find_cycle(steps: &[Step], ids: &BTreeMap<&str, &Step>) -> Option<Vec<String>> {
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        id: &'a str,
        ids: &BTreeMap<&'a str, &'a Step>,
        mark: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(id) {
            Some(2) => return None,
            Some(1) => {
                let start = stack.iter().position(|s| *s == id).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(id.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(id, 1);
        stack.push(id);
        if let Some(step) = ids.get(id) {
            for n in &step.needs {
                if let Some((k, _)) = ids.get_key_value(n.as_str())
                    && let Some(c) = visit(k, ids, mark, stack)
                {
                    return Some(c);
                }
            }
        }
        stack.pop();
        mark.insert(id, 2);
        None
    }
    for s in steps {
        let mut stack = Vec::new();
        if let Some(c) = visit(s.id.as_str(), ids, &mut mark, &mut stack) {
            return Some(c);
        }
    }
    None
}

/// Steps in an order where every step comes after its needs (input must be acyclic).
pub fn topo_order<'a>(steps: &'a [Step], ids: &BTreeMap<&str, &'a Step>) -> Vec<&'a Step> {
    let mut out: Vec<&Step> = Vec::with_capacity(steps.len());
    let mut done: BTreeSet<&str> = BTreeSet::new();
    while out.len() < steps.len() {
        let before = out.len();
        for s in steps {
            if !done.contains(s.id.as_str())
                && s.needs
                    .iter()
                    .all(|n| done.contains(n.as_str()) || !ids.contains_key(n.as_str()))
            {
                done.insert(s.id.as_str());
                out.push(s);
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}

fn ancestors<'a>(
    steps: &'a [Step],
    ids: &BTreeMap<&'a str, &'a Step>,
) -> BTreeMap<&'a str, BTreeSet<&'a str>> {
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in topo_order(steps, ids) {
        let mut set = BTreeSet::new();
        for n in &s.needs {
            if let Some((k, _)) = ids.get_key_value(n.as_str()) {
                set.insert(*k);
                if let Some(up) = out.get(k) {
                    set.extend(up.iter().copied());
                }
            }
        }
        out.insert(s.id.as_str(), set);
    }
    out
}
