"""Times TransformerLens's patching.py on the sweeps of experiments/ioi.toml (the Exploratory
Analysis demo's: resid_pre, attn_out, mlp_out over [layer, pos]; z, v, pattern over [layer, head])
with its metric, the normalised logit difference. Prints seconds as JSON.

Usage: python benches/tl_ioi.py MODEL_DIR
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformer_lens.patching as patching
from transformer_lens.model_bridge import TransformerBridge

# The same prompts and answers as the tests' oracle (and experiments/ioi.toml).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "oracle"))
from oracle_common import answer_ids, prompt_set  # noqa: E402

PROMPT_SET = prompt_set("gpt2")  # experiments/prompts/ioi.jsonl
PROMPTS = [p["clean"] for p in PROMPT_SET]

t0 = time.perf_counter()
model = TransformerBridge.boot_transformers(sys.argv[1], device="cpu")
model.enable_compatibility_mode(disable_warnings=True)
t_load = time.perf_counter() - t0
clean = model.to_tokens(PROMPTS)
corrupted = clean[[i ^ 1 for i in range(len(PROMPTS))]]
answers = answer_ids(model, PROMPT_SET)


def logit_diff(logits):
    last = logits[:, -1, :]
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()


t0 = time.perf_counter()
with torch.no_grad():
    clean_logits, cache = model.run_with_cache(clean)
    clean_b, corr_b = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()

    def metric(logits):
        return (logit_diff(logits) - corr_b) / (clean_b - corr_b)

    for f in (patching.get_act_patch_resid_pre, patching.get_act_patch_attn_out, patching.get_act_patch_mlp_out,
              patching.get_act_patch_attn_head_out_all_pos, patching.get_act_patch_attn_head_v_all_pos,
              patching.get_act_patch_attn_head_pattern_all_pos):
        f(model, corrupted, cache, metric)
t_run = time.perf_counter() - t0
print(json.dumps({"load_s": t_load, "patching_s": t_run, "torch_threads": torch.get_num_threads()}))
