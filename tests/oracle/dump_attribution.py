"""Attribution patching on the fixtures, the reference for tl-run's attribution_patching runs.

AtP is TransformerLens's Attribution Patching demo: forward and backward hooks cache the
corrupted activations and the gradient of the normalised mean logit difference on the corrupted
run, and attr = (clean - corrupted) * grad summed over batch and the feature axis (and the axes
a cell covers). AtP*'s qk fix is computed by brute force: for each query/key cell a real forward
with that query/key patched gives the layer's attention pattern P', and the estimate is
sum((P' - P) * dmetric/dP). GradDrop re-runs the backward with the gradient through one layer's
attn_out and mlp_out stopped, for each layer, and takes sum_l |AtP_l - AtP| / (L - 1).

Writes OUT/<fixture>/attribution.safetensors: per target "<target>" (AtP), "qk/<target>" and
"gd/<target>", each flattened in activation patching's cell order, "real/resid_pre" (patching.py's
get_act_patch_resid_pre on the same prompts and metric, for verify_top), plus baselines and prompts.
Usage: python tests/oracle/dump_attribution.py MODELS_DIR OUT_DIR
"""
import json
import sys

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file

sys.path.insert(0, __import__("os").path.dirname(__file__))
from oracle_common import answer_ids, load, out_dir, prompt_set  # noqa: E402

# fixture -> number of prompts (corrupted prompt i = clean prompt i^1; equal token lengths).
FIXTURES = {"gpt2-tiny": 8, "gpt2-odd": 4, "llama-tiny": 2}
# target -> (hook, axes); axes as in activation patching.
TARGETS = {
    "resid_pre": ("hook_resid_pre", "layer_pos"), "attn_out": ("hook_attn_out", "layer_pos"),
    "mlp_out": ("hook_mlp_out", "layer_pos"), "resid_mid": ("hook_resid_mid", "layer_pos"),
    "z_by_pos": ("attn.hook_z", "layer_pos_head"), "q_by_pos": ("attn.hook_q", "layer_pos_head"),
    "k_by_pos": ("attn.hook_k", "layer_pos_head"), "v_by_pos": ("attn.hook_v", "layer_pos_head"),
    "z_all_pos": ("attn.hook_z", "layer_head"), "q_all_pos": ("attn.hook_q", "layer_head"),
    "k_all_pos": ("attn.hook_k", "layer_head"), "v_all_pos": ("attn.hook_v", "layer_head"),
    "pattern_all_pos": ("attn.hook_pattern", "layer_head"), "pattern_by_dest": ("attn.hook_pattern", "layer_head_dest"),
    "pattern_dest_src": ("attn.hook_pattern", "layer_head_dest_src"),
}


def reduce(x: torch.Tensor, hook: str, axes: str) -> torch.Tensor:
    """Sum over batch and whatever a cell covers; result flattened in cell order."""
    x = x.sum(0)
    if "pattern" in hook:  # [head, dest, src]
        return {"layer_head": x.sum((1, 2)), "layer_head_dest": x.sum(2), "layer_head_dest_src": x}[axes].flatten()
    if axes == "layer_pos":  # [pos, d_model]
        return x.sum(-1)
    if axes == "layer_pos_head":  # [pos, head, d_head]
        return x.sum(-1).flatten()
    return x.sum((0, 2))  # [head]


def fwd_bwd(model, tokens, metric, names, cut=None):
    acts, grads = {}, {}
    model.reset_hooks()
    if cut is not None:
        for n in (f"blocks.{cut}.hook_attn_out", f"blocks.{cut}.hook_mlp_out"):
            model.add_hook(n, lambda x, hook: x.detach() + (x - x.detach()) * 0)
    # Keyed by the name asked for: the bridge's hook.name can be an alias (blocks.0.hook_in).
    for n in names:
        model.add_hook(n, lambda x, hook, n=n: acts.__setitem__(n, x.detach()), "fwd")
        model.add_hook(n, lambda g, hook, n=n: grads.__setitem__(n, g.detach()), "bwd")
    metric(model(tokens)).backward()
    model.reset_hooks()
    # The bridge's hook_resid_mid is ln2's input alias: its backward hook sees only the gradient
    # through ln2, not through the residual connection. resid_mid = resid_pre + attn_out, so its
    # full gradient is attn_out's (HookedTransformer's demo reads the full one).
    for n in names:
        if n.endswith("hook_resid_mid"):
            grads[n] = grads[n.replace("hook_resid_mid", "hook_attn_out")]
    return acts, grads


def main() -> None:
    models, out = sys.argv[1], sys.argv[2]
    for name, n in FIXTURES.items():
        model = load(models, name)
        prompts = prompt_set(name)[:n]
        clean = torch.cat([model.to_tokens(p["clean"]) for p in prompts])
        corrupted = clean[[i ^ 1 for i in range(n)]]
        answers = answer_ids(model, prompts)
        L, H, seq = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
        targets = {k: v for k, v in TARGETS.items() if k != "pattern_dest_src" or name == "gpt2-tiny"}

        def logit_diff(logits):
            last = logits[:, -1, :]
            return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean)
            clean_b, corr_b = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()

        def metric(logits):
            return (logit_diff(logits) - corr_b) / (clean_b - corr_b)

        names = sorted({f"blocks.{l}.{h}" for l in range(L) for h, _ in targets.values()} | {f"blocks.{l}.hook_attn_out" for l in range(L)})
        acts, grads = fwd_bwd(model, corrupted, metric, names)
        t = {"clean_baseline": torch.tensor([clean_b]), "corrupted_baseline": torch.tensor([corr_b]), "answers": answers,
             "clean_tokens": clean}

        def atp(grads_):
            return {k: torch.cat([reduce((clean_cache[f"blocks.{l}.{h}"] - acts[f"blocks.{l}.{h}"]) * grads_[f"blocks.{l}.{h}"], h, a)
                                  for l in range(L)]) for k, (h, a) in targets.items()}

        base = atp(grads)
        t.update(base)
        # The real effects verify_top is checked against: patching.py on the same prompts and
        # metric, every resid_pre cell ([layer, pos], flattened).
        with torch.no_grad():
            t["real/resid_pre"] = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric).flatten()
        # GradDrop.
        spread = {k: torch.zeros_like(v) for k, v in base.items()}
        for cut in range(L):
            _, g = fwd_bwd(model, corrupted, metric, names, cut)
            for k, v in atp(g).items():
                spread[k] += (v - base[k]).abs()
        t.update({f"gd/{k}": v / max(L - 1, 1) for k, v in spread.items()})
        # AtP*'s qk fix, one real forward per cell.
        for k, (h, a) in targets.items():
            if h not in ("attn.hook_q", "attn.hook_k"):
                continue
            heads = model.cfg.n_key_value_heads if (h == "attn.hook_k" and getattr(model.cfg, "n_key_value_heads", None)) else H
            vals = []
            for l in range(L):
                name_ = f"blocks.{l}.{h}"
                p_name = f"blocks.{l}.attn.hook_pattern"
                cells = [(p, hh) for p in range(seq) for hh in range(heads)] if a == "layer_pos_head" else [(None, hh) for hh in range(heads)]
                for p, hh in cells:
                    got = {}

                    def patch(x, hook, p=p, hh=hh):
                        x = x.clone()
                        if p is None:
                            x[:, :, hh] = clean_cache[name_][:, :, hh]
                        else:
                            x[:, p, hh] = clean_cache[name_][:, p, hh]
                        return x

                    with torch.no_grad():
                        model.run_with_hooks(corrupted, fwd_hooks=[(name_, patch), (p_name, lambda x, hook: got.__setitem__("p", x))])
                    vals.append(((got["p"] - acts[p_name]) * grads[p_name]).sum())
            t[f"qk/{k}"] = torch.stack(vals)
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in t.items()},
                  f"{out_dir(out, name)}/attribution.safetensors",
                  metadata={"prompts": json.dumps(prompts)})


if __name__ == "__main__":
    main()
