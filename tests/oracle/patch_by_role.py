"""Patching by role against TransformerLens, on the prompts of a tl-run run's manifest: the clean
and corrupted prompts, each role's filler as a byte span, and the answers. Each role's position
in each prompt comes from TransformerLens's own tokenizer as IOIDataset finds word_idx (the
token count of the prompt up to the end of the filler, minus one); resid_pre over [layer, role]
and z over [layer, role, head] are patched with those per-prompt index tensors
(act[arange(n), pos] = clean[arange(n), pos]), measuring the mean logit difference at the last
position (or, with the spec's [metric] position, at each prompt's position of that role).
Prompts are left-padded as to_tokens does (tl-run's `pos` counts a prompt's own tokens).

A MODEL that is a .gguf file (SmolLM2) is dequantized into a temporary HF directory first
(smollm2_hf.py); --resid-only skips the z sweep (a forward per layer, role and head).

Usage: python tests/oracle/patch_by_role.py MODEL_DIR|MODEL.gguf MANIFEST OUT_JSON [--resid-only]
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402


def spec_slots(manifest_path):
    """The [prompts.slots] of the spec the run read (beside the output directory's manifest)."""
    import tomllib
    spec_file = os.path.join(os.path.dirname(os.path.dirname(manifest_path)), "spec.toml")
    with open(spec_file, "rb") as f:
        return tomllib.load(f)["prompts"]["slots"]


def main() -> None:
    model_path, manifest_path, out = sys.argv[1:4]
    resid_only = "--resid-only" in sys.argv[4:]
    if model_path.endswith(".gguf"):
        import tempfile

        from smollm2_hf import save_hf_dir

        with tempfile.TemporaryDirectory() as d:
            save_hf_dir(model_path, d)
            model = TransformerBridge.boot_transformers(d, device="cpu")
            patch(model, manifest_path, out, resid_only)
    else:
        patch(TransformerBridge.boot_transformers(model_path, device="cpu"), manifest_path, out, resid_only)


def patch(model, manifest_path: str, out: str, resid_only: bool) -> None:
    model.enable_compatibility_mode(disable_warnings=True)
    model.tokenizer.padding_side = "left"
    with open(manifest_path) as f:
        spec = json.load(f)["spec"]
    prompts = spec["prompts"]
    metric_role = spec["metric"].get("position")
    clean_text = [p["clean"] for p in prompts]
    clean = model.to_tokens(clean_text, padding_side="left")
    corrupted = model.to_tokens([p["corrupted"] for p in prompts], padding_side="left")
    assert clean.shape == corrupted.shape, "clean and corrupted lengths differ"
    n, seq = clean.shape
    lengths = [model.to_tokens(t).shape[1] for t in clean_text]
    names = [r[0] for r in prompts[0]["roles"]]
    # What the manifest says is checked against the spec's own slots, not trusted: each span holds
    # a filler of its slot, S1 and S2 the same name, the answers are IO's and S's fillers.
    slots = spec_slots(manifest_path)
    for p in prompts:
        text = p["clean"].encode()
        spans = {r[0]: text[r[1]["start"] : r[1]["end"]].decode() for r in p["roles"]}
        for role, filler in spans.items():
            slot = role.rstrip("0123456789") if role not in slots else role
            assert filler in slots[slot], f"{role} spans {filler!r}, not a filler of {slot}"
        if "S1" in spans:
            assert spans["S1"] == spans["S2"] and p["roles"][[r[0] for r in p["roles"]].index("S1")][1]["start"] < p["roles"][[r[0] for r in p["roles"]].index("S2")][1]["start"]
        assert p["correct"] == spans["IO"] and p["incorrect"] == spans["S1"], p
        assert len(model.to_tokens(p["clean"])[0]) == len(model.to_tokens(p["corrupted"])[0]), p

    def position(p, name):
        span = dict((r[0], r[1]) for r in p["roles"])[name]
        prefix = p["clean"].encode()[: span["end"]].decode()
        return model.to_tokens(prefix).shape[1] - 1

    pad = [seq - length for length in lengths]
    role_pos = {name: torch.tensor([pad[i] + position(p, name) for i, p in enumerate(prompts)]) for name in names}
    role_pos["END"] = torch.full((n,), seq - 1)
    roles = names + ["END"]
    answer = lambda s: model.to_tokens(s, prepend_bos=False)[0, 0]  # noqa: E731
    correct = torch.stack([answer(p["correct"]) for p in prompts])
    wrong = torch.stack([answer(p["incorrect"]) for p in prompts])
    rows = torch.arange(n)

    def logit_diff(logits):
        # At the last position, or at each prompt's position of the metric's role.
        last = logits[:, -1, :] if metric_role is None else logits[rows, role_pos[metric_role]]
        return (last[rows, correct] - last[rows, wrong]).mean().item()

    attention_mask = (clean != model.tokenizer.pad_token_id).long() if min(pad) < max(pad) else None
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
    result = {"roles": roles, "positions": {r: role_pos[r].tolist() for r in roles}}
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, **kwargs)
        result["clean"] = logit_diff(clean_logits)
        result["corrupted"] = logit_diff(model(corrupted, **kwargs))
        resid = []
        z = []
        for layer in range(model.cfg.n_layers):
            for r in roles:
                pos = role_pos[r]
                name = f"blocks.{layer}.hook_resid_pre"

                def restore(act, hook, pos=pos):
                    act[rows, pos] = cache[hook.name][rows, pos]
                    return act

                resid.append(logit_diff(model.run_with_hooks(corrupted, fwd_hooks=[(name, restore)], **kwargs)))
                for h in range(0 if resid_only else model.cfg.n_heads):
                    def restore_head(act, hook, pos=pos, h=h):
                        act[rows, pos, h] = cache[hook.name][rows, pos, h]
                        return act

                    zname = f"blocks.{layer}.attn.hook_z"
                    z.append(logit_diff(model.run_with_hooks(corrupted, fwd_hooks=[(zname, restore_head)], **kwargs)))
        result["resid_pre"] = resid
        result["z"] = z
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
