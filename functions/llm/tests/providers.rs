//! The provider clients against the scripted provider, over HTTP, for both protocols:
//! text, streaming, tool calls, and every error the gateway must tell apart.
// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use aob_llm::chat::{ChatRequest, ChatResponse, Message, ProviderError, TokenUsage, ToolSpec};
use aob_llm::provider::{Endpoint, Protocol, Provider, connect};
use aob_scripted_provider::{Reply, Rule, Script, ScriptedError, ScriptedProvider, When};
use serde_json::json;

const PROTOCOLS: [Protocol; 2] = [Protocol::Openai, Protocol::Anthropic];
const HELLO: &str = "Hello there, this is the scripted provider speaking.";

fn client(double: &ScriptedProvider, protocol: Protocol, timeout: Duration) -> Box<dyn Provider> {
    let base = match protocol {
        Protocol::Openai => double.openai_base_url(),
        Protocol::Anthropic => double.url(),
    };
    connect(
        Endpoint {
            protocol,
            base_url: base.parse().unwrap(),
            api_key: Some("test-key".into()),
            timeout,
        },
        reqwest::Client::new(),
    )
}

fn ask(model: &str, text: &str) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        system: None,
        messages: vec![Message::user(text)],
        tools: vec![],
        max_tokens: 100,
        temperature: None,
        json: false,
    }
}

async fn streamed(
    p: &dyn Provider,
    req: &ChatRequest,
) -> (Result<ChatResponse, ProviderError>, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = p.chat(req, Some(&tx)).await;
    drop(tx);
    let mut pieces = Vec::new();
    while let Some(p) = rx.recv().await {
        pieces.push(p);
    }
    (r, pieces)
}

fn error(status: u16, message: &str) -> ScriptedError {
    ScriptedError {
        status,
        message: Some(message.into()),
        ..ScriptedError::default()
    }
}

#[tokio::test]
async fn text_streamed_and_not() {
    let double = ScriptedProvider::start(Script {
        rules: vec![],
        default: Some(Reply::text(HELLO)),
    })
    .await
    .unwrap();
    for protocol in PROTOCOLS {
        let p = client(&double, protocol, Duration::from_secs(10));
        let mut req = ask("m", "say hello");
        req.system = Some("Be brief.".into());
        let whole = p.chat(&req, None).await.unwrap();
        assert_eq!(whole.text, HELLO, "{protocol:?}");
        assert_eq!(whole.finish_reason, "stop", "{protocol:?}");
        assert_eq!(whole.model, "m");
        // The double counts words: "Be brief." and "say hello" in, the 8 words of HELLO out.
        assert_eq!(
            whole.usage,
            TokenUsage {
                input: 4,
                output: 8,
                cached_input: 0
            },
            "{protocol:?}"
        );

        let (r, pieces) = streamed(p.as_ref(), &req).await;
        assert!(pieces.len() > 1, "{protocol:?}: {pieces:?}");
        assert_eq!(pieces.concat(), HELLO, "{protocol:?}");
        assert_eq!(r.unwrap(), whole, "{protocol:?}: streamed answer differs");
    }
    let recent = double.requests().recent;
    let openai_stream = &recent[1].body;
    assert_eq!(
        openai_stream["stream_options"],
        json!({ "include_usage": true })
    );
    assert_eq!(
        openai_stream["messages"][0],
        json!({ "role": "system", "content": "Be brief." })
    );
    assert_eq!(recent[2].path, "/v1/messages");
    assert_eq!(recent[2].body["system"], "Be brief.");
}

#[tokio::test]
async fn tool_calls_and_their_results_round_trip() {
    let double = ScriptedProvider::start(Script::new(vec![
        Rule::when(
            When {
                has_tool_result: Some(true),
                contains: Some("rain".into()),
                ..When::default()
            },
            Reply::text("Take an umbrella."),
        ),
        Rule::when(
            When {
                contains: Some("weather".into()),
                ..When::default()
            },
            Reply::tool_call("forecast", json!({ "city": "Oslo", "days": 2 })),
        ),
    ]))
    .await
    .unwrap();
    for protocol in PROTOCOLS {
        let p = client(&double, protocol, Duration::from_secs(10));
        let mut req = ask("m", "what is the weather in Oslo?");
        req.tools = vec![ToolSpec {
            name: "forecast".into(),
            description: "Forecast for a city".into(),
            input_schema: json!({ "type": "object", "properties": { "city": { "type": "string" } } }),
        }];
        for stream in [false, true] {
            let r = if stream {
                let (r, pieces) = streamed(p.as_ref(), &req).await;
                assert!(pieces.is_empty(), "{pieces:?}");
                r.unwrap()
            } else {
                p.chat(&req, None).await.unwrap()
            };
            assert_eq!(
                r.finish_reason, "tool_calls",
                "{protocol:?} stream={stream}"
            );
            assert_eq!(r.text, "");
            assert_eq!(r.tool_calls.len(), 1);
            assert_eq!(r.tool_calls[0].name, "forecast");
            assert_eq!(
                r.tool_calls[0].arguments,
                json!({ "city": "Oslo", "days": 2 }),
                "{protocol:?} stream={stream}"
            );
            assert!(!r.tool_calls[0].id.is_empty());
        }
        let call = p.chat(&req, None).await.unwrap().tool_calls.remove(0);
        let id = call.id.clone();
        req.messages.push(Message::assistant("", vec![call]));
        req.messages.push(Message::tool(&id, "rain all day", false));
        let r = p.chat(&req, None).await.unwrap();
        assert_eq!(
            r.text, "Take an umbrella.",
            "{protocol:?}: the tool result was not recognised"
        );
        assert_eq!(r.finish_reason, "stop");
    }
}

#[tokio::test]
async fn rate_limits_carry_retry_after() {
    let double = ScriptedProvider::start(Script::new(vec![
        Rule::when(
            When {
                model: Some("seconds".into()),
                ..When::default()
            },
            Reply {
                error: Some(ScriptedError {
                    retry_after: Some("7".into()),
                    ..error(429, "slow down")
                }),
                ..Reply::default()
            },
        ),
        Rule::when(
            When {
                model: Some("millis".into()),
                ..When::default()
            },
            Reply {
                error: Some(ScriptedError {
                    retry_after_ms: Some(1500),
                    ..error(429, "slow down")
                }),
                ..Reply::default()
            },
        ),
        Rule::when(
            When {
                model: Some("bare".into()),
                ..When::default()
            },
            Reply::error(429, "slow down"),
        ),
    ]))
    .await
    .unwrap();
    for protocol in PROTOCOLS {
        let p = client(&double, protocol, Duration::from_secs(10));
        for (model, wait) in [
            ("seconds", Some(Duration::from_secs(7))),
            ("millis", Some(Duration::from_millis(1500))),
            ("bare", None),
        ] {
            for stream in [false, true] {
                let r = if stream {
                    streamed(p.as_ref(), &ask(model, "hi")).await.0
                } else {
                    p.chat(&ask(model, "hi"), None).await
                };
                assert_eq!(
                    r,
                    Err(ProviderError::RateLimited { retry_after: wait }),
                    "{protocol:?} {model} stream={stream}"
                );
            }
        }
    }
}

#[tokio::test]
async fn server_errors_are_unavailable_and_bad_requests_rejected_with_the_message() {
    let double = ScriptedProvider::start(Script::new(vec![
        Rule::when(
            When {
                model: Some("broken".into()),
                ..When::default()
            },
            Reply::error(500, "internal trouble"),
        ),
        Rule::when(
            When {
                model: Some("overloaded".into()),
                ..When::default()
            },
            Reply::error(529, "Overloaded"),
        ),
        Rule::when(
            When {
                model: Some("bad".into()),
                ..When::default()
            },
            Reply::error(400, "max_tokens: 100000 > 8192, the maximum for this model"),
        ),
    ]))
    .await
    .unwrap();
    for protocol in PROTOCOLS {
        let p = client(&double, protocol, Duration::from_secs(10));
        for model in ["broken", "overloaded"] {
            let r = p.chat(&ask(model, "hi"), None).await;
            assert!(
                matches!(&r, Err(ProviderError::Unavailable(_))),
                "{protocol:?} {model}: {r:?}"
            );
        }
        match p.chat(&ask("bad", "hi"), None).await {
            Err(ProviderError::Rejected(m)) => {
                assert!(m.contains("max_tokens: 100000 > 8192"), "{m}");
                assert!(m.contains(&double.url()) && m.contains("400"), "{m}");
            }
            other => panic!("{protocol:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_hang_beyond_the_limit_is_a_timeout() {
    let double = ScriptedProvider::start(Script::new(vec![
        Rule::always(Reply::text("late")).delay_ms(30_000),
    ]))
    .await
    .unwrap();
    let limit = Duration::from_millis(300);
    for protocol in PROTOCOLS {
        let p = client(&double, protocol, limit);
        for stream in [false, true] {
            let started = Instant::now();
            let r = if stream {
                streamed(p.as_ref(), &ask("m", "hi")).await.0
            } else {
                p.chat(&ask("m", "hi"), None).await
            };
            assert_eq!(
                r,
                Err(ProviderError::Timeout(limit)),
                "{protocol:?} stream={stream}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        }
    }
}

#[tokio::test]
async fn fail_twice_then_succeed_and_count_requests() {
    let double = ScriptedProvider::start(Script::new(vec![
        Rule::always(Reply::error(503, "warming up")).times(2),
        Rule::always(Reply::text("ready")),
    ]))
    .await
    .unwrap();
    let p = client(&double, Protocol::Anthropic, Duration::from_secs(10));
    for _ in 0..2 {
        assert!(matches!(
            p.chat(&ask("m", "hi"), None).await,
            Err(ProviderError::Unavailable(_))
        ));
    }
    assert_eq!(p.chat(&ask("m", "hi"), None).await.unwrap().text, "ready");
    assert_eq!(double.requests().for_model("m"), 3);
}

#[tokio::test]
async fn no_server_is_unavailable() {
    // A port that was free a moment ago and has nobody listening now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for protocol in PROTOCOLS {
        let p = connect(
            Endpoint {
                protocol,
                base_url: format!("http://127.0.0.1:{port}").parse().unwrap(),
                api_key: None,
                timeout: Duration::from_secs(5),
            },
            reqwest::Client::new(),
        );
        match p.chat(&ask("m", "hi"), None).await {
            Err(ProviderError::Unavailable(m)) => {
                assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}")
            }
            other => panic!("{protocol:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn json_mode_reaches_both_protocols() {
    let double = ScriptedProvider::start(Script::default()).await.unwrap();
    for protocol in PROTOCOLS {
        let mut req = ask("m", "give me an object");
        req.json = true;
        client(&double, protocol, Duration::from_secs(10))
            .chat(&req, None)
            .await
            .unwrap();
    }
    let recent = double.requests().recent;
    assert_eq!(
        recent[0].body["response_format"],
        json!({ "type": "json_object" })
    );
    assert!(
        recent[1].body["system"]
            .as_str()
            .unwrap()
            .contains("JSON object"),
        "{}",
        recent[1].body
    );
}
