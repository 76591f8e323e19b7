//! The `aob` command line as a library: the binary only parses arguments and calls
//! [`execute`]; tests and tools can use [`dev::run_stack`], [`runs::start_and_wait`],
//! [`progress::format_event`] and the rest directly.

#[macro_use]
pub mod out;

pub mod audit;
pub mod bridge;
pub mod cli;
pub mod ctx;
pub mod dev;
pub mod dlq;
pub mod infra;
pub mod input;
pub mod kb;
pub mod people;
pub mod policy;
pub mod progress;
pub mod runs;
pub mod table;
pub mod tools;
pub mod topology;
pub mod workflows;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{
    ApprovalsCommand, AuditCommand, BridgeCommand, Cli, Command, DlqCommand, InfraCommand,
    KbCommand, PolicyCommand, RunCommand, StreamsCommand, ToolsCommand, WorkflowCommand,
};
use crate::ctx::Ctx;

/// Runs one parsed command line; the exit code says how it went.
pub async fn execute(cli: Cli) -> Result<ExitCode> {
    let mut ctx = Ctx::new(&cli.tenant, cli.nats_url.as_deref())?;
    ctx.user = cli.user.clone().filter(|u| !u.trim().is_empty());
    if !matches!(cli.command, Command::Dev(_)) && std::env::var_os("RUST_LOG").is_some() {
        aob_runtime::init_logging();
    }
    match cli.command {
        Command::Dev(args) => dev::cmd_dev(&ctx, cli.nats_url.as_deref(), args).await,
        Command::Streams(StreamsCommand::Apply(r)) => topology::apply(&ctx, r.replicas).await,
        Command::Streams(StreamsCommand::Diff(r)) => topology::diff(&ctx, r.replicas).await,
        Command::Workflow(WorkflowCommand::Validate { files }) => Ok(workflows::validate(&files)),
        Command::Workflow(WorkflowCommand::Publish { file }) => {
            workflows::publish(&ctx, &file).await
        }
        Command::Workflow(WorkflowCommand::List) => workflows::list(&ctx).await,
        Command::Workflow(WorkflowCommand::Show {
            name,
            version,
            json,
        }) => workflows::show(&ctx, &name, version, json).await,
        Command::Run(RunCommand::Start(args)) => runs::cmd_start(&ctx, args).await,
        Command::Run(RunCommand::Get { id, json }) => runs::cmd_get(&ctx, &id, json).await,
        Command::Run(RunCommand::Watch {
            id,
            timeout,
            no_tokens,
        }) => runs::cmd_watch(&ctx, &id, timeout, !no_tokens).await,
        Command::Run(RunCommand::List { limit }) => runs::cmd_list(&ctx, limit).await,
        Command::Run(RunCommand::Cancel {
            id,
            reason,
            compensate,
        }) => runs::cmd_cancel(&ctx, &id, reason, compensate).await,
        Command::Run(RunCommand::Pause { id }) => people::cmd_pause(&ctx, &id, true).await,
        Command::Run(RunCommand::Resume { id }) => people::cmd_pause(&ctx, &id, false).await,
        Command::Run(RunCommand::Rollback {
            id,
            to,
            reason,
            wait,
        }) => people::cmd_rollback(&ctx, &id, &to, reason, wait).await,
        Command::Run(RunCommand::Fork(args)) => people::cmd_fork(&ctx, args).await,
        Command::Run(RunCommand::Replay { id, version, file }) => {
            people::cmd_replay(&ctx, &id, version, file.as_deref()).await
        }
        Command::Approvals(ApprovalsCommand::List { mine, roles }) => {
            people::cmd_approvals(&ctx, mine, &roles).await
        }
        Command::Approve(args) => people::cmd_approve(&ctx, args).await,
        Command::Kb(KbCommand::Create {
            name,
            model,
            chunk_size,
            overlap,
        }) => kb::cmd_create(&ctx, &name, &model, chunk_size, overlap).await,
        Command::Kb(KbCommand::Ingest { name, files, meta }) => {
            kb::cmd_ingest(&ctx, &name, &files, &meta).await
        }
        Command::Kb(KbCommand::Ls { name }) => kb::cmd_ls(&ctx, name.as_deref()).await,
        Command::Kb(KbCommand::Rm { name, doc }) => kb::cmd_rm(&ctx, &name, &doc).await,
        Command::Kb(KbCommand::Search {
            name,
            query,
            top_k,
            filter,
        }) => kb::cmd_search(&ctx, &name, &query, top_k, &filter).await,
        Command::Reject(args) => people::cmd_reject(&ctx, args).await,
        Command::Audit(AuditCommand::Tail {
            all,
            run,
            json,
            limit,
        }) => audit::cmd_tail(&ctx, all, run.as_deref(), json, limit).await,
        Command::Audit(AuditCommand::Flush { timeout }) => audit::cmd_flush(&ctx, timeout).await,
        Command::Audit(AuditCommand::Ls { url }) => {
            audit::cmd_ls(&audit::audit_url(url.as_deref())?).await
        }
        Command::Dlq(DlqCommand::Ls { json }) => dlq::cmd_ls(&ctx, json).await,
        Command::Dlq(DlqCommand::Replay { seqs, all }) => dlq::cmd_replay(&ctx, &seqs, all).await,
        Command::Bridge(BridgeCommand::Http {
            routes: _,
            broker: Some(broker),
            listen,
            types,
        }) => {
            bridge::cmd_broker(&ctx, &broker, listen.as_deref().unwrap_or_default(), &types).await
        }
        Command::Bridge(BridgeCommand::Http { routes, .. }) => {
            bridge::cmd_http(&ctx, &routes).await
        }
        Command::Bridge(BridgeCommand::Lambda {
            functions,
            endpoint_url,
        }) => bridge::cmd_lambda(&ctx, &functions, endpoint_url.as_deref()).await,
        Command::Infra(InfraCommand::NatsAccounts {
            tenants,
            system_user,
            out,
        }) => infra::cmd_nats_accounts(&tenants, &system_user, &out).map(|()| ExitCode::SUCCESS),
        Command::Tools(ToolsCommand::List { config, json }) => {
            tools::cmd_list(config.as_deref(), json).await
        }
        Command::Policy(PolicyCommand::Push {
            files,
            all,
            replace,
        }) => policy::cmd_push(&ctx, &files, all, replace).await,
        Command::Policy(PolicyCommand::Ls) => policy::cmd_ls(&ctx).await,
        Command::Policy(PolicyCommand::Test { paths, input, json }) => {
            Ok(policy::cmd_test(&ctx, &paths, Some(&input), json))
        }
    }
}
