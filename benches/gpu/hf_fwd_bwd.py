"""The reference 'one forward + backward' for the 8B attribution bench: HF transformers' own
Llama on the same checkpoint, prompts and dtype, the logit difference at the last position,
gradients with respect to the activations only (weights frozen, as attribution needs). Prints
the median of 3 timed passes after one warm-up, and the peak memory torch allocated.

Usage: python hf_fwd_bwd.py MODEL_DIR PROMPTS_JSONL DEVICE DTYPE
"""
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, prompts_file, device, dtype_name = sys.argv[1:5]
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
prompts = [json.loads(line) for line in open(prompts_file) if line.strip()]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device)
model.requires_grad_(False)
tok = AutoTokenizer.from_pretrained(model_dir)
t_load = time.perf_counter() - t0
ids = torch.tensor([tok(p["clean"])["input_ids"] for p in prompts], device=device)
answers = torch.tensor([[tok(a, add_special_tokens=False)["input_ids"][0] for a in p["answers"]] for p in prompts], device=device)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


times = []
for rep in range(4):
    sync()
    t = time.perf_counter()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    last = model(inputs_embeds=emb, logits_to_keep=1).logits[:, -1].float()
    (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean().backward()
    sync()
    times.append(time.perf_counter() - t)
peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
print(json.dumps({"load_s": round(t_load, 2), "fwd_bwd_s": round(statistics.median(times[1:]), 4), "all_s": [round(x, 4) for x in times],
                  "peak_gib": round(peak, 2), "batch": list(ids.shape)}))
