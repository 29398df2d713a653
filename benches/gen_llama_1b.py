"""Writes a random Llama-architecture checkpoint of ~1.1B parameters in bfloat16 (20 layers,
d_model 2048, 16 query / 8 key-value heads, MLP 5632, vocab 32000; untied), to measure peak
memory while loading (benches/load_rss.sh). Tensors are drawn directly (no model object), so it
takes seconds, not minutes.

Usage: python benches/gen_llama_1b.py OUT_DIR
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
L, D, H, KV, M, V = 20, 2048, 16, 8, 5632, 32000
E = D // H
g = torch.Generator().manual_seed(0)


def rnd(*shape, scale=0.02):
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


t = {"model.embed_tokens.weight": rnd(V, D), "lm_head.weight": rnd(V, D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
for l in range(L):
    p = f"model.layers.{l}."
    t[p + "self_attn.q_proj.weight"] = rnd(H * E, D)
    t[p + "self_attn.k_proj.weight"] = rnd(KV * E, D)
    t[p + "self_attn.v_proj.weight"] = rnd(KV * E, D)
    t[p + "self_attn.o_proj.weight"] = rnd(D, H * E)
    t[p + "mlp.gate_proj.weight"] = rnd(M, D)
    t[p + "mlp.up_proj.weight"] = rnd(M, D)
    t[p + "mlp.down_proj.weight"] = rnd(D, M)
    t[p + "input_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    t[p + "post_attention_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
save_file(t, os.path.join(out, "model.safetensors"))
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "num_hidden_layers": L, "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": KV,
               "intermediate_size": M, "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False}, f, indent=1)
print(sum(v.numel() for v in t.values()), "parameters")
