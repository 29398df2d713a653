"""Windows of layers restored together (ROME's causal tracing, `window = k`): a TransformerLens
loop that, for each layer l and position p, runs the corrupted prompts with the clean activation
put back at p in every layer of range(max(0, l - k // 2), min(n_layers, l - (-k // 2))), as
ROME's trace_important_window does, and measures the mean logit difference at the last position.

gpt2-odd (3 layers) reads the IOI prompts (corrupted prompt i = clean prompt i^1); stories260K
(the real 5-layer Llama) random tokens with position 5 changed. Writes
OUT_DIR/<fixture>/windows.safetensors with one [layer, pos] tensor per site and window.

Usage: python tests/oracle/dump_windows.py FIXTURES_DIR OUT_DIR
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import answer_ids, load, out_dir, prompt_set  # noqa: E402

FIXTURES = {"gpt2-odd": 4, "stories260K": 4}
SITES = ["mlp_out", "attn_out"]
# fixture -> key -> (site, [(layer, head or position)]): cells patched together.
UNITS = {
    "gpt2-odd": {"z_units": ("z", [(0, 1), (1, 2), (2, 0)]), "resid_pre_units": ("resid_pre", [(1, 10), (2, 12)])},
    "stories260K": {"z_units": ("z", [(0, 1), (2, 3), (4, 0)]), "resid_pre_units": ("resid_pre", [(1, 5), (3, 8)])},
}
# Each unit of UNITS alone too (key_<i>): the joint patch must differ from every one of them.
UNITS_ALONE = True
WINDOWS = [1, 2, 3]


def main() -> None:
    fixtures, out = sys.argv[1], sys.argv[2]
    for name, n in FIXTURES.items():
        model = load(fixtures, name)
        if name.startswith("gpt2"):
            prompts = prompt_set(name)[:n]
            clean = model.to_tokens([p["clean"] for p in prompts])
            corrupted = clean[[i ^ 1 for i in range(n)]]
            answers = answer_ids(model, prompts)
        else:
            gen = torch.Generator().manual_seed(5)
            clean = torch.randint(3, model.cfg.d_vocab, (n, 12), generator=gen)
            clean[:, 0] = 1  # BOS
            corrupted = clean.clone()
            corrupted[:, 5] = torch.randint(3, model.cfg.d_vocab, (n,), generator=gen)
            answers = torch.randint(3, model.cfg.d_vocab, (n, 2), generator=gen)

        def logit_diff(logits):
            last = logits[:, -1, :]
            return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

        n_layers, seq = model.cfg.n_layers, clean.shape[1]
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(clean)
            out_t = {
                "clean_tokens": clean, "corrupted_tokens": corrupted, "answers": answers,
                "clean_baseline": logit_diff(clean_logits).reshape(1),
                "corrupted_baseline": logit_diff(model(corrupted)).reshape(1),
            }
            for site in SITES:
                for k in WINDOWS:
                    result = torch.zeros(n_layers, seq)
                    for layer in range(n_layers):
                        window = range(max(0, layer - k // 2), min(n_layers, layer - (-k // 2)))
                        for pos in range(seq):
                            def restore(act, hook, pos=pos):
                                act[:, pos] = cache[hook.name][:, pos]
                                return act
                            hooks = [(f"blocks.{L}.hook_{site}", restore) for L in window]
                            result[layer, pos] = logit_diff(model.run_with_hooks(corrupted, fwd_hooks=hooks))
                    out_t[f"{site}_window{k}"] = result
            # Multi-site: units of one target restored together in one forward.
            for key, (site, units) in UNITS[name].items():
                def restore_unit(act, hook, site=site, units=units):
                    layer = int(hook.name.split(".")[1])
                    for L, i in units:
                        if L == layer and site == "z":
                            act[:, :, i] = cache[hook.name][:, :, i]
                        elif L == layer:
                            act[:, i] = cache[hook.name][:, i]
                    return act
                name_of = (lambda L: f"blocks.{L}.attn.hook_z") if site == "z" else (lambda L: f"blocks.{L}.hook_{site}")
                hooks = [(name_of(L), restore_unit) for L in sorted({L for L, _ in units})]
                out_t[key] = torch.tensor([logit_diff(model.run_with_hooks(corrupted, fwd_hooks=hooks))])
                for j, (L, i) in enumerate(units):
                    def restore_one(act, hook, site=site, i=i):
                        if site == "z":
                            act[:, :, i] = cache[hook.name][:, :, i]
                        else:
                            act[:, i] = cache[hook.name][:, i]
                        return act
                    alone = model.run_with_hooks(corrupted, fwd_hooks=[(name_of(L), restore_one)])
                    out_t[f"{key}_{j}"] = torch.tensor([logit_diff(alone)])
        save_file({k: v.contiguous() for k, v in out_t.items()}, os.path.join(out_dir(out, name), "windows.safetensors"))


if __name__ == "__main__":
    main()
