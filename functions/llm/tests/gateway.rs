//! The model gateway against a real nats-server and the scripted provider (a test double
//! that speaks the OpenAI and Anthropic wire protocols).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use aob_llm::chat::{ChatRequest, Message};
use aob_llm::config::{Config, Route, Strategy};
use aob_llm::gateway::{Caller, Gateway};
use aob_llm::handler::LlmHandler;
use aob_model::wire::{ErrorClass, Outcome, Task};
use aob_runtime::Handler;
use aob_runtime::context::{Collect, Context, Emission};
use aob_runtime::secrets::Secrets;
use aob_scripted_provider::{Script, ScriptedProvider};
use aob_testkit::NatsServer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Env {
    _server: NatsServer,
    client: async_nats::Client,
    double: ScriptedProvider,
}

async fn env(script: &str) -> Env {
    let server = NatsServer::start().unwrap();
    let client = server.connect().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    aob_streams::Topology::default().apply(&js).await.unwrap();
    let double = ScriptedProvider::start(Script::parse(script, "test script").unwrap())
        .await
        .unwrap();
    Env {
        _server: server,
        client,
        double,
    }
}

impl Env {
    /// A gateway whose models `a` (OpenAI protocol) and `b` (Anthropic) are the double.
    async fn gateway(&self, extra: &str) -> Gateway {
        let yaml = format!(
            r#"
models:
  a: {{ protocol: openai, base_url: "{o}", provider: pa, price: {{ input: 1000, output: 2000 }}, max_output_tokens: 50, timeout: 2s }}
  b: {{ protocol: anthropic, base_url: "{u}", provider: pb, price: {{ input: 10, output: 20 }}, max_output_tokens: 50, timeout: 2s }}
default: {{ model: a }}
{extra}
"#,
            o = self.double.openai_base_url(),
            u = self.double.url()
        );
        let config = Config::parse(&yaml).unwrap();
        Gateway::open(&self.client, config, Secrets::none())
            .await
            .unwrap()
    }
}

fn caller(run: &str, scope: &str) -> Caller {
    Caller {
        approved: Vec::new(),
        tenant: "acme".into(),
        run_id: run.into(),
        workflow: "wf".into(),
        version: 1,
        step: "s".into(),
        node_type: "llm".into(),
        scope: scope.into(),
        replay: false,
    }
}

fn cx() -> Context {
    Context::detached(&aob_testkit::task("llm", "s", json!({}), json!({})))
}

fn ask(text: &str) -> ChatRequest {
    ChatRequest {
        model: String::new(),
        system: None,
        messages: vec![Message::user(text)],
        tools: Vec::new(),
        max_tokens: 0,
        temperature: None,
        json: false,
    }
}

fn fallback() -> Route {
    Route::Strategy {
        strategy: Strategy::Fallback,
        models: vec!["a".into(), "b".into()],
    }
}

#[tokio::test]
async fn fallback_passes_over_a_failing_model_and_a_recorded_answer_is_never_paid_twice() {
    let e = env(r#"
rules:
  - when: { model: a }
    reply: { error: { status: 500, message: boom } }
default: { text: "from b", usage: { input: 10, output: 5 } }
"#)
    .await;
    let g = e.gateway("").await;
    let a = g
        .call(
            &caller("r1", "s"),
            Some(&fallback()),
            &ask("hi"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert_eq!(a.model, "b");
    assert_eq!(a.response.text, "from b");
    assert!(!a.reused);
    assert_eq!(a.passed_over.len(), 1, "{:?}", a.passed_over);
    assert!(a.passed_over[0].contains("boom"), "{:?}", a.passed_over);
    // cost of b: 10 in × $10/M + 5 out × $20/M
    assert!((a.cost_usd - (10.0 * 10.0 + 5.0 * 20.0) / 1e6).abs() < 1e-12);
    let before = e.double.requests().total;

    // The same call again (a retry after a crash): the recorded answer, no request.
    let again = g
        .call(
            &caller("r1", "s"),
            Some(&fallback()),
            &ask("hi"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert!(again.reused);
    assert_eq!(again.response, a.response);
    assert_eq!(e.double.requests().total, before, "no second request");

    // Another instance (a restarted process) finds it too.
    let g2 = e.gateway("").await;
    let third = g2
        .call(
            &caller("r1", "s"),
            Some(&fallback()),
            &ask("hi"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert!(third.reused);
    assert_eq!(e.double.requests().total, before);

    // A replay that misses the record is an error, never a live call.
    let mut replay = caller("r1", "s");
    replay.replay = true;
    let err = g
        .call(
            &replay,
            Some(&fallback()),
            &ask("something else"),
            None,
            &cx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Terminal);
    assert!(err.message.contains("replay"), "{}", err.message);
    assert_eq!(e.double.requests().total, before);
}

#[tokio::test]
async fn the_breaker_opens_then_half_opens_after_its_cool_down() {
    let e = env(r#"
rules:
  - when: { model: a }
    times: 3
    reply: { error: { status: 503, message: down } }
default: { text: ok }
"#)
    .await;
    let g = e
        .gateway("providers:\n  pa: { breaker: { failures: 2, cool_down: 300ms } }\n")
        .await;
    let fixed = Route::Model { model: "a".into() };
    for i in 0..2 {
        let err = g
            .call(
                &caller("r", &format!("s{i}")),
                Some(&fixed),
                &ask(&format!("q{i}")),
                None,
                &cx(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Retryable);
    }
    assert_eq!(g.breakers().state("pa"), "open");
    let sent = e.double.requests().for_model("a");
    let err = g
        .call(&caller("r", "s2"), Some(&fixed), &ask("q2"), None, &cx())
        .await
        .unwrap_err();
    assert!(
        err.message
            .contains("circuit breaker of provider pa is open"),
        "{}",
        err.message
    );
    assert!(err.retry_after_ms.is_some());
    assert_eq!(
        e.double.requests().for_model("a"),
        sent,
        "an open breaker sends nothing"
    );
    // With fallback, an open breaker passes to the next model at once.
    let a = g
        .call(
            &caller("r", "s3"),
            Some(&fallback()),
            &ask("q3"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert_eq!(a.model, "b");
    // After the cool-down one trial goes through; it fails (third scripted 503): open again.
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    g.call(&caller("r", "s4"), Some(&fixed), &ask("q4"), None, &cx())
        .await
        .unwrap_err();
    assert_eq!(g.breakers().state("pa"), "open");
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    let ok = g
        .call(&caller("r", "s5"), Some(&fixed), &ask("q5"), None, &cx())
        .await
        .unwrap();
    assert_eq!(ok.response.text, "ok");
    assert_eq!(g.breakers().state("pa"), "closed");
}

#[tokio::test]
async fn retry_after_becomes_the_delay_of_the_next_attempt() {
    let e = env(r#"
rules:
  - reply: { error: { status: 429, message: "slow down", retry_after: "7" } }
"#)
    .await;
    let g = e.gateway("").await;
    let err = g
        .call(
            &caller("r", "s"),
            Some(&Route::Model { model: "a".into() }),
            &ask("x"),
            None,
            &cx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Retryable);
    assert_eq!(err.retry_after_ms, Some(7000), "{err:?}");
}

#[tokio::test]
async fn fifty_concurrent_calls_against_a_budget_that_fits_ten() {
    // Every answer costs exactly its worst case: 50 output tokens at $2000/M = $0.10, plus
    // the input bound. The run's budget fits ten such calls.
    let e = env(r#"
default: { text: "x", usage: { input: 0, output: 50 } }
rules:
  - delay_ms: 200
    reply: { text: "x", usage: { input: 0, output: 50 } }
"#)
    .await;
    let probe = ask("q00");
    let input = aob_llm::gateway::input_bound(&probe);
    let worst = (input as f64 * 1000.0 + 50.0 * 2000.0) / 1e6;
    let budget = worst * 10.0 + worst / 2.0;
    let g = Arc::new(
        e.gateway(&format!("budgets:\n  run: {{ usd: {budget} }}\n"))
            .await,
    );
    let mut set = tokio::task::JoinSet::new();
    for i in 0..50 {
        let g = g.clone();
        set.spawn(async move {
            g.call(
                &caller("budget-run", &format!("s{i}")),
                None,
                &ask(&format!("q{i:02}")),
                None,
                &cx(),
            )
            .await
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(err) => {
                assert_eq!(err.class, ErrorClass::Terminal);
                assert!(
                    err.message.contains("budget of run budget-run"),
                    "{}",
                    err.message
                );
                refused += 1;
            }
        }
    }
    assert!(ok <= 10, "{ok} calls succeeded");
    assert!(ok >= 1);
    assert_eq!(ok + refused, 50);
    assert_eq!(
        e.double.requests().total,
        ok as u64,
        "refused calls send nothing"
    );
    let scope = aob_llm::ledger::Scope::run(
        "acme",
        "budget-run",
        aob_llm::config::Budget {
            usd: Some(budget),
            tokens: None,
            period: Default::default(),
        },
    );
    let ledger = g.ledgers().get(&scope).await.unwrap();
    assert!(
        ledger.spent.usd <= budget,
        "spent {} of {budget}",
        ledger.spent.usd
    );
    assert!(ledger.spent.usd > 0.0);
}

#[tokio::test]
async fn rate_limits_hold_across_instances() {
    let e = env("default: { text: ok }\n").await;
    let extra = "tenants:\n  acme: { limits: { requests_per_minute: 3 } }\n";
    let g1 = e.gateway(extra).await;
    let g2 = e.gateway(extra).await;
    // Four calls alternate between two instances; the fourth is refused. (A minute that
    // turns during the test would reset the window, so retry the whole check once.)
    let mut refused = None;
    for round in 0..2 {
        let mut results = Vec::new();
        for i in 0..4 {
            let g = if i % 2 == 0 { &g1 } else { &g2 };
            results.push(
                g.call(
                    &caller("rl", &format!("r{round}s{i}")),
                    None,
                    &ask(&format!("r{round}q{i}")),
                    None,
                    &cx(),
                )
                .await,
            );
        }
        let oks = results.iter().filter(|r| r.is_ok()).count();
        if oks == 3 {
            refused = results.into_iter().find_map(Result::err);
            break;
        }
    }
    let err = refused.expect("the fourth call of the minute is refused");
    assert_eq!(err.class, ErrorClass::Retryable);
    assert!(
        err.message.contains("rate limit of tenant acme reached"),
        "{}",
        err.message
    );
    assert!(err.retry_after_ms.is_some_and(|ms| ms <= 60_000));
}

fn task(config: Value) -> Task {
    let mut t = aob_testkit::task(
        "llm",
        "classify",
        config,
        json!({"input": {"text": "refund my order"}}),
    );
    t.run_id = "run-llm".into();
    t.workflow = "wf".into();
    t
}

#[tokio::test]
async fn the_llm_step_streams_repairs_json_and_accounts_cost() {
    let e = env(r#"
rules:
  - when: { contains: "does not satisfy" }
    reply: { text: '{"category": "refund", "confidence": 0.9}', usage: { input: 20, output: 10 } }
  - when: { contains: "refund my order" }
    reply: { text: "I think it is a refund", usage: { input: 10, output: 6 } }
"#)
    .await;
    let g = Arc::new(e.gateway("").await);
    let h = LlmHandler::new(g);
    let config = json!({
        "model": "b",
        "system": "Classify the request.",
        "prompt": "{{ input.text }}",
        "output_schema": {"type": "object", "required": ["category"], "properties": {"category": {"enum": ["refund", "other"]}}},
    });
    let t = task(config.clone());
    let collect = Arc::new(Collect::default());
    let cx = Context::new(
        &t.tenant,
        &t.run_id,
        &t.at,
        CancellationToken::new(),
        collect.clone(),
        Secrets::none(),
    );
    let Outcome::Completed { output } = h.handle(t, &cx).await.unwrap() else {
        panic!("not completed")
    };
    assert_eq!(output["json"]["category"], "refund");
    assert_eq!(output["calls"].as_array().unwrap().len(), 2, "{output}");
    let usage = cx.usage();
    assert_eq!(usage.tokens_in, Some(30));
    assert_eq!(usage.tokens_out, Some(16));
    assert_eq!(usage.model.as_deref(), Some("b"));
    let cost = usage.cost_usd.unwrap();
    assert!(
        (cost - (30.0 * 10.0 + 16.0 * 20.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    assert!(output["template_digest"].is_string() && output["prompt_digest"].is_string());
    let chunks: String = collect
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match &e.body {
            Emission::Chunk { text } => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert!(chunks.contains("I think it is a refund"), "{chunks}");
    let records = cx.take_records();
    assert_eq!(records.len(), 2, "one record per model call");
    assert!(records.iter().all(|r| r.model.as_deref() == Some("b")));

    // An answer that never fits fails the step with the last error.
    e.double
        .set_script(Script::parse("default: { text: 'not json at all' }\n", "s").unwrap())
        .unwrap();
    let mut t = task(
        json!({"model": "a", "prompt": "again", "max_repairs": 1, "output_schema": {"type": "object"}}),
    );
    t.at.step = "other".into();
    let cx = Context::detached(&t);
    let err = h.handle(t, &cx).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Terminal);
    assert!(err.message.contains("after 1 repair"), "{}", err.message);
    assert!(err.message.contains("not JSON"), "{}", err.message);
}

#[tokio::test]
async fn cheapest_tries_the_lower_price_first_and_fastest_the_quicker_model() {
    let e = env(r#"
rules:
  - when: { model: a }
    delay_ms: 150
    reply: { text: "from a" }
default: { text: "from b" }
"#)
    .await;
    let g = e.gateway("").await;
    let route = |strategy| Route::Strategy {
        strategy,
        models: vec!["a".into(), "b".into()],
    };
    // b costs less than a.
    let got = g
        .call(
            &caller("r", "c"),
            Some(&route(Strategy::Cheapest)),
            &ask("q"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert_eq!(got.model, "b");
    // Unmeasured models go first, so each is measured once; then the quicker one leads.
    let fixed_a = Route::Model { model: "a".into() };
    g.call(&caller("r", "f0"), Some(&fixed_a), &ask("q0"), None, &cx())
        .await
        .unwrap();
    let got = g
        .call(
            &caller("r", "f1"),
            Some(&route(Strategy::Fastest)),
            &ask("q1"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert_eq!(got.model, "b", "b has never been measured");
    let got = g
        .call(
            &caller("r", "f2"),
            Some(&route(Strategy::Fastest)),
            &ask("q2"),
            None,
            &cx(),
        )
        .await
        .unwrap();
    assert_eq!(got.model, "b", "b answered faster than a");
}

#[tokio::test]
async fn a_tokens_per_minute_limit_counts_the_worst_case_and_refuses_past_it() {
    let e = env("default: { text: ok, usage: { input: 5, output: 5 } }\n").await;
    // Each call may use up to its prompt bound plus max_tokens (50): counted at that
    // worst case, three would not fit in 160; corrected to the real use (10 each) after
    // each call, they do.
    let g = e
        .gateway("tenants:\n  acme: { limits: { tokens_per_minute: 160 } }\n")
        .await;
    let one = aob_llm::gateway::input_bound(&ask("q0")) + 50;
    assert!(2 * one <= 160 && 3 * one > 160, "bound {one}");
    for i in 0..2 {
        g.call(
            &caller("t", &format!("s{i}")),
            None,
            &ask(&format!("q{i}")),
            None,
            &cx(),
        )
        .await
        .unwrap();
    }
    g.call(&caller("t", "s2"), None, &ask("q2"), None, &cx())
        .await
        .unwrap();
    // A call whose worst case alone exceeds the limit is refused.
    let mut big = ask("q3");
    big.messages[0].content = "x".repeat(200);
    let err = g
        .call(&caller("t", "s3"), None, &big, None, &cx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Retryable);
    assert!(
        err.message.contains("160 tokens per minute"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn ledgers_in_two_processes_never_decide_on_what_their_cache_remembers() {
    use aob_llm::ledger::{Amount, Ledgers, Scope};
    let e = env("default: { text: ok }\n").await;
    let kv = async_nats::jetstream::new(e.client.clone())
        .get_key_value(aob_streams::LEDGER)
        .await
        .unwrap();
    let (a, b) = (Ledgers::new(kv.clone()), Ledgers::new(kv));
    let budget = aob_llm::config::Budget {
        usd: Some(2.0),
        tokens: None,
        period: Default::default(),
    };
    let scopes = [Scope::run("acme", "two", budget)];
    let one = Amount {
        usd: 1.0,
        tokens: 1,
    };
    let hold = std::time::Duration::from_secs(60);
    let now = aob_runtime::now_ms;
    let reserve = |l: &Ledgers, id: &'static str| {
        let l = l.clone();
        let scopes = scopes.clone();
        async move { l.reserve(&scopes, id, one, hold, now()).await.unwrap() }
    };
    assert!(reserve(&a, "1").await.is_ok());
    assert!(reserve(&a, "2").await.is_ok());
    assert!(reserve(&a, "3").await.is_err(), "full");
    // Another process frees a hold; the first one's cache still says full.
    b.release(&scopes, "1").await.unwrap();
    assert!(
        reserve(&a, "3").await.is_ok(),
        "a refusal is checked against the store"
    );
    // And the second one's cache (one hold) is behind the first's write: no overspend.
    assert!(
        reserve(&b, "4").await.is_err(),
        "a write on a stale cache is retried"
    );
    let l = a.get(&scopes[0]).await.unwrap();
    assert_eq!(l.held(now()).usd, 2.0);
}

#[tokio::test]
async fn two_deliveries_racing_on_one_call_both_answer_with_the_recorded_answer() {
    // The double answers "A" once, then "B": two concurrent calls get different replies
    // from it, but only one can be the call's answer.
    let e = env(r#"
rules:
  - times: 1
    delay_ms: 100
    reply: { text: "A" }
  - delay_ms: 300
    reply: { text: "B" }
"#)
    .await;
    let (g1, g2) = (e.gateway("").await, e.gateway("").await);
    let (c1, c2) = (caller("race", "s"), caller("race", "s"));
    let (q1, q2) = (ask("same question"), ask("same question"));
    let (x1, x2) = (cx(), cx());
    let (a, b) = tokio::join!(
        g1.call(&c1, None, &q1, None, &x1),
        g2.call(&c2, None, &q2, None, &x2)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(e.double.requests().total, 2, "both called");
    assert_eq!(a.response.text, "A");
    assert_eq!(
        b.response.text, "A",
        "the later one takes the recorded answer"
    );
}
