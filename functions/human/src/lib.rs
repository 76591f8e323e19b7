//! `aob-human`: sends the approval request of a `human` step (email over SMTP, a webhook)
//! and answers `waiting` with the rendered request. From then on the request is the
//! engine's run state: decisions arrive as signals, deadlines are engine timers. This
//! function holds nothing, so an approval survives any restart.

use aob_model::nodes::HumanConfig;
use aob_model::wire::{Outcome, StepError, Task};
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::{Value, json};

/// Environment variables the function reads.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        "AOB_SMTP_URL",
        "SMTP server for approval emails, e.g. smtp://127.0.0.1:25 or smtps://user:pass@mail.example.com (emails are not sent without it)",
    ),
    (
        "AOB_SMTP_FROM",
        "sender of approval emails (default aob@localhost)",
    ),
    (
        "AOB_APPROVAL_URL",
        "link put in notifications, with {tenant}, {run} and {step} replaced (e.g. https://aob.example.com/runs/{run}/steps/{step})",
    ),
];

/// Where notifications go.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    smtp: Option<String>,
    from: String,
    link: Option<String>,
    http: reqwest::Client,
}

impl Notifier {
    /// Reads [`ENV_VARS`].
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Notifier::new(
            var("AOB_SMTP_URL"),
            var("AOB_SMTP_FROM").unwrap_or_else(|| "aob@localhost".into()),
            var("AOB_APPROVAL_URL"),
        )
    }

    /// A notifier mailing through `smtp` (a URL) as `from`, linking to `link`.
    pub fn new(smtp: Option<String>, from: String, link: Option<String>) -> Self {
        Notifier {
            smtp,
            from,
            link,
            http: reqwest::Client::new(),
        }
    }
}

/// The `human` function.
#[derive(Debug, Clone, Default)]
pub struct HumanHandler {
    notifier: Notifier,
}

impl HumanHandler {
    /// A handler sending notifications with `notifier`.
    pub fn new(notifier: Notifier) -> Self {
        HumanHandler { notifier }
    }
}

impl aob_runtime::Handler for HumanHandler {
    fn node_type(&self) -> &'static str {
        "human"
    }

    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        ENV_VARS
    }

    async fn handle(
        &self,
        task: Task,
        _cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        let config: HumanConfig = aob_runtime::parse_config("human", &task.config)?;
        let summary = config.summary.clone().unwrap_or_else(|| {
            format!(
                "Step `{}` of run {} needs a decision.",
                task.at.step, task.run_id
            )
        });
        let link = self.notifier.link.as_ref().map(|l| {
            l.replace("{tenant}", &task.tenant)
                .replace("{run}", &task.run_id)
                .replace("{step}", &task.at.step)
        });
        let request = Request {
            task: &task,
            config: &config,
            summary: &summary,
            link: link.as_deref(),
        };
        let mut notified = Vec::new();
        if let Some(n) = &config.notify {
            if !n.email.is_empty() {
                self.mail(&request, &n.email).await?;
                notified.extend(n.email.iter().map(|a| format!("mail:{a}")));
            }
            if let Some(url) = &n.webhook {
                self.webhook(&request, url).await?;
                notified.push(format!("webhook:{url}"));
            }
        }
        Ok(Outcome::Waiting {
            until_ms: None,
            detail: Some(json!({
                "summary": summary,
                "values": config.values.clone().unwrap_or(Value::Null),
                "notified": notified,
                "link": link,
            })),
        })
    }
}

/// One request, as the notifications say it.
struct Request<'a> {
    task: &'a Task,
    config: &'a HumanConfig,
    summary: &'a str,
    link: Option<&'a str>,
}

impl Request<'_> {
    fn subject(&self) -> String {
        format!(
            "[aob] approval needed: {} / {} (run {})",
            self.task.workflow, self.task.at.step, self.task.run_id
        )
    }

    fn text(&self) -> String {
        let t = self.task;
        let mut s = format!("{}\n\n", self.summary);
        s.push_str(&format!(
            "Workflow: {} v{}\nRun: {}\nStep: {}\n",
            t.workflow, t.version, t.run_id, t.at.step
        ));
        let who: Vec<String> = self
            .config
            .approvers
            .users
            .iter()
            .map(|u| format!("user {u}"))
            .chain(
                self.config
                    .approvers
                    .roles
                    .iter()
                    .map(|r| format!("role {r}")),
            )
            .collect();
        s.push_str(&format!(
            "Who may decide: {} ({} approval{} needed)\n",
            who.join(", "),
            self.config.required,
            if self.config.required == 1 { "" } else { "s" }
        ));
        if let Some(d) = &self.config.deadline {
            s.push_str(&format!("Deadline: {} after the request\n", d.after));
        }
        if let Some(v) = &self.config.values {
            s.push_str(&format!("Values you may edit: {v}\n"));
        }
        s.push_str(&format!(
            "\nTo approve: aob approve {run} {step} --comment TEXT\nTo reject:  aob reject {run} {step} --reason TEXT\n",
            run = t.run_id,
            step = t.at.step
        ));
        if let Some(l) = self.link {
            s.push_str(&format!("Or open {l}\n"));
        }
        s
    }
}

impl HumanHandler {
    async fn mail(&self, r: &Request<'_>, to: &[String]) -> Result<(), StepError> {
        let Some(url) = &self.notifier.smtp else {
            return Err(StepError::terminal(
                "the step mails its request (`notify.email`) but AOB_SMTP_URL is not set for the human function",
            ));
        };
        let from: Mailbox = self.notifier.from.parse().map_err(|e| {
            StepError::terminal(format!(
                "AOB_SMTP_FROM `{}` is not an address: {e}",
                self.notifier.from
            ))
        })?;
        let mut msg = lettre::Message::builder()
            .from(from)
            .subject(r.subject())
            .header(ContentType::TEXT_PLAIN);
        for a in to {
            let mb: Mailbox = a.parse().map_err(|e| {
                StepError::terminal(format!("`notify.email`: `{a}` is not an address: {e}"))
            })?;
            msg = msg.to(mb);
        }
        let msg = msg
            .body(r.text())
            .map_err(|e| StepError::terminal(format!("building the approval email: {e}")))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| StepError::terminal(format!("AOB_SMTP_URL `{url}`: {e}")))?
            .timeout(Some(std::time::Duration::from_secs(20)))
            .build();
        transport.send(msg).await.map_err(|e| {
            // The server may come back: the engine retries per the step's policy.
            StepError::retryable(format!("sending the approval email through {url}: {e}"))
        })?;
        tracing::info!(run = %r.task.run_id, step = %r.task.at.step, to = ?to, "approval email sent");
        Ok(())
    }

    async fn webhook(&self, r: &Request<'_>, url: &str) -> Result<(), StepError> {
        let t = r.task;
        let body = json!({
            "kind": "approval_requested",
            "tenant": t.tenant,
            "run_id": t.run_id,
            "workflow": t.workflow,
            "version": t.version,
            "step": t.at.step,
            "summary": r.summary,
            "users": r.config.approvers.users,
            "roles": r.config.approvers.roles,
            "required": r.config.required,
            "values": r.config.values,
            "link": r.link,
            "approve": format!("aob approve {} {}", t.run_id, t.at.step),
            "reject": format!("aob reject {} {} --reason TEXT", t.run_id, t.at.step),
        });
        let resp = self
            .notifier
            .http
            .post(url)
            .timeout(std::time::Duration::from_secs(20))
            .json(&body)
            .send()
            .await
            .map_err(|e| StepError::retryable(format!("approval webhook {url}: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 429 {
            Err(StepError::retryable(format!(
                "approval webhook {url} answered {status}"
            )))
        } else {
            Err(StepError::terminal(format!(
                "approval webhook {url} answered {status}"
            )))
        }
    }
}
