//! Knowledge-base figures: search latency over 10,000 and 100,000 chunks (384 dimensions,
//! exact cosine, top 5), against a plain pass over the same vectors measured in the same
//! run; and ingest throughput of the in-process model (chunks per second).
//!
//! `cargo bench -p aob-kb` (needs the model: `scripts/setup`). `AOB_BENCH_QUERIES` sets the
//! queries per size (default 200).

#![allow(clippy::expect_used)]

use std::time::Instant;

use aob_kb::chunk::{ChunkOptions, chunk};
use aob_kb::minilm::{DIMS, MiniLm, model_dir};
use aob_kb::search::{Entry, Index};
use serde_json::Map;

/// A small deterministic generator (xorshift), so runs compare.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
    fn vector(&mut self) -> Vec<f32> {
        (0..DIMS).map(|_| self.next()).collect()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let queries: usize = std::env::var("AOB_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!("search, top 5 of N chunks of {DIMS} dimensions, {queries} queries each");
    println!(
        "{:>8} {:>10} {:>10} {:>14} {:>8}",
        "N", "p50 ms", "p99 ms", "dots p50 ms", "ratio"
    );
    for n in [10_000usize, 100_000] {
        let mut ix = Index::new(DIMS);
        let mut flat = Vec::with_capacity(n * DIMS);
        for i in 0..n {
            let v = rng.vector();
            flat.extend_from_slice(&v);
            let e = Entry {
                chunk_id: format!("doc{}#{}", i / 10, i % 10),
                doc: format!("doc{}", i / 10),
                position: (i % 10) as u32,
                heading: String::new(),
                text: String::new(),
                metadata: Map::new(),
            };
            ix.push(e, v).expect("dimensions match");
        }
        let none = Map::new();
        let (mut search, mut scan) = (Vec::new(), Vec::new());
        for _ in 0..queries {
            let q = rng.vector();
            let t = Instant::now();
            let hits = ix.search(&q, 5, &none, None).expect("search");
            search.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(hits.len(), 5);
            // The floor: every dot product, with no ranking, no heap, no copies.
            let t = Instant::now();
            let best = flat
                .chunks_exact(DIMS)
                .map(|v| {
                    let mut acc = [0f32; 4];
                    for (a, b) in v.chunks_exact(4).zip(q.chunks_exact(4)) {
                        for i in 0..4 {
                            acc[i] += a[i] * b[i];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .fold(f32::MIN, f32::max);
            std::hint::black_box(best);
            scan.push(t.elapsed().as_secs_f64() * 1e3);
        }
        search.sort_by(f64::total_cmp);
        scan.sort_by(f64::total_cmp);
        let (p50, p99, s50) = (
            percentile(&search, 0.5),
            percentile(&search, 0.99),
            percentile(&scan, 0.5),
        );
        println!(
            "{n:>8} {p50:>10.3} {p99:>10.3} {s50:>14.3} {:>8.2}",
            p50 / s50
        );
    }

    let Ok(dir) = model_dir() else {
        println!("ingest: skipped (no model; run scripts/setup)");
        return;
    };
    let model = MiniLm::load(&dir).expect("the model loads");
    let para = "The support team answers requests from customers about orders, invoices, shipping and the opening hours of the offices in Tokyo and Paris. ";
    let text: String = (0..60)
        .map(|i| format!("# Section {i}\n\n{}\n\n", para.repeat(4)))
        .collect();
    let t = Instant::now();
    let chunks = chunk(&text, ChunkOptions::default());
    let cut = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for c in &chunks {
        std::hint::black_box(model.embed(&c.text));
    }
    let secs = t.elapsed().as_secs_f64();
    let embedder = aob_kb::embed::Embedder::Local(std::sync::Arc::new(model));
    let texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let t = Instant::now();
    rt.block_on(embedder.embed(&texts)).expect("embedded");
    let all = t.elapsed().as_secs_f64();
    let chars: usize = chunks.iter().map(|c| c.text.len()).sum();
    println!(
        "ingest: {} chunks ({} characters each on average) chunked in {:.1} ms; embedded at {:.1} chunks/s on one core, {:.1} chunks/s on all {} ({:.2}x)",
        chunks.len(),
        chars / chunks.len().max(1),
        cut * 1e3,
        chunks.len() as f64 / secs,
        chunks.len() as f64 / all,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        secs / all
    );
}
