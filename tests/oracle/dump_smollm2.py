"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), as HF transformers and
TransformerLens see it: transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`,
with the `gguf` package) is the independent reference for tl-run's GGUF reader — its tokens for
the IOI prompts and its logits — and TransformerLens's patching.py (resid_pre over [layer, pos],
z over [layer, head]) runs on the same dequantized weights, saved as a safetensors directory.

Writes OUT_DIR/smollm2/gguf.safetensors (all 8 IOI prompts) and OUT_DIR/smollm2/patching.safetensors
(the first two IOI pairs).

Usage: python tests/oracle/dump_smollm2.py FIXTURES_DIR OUT_DIR
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import ROOT, load, out_dir  # noqa: E402

GGUF_DIR = os.path.join(ROOT, ".models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ioi_prompts() -> list:
    with open(os.path.join(ROOT, "experiments", "prompts", "ioi.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    out = out_dir(sys.argv[2], "smollm2")
    hf = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    prompts = ioi_prompts()
    texts = [p["clean"] for p in prompts]
    ids = [tok(t).input_ids for t in texts]
    t = {}
    with torch.no_grad():
        for i, row in enumerate(ids):
            t[f"hf_tokens/{i}"] = torch.tensor(row)
            t[f"hf_logits/{i}"] = hf(torch.tensor([row])).logits[0].float().contiguous()
    save_file(t, os.path.join(out, "gguf.safetensors"), metadata={"prompts": json.dumps(texts)})

    # The same dequantized weights as a plain HF directory, for TransformerLens (a GGUF-loaded
    # model refuses save_pretrained, so its state dict goes into a fresh model).
    with tempfile.TemporaryDirectory() as d:
        plain = LlamaForCausalLM(hf.config).eval()
        plain.load_state_dict(hf.state_dict())
        plain.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        model = load(os.path.dirname(d), os.path.basename(d))
        # The first two IOI pairs: TL's one forward per cell on a 135M model is the slow part.
        pairs = prompts[:4]
        clean = torch.cat([model.to_tokens(p["clean"]) for p in pairs])
        n = clean.shape[0]
        corrupted = clean[[i ^ 1 for i in range(n)]]
        answers = torch.tensor([[tok(a, add_special_tokens=False).input_ids[0] for a in p["answers"]] for p in pairs])

        def logit_diff(logits):
            last = logits[:, -1, :]
            return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(clean)
            r = {
                "clean_tokens": clean, "corrupted_tokens": corrupted, "answers": answers,
                "clean_baseline": logit_diff(clean_logits).reshape(1),
                "corrupted_baseline": logit_diff(model(corrupted)).reshape(1),
                "resid_pre": patching.get_act_patch_resid_pre(model, corrupted, cache, logit_diff),
                "z_all_pos": patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, logit_diff),
            }
        save_file({k: v.contiguous() for k, v in r.items()}, os.path.join(out, "patching.safetensors"),
                  metadata={"prepend_bos": json.dumps(bool(model.cfg.default_prepend_bos)), "prompts": json.dumps(pairs)})


if __name__ == "__main__":
    main()
