"""Times TransformerLens 4.3's patching.py on one IOI sweep set, on a given device and dtype, and
saves the values so the caller can compare them with tl-run's Parquet.

  set "ioi":     resid_pre, attn_out, mlp_out over [layer, pos]; z, v, pattern over [layer, head]
                 (experiments/ioi.toml's two patching runs, benches/gpu/ioi_patching.toml)
  set "smollm2": resid_pre over [layer, pos]; z over [layer, head] (benches/smollm2.toml)

The metric is the normalised logit difference at the last position, as in the specs. Timed: the
clean run with cache, the corrupted run and the sweeps (TransformerLens's side of tl-run's
'clean and corrupted runs' + sweeps), with the device synchronised at both ends.

Usage: python tl_patching.py MODEL_DIR PROMPTS_JSONL DEVICE DTYPE SET OUT_JSON
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
import torch
import transformer_lens.patching as patching
from transformer_lens.model_bridge import TransformerBridge

model_dir, prompts_file, device, dtype_name, sweep_set, out_json = sys.argv[1:7]
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
with open(prompts_file) as fh:
    prompts = [json.loads(line) for line in fh if line.strip()]


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


t0 = time.perf_counter()
model = TransformerBridge.boot_transformers(model_dir, device=device, dtype=dtype)
model.enable_compatibility_mode(disable_warnings=True)
sync()
t_load = time.perf_counter() - t0
clean = model.to_tokens([p["clean"] for p in prompts])
corrupted = clean[[i ^ 1 for i in range(len(prompts))]]
answers = torch.tensor([[model.to_tokens(a, prepend_bos=False)[0, 0].item() for a in p["answers"]] for p in prompts], device=clean.device)


def logit_diff(logits):
    last = logits[:, -1, :].float()
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()


sweeps = {"ioi": [("resid_pre", patching.get_act_patch_resid_pre), ("attn_out", patching.get_act_patch_attn_out),
                  ("mlp_out", patching.get_act_patch_mlp_out), ("z", patching.get_act_patch_attn_head_out_all_pos),
                  ("v", patching.get_act_patch_attn_head_v_all_pos), ("pattern", patching.get_act_patch_attn_head_pattern_all_pos)],
          "smollm2": [("resid_pre", patching.get_act_patch_resid_pre), ("z", patching.get_act_patch_attn_head_out_all_pos)]}[sweep_set]
values = {}
sync()
t0 = time.perf_counter()
with torch.no_grad():
    clean_logits, cache = model.run_with_cache(clean)
    clean_b, corr_b = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()

    def metric(logits):
        return (logit_diff(logits) - corr_b) / (clean_b - corr_b)

    for hook, f in sweeps:
        values[hook] = f(model, corrupted, cache, metric)
    sync()
t_run = time.perf_counter() - t0
json.dump({"load_s": t_load, "patching_s": t_run, "device": device, "dtype": dtype_name, "clean": clean_b, "corrupted": corr_b,
           "values": {k: v.float().cpu().tolist() for k, v in values.items()}}, open(out_json, "w"))
print(json.dumps({"load_s": round(t_load, 3), "patching_s": round(t_run, 3)}))
