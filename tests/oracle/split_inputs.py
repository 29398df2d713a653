"""TransformerLens's split q/k/v inputs and hook_mlp_in (set_use_split_qkv_input,
set_use_hook_mlp_in: the receivers of edge attribution) on a fixture: the last position's logits
with nothing edited, and with a fixed vector (3·sin(i + 1) over d_model) added to one head's copy
of the residual at hook_q_input, hook_k_input or hook_v_input of one layer, or to hook_mlp_in.

Usage: python tests/oracle/split_inputs.py MODEL_DIR TOKENS_JSON LAYER HEAD KV_HEAD OUT_JSON
"""
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens.model_bridge import TransformerBridge


def main() -> None:
    model_dir, tokens, layer, head, kv_head, out = sys.argv[1:7]
    layer, head, kv_head = int(layer), int(head), int(kv_head)
    model = TransformerBridge.boot_transformers(model_dir, device="cpu")
    model.enable_compatibility_mode(disable_warnings=True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    tokens = torch.tensor([json.loads(tokens)])
    d = model.cfg.d_model
    delta = torch.tensor([3.0 * math.sin(i + 1) for i in range(d)])

    def add_at(index):
        def hook(act, hook):
            act = act.clone()
            if index is None:
                act[:] += delta
            else:
                act[:, :, index] += delta
            return act

        return hook

    result = {}
    with torch.no_grad():
        result["none"] = model(tokens)[0, -1].tolist()
        for key, name, index in [
            ("q", f"blocks.{layer}.hook_q_input", head),
            ("k", f"blocks.{layer}.hook_k_input", kv_head),
            ("v", f"blocks.{layer}.hook_v_input", kv_head),
            ("mlp", f"blocks.{layer}.hook_mlp_in", None),
        ]:
            logits = model.run_with_hooks(tokens, fwd_hooks=[(name, add_at(index))])
            result[key] = logits[0, -1].tolist()
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (f"blocks.{layer}.hook_k_input", f"blocks.{layer}.hook_q_input"))
        result["q_input_shape"] = list(cache[f"blocks.{layer}.hook_q_input"].shape)
        result["k_input_shape"] = list(cache[f"blocks.{layer}.hook_k_input"].shape)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
