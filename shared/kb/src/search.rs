//! Exact cosine search over a knowledge base held in memory: every vector is normalised
//! once when loaded, so a query is one dot product per chunk and a bounded heap for the
//! best `top_k`. No vector database: 100,000 chunks of 384 dimensions are 150 MB of
//! floats and a few tens of milliseconds per query.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a chunk is, besides its vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `<doc>#<position>`.
    pub chunk_id: String,
    /// The document.
    pub doc: String,
    /// Position in the document.
    pub position: u32,
    /// Heading path.
    pub heading: String,
    /// Text.
    pub text: String,
    /// The document's metadata.
    pub metadata: Map<String, Value>,
}

/// A chunk found, with its score (cosine similarity, -1 to 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// The chunk.
    #[serde(flatten)]
    pub entry: Entry,
    /// Cosine similarity to the query.
    pub score: f32,
}

/// Chunks and their unit vectors, row by row.
#[derive(Debug, Clone, Default)]
pub struct Index {
    dims: usize,
    entries: Vec<Entry>,
    vectors: Vec<f32>,
}

/// Scales `v` to length 1 (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// The dot product, in eight independent lanes so that the compiler vectorises it (a
/// single running sum would be one long chain of dependent additions).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Whether a chunk's metadata passes a filter: every key equal, or among the values of an
/// array.
pub fn matches(metadata: &Map<String, Value>, filter: &Map<String, Value>) -> bool {
    filter
        .iter()
        .all(|(k, want)| match (metadata.get(k), want) {
            (Some(have), Value::Array(options)) => options.contains(have),
            (Some(have), want) => have == want,
            (None, _) => false,
        })
}

#[derive(PartialEq)]
struct Scored(f32, usize);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    // Reversed, so the heap's top is the worst kept hit; ties keep the earlier chunk.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| self.1.cmp(&other.1))
    }
}

impl Index {
    /// An empty index of `dims`-dimensional vectors.
    pub fn new(dims: usize) -> Self {
        Index {
            dims,
            entries: Vec::new(),
            vectors: Vec::new(),
        }
    }

    /// Dimensions.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a chunk; its vector is normalised. `Err` if the dimensions differ.
    pub fn push(&mut self, entry: Entry, mut vector: Vec<f32>) -> Result<(), String> {
        if vector.len() != self.dims {
            return Err(format!(
                "chunk {} has {} dimensions; the knowledge base has {}",
                entry.chunk_id,
                vector.len(),
                self.dims
            ));
        }
        normalize(&mut vector);
        self.vectors.extend_from_slice(&vector);
        self.entries.push(entry);
        Ok(())
    }

    /// The `top_k` chunks most like `query` (best first) that pass `filter` and score at
    /// least `min_score`.
    pub fn search(
        &self,
        query: &[f32],
        top_k: usize,
        filter: &Map<String, Value>,
        min_score: Option<f32>,
    ) -> Result<Vec<Hit>, String> {
        if query.len() != self.dims {
            return Err(format!(
                "the query has {} dimensions; the knowledge base has {}",
                query.len(),
                self.dims
            ));
        }
        let mut q = query.to_vec();
        normalize(&mut q);
        let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(top_k + 1);
        if top_k == 0 || self.dims == 0 {
            return Ok(Vec::new());
        }
        for (i, v) in self.vectors.chunks_exact(self.dims).enumerate() {
            let score = dot(&q, v);
            if min_score.is_some_and(|m| score < m) {
                continue;
            }
            if heap.len() == top_k && heap.peek().is_some_and(|w| w.0 >= score) {
                continue;
            }
            if !filter.is_empty() && !matches(&self.entries[i].metadata, filter) {
                continue;
            }
            heap.push(Scored(score, i));
            if heap.len() > top_k {
                heap.pop();
            }
        }
        let mut hits: Vec<Scored> = heap.into_vec();
        hits.sort();
        Ok(hits
            .into_iter()
            .map(|Scored(score, i)| Hit {
                entry: self.entries[i].clone(),
                score,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(id: &str, lang: &str) -> Entry {
        Entry {
            chunk_id: id.into(),
            doc: id.into(),
            position: 0,
            heading: String::new(),
            text: id.into(),
            metadata: json!({"lang": lang}).as_object().cloned().unwrap(),
        }
    }

    #[test]
    fn the_best_chunks_come_first_and_filters_apply() {
        let mut ix = Index::new(3);
        ix.push(entry("x", "en"), vec![1.0, 0.0, 0.0]).unwrap();
        ix.push(entry("xy", "fr"), vec![1.0, 1.0, 0.0]).unwrap();
        ix.push(entry("y", "en"), vec![0.0, 2.0, 0.0]).unwrap();
        ix.push(entry("z", "en"), vec![0.0, 0.0, 5.0]).unwrap();
        let none = Map::new();
        let hits = ix.search(&[0.9, 0.1, 0.0], 2, &none, None).unwrap();
        let ids: Vec<&str> = hits.iter().map(|h| h.entry.chunk_id.as_str()).collect();
        assert_eq!(ids, vec!["x", "xy"]);
        assert!((hits[0].score - 0.99388).abs() < 1e-4, "{}", hits[0].score);
        let en = json!({"lang": "en"}).as_object().cloned().unwrap();
        let hits = ix.search(&[0.9, 0.1, 0.0], 2, &en, None).unwrap();
        let ids: Vec<&str> = hits.iter().map(|h| h.entry.chunk_id.as_str()).collect();
        assert_eq!(ids, vec!["x", "y"]);
        let hits = ix.search(&[0.9, 0.1, 0.0], 10, &none, Some(0.5)).unwrap();
        assert_eq!(hits.len(), 2, "z and y score below 0.5");
        let either = json!({"lang": ["fr", "de"]}).as_object().cloned().unwrap();
        assert_eq!(
            ix.search(&[1.0, 0.0, 0.0], 5, &either, None).unwrap().len(),
            1
        );
        assert!(ix.push(entry("w", "en"), vec![1.0]).is_err());
        assert!(ix.search(&[1.0], 1, &none, None).is_err());
    }
}
