//! The topology applies idempotently and reports drift; the NATS run store passes the
//! same battery as its memory twin.

use aob_streams::Topology;
use aob_tests::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_twice_changes_nothing_and_diff_shows_drift() {
    let s = Stack::bare().await.unwrap();
    // Stack::bare applied it once already.
    assert!(
        s.topology.apply(&s.js).await.unwrap().is_empty(),
        "second apply changes nothing"
    );
    assert!(s.topology.diff(&s.js).await.unwrap().is_empty());
    // Someone changes a stream by hand: diff names it, apply puts it back.
    let mut cfg =
        s.js.get_stream(aob_streams::HISTORY)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
    cfg.max_age = std::time::Duration::from_secs(3600);
    s.js.update_stream(cfg).await.unwrap();
    let drift = s.topology.diff(&s.js).await.unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].object, "stream AOB_HISTORY");
    assert!(drift[0].change.starts_with("max_age"));
    assert_eq!(s.topology.apply(&s.js).await.unwrap().len(), 1);
    assert!(s.topology.diff(&s.js).await.unwrap().is_empty());
    // A missing consumer is drift too.
    s.js.get_stream(aob_streams::TASKS)
        .await
        .unwrap()
        .delete_consumer("fn-http")
        .await
        .unwrap();
    let drift = s.topology.diff(&s.js).await.unwrap();
    assert_eq!(
        drift.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        ["consumer AOB_TASKS/fn-http: missing"]
    );
    let other = Topology {
        replicas: 1,
        ..Topology::default()
    };
    assert!(!other.diff(&s.js).await.unwrap().is_empty());
    // Each work queue holds its parked message, which never expires; a missing one is
    // drift, and apply parks it again.
    s.topology.apply(&s.js).await.unwrap();
    for (stream, subject) in s.topology.parked() {
        let st = s.js.get_stream(stream).await.unwrap();
        let m = st.get_last_raw_message_by_subject(subject).await.unwrap();
        let headers = m.headers;
        assert_eq!(
            headers.get("Nats-TTL").map(|v| v.as_str()),
            Some("never"),
            "{stream}"
        );
        st.delete_message(m.sequence).await.unwrap();
        let drift = s.topology.diff(&s.js).await.unwrap();
        assert_eq!(
            drift.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            [format!("parked message {stream}/{subject}: missing")]
        );
        s.topology.apply(&s.js).await.unwrap();
        assert!(s.topology.diff(&s.js).await.unwrap().is_empty());
    }
    // An ack policy the server cannot change in place (the audit sink's consumer of an
    // older release acked every message): diff names it, apply says what to do.
    s.topology.apply(&s.js).await.unwrap();
    let audit = s.js.get_stream(aob_streams::AUDIT).await.unwrap();
    let (_, mut old) = s
        .topology
        .consumers()
        .into_iter()
        .find(|(_, c)| c.durable_name.as_deref() == Some(aob_streams::AUDIT_SINK))
        .unwrap();
    old.ack_policy = async_nats::jetstream::consumer::AckPolicy::Explicit;
    audit
        .delete_consumer(aob_streams::AUDIT_SINK)
        .await
        .unwrap();
    audit.create_consumer(old).await.unwrap();
    let drift = s.topology.diff(&s.js).await.unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(drift[0].change.starts_with("ack_policy"), "{drift:?}");
    let e = s.topology.apply(&s.js).await.unwrap_err().to_string();
    assert!(
        e.contains("ack policy") && e.contains("nats consumer rm AOB_AUDIT audit-sink"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_run_store_passes_the_battery() {
    let s = Stack::bare().await.unwrap();
    let kv = s.js.get_key_value(aob_streams::RUNS).await.unwrap();
    aob_engine::store::battery(&aob_engine::store::NatsStore(kv), "t").await;
}
