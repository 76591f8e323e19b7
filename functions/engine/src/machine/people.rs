//! People in the loop: the approval request of a `human` step, decisions on it, and its
//! deadlines. The request is run state (the step is WAITING), never a held message or an
//! open connection, so it waits for days and survives every restart.

use super::*;
use aob_model::nodes::{Deadline, DeadlineAction, HumanConfig};
use aob_model::state::{Approval, Vote};
use aob_model::wire::Verdict;

/// A decision as it arrived (see [`Signal::Decide`]).
pub(super) struct Decision {
    pub step: String,
    pub by: String,
    pub roles: Vec<String>,
    pub verdict: Verdict,
    pub comment: Option<String>,
    pub set: Map<String, Value>,
    pub id: Option<String>,
    pub request: Option<String>,
}

/// The action a failure says a policy holds for approval (`tool payments.refund`).
pub(super) fn policy_hold(error: &StepError) -> Option<String> {
    let p = error.details.as_ref()?.get("policy")?;
    (p.get("outcome")?.as_str()? == "require_approval")
        .then(|| p.get("action")?.as_str().map(str::to_string))
        .flatten()
}

/// The deadline in force after `round` escalations.
fn deadline_at(cfg: &HumanConfig, round: u32) -> Option<&Deadline> {
    let mut d = cfg.deadline.as_ref();
    for _ in 0..round {
        d = d.and_then(|d| d.then.as_deref());
    }
    d
}

/// Milliseconds since the Unix epoch as RFC 3339, for messages people read.
fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

impl Machine<'_> {
    fn human_config(&self, step: &Step) -> Option<HumanConfig> {
        serde_json::from_value(Value::Object(step.config.clone())).ok()
    }

    /// The `human` function has rendered and sent the request (its `detail`): the step now
    /// waits for people, with the request kept in its state.
    pub(super) fn request_approval(&mut self, step: &Step, at: &StepRef, detail: Value) {
        let Some(cfg) = self.human_config(step) else {
            // Checked when the workflow was published: only a definition edited in the
            // store by hand gets here.
            return self.on_failed(
                step,
                at,
                StepError::terminal("the step's approval settings do not parse"),
            );
        };
        let deadline = cfg.deadline.as_ref();
        let deadline_ms = deadline.map(|d| self.now + d.after.as_millis());
        let summary = detail
            .get("summary")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(cfg.summary.clone());
        let values = detail.get("values").cloned().unwrap_or(Value::Null);
        if let Some(due_ms) = deadline_ms {
            self.effects.push(Effect::Timer {
                timer: TimerKind::Approval {
                    at: at.clone(),
                    round: 0,
                },
                due_ms,
            });
        }
        let data = json!({
            "summary": summary,
            "values": values,
            "users": cfg.approvers.users,
            "roles": cfg.approvers.roles,
            "required": cfg.required,
            "allow_self_approval": cfg.allow_self_approval,
            "deadline_ms": deadline_ms,
            "deadline_action": deadline.map(|d| d.action),
            "notified": detail.get("notified").cloned().unwrap_or(Value::Null),
            "approve": format!("aob approve {} {}", self.s.run_id, step.id),
            "reject": format!("aob reject {} {} --reason TEXT", self.s.run_id, step.id),
        });
        let message = match &summary {
            Some(s) => format!("approval needed: {s}"),
            None => format!("approval needed for step `{}`", step.id),
        };
        self.history(
            HistoryKind::ApprovalRequested,
            Some(at),
            Some(message),
            Some(data),
        );
        if let Some(st) = self.s.steps.get_mut(&step.id) {
            st.approval = Some(Box::new(Approval {
                summary,
                values,
                users: cfg.approvers.users,
                roles: cfg.approvers.roles,
                required: cfg.required,
                allow_self: cfg.allow_self_approval,
                round: 0,
                deadline_ms,
                votes: Vec::new(),
                action: None,
            }));
        }
    }

    /// A policy held an action of attempt `at` for approval (the gateway refused it with
    /// `require_approval`): the step waits for a person instead of failing.
    pub(super) fn hold_for_approval(
        &mut self,
        step: &Step,
        at: &StepRef,
        action: String,
        error: StepError,
    ) {
        let who = self
            .def
            .wf
            .approvers
            .clone()
            .unwrap_or(aob_model::nodes::Approvers {
                users: Vec::new(),
                roles: vec!["admin".to_string()],
            });
        let reason = error
            .details
            .as_ref()
            .and_then(|d| d.pointer("/policy/reason"))
            .and_then(Value::as_str)
            .unwrap_or("a policy asks for it")
            .to_string();
        let summary = format!("{action} needs approval: {reason}");
        if let Some(st) = self.s.steps.get_mut(&step.id) {
            st.phase = Phase::Waiting {
                attempt: at.attempt,
            };
            st.approval = Some(Box::new(Approval {
                summary: Some(summary.clone()),
                values: Value::Null,
                users: who.users.clone(),
                roles: who.roles.clone(),
                required: 1,
                allow_self: false,
                round: 0,
                deadline_ms: None,
                votes: Vec::new(),
                action: Some(action.clone()),
            }));
        }
        self.history(
            HistoryKind::StepWaiting,
            Some(at),
            Some(summary.clone()),
            Some(json!({"policy_hold": error})),
        );
        self.history(
            HistoryKind::ApprovalRequested,
            Some(at),
            Some(format!("approval needed: {summary}")),
            Some(json!({
                "summary": summary,
                "action": action,
                "policy": error.details.as_ref().and_then(|d| d.get("policy")),
                "users": who.users,
                "roles": who.roles,
                "required": 1,
                "approve": format!("aob approve {} {}", self.s.run_id, step.id),
                "reject": format!("aob reject {} {} --reason TEXT", self.s.run_id, step.id),
            })),
        );
    }

    /// A decision that is not taken: recorded with its reason, nothing else changes.
    fn refuse(&mut self, d: &Decision, at: Option<&StepRef>, why: String) {
        let data = Some(json!({
            "by": d.by,
            "roles": d.roles,
            "decision": d.verdict,
            "comment": d.comment,
            "set": d.set,
            "id": d.id,
            "reason": why,
        }));
        let message = Some(format!("decision by {} refused: {why}", d.by));
        match at {
            Some(at) => self.history(HistoryKind::DecisionRefused, Some(at), message, data),
            None => self.step_event(HistoryKind::DecisionRefused, &d.step, message, data),
        }
    }

    /// A person decides on the approval request of `d.step`.
    pub(super) fn on_decide(&mut self, d: Decision) {
        let Some(st) = self.s.steps.get(&d.step) else {
            return self.refuse(&d, None, format!("this run has no step `{}`", d.step));
        };
        let at = StepRef {
            step: d.step.clone(),
            item: None,
            iteration: st.iteration(),
            attempt: st.attempt(),
            generation: self.s.generation,
        };
        let status = st.status();
        let Some(a) = st
            .approval
            .as_deref()
            .filter(|_| status == StepStatus::Waiting)
            .cloned()
        else {
            let why = format!(
                "step `{}` has no open approval request (it is {})",
                d.step,
                status_word(status)
            );
            return self.refuse(&d, Some(&at), why);
        };
        if let Some(seen) = &d.request
            && *seen != at.token()
        {
            return self.refuse(
                &d,
                Some(&at),
                "the request you decided on was replaced (the run rolled back and asks again): look at the new one".into(),
            );
        }
        if let Some(due) = a.deadline_ms
            && self.now >= due
        {
            return self.refuse(
                &d,
                Some(&at),
                format!(
                    "the request expired at {}; its deadline action applies",
                    when(due)
                ),
            );
        }
        let allowed = a.users.contains(&d.by) || d.roles.iter().any(|r| a.roles.contains(r));
        if !allowed {
            return self.refuse(
                &d,
                Some(&at),
                format!(
                    "`{}` may not decide on `{}`: it asks users [{}] and roles [{}]",
                    d.by,
                    d.step,
                    a.users.join(", "),
                    a.roles.join(", ")
                ),
            );
        }
        if !a.allow_self && self.s.started_by.as_deref() == Some(d.by.as_str()) {
            return self.refuse(
                &d,
                Some(&at),
                format!(
                    "`{}` started this run and may not decide on its approvals (the step does not set `allow_self_approval`)",
                    d.by
                ),
            );
        }
        if let Some(v) = a.votes.iter().find(|v| v.by == d.by) {
            let what = match v.decision {
                Verdict::Approve => "approved",
                Verdict::Reject => "rejected",
            };
            return self.refuse(
                &d,
                Some(&at),
                format!("`{}` has already decided on this request ({what})", d.by),
            );
        }
        let mut values = a.values.clone();
        if !d.set.is_empty() {
            if d.verdict == Verdict::Reject {
                return self.refuse(
                    &d,
                    Some(&at),
                    "fields are edited with an approval, not a rejection".into(),
                );
            }
            let schema = self
                .def
                .step(&d.step)
                .and_then(|s| self.human_config(s))
                .and_then(|c| c.fields);
            let Some(schema) = schema else {
                return self.refuse(
                    &d,
                    Some(&at),
                    format!("step `{}` has no editable fields", d.step),
                );
            };
            let mut merged = values.as_object().cloned().unwrap_or_default();
            merged.extend(d.set.clone());
            values = Value::Object(merged);
            let problems = schema_problems(&schema, &values, "the step's `fields` schema");
            if !problems.is_empty() {
                return self.refuse(
                    &d,
                    Some(&at),
                    format!(
                        "the edited fields do not match the step's `fields` schema: {}",
                        problems.join("; ")
                    ),
                );
            }
        }
        // Taken.
        let Some(step) = self.def.step(&d.step) else {
            return;
        };
        let mut a = a;
        a.values = values.clone();
        a.votes.push(Vote {
            by: d.by.clone(),
            decision: d.verdict,
            comment: d.comment.clone(),
            ts_ms: self.now,
        });
        let approvals = a
            .votes
            .iter()
            .filter(|v| v.decision == Verdict::Approve)
            .count() as u32;
        let message = match (d.verdict, &d.comment) {
            (Verdict::Approve, _) => {
                format!("approved by {} ({approvals} of {})", d.by, a.required)
            }
            (Verdict::Reject, Some(c)) => format!("rejected by {}: {c}", d.by),
            (Verdict::Reject, None) => format!("rejected by {}", d.by),
        };
        self.history(
            HistoryKind::ApprovalDecided,
            Some(&at),
            Some(message.clone()),
            Some(json!({
                "by": d.by,
                "roles": d.roles,
                "decision": d.verdict,
                "comment": d.comment,
                "set": d.set,
                "approvals": approvals,
                "required": a.required,
                "id": d.id,
            })),
        );
        let round = a.round;
        let action = a.action.clone();
        let has_deadline = a.deadline_ms.is_some();
        let done = d.verdict == Verdict::Reject || approvals >= a.required;
        let output = done.then(|| approval_output(&a, false));
        if let Some(st) = self.s.steps.get_mut(&d.step) {
            st.approval = Some(Box::new(a));
        }
        if !done {
            return;
        }
        if has_deadline {
            self.effects.push(Effect::CancelTimer {
                timer: TimerKind::Approval {
                    at: at.clone(),
                    round,
                },
            });
        }
        if let (Verdict::Approve, Some(action)) = (d.verdict, action) {
            // A held action: the step runs again, with the action allowed.
            if let Some(st) = self.s.steps.get_mut(&d.step) {
                st.grants.push(action);
                st.approval = None;
            }
            return self.launch(
                step,
                StepRef {
                    attempt: at.attempt + 1,
                    ..at
                },
            );
        }
        match d.verdict {
            Verdict::Reject => self.on_failed(
                step,
                &at,
                StepError::terminal(message).with_details(json!({
                    "rejected_by": d.by,
                    "comment": d.comment,
                })),
            ),
            Verdict::Approve => {
                self.cancel_step_timeout(step, &at);
                self.complete_step(&d.step, output.unwrap_or(Value::Null), Some(&at));
            }
        }
    }

    /// The deadline of round `round` of the request of attempt `at` passed. False when the
    /// request is gone (decided, or the step moved on).
    pub(super) fn on_deadline(&mut self, at: &StepRef, round: u32) -> bool {
        if !self.is_current(at) {
            return false;
        }
        let Some(a) = self
            .s
            .steps
            .get(&at.step)
            .and_then(|st| st.approval.as_deref())
            .filter(|a| a.round == round)
            .cloned()
        else {
            return false;
        };
        let Some(step) = self.def.step(&at.step) else {
            return false;
        };
        let Some(cfg) = self.human_config(step) else {
            return false;
        };
        let Some(dl) = deadline_at(&cfg, round).cloned() else {
            return false;
        };
        self.history(
            HistoryKind::ApprovalExpired,
            Some(at),
            Some(format!(
                "approval request expired after {} without a decision; deadline action: {}",
                dl.after,
                action_word(dl.action)
            )),
            Some(json!({
                "round": round,
                "action": dl.action,
                "deadline_ms": a.deadline_ms,
                "votes": a.votes.len(),
            })),
        );
        match dl.action {
            DeadlineAction::Approve => {
                self.cancel_step_timeout(step, at);
                self.complete_step(&at.step, approval_output(&a, true), Some(at));
            }
            DeadlineAction::Reject => self.on_failed(
                step,
                at,
                StepError::terminal(format!(
                    "approval request expired after {} without a decision; the deadline rejects it",
                    dl.after
                ))
                .with_details(json!({"expired": true})),
            ),
            DeadlineAction::Fail => self.end_early(
                RunStatus::Failed,
                format!(
                    "the approval request of step `{}` expired after {}; the deadline fails the run",
                    at.step, dl.after
                ),
            ),
            DeadlineAction::Escalate => {
                let to = dl.to.clone().unwrap_or_default();
                let next = dl.then.as_deref();
                let deadline_ms = next.map(|n| self.now + n.after.as_millis());
                if let Some(due_ms) = deadline_ms {
                    self.effects.push(Effect::Timer {
                        timer: TimerKind::Approval {
                            at: at.clone(),
                            round: round + 1,
                        },
                        due_ms,
                    });
                }
                self.history(
                    HistoryKind::ApprovalEscalated,
                    Some(at),
                    Some(format!(
                        "escalated to users [{}] and roles [{}]",
                        to.users.join(", "),
                        to.roles.join(", ")
                    )),
                    Some(json!({
                        "users": to.users,
                        "roles": to.roles,
                        "round": round + 1,
                        "deadline_ms": deadline_ms,
                        "deadline_action": next.map(|n| n.action),
                    })),
                );
                if let Some(a) = self
                    .s
                    .steps
                    .get_mut(&at.step)
                    .and_then(|st| st.approval.as_deref_mut())
                {
                    a.users = to.users;
                    a.roles = to.roles;
                    a.round = round + 1;
                    a.deadline_ms = deadline_ms;
                }
            }
        }
        true
    }
}

/// A status as people see it (`WAITING`, `FAILED`): its serde name.
pub(super) fn status_word<T: serde::Serialize>(s: T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn action_word(a: DeadlineAction) -> &'static str {
    match a {
        DeadlineAction::Approve => "approve",
        DeadlineAction::Reject => "reject",
        DeadlineAction::Escalate => "escalate",
        DeadlineAction::Fail => "fail the run",
    }
}

/// The output of an approved `human` step.
fn approval_output(a: &Approval, expired: bool) -> Value {
    let approvers: Vec<&str> = a
        .votes
        .iter()
        .filter(|v| v.decision == Verdict::Approve)
        .map(|v| v.by.as_str())
        .collect();
    let comments: Vec<Value> = a
        .votes
        .iter()
        .filter_map(|v| {
            v.comment
                .as_ref()
                .map(|c| json!({"by": v.by, "comment": c}))
        })
        .collect();
    json!({
        "approved": true,
        "by_deadline": expired,
        "approvers": approvers,
        "comments": comments,
        "values": a.values,
    })
}
