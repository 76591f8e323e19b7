//! Command-line arguments of `aob` (clap derive). Each command's `--help` ends with examples.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The `aob` command line.
#[derive(Debug, Parser)]
#[command(
    name = "aob",
    version,
    about = "AOB: workflows as serverless functions on NATS JetStream",
    long_about = "AOB: workflows as serverless functions on NATS JetStream.\n\n\
        Without --nats-url or NATS_URL, commands connect to the URL that `aob dev` wrote to \
        .aob/nats.url in the current directory, else to nats://127.0.0.1:4222.",
    after_help = "EXAMPLES:\n  \
        aob dev                                          # NATS, engine and functions in one process\n  \
        aob workflow publish examples/chain/workflow.yaml\n  \
        aob run start greeting --input '{\"name\": \"Ada\"}' --wait\n  \
        aob run list\n  \
        aob --tenant acme run get 01JAB3XYZ --json"
)]
pub struct Cli {
    /// Tenant whose workflows and runs are used.
    #[arg(long, global = true, env = "AOB_TENANT", default_value = "default")]
    pub tenant: String,
    /// NATS server URL (default: the URL in .aob/nats.url written by `aob dev`, else nats://127.0.0.1:4222).
    #[arg(long, global = true, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// Who you are: recorded as the starter of runs and the author of decisions (default: $USER).
    #[arg(long = "as", global = true, env = "AOB_USER", value_name = "USER")]
    pub user: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run NATS, the engine and all functions in one process, for development.
    #[command(
        long_about = "Runs everything in one process: a local nats-server with JetStream (unless \
            --nats-url or NATS_URL points to one), the topology, the engine with its timer service, \
            and the transform, validate, http, wait, human, tool, llm and agent functions (tools from AOB_TOOLS; models from \
            AOB_MODELS, or, without it, the scripted provider: a test double that needs no key and no network). \
            Payloads larger than the offload \
            threshold go to <data>/payloads unless AOB_PAYLOAD_URL is set. The server's URL is \
            written to <data>/nats.url so that other shells can use it. Ctrl-C stops everything.",
        after_help = "EXAMPLES:\n  \
            aob dev\n  \
            aob dev --data /tmp/aobdev\n  \
            aob dev --example examples/chain/workflow.yaml --input '{\"name\": \"Ada\"}'\n  \
            AOB_TOOLS=examples/agentic/tools.yaml aob dev --example examples/agentic/workflow.yaml \
              --input '{\"text\": \"When does the Tokyo office open?\"}'\n  \
            # in another shell:\n  \
            export NATS_URL=$(cat .aob/nats.url)"
    )]
    Dev(DevArgs),
    /// Create or check the NATS streams, buckets and consumers.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob streams apply\n  \
            aob streams apply --replicas 3\n  \
            aob streams diff || echo 'drift!'"
    )]
    Streams(StreamsCommand),
    /// Validate, publish and inspect workflow definitions.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob workflow validate examples/*/workflow.yaml\n  \
            aob workflow publish examples/chain/workflow.yaml\n  \
            aob workflow list\n  \
            aob workflow show greeting --version 1"
    )]
    Workflow(WorkflowCommand),
    /// Start, inspect, follow and cancel runs.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob run start greeting --input '{\"name\": \"Ada\"}' --wait\n  \
            aob run get 01JAB3XYZ\n  \
            aob run watch 01JAB3XYZ\n  \
            aob run list --limit 5\n  \
            aob run cancel 01JAB3XYZ --reason 'wrong input'"
    )]
    Run(RunCommand),
    /// List the approval requests waiting for a decision.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob approvals list\n  \
            aob --as alice approvals list --mine --role finance"
    )]
    Approvals(ApprovalsCommand),
    /// Approve the open approval request of a run's `human` step.
    #[command(
        long_about = "Sends your approval of the request of a `human` step and waits for the \
            engine's answer: recorded (exit code 0) or refused with the reason (exit code 1), \
            e.g. you may not decide, you already did, or the request expired.",
        after_help = "EXAMPLES:\n  \
            aob --as alice approve 01JAB3XYZ review --comment 'looks right'\n  \
            aob --as bob approve 01JAB3XYZ review --role finance --set amount=120 --set note='\"ok\"'"
    )]
    Approve(ApproveArgs),
    /// Reject the open approval request of a run's `human` step.
    #[command(after_help = "EXAMPLES:\n  \
        aob --as alice reject 01JAB3XYZ review --reason 'the total is wrong'")]
    Reject(RejectArgs),
    /// Knowledge bases: create, ingest documents, list, remove, search.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob kb create handbook\n  \
            aob kb ingest handbook docs/*.md --meta lang=en\n  \
            aob kb ls handbook\n  \
            aob kb search handbook 'When does the Tokyo office open?'"
    )]
    Kb(KbCommand),
    /// Follow decision records, flush the audit sink, list the audit's Parquet files.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob audit tail\n  \
            aob audit tail --all --run 01JAB3XYZ --json\n  \
            aob audit flush\n  \
            aob audit ls\n  \
            duckdb -c \"SELECT event_kind, count(*) FROM read_parquet('.aob/audit/**/*.parquet', hive_partitioning = true) GROUP BY 1\""
    )]
    Audit(AuditCommand),
    /// List the messages components could not use, and publish them again.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob dlq ls\n  \
            aob dlq replay 42 43\n  \
            aob --tenant acme dlq replay --all"
    )]
    Dlq(DlqCommand),
    /// List the tools of the tools file (AOB_TOOLS): MCP servers' tools and HTTP tools.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            AOB_TOOLS=tools.yaml aob tools list\n  \
            aob tools list --config tools.yaml --json"
    )]
    Tools(ToolsCommand),
    /// Generate deployment configuration.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob infra nats-accounts acme globex --out infra/nats/generated"
    )]
    Infra(InfraCommand),
    /// Take tasks from NATS and run them on functions served elsewhere: Lambda, or
    /// CloudEvents over HTTP (Knative, Cloud Run).
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob bridge http --route transform=http://aob-transform.aob.svc.cluster.local\n  \
            aob bridge lambda --function transform=aob-transform --function llm=aob-llm"
    )]
    Bridge(BridgeCommand),
    /// Push Rego policies to the bucket, list them, and try them locally.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  \
            aob policy push --all examples/policies/_all/*.rego\n  \
            aob --tenant acme policy push examples/policies/acme/refund_approval.rego\n  \
            aob policy ls\n  \
            aob policy test examples/policies --input '{\"kind\": \"model\", \"tenant\": \"acme\", \"spend\": {\"run_usd\": 0.7}}'"
    )]
    Policy(PolicyCommand),
}

/// `aob policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Compile Rego files, then store them under the tenant's key (or `_all`).
    #[command(
        long_about = "Compiles the files together with every policy already in the bucket, then \
            stores them under the tenant's key (--tenant, default `default`) or, with --all, \
            under `_all`, which applies to every tenant. Files of the same name are replaced; \
            others stay unless --replace is given. A compile error names the file, the line and \
            the message, and nothing is pushed. Running functions reload within a moment.",
        after_help = "EXAMPLES:\n  \
            aob policy push --all examples/policies/_all/*.rego\n  \
            aob --tenant acme policy push refund_approval.rego\n  \
            aob --tenant acme policy push --replace *.rego"
    )]
    Push {
        /// Rego files (`package aob.policies.<id>`).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Store under `_all` (every tenant) instead of the tenant.
        #[arg(long)]
        all: bool,
        /// The files become the whole set of the key; files not given are removed.
        #[arg(long)]
        replace: bool,
    },
    /// List the bucket's keys (`_all` and tenants) with their files and versions.
    #[command(after_help = "EXAMPLES:\n  \
        aob policy ls")]
    Ls,
    /// Evaluate local policies on an input; exit code 0 allow, 1 deny, 2 require_approval,
    /// 3 when a file or the input is wrong.
    #[command(
        long_about = "Evaluates local policies on one input, without a server, and prints the \
            decision. Rego files given apply to every tenant; a directory is read like \
            AOB_POLICY_DIR (`_all/` and tenant folders). The input is the document policies \
            see as `input`; its `tenant` defaults to --tenant. Exit code: 0 allow, 1 deny, \
            2 require_approval, 3 when a file or the input is wrong.",
        after_help = "EXAMPLES:\n  \
            aob policy test examples/policies --input '{\"kind\": \"tool\", \"tenant\": \"globex\", \"tool\": {\"name\": \"payments.refund\"}}'\n  \
            aob --tenant acme policy test refund_approval.rego --input @input.json --json"
    )]
    Test {
        /// Rego files, or directories laid out as AOB_POLICY_DIR.
        #[arg(required = true, value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
        /// The input document: JSON text, @file.json, or @- for standard input.
        #[arg(long, value_name = "JSON|@FILE")]
        input: String,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `aob tools ...`.
#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// Connect to every configured MCP server and print each tool with its description and
    /// arguments; a server that cannot be reached is shown with its error (exit code 1).
    #[command(after_help = "EXAMPLES:\n  \
        AOB_TOOLS=tools.yaml aob tools list\n  \
        aob tools list --config tools.yaml --json | jq '.tools[].name'")]
    List {
        /// The tools file (default: AOB_TOOLS).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the tools (with their full input schemas) and errors as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `aob dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The tenant's dead letters, oldest first, with the component, the subject and the reason.
    #[command(after_help = "EXAMPLES:\n  \
        aob dlq ls\n  \
        aob dlq ls --json | jq -r .reason")]
    Ls {
        /// Print each dead letter as JSON (with its `seq`).
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again on the subject they came from, then remove them.
    #[command(after_help = "EXAMPLES:\n  \
        aob dlq replay 42\n  \
        aob dlq replay --all")]
    Replay {
        /// Sequence numbers shown by `aob dlq ls`.
        #[arg(value_name = "SEQ")]
        seqs: Vec<u64>,
        /// Every dead letter of the tenant.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
    },
}

/// `aob audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print decision records of the tenant as they are published.
    #[command(after_help = "EXAMPLES:\n  \
        aob audit tail\n  \
        aob audit tail --all --limit 20\n  \
        aob audit tail --run 01JAB3XYZ --json")]
    Tail {
        /// Start from the oldest record kept, not from now.
        #[arg(long)]
        all: bool,
        /// Only this run's records.
        #[arg(long, value_name = "ID")]
        run: Option<String>,
        /// Print each record as JSON.
        #[arg(long)]
        json: bool,
        /// Stop after this many records.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Ask the running audit sink to write its current batch now.
    #[command(after_help = "EXAMPLES:\n  \
        aob audit flush\n  \
        aob audit flush --timeout 1m")]
    Flush {
        /// How long to wait for the sink's answer.
        #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
    },
    /// List the audit's Parquet files with their row counts.
    #[command(after_help = "EXAMPLES:\n  \
        aob audit ls\n  \
        aob audit ls --url s3://audit-bucket/aob\n  \
        AOB_AUDIT_URL=file:///var/lib/aob/audit aob audit ls")]
    Ls {
        /// Where the files are (default: AOB_AUDIT_URL, else .aob/audit as written by `aob dev`).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
}

/// `aob dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory for the NATS store, payloads and nats.url.
    #[arg(long, default_value = ".aob", value_name = "DIR")]
    pub data: PathBuf,
    /// Once ready, publish this workflow, start one run of it and show its progress.
    #[arg(long, value_name = "FILE")]
    pub example: Option<PathBuf>,
    /// Input of the example run: JSON, or @file.json.
    #[arg(long, value_name = "JSON", requires = "example")]
    pub input: Option<String>,
}

/// `aob streams ...`.
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Create what is missing and update what drifted (safe to repeat).
    #[command(after_help = "EXAMPLES:\n  \
        aob streams apply\n  \
        NATS_URL=nats://nats.prod:4222 aob streams apply --replicas 3")]
    Apply(ReplicasArg),
    /// Show differences between the wanted topology and the server's; exit code 1 on drift.
    #[command(after_help = "EXAMPLES:\n  \
        aob streams diff\n  \
        aob streams diff --replicas 3 || aob streams apply --replicas 3")]
    Diff(ReplicasArg),
}

/// Replicas of the topology.
#[derive(Debug, Args)]
pub struct ReplicasArg {
    /// Replicas of every stream and bucket (1 for a single server, 3 for a cluster).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5))]
    pub replicas: u16,
}

/// `aob workflow ...`.
#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Check definition files without a server; prints every problem, exit code 1 if any.
    #[command(after_help = "EXAMPLES:\n  \
        aob workflow validate workflow.yaml\n  \
        aob workflow validate examples/*/workflow.yaml")]
    Validate {
        /// Definition files (YAML or JSON).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Validate a definition and publish it as a new version (or the version it names).
    #[command(after_help = "EXAMPLES:\n  \
        aob workflow publish examples/chain/workflow.yaml\n  \
        aob --tenant acme workflow publish order.json")]
    Publish {
        /// Definition file (YAML or JSON).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List the tenant's workflows with their latest version.
    #[command(after_help = "EXAMPLES:\n  \
        aob workflow list\n  \
        aob --tenant acme workflow list")]
    List,
    /// Show a published definition: its steps with their type and needs.
    #[command(after_help = "EXAMPLES:\n  \
        aob workflow show greeting\n  \
        aob workflow show greeting --version 2 --json")]
    Show {
        /// Workflow name.
        name: String,
        /// Version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        /// Print the stored definition as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `aob run ...`.
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Start a run; prints its id (with --wait, its progress until it ends).
    #[command(
        long_about = "Starts a run of a published workflow and prints its id. The run id is \
            chosen here (a new ULID unless --run-id is given) and sent as the message id, so \
            repeating the same command with the same --run-id starts the run once. An input \
            larger than the offload threshold goes to the payload store (AOB_PAYLOAD_URL). \
            With --wait the exit code is 0 only when the run completes.",
        after_help = "EXAMPLES:\n  \
            aob run start greeting --input '{\"name\": \"Ada\"}'\n  \
            aob run start greeting --input @input.json --wait\n  \
            aob run start greeting --version 2 --run-id order-1234 --wait --timeout 5m\n  \
            echo '{\"name\": \"Ada\"}' | aob run start greeting --input @-"
    )]
    Start(StartArgs),
    /// Show a run's status and its steps.
    #[command(after_help = "EXAMPLES:\n  \
        aob run get 01JAB3XYZ\n  \
        aob run get 01JAB3XYZ --json | jq .steps")]
    Get {
        /// Run id.
        id: String,
        /// Print the run state as JSON, with offloaded values loaded.
        #[arg(long)]
        json: bool,
    },
    /// Print a run's history so far, then follow it until it ends.
    #[command(after_help = "EXAMPLES:\n  \
        aob run watch 01JAB3XYZ\n  \
        aob run watch 01JAB3XYZ --timeout 10m")]
    Watch {
        /// Run id.
        id: String,
        /// Give up after this long (e.g. `30s`, `5m`).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        timeout: Option<Duration>,
        /// Do not show the text models stream while `llm` and `agent` steps run.
        #[arg(long)]
        no_tokens: bool,
    },
    /// List the tenant's runs, newest first.
    #[command(after_help = "EXAMPLES:\n  \
        aob run list\n  \
        aob run list --limit 100")]
    List {
        /// Most runs shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Ask a run to stop: running steps are told, pending ones are skipped.
    #[command(after_help = "EXAMPLES:\n  \
        aob run cancel 01JAB3XYZ\n  \
        aob run cancel 01JAB3XYZ --reason 'wrong input'")]
    Cancel {
        /// Run id.
        id: String,
        /// Why, shown in the history.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Run the compensations of the completed steps (latest first) before the run ends.
        #[arg(long)]
        compensate: bool,
    },
    /// Start no new step of a run until it is resumed (running steps finish).
    #[command(after_help = "EXAMPLES:\n  \
        aob run pause 01JAB3XYZ\n  \
        aob run resume 01JAB3XYZ")]
    Pause {
        /// Run id.
        id: String,
    },
    /// Let a paused run go on.
    #[command(after_help = "EXAMPLES:\n  \
        aob run resume 01JAB3XYZ")]
    Resume {
        /// Run id.
        id: String,
    },
    /// Roll a running or failed run back to the checkpoint before a step, and run on from there.
    #[command(after_help = "EXAMPLES:\n  \
        aob run rollback 01JAB3XYZ --to draft\n  \
        aob run rollback 01JAB3XYZ --to draft --reason 'new prompt' --wait")]
    Rollback {
        /// Run id.
        id: String,
        /// The step to run again (with every step that started after it).
        #[arg(long, value_name = "STEP")]
        to: String,
        /// Why, shown in the history.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Follow the run until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Start a new run reusing a run's recorded outputs before a step; run the rest live.
    #[command(
        long_about = "Starts a new run of the same workflow (or of --version N of it) that reuses \
            the recorded outputs of the steps that completed before STEP started in RUN and \
            executes live from STEP on. The original run and its history are untouched. \
            Use it for what-ifs: a changed prompt or model in a new version, or a changed \
            output with --set.",
        after_help = "EXAMPLES:\n  \
            aob run fork 01JAB3XYZ --from review --wait\n  \
            aob run fork 01JAB3XYZ --from draft --version 3\n  \
            aob run fork 01JAB3XYZ --from check --set steps.draft.output='{\"text\": \"shorter\"}'"
    )]
    Fork(ForkArgs),
    /// Run the engine again over a run's recorded history and check it decides the same.
    #[command(
        long_about = "Replays a run: the engine's decisions are computed again from the recorded \
            history (step outputs, model and tool answers, signals, timers), with the run's \
            workflow version or another one, and compared with what was recorded. No function, \
            model or tool is called. Exit code 0 when every decision matches, 1 at the first \
            difference, which is shown. Use it before upgrading the engine or a workflow.",
        after_help = "EXAMPLES:\n  \
            aob run replay 01JAB3XYZ\n  \
            aob run replay 01JAB3XYZ --version 4\n  \
            aob run replay 01JAB3XYZ --file workflow.yaml"
    )]
    Replay {
        /// Run id.
        id: String,
        /// Replay under this published version instead of the run's.
        #[arg(long, conflicts_with = "file")]
        version: Option<u32>,
        /// Replay under the definition in this file (not published).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

/// `aob run fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The run to fork.
    pub id: String,
    /// The first step executed live.
    #[arg(long, value_name = "STEP")]
    pub from: String,
    /// Input of the new run: JSON text, @file.json or @- (default: the original run's).
    #[arg(long, value_name = "JSON|@FILE")]
    pub input: Option<String>,
    /// Use this output for a reused step: `steps.<id>.output=<JSON>` (repeatable).
    #[arg(long = "set", value_name = "steps.ID.output=JSON")]
    pub set: Vec<String>,
    /// Run this version of the workflow (default: the original run's).
    #[arg(long)]
    pub version: Option<u32>,
    /// Run id of the new run (default: a new ULID).
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// Follow the new run until it ends.
    #[arg(long)]
    pub wait: bool,
}

/// `aob kb ...`.
#[derive(Debug, Subcommand)]
pub enum KbCommand {
    /// Create a knowledge base.
    #[command(after_help = "EXAMPLES:\n  \
        aob kb create handbook\n  \
        aob kb create handbook --model text-embedding-3-small --chunk-size 1200 --overlap 150")]
    Create {
        /// Its name.
        name: String,
        /// Embedding model: all-MiniLM-L6-v2 (in process, no key) or a model of the models file (AOB_MODELS).
        #[arg(long, default_value = "all-MiniLM-L6-v2")]
        model: String,
        /// Most characters in a chunk.
        #[arg(long, default_value_t = 800)]
        chunk_size: usize,
        /// Characters repeated from the previous chunk.
        #[arg(long, default_value_t = 100)]
        overlap: usize,
    },
    /// Add or update documents (text, Markdown, HTML); unchanged ones cost nothing.
    #[command(after_help = "EXAMPLES:\n  \
        aob kb ingest handbook docs/*.md\n  \
        aob kb ingest handbook faq.html --meta lang=en --meta team=support")]
    Ingest {
        /// The knowledge base.
        name: String,
        /// Files; each one's path is its document id.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Metadata for these documents: key=value (repeatable); `retrieve` filters on it.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
    },
    /// List knowledge bases, or the documents of one.
    #[command(after_help = "EXAMPLES:\n  \
        aob kb ls\n  \
        aob kb ls handbook")]
    Ls {
        /// A knowledge base.
        name: Option<String>,
    },
    /// Remove a document.
    #[command(after_help = "EXAMPLES:\n  \
        aob kb rm handbook --doc docs/old.md")]
    Rm {
        /// The knowledge base.
        name: String,
        /// The document id (as `aob kb ls NAME` shows it).
        #[arg(long)]
        doc: String,
    },
    /// Show the chunks most like a query.
    #[command(after_help = "EXAMPLES:\n  \
        aob kb search handbook 'When does the Tokyo office open?' --top-k 3\n  \
        aob kb search handbook 'opening hours' --filter lang=en")]
    Search {
        /// The knowledge base.
        name: String,
        /// The query.
        query: String,
        /// How many chunks.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Only documents with this metadata: key=value (repeatable).
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filter: Vec<String>,
    },
}

/// `aob approvals ...`.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List the open approval requests of the tenant's running runs.
    #[command(after_help = "EXAMPLES:\n  \
        aob approvals list\n  \
        aob --as alice approvals list --mine --role finance")]
    List {
        /// Only the requests you (--as, with --role) may decide on and have not decided.
        #[arg(long)]
        mine: bool,
        /// Roles you hold (repeatable).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
    },
}

/// `aob approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// Run id.
    pub run: String,
    /// The `human` step.
    pub step: String,
    /// A comment, kept with the decision.
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
    /// Edit a field of the request: `field=value`, the value JSON or else text (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    /// Roles you hold (repeatable).
    #[arg(long = "role", value_name = "ROLE")]
    pub roles: Vec<String>,
    /// Give up waiting for the engine's answer after this long.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "30s")]
    pub timeout: Duration,
}

/// `aob reject`.
#[derive(Debug, Args)]
pub struct RejectArgs {
    /// Run id.
    pub run: String,
    /// The `human` step.
    pub step: String,
    /// Why, kept with the decision.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// Roles you hold (repeatable).
    #[arg(long = "role", value_name = "ROLE")]
    pub roles: Vec<String>,
    /// Give up waiting for the engine's answer after this long.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "30s")]
    pub timeout: Duration,
}

/// `aob run start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Workflow name.
    pub name: String,
    /// Version to run (default: the latest).
    #[arg(long)]
    pub version: Option<u32>,
    /// Run input: JSON text, @file.json, or @- for standard input (default `{}`).
    #[arg(long, value_name = "JSON|@FILE")]
    pub input: Option<String>,
    /// Run id (`[A-Za-z0-9_-]`, at most 128); default: a new ULID.
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// Show the run's progress until it ends; exit code 0 only when it completes.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long (e.g. `30s`, `5m`).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", requires = "wait")]
    pub timeout: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write it like `30s` or `5m`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_examples() {
        fn walk(cmd: &clap::Command, path: &str) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_name() != "help" {
                let after = cmd
                    .get_after_help()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                assert!(
                    after.contains("EXAMPLES:"),
                    "`{path}` has no EXAMPLES in its help"
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path);
            }
        }
        walk(&Cli::command(), "");
    }

    #[test]
    fn global_flags_and_start_args() {
        let cli = Cli::try_parse_from([
            "aob",
            "run",
            "start",
            "greeting",
            "--input",
            "{}",
            "--wait",
            "--timeout",
            "5s",
            "--tenant",
            "acme",
        ])
        .unwrap();
        assert_eq!(cli.tenant, "acme");
        let Command::Run(RunCommand::Start(args)) = cli.command else {
            panic!("not run start")
        };
        assert!(args.wait);
        assert_eq!(args.timeout, Some(Duration::from_secs(5)));
        assert!(
            Cli::try_parse_from(["aob", "run", "start", "greeting", "--timeout", "5s"]).is_err()
        );
    }
}

/// `aob bridge ...`.
#[derive(Debug, Subcommand)]
pub enum BridgeCommand {
    /// POST each task of the routed node types as a CloudEvent to its function's URL.
    #[command(
        long_about = "Consumes the tasks of every routed node type from its durable consumer (as \
            the function itself would: run no NATS-consumer function of those types beside it), \
            POSTs each as a CloudEvent (type dev.aob.task, binary mode) to the type's URL, and \
            settles the reply event (type dev.aob.task.reply): the audit records stored, the result \
            handed to the engine, and only then the task acknowledged. A function that cannot be \
            reached, answers an error or is throttled (429, Retry-After honoured) gets the task \
            again later; an aborted run's task is dropped. AOB_HTTP_ADDR serves /healthz, \
            /readyz and /metrics.\n\n\
            With --broker instead of routes, each task goes to a Knative broker (its ingress \
            URL) with the extension attribute aobnodetype, and is acknowledged once the broker \
            took it; the broker's triggers deliver it to the function and bring the reply \
            event back to POST /replies on --listen, where it is settled (answered 200 once \
            stored, else 503 so the broker sends it again). Tasks the broker gives up on come \
            to POST /dead-letters and are dead-lettered (see `aob dlq`). Each task carries a \
            token (extension aobtoken, an HMAC under AOB_BRIDGE_KEY, which every replica of \
            the bridge shares) that the function copies to its reply: what arrives without \
            the right one is refused with 401, so nothing but the bridge's own tasks can \
            settle a step. infra/knative has both set-ups.",
        after_help = "EXAMPLES:\n  \
            aob bridge http --route transform=http://aob-transform.aob.svc.cluster.local \\\n    \
              --route llm=http://aob-llm.aob.svc.cluster.local\n  \
            aob bridge http --broker http://broker-ingress.knative-eventing.svc.cluster.local/aob/aob \\\n    \
              --listen 0.0.0.0:8081"
    )]
    Http {
        /// A node type and its function's URL (repeat for each type).
        #[arg(
            long = "route",
            value_name = "TYPE=URL",
            required_unless_present = "broker",
            conflicts_with = "broker"
        )]
        routes: Vec<String>,
        /// Send every task to this Knative broker ingress instead (needs --listen).
        #[arg(long, value_name = "URL", requires = "listen")]
        broker: Option<String>,
        /// Where the broker's triggers deliver replies (POST /replies) and undeliverable
        /// tasks (POST /dead-letters).
        #[arg(long, value_name = "ADDR", requires = "broker")]
        listen: Option<String>,
        /// With --broker: the node types to forward (repeat; default: every function type).
        #[arg(long = "type", value_name = "TYPE", requires = "broker")]
        types: Vec<String>,
    },
    /// Invoke a Lambda function for each task of the mapped node types.
    #[command(
        long_about = "Consumes the tasks of every mapped node type from its durable consumer and \
            invokes the type's Lambda function synchronously (RequestResponse) with the task as \
            the event, through the AWS SDK (credentials and region from the usual AWS_* variables \
            and files). The response is settled as a NATS function settles its result, and only \
            then is the task acknowledged. A throttled invocation, a function error or an \
            unreachable endpoint gives the task back for a later delivery. --endpoint-url (or \
            AWS_ENDPOINT_URL_LAMBDA) points at another endpoint, such as `cargo lambda watch`.",
        after_help = "EXAMPLES:\n  \
            aob bridge lambda --function transform=aob-transform --function llm=aob-llm\n  \
            aob bridge lambda --function transform=aob-transform --endpoint-url http://127.0.0.1:9000"
    )]
    Lambda {
        /// A node type and its function's name or ARN (repeat for each type).
        #[arg(long = "function", value_name = "TYPE=FUNCTION", required = true)]
        functions: Vec<String>,
        /// Lambda endpoint (default: the region's).
        #[arg(long, env = "AWS_ENDPOINT_URL_LAMBDA", value_name = "URL")]
        endpoint_url: Option<String>,
    },
}

/// `aob infra ...`.
#[derive(Debug, Subcommand)]
pub enum InfraCommand {
    /// Write the NATS users and permissions for these tenants (accounts.conf and a password
    /// file per user).
    #[command(
        long_about = "Writes <out>/accounts.conf, to include in a nats-server configuration: one account \
            (AOB, with JetStream) whose users are the system user (engine, functions, audit sink) and \
            one user per tenant (tenant-<name>). A tenant's user may publish starts and signals of its \
            own runs and follow their history and state; it may not publish results, internal signals \
            or tasks, nor touch another tenant's subjects. Passwords are generated once into \
            <out>/<user>.password (mode 0600) and kept when the command runs again.",
        after_help = "EXAMPLES:\n  \
            aob infra nats-accounts acme globex --out infra/nats/generated"
    )]
    NatsAccounts {
        /// The tenants.
        #[arg(value_name = "TENANT", required = true)]
        tenants: Vec<String>,
        /// The system user's name.
        #[arg(long, default_value = "aob", value_name = "USER")]
        system_user: String,
        /// Where to write.
        #[arg(long, default_value = "infra/nats/generated", value_name = "DIR")]
        out: PathBuf,
    },
}
