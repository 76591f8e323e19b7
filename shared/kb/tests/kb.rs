//! Knowledge bases with the real all-MiniLM-L6-v2 (from the PyPI package `scripts/setup`
//! installs): the Rust model against a numpy reference, retrieval of the right chunk, and
//! the chunk files read back and by DuckDB.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use aob_kb::chunk::{ChunkOptions, chunk};
use aob_kb::minilm::{MiniLm, model_dir};
use aob_kb::parquet_io::{Row, decode, encode};
use aob_kb::search::{Entry, Index};
use serde_json::{Map, Value, json};

#[allow(clippy::expect_used)]
fn venv_python() -> PathBuf {
    let venv = aob_testkit::venv_dir().expect("a virtualenv");
    venv.join("bin/python")
}

#[allow(clippy::expect_used)]
fn model() -> &'static MiniLm {
    static M: OnceLock<MiniLm> = OnceLock::new();
    M.get_or_init(|| {
        MiniLm::load(&model_dir().expect("run scripts/setup")).expect("the model loads")
    })
}

#[test]
fn the_rust_model_matches_a_numpy_reference() {
    let texts = vec![
        "The Tokyo office opens at 09:00.".to_string(),
        "Invoices are sent on the first business day of each month, in EUR or USD.".to_string(),
        "Crème brûlée — naïve café façade! (ÀÉÎÕÜ) 東京 supercalifragilisticexpialidocious"
            .to_string(),
        "x".repeat(3) + &" word".repeat(300),
    ];
    let mut child = Command::new(venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/minilm_reference.py"
        ))
        .arg(model_dir().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    serde_json::to_writer(child.stdin.take().unwrap(), &texts).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the reference failed");
    let reference: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    for (text, want) in texts.iter().zip(&reference) {
        let got = model().embed(text);
        assert_eq!(got.len(), 384);
        let cos: f64 = got.iter().zip(want).map(|(a, b)| f64::from(*a) * b).sum();
        assert!(cos > 1.0 - 1e-4, "cosine {cos} for {text:?}");
    }
}

const CORPUS: &[(&str, &str, &str)] = &[
    (
        "offices.md",
        "en",
        "# Offices\n\nThe Tokyo office opens at 09:00 and closes at 18:00 local time. It is closed on Saturdays and Sundays.\n\nThe Paris office opens at 08:30 and closes at 17:30.\n\n## Holidays\n\nBoth offices close during the last week of December.",
    ),
    (
        "billing.md",
        "en",
        "# Billing\n\nInvoices are sent on the first business day of each month. Payment is due within 30 days.\n\nLate payments carry a fee of 2 percent per month.\n\n## Refunds\n\nRefunds are paid back to the original card within 10 business days.",
    ),
    (
        "security.md",
        "en",
        "# Security\n\nPasswords must be at least 14 characters long and are rotated every 90 days.\n\nTwo-factor authentication is required for every administrator account.",
    ),
    (
        "shipping.md",
        "en",
        "# Shipping\n\nOrders placed before 14:00 ship the same day. Standard delivery takes three to five days.\n\nExpress delivery arrives the next business day for an extra fee.",
    ),
    (
        "kantine.md",
        "de",
        "# Kantine\n\nDie Kantine ist von 11:30 bis 14:00 geöffnet. Freitags gibt es Fisch.",
    ),
];

#[allow(clippy::unwrap_used)]
fn corpus_index() -> Index {
    let mut ix = Index::new(384);
    for (doc, lang, text) in CORPUS {
        for c in chunk(
            text,
            ChunkOptions {
                size: 200,
                overlap: 40,
            },
        ) {
            let embedded = format!("{}\n{}", c.heading, c.text);
            ix.push(
                Entry {
                    chunk_id: format!("{doc}#{}", c.position),
                    doc: doc.to_string(),
                    position: c.position,
                    heading: c.heading.clone(),
                    text: c.text.clone(),
                    metadata: json!({"lang": lang}).as_object().cloned().unwrap(),
                },
                model().embed(&embedded),
            )
            .unwrap();
        }
    }
    ix
}

#[test]
fn questions_find_their_chunk_in_the_top_three() {
    let ix = corpus_index();
    let none = Map::new();
    for (question, doc, needle) in [
        ("When does the Tokyo office open?", "offices.md", "Tokyo"),
        (
            "How long do I have to pay an invoice?",
            "billing.md",
            "30 days",
        ),
        ("How do I get my money back?", "billing.md", "Refunds"),
        (
            "How long must my password be?",
            "security.md",
            "14 characters",
        ),
        ("When will my parcel arrive?", "shipping.md", "delivery"),
    ] {
        let hits = ix.search(&model().embed(question), 3, &none, None).unwrap();
        assert!(
            hits.iter()
                .any(|h| h.entry.doc == doc && h.entry.text.contains(needle)),
            "{question}: {:#?}",
            hits.iter()
                .map(|h| (&h.entry.chunk_id, h.score))
                .collect::<Vec<_>>()
        );
    }
    // A metadata filter keeps to one language.
    let de: Map<String, Value> = json!({"lang": "de"}).as_object().cloned().unwrap();
    let hits = ix
        .search(&model().embed("When does the office open?"), 3, &de, None)
        .unwrap();
    assert!(!hits.is_empty() && hits.iter().all(|h| h.entry.doc == "kantine.md"));
}

#[test]
fn chunk_files_read_back_and_in_duckdb() {
    let rows: Vec<Row> = chunk(
        CORPUS[0].2,
        ChunkOptions {
            size: 200,
            overlap: 40,
        },
    )
    .into_iter()
    .map(|c| Row {
        embedding: model().embed(&c.text),
        entry: Entry {
            chunk_id: format!("offices.md#{}", c.position),
            doc: "offices.md".into(),
            position: c.position,
            heading: c.heading,
            text: c.text,
            metadata: json!({"lang": "en"}).as_object().cloned().unwrap(),
        },
    })
    .collect();
    let bytes = encode(&rows, "all-MiniLM-L6-v2", "abc123").unwrap();
    assert_eq!(decode(bytes.clone()).unwrap(), rows);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("offices.parquet");
    std::fs::write(&file, &bytes).unwrap();
    let out = Command::new(venv_python())
        .args([
            "-c",
            &format!(
                "import duckdb; print(duckdb.sql(\"SELECT chunk_id, heading, len(embedding), json_extract_string(metadata, '$.lang') FROM read_parquet('{}') ORDER BY position\").fetchall())",
                file.display()
            ),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("('offices.md#0', 'Offices', 384, 'en')"),
        "{text}"
    );
    assert!(text.contains("'Offices > Holidays'"), "{text}");
}
