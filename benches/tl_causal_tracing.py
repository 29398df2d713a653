"""ROME's causal-tracing loop in TransformerLens 4.3, on the work of
benches/causal_tracing_smollm2.toml: for each prompt, a batch of the clean prompt and its 10
noised copies (the subject's embeddings + 3 × std(W_E) Gaussian noise), and for each layer,
position and kind one forward restoring the clean state there in the noised rows (resid_pre; and
mlp_out with a window of 10 layers), measuring the mean
probability of the answer over the noised rows: ROME's trace_with_patch / trace_important_window,
one forward per cell. Prints the seconds and the mean of the traced probabilities as JSON.

Usage: python benches/tl_causal_tracing.py MODEL_DIR SPEC_TOML
"""
import json
import os
import sys
import time
import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
import torch
from transformer_lens.model_bridge import TransformerBridge

model_dir, spec_file = sys.argv[1:3]
with open(spec_file, "rb") as f:
    spec = tomllib.load(f)
model = TransformerBridge.boot_transformers(model_dir, device="cpu")
model.enable_compatibility_mode(disable_warnings=True)
samples, scale = spec["corruption"]["samples"], spec["corruption"]["noise"]
n_layers = model.cfg.n_layers
std = model.W_E.std().item()
torch.manual_seed(spec["corruption"]["seed"])


def subject_range(tokens, text, words):
    """Token positions spelling the subject (ROME's find_token_range, by prefix token counts)."""
    for w in words:
        at = text.find(w)
        if at >= 0:
            start = model.to_tokens(text[:at].rstrip()).shape[1] if at else 1
            end = model.to_tokens(text[: at + len(w)]).shape[1]
            return range(start, end)
    raise ValueError(f"no subject in {text!r}")


start = time.perf_counter()
traced = []
with torch.no_grad():
    for text, (answer,) in zip(spec["prompts"]["clean"], spec["prompts"]["answers"]):
        tokens = model.to_tokens(text).repeat(samples + 1, 1)
        seq = tokens.shape[1]
        subject = subject_range(tokens, text, spec["corruption"]["words"])
        noise = torch.randn(samples, len(subject), model.cfg.d_model) * std * scale
        target = model.to_tokens(answer, prepend_bos=False)[0, 0]

        def corrupt(act, hook):
            act[1:, subject.start : subject.stop] += noise
            return act

        _, cache = model.run_with_cache(tokens[:1])
        for kind, window in [("resid_pre", 1), ("mlp_out", 10)]:
            for layer in range(n_layers):
                layers = range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
                for pos in range(seq):
                    def restore(act, hook, pos=pos):
                        act[1:, pos] = cache[hook.name][0, pos]
                        return act

                    hooks = [("hook_embed", corrupt)] + [(f"blocks.{L}.hook_{kind}", restore) for L in layers]
                    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                    traced.append(logits[1:, -1].softmax(-1)[:, target].mean().item())
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "cells": len(traced),
                  "mean_prob": sum(traced) / len(traced)}))
