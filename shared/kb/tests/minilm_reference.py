"""A second computation of all-MiniLM-L6-v2 embeddings, to check the Rust one against:
the Hugging Face `tokenizers` library for tokenization and numpy (float64) for the math.

Usage: python minilm_reference.py MODEL_DIR < texts.json > vectors.json
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

model_dir = sys.argv[1]
texts = json.load(sys.stdin)
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.enable_truncation(256)
tok.no_padding()
w = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
erf = np.vectorize(math.erf)


def norm(x, name):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-12) * w[name + ".weight"] + w[name + ".bias"]


def dense(x, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


out = []
for text in texts:
    ids = tok.encode(text).ids
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(x, "embeddings.LayerNorm")
    for layer in range(6):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            dense(x, p + "attention.self." + part).reshape(n, 12, 32).transpose(1, 0, 2)
            for part in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 2, 1) / math.sqrt(32)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        c = (s @ v).transpose(1, 0, 2).reshape(n, 384)
        a = norm(dense(c, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = dense(a, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = norm(dense(h, p + "output.dense") + a, p + "output.LayerNorm")
    e = x.mean(0)
    out.append((e / np.linalg.norm(e)).tolist())
print(json.dumps(out))
