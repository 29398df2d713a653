"""Writes random weights for the Llama-architecture config.json already in DIR (SmolLM2-135M's
shape, or Llama-3-8B's: 32 layers, d_model 4096, 32/8 heads, MLP 14336) as HF safetensors in the
config's torch_dtype, sharded at ~4 GB with model.safetensors.index.json as the hub writes them.
Tensors are drawn one at a time (on the GPU when there is one), so an 8B checkpoint takes seconds
to draw and is bounded by the disk to write; norm weights are 1 + noise so no step is an identity.

Usage: python benches/gpu/gen_llama.py DIR
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
cfg = json.load(open(os.path.join(out, "config.json")))
L, D, H, KV, M, V = (cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"))
E = cfg.get("head_dim", D // H)
dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.get("torch_dtype", "float32")]
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=dev).manual_seed(0)


def rnd(*shape, scale=0.02, base=0.0):
    return (torch.randn(*shape, generator=g, device=dev) * scale + base).to(dtype).cpu()


shapes = [("model.embed_tokens.weight", (V, D), {}), ("model.norm.weight", (D,), {"base": 1.0, "scale": 0.1})]
if not cfg.get("tie_word_embeddings", False):
    shapes.append(("lm_head.weight", (V, D), {}))
for l in range(L):
    p = f"model.layers.{l}."
    shapes += [(p + "input_layernorm.weight", (D,), {"base": 1.0, "scale": 0.1}),
               (p + "self_attn.q_proj.weight", (H * E, D), {}), (p + "self_attn.k_proj.weight", (KV * E, D), {}),
               (p + "self_attn.v_proj.weight", (KV * E, D), {}), (p + "self_attn.o_proj.weight", (D, H * E), {}),
               (p + "post_attention_layernorm.weight", (D,), {"base": 1.0, "scale": 0.1}),
               (p + "mlp.gate_proj.weight", (M, D), {}), (p + "mlp.up_proj.weight", (M, D), {}),
               (p + "mlp.down_proj.weight", (D, M), {})]
shard_bytes = 4 << 30
shards, current, size = [], {}, 0
for name, shape, kw in shapes:
    t = rnd(*shape, **kw)
    current[name] = t
    size += t.numel() * t.element_size()
    if size >= shard_bytes:
        shards.append(current)
        current, size = {}, 0
if current:
    shards.append(current)
weight_map, total = {}, 0
for i, s in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(s, os.path.join(out, fname), metadata={"format": "pt"})
    for k, v in s.items():
        weight_map[k] = fname
        total += v.numel() * v.element_size()
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
print(f"{sum(v.numel() for s in shards for v in s.values()) / 1e9:.2f}B parameters, {total / 2**30:.1f} GiB in {len(shards)} shards")
