"""Times TransformerLens's patching.py on benches/smollm2.toml's sweeps (resid_pre over
[layer, pos], z over [layer, head], normalised logit difference, the 8 IOI prompts) on
SmolLM2-135M-Instruct's dequantized weights, which it first writes once as a safetensors
directory (transformers' own GGUF loading). Prints seconds as JSON.

Usage: python benches/tl_smollm2.py GGUF_FILE HF_DIR
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformer_lens.patching as patching
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

gguf, hf_dir = sys.argv[1], sys.argv[2]
if not os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
    d, f = os.path.split(os.path.realpath(gguf))
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    plain = LlamaForCausalLM(hf.config)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(hf_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(hf_dir)

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
with open(os.path.join(root, "experiments", "prompts", "ioi.jsonl")) as fh:
    prompts = [json.loads(line) for line in fh if line.strip()]
t0 = time.perf_counter()
model = TransformerBridge.boot_transformers(hf_dir, device="cpu")
model.enable_compatibility_mode(disable_warnings=True)
t_load = time.perf_counter() - t0
clean = torch.cat([model.to_tokens(p["clean"]) for p in prompts])
corrupted = clean[[i ^ 1 for i in range(len(prompts))]]
answers = torch.tensor([[model.to_tokens(a, prepend_bos=False)[0, 0].item() for a in p["answers"]] for p in prompts])


def logit_diff(logits):
    last = logits[:, -1, :]
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()


t0 = time.perf_counter()
with torch.no_grad():
    clean_logits, cache = model.run_with_cache(clean)
    clean_b, corr_b = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()

    def metric(logits):
        return (logit_diff(logits) - corr_b) / (clean_b - corr_b)

    patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
t_run = time.perf_counter() - t0
print(json.dumps({"load_s": t_load, "patching_s": t_run, "torch_threads": torch.get_num_threads()}))
