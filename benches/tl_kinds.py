"""Times TransformerLens 4.3.0 on the work of benches/kinds.toml, done the way its demos do it:
the Attribution Patching demo (forward and backward hooks on the corrupted run), ActivationCache's
logit lens and direct logit attribution, head_detector over the prompts, and a mean ablation of
every head's hook_z one run_with_hooks each. Prints seconds per kind as JSON.

Usage: python benches/tl_kinds.py MODEL_DIR
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformer_lens.head_detector import detect_head
from transformer_lens.model_bridge import TransformerBridge

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "oracle"))
from oracle_common import answer_ids, prompt_set  # noqa: E402

PROMPT_SET = prompt_set("gpt2")  # experiments/prompts/ioi.jsonl
PROMPTS = [p["clean"] for p in PROMPT_SET]

model = TransformerBridge.boot_transformers(sys.argv[1], device="cpu")
model.enable_compatibility_mode(disable_warnings=True)
model.set_use_attn_result(True)
clean = model.to_tokens(PROMPTS)
corrupted = clean[[i ^ 1 for i in range(len(PROMPTS))]]
answers = answer_ids(model, PROMPT_SET)
L, H = model.cfg.n_layers, model.cfg.n_heads
times = {}


def logit_diff(logits):
    last = logits[:, -1, :]
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()


# Attribution: resid_pre/attn_out/mlp_out by position and z/q/k/v per head (all positions).
t0 = time.perf_counter()
with torch.no_grad():
    clean_logits, clean_cache = model.run_with_cache(clean)
    clean_b, corr_b = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()
names = [f"blocks.{l}.{h}" for l in range(L) for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")]
acts, grads = {}, {}
for n in names:
    model.add_hook(n, lambda x, hook, n=n: acts.__setitem__(n, x.detach()), "fwd")
    model.add_hook(n, lambda g, hook, n=n: grads.__setitem__(n, g.detach()), "bwd")
((logit_diff(model(corrupted)) - corr_b) / (clean_b - corr_b)).backward()
model.reset_hooks()
attr = {n: ((clean_cache[n] - acts[n]) * grads[n]).sum(0).sum(-1) for n in names}
times["attribution"] = time.perf_counter() - t0

# Logit lens and DLA per layer and per head.
t0 = time.perf_counter()
with torch.no_grad():
    _, cache = model.run_with_cache(clean)
    direction = model.W_U[:, answers[:, 0]] - model.W_U[:, answers[:, 1]]  # [d, n]
    lens = (cache.accumulated_resid(layer=-1, incl_mid=True, apply_ln=True)[:, :, -1, :] * direction.T).sum(-1).mean(-1)
    dla_layers = cache.logit_attrs(cache.decompose_resid(layer=-1, pos_slice=-1), tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1).mean(-1)
    dla_heads = cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1).mean(-1)
times["logit lens + DLA layers + DLA heads"] = time.perf_counter() - t0

# head_detector, three patterns over the prompts.
t0 = time.perf_counter()
for pattern in ("previous_token_head", "duplicate_token_head", "induction_head"):
    detect_head(model, PROMPTS, pattern)
times["head scores"] = time.perf_counter() - t0

# Mean ablation of every head, one forward each.
t0 = time.perf_counter()
with torch.no_grad():
    for l in range(L):
        mean_z = clean_cache[f"blocks.{l}.attn.hook_z"].mean(0, keepdim=True)
        for h in range(H):
            def ablate(x, hook, h=h, mean_z=mean_z):
                x = x.clone()
                x[:, :, h] = mean_z[:, :, h]
                return x
            logit_diff(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{l}.attn.hook_z", ablate)]))
times["ablation sweep (every head)"] = time.perf_counter() - t0
times["torch_threads"] = torch.get_num_threads()
print(json.dumps(times))
