"""Runs TransformerLens 4.3.0 (TransformerBridge, compatibility mode) on the fixture models and
writes every hook activation, the tokens and the logits to safetensors, for the Rust tests to read.

One file per case: OUT_DIR/<fixture>/<processing>-<case>.safetensors, where processing is
"processed" (from_pretrained defaults: fold_ln, center_writing_weights, center_unembed,
fold_value_biases) or "raw" (no processing; these files also carry the HF transformers logits as
"hf_logits"). Keys are full TransformerLens hook names plus "tokens" and "logits".

Usage: python tests/oracle/dump_tl.py FIXTURES_DIR OUT_DIR
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import fixture_dir, prompt_set, uses_gpt2_tokenizer  # noqa: E402

# The first IOI prompts of experiments/prompts/ioi.jsonl (the tests read them back from metadata).
IOI = [p["clean"] for p in prompt_set("gpt2-tiny")][:4]
STORIES = [
    "Once upon a time, there was a little girl named Lily.",
    "Once upon a time, there was a little boy named Timmy.",
]
# fixture -> cases. A case is a list of prompts (tokenized by TL with prepend_bos) or
# {"random_tokens": [batch, seq], "seed": s} for token ids fed directly.
CASES = {
    "gpt2-tiny": {"single": IOI[:1], "batch": IOI},
    "gpt2-odd": {"single": IOI[2:3], "batch": IOI[:2], "long": {"random_tokens": [2, 128], "seed": 7}},
    "llama-tiny": {"single": STORIES[:1], "batch": STORIES},
    "stories260K": {"single": STORIES[:1], "batch": STORIES, "long": {"random_tokens": [2, 96], "seed": 8}},
}
# One fixture per further family (configs/fixtures.toml): a prompt alone and a batch.
ZOO = ["llama3-tiny", "llama-linear-tiny", "neo-tiny", "gptj-tiny", "neox-tiny", "opt-tiny", "mistral-tiny", "qwen2-tiny",
       "qwen3-tiny", "gemma-tiny", "gemma2-tiny", "phi-tiny", "phi3-tiny", "stablelm-tiny", "bloom-tiny"]
for _name in ZOO:
    _prompts = IOI if uses_gpt2_tokenizer(_name) else STORIES
    CASES[_name] = {"single": _prompts[:1], "batch": _prompts}
# Aliases the bridge also exposes (module in/out points) are not TransformerLens hook points.
SKIP_SUFFIXES = (".hook_in", ".hook_out", "hook_hidden_states", "hook_unembed")


def tokens_for(model, case) -> torch.Tensor:
    if isinstance(case, dict):
        gen = torch.Generator().manual_seed(case["seed"])
        return torch.randint(3, model.cfg.d_vocab, case["random_tokens"], generator=gen)
    toks = [model.to_tokens(p) for p in case]
    assert len({t.shape[1] for t in toks}) == 1, f"prompts of unequal length: {case}"
    return torch.cat(toks, dim=0)


def dump(model_dir: str, out_dir: str, fixture: str, processed: bool) -> None:
    model = TransformerBridge.boot_transformers(model_dir, device="cpu")
    if processed:
        model.enable_compatibility_mode(disable_warnings=True)
    else:
        model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    try:
        model.set_use_attn_result(True)
    except NotImplementedError:
        pass  # the bridge has no per-head result for this family's attention (GPT-Neo, GPT-J, OPT)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval() if not processed else None
    tag = "processed" if processed else "raw"
    for case_name, case in CASES[fixture].items():
        tokens = tokens_for(model, case)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        tensors = {"tokens": tokens.to(torch.int64).contiguous(), "logits": logits.float().contiguous()}
        for name, act in cache.items():
            if not name.endswith(SKIP_SUFFIXES):
                tensors[name] = act.detach().float().clone().contiguous()
        if hf is not None:
            with torch.no_grad():
                tensors["hf_logits"] = hf(tokens).logits.float().contiguous()
        meta = {"prompts": json.dumps(case if isinstance(case, list) else []), "fixture": fixture,
                "prepend_bos": json.dumps(bool(model.cfg.default_prepend_bos))}
        save_file(tensors, os.path.join(out_dir, f"{tag}-{case_name}.safetensors"), metadata=meta)


def main() -> None:
    fixtures, out = sys.argv[1], sys.argv[2]
    only = sys.argv[3:] or list(CASES)
    torch.manual_seed(0)
    for fixture in only:
        d = os.path.join(out, fixture)
        os.makedirs(d, exist_ok=True)
        for processed in (True, False):
            dump(fixture_dir(fixtures, fixture), d, fixture, processed)


if __name__ == "__main__":
    main()
