"""The experiment kinds on one fixture per further decoder family (configs/fixtures.toml):
TransformerLens's patching.py (resid_pre over [layer, pos], z over [layer, head]), the Attribution
Patching demo's AtP for the same two targets, and direct logit attribution per layer
(decompose_resid + logit_attrs) and, where the bridge computes per-head results, per head
(stack_head_results), causal_tracing.toml's noise tracing (patching.py on noised embeddings) and
induction.toml's stripe scores on repeated random tokens.
IOI prompts for GPT-2-tokenizer fixtures, the stories prompts otherwise;
corrupted prompt i = clean prompt i^1; metric: mean logit difference at the last position.

Writes OUT_DIR/<fixture>/zoo.safetensors.

Usage: python tests/oracle/dump_zoo.py FIXTURES_DIR OUT_DIR
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dump_attribution import fwd_bwd, reduce  # noqa: E402
from oracle_common import answer_ids, load, out_dir, prompt_set, uses_gpt2_tokenizer  # noqa: E402

ZOO = ["llama3-tiny", "llama-linear-tiny", "neo-tiny", "gptj-tiny", "neox-tiny", "opt-tiny", "mistral-tiny", "qwen2-tiny",
       "qwen3-tiny", "gemma-tiny", "gemma2-tiny", "phi-tiny", "phi3-tiny", "stablelm-tiny", "bloom-tiny"]


def main() -> None:
    models, out = sys.argv[1], sys.argv[2]
    for name in sys.argv[3:] or ZOO:
        model = load(models, name)
        try:
            model.set_use_attn_result(True)
            has_result = True
        except NotImplementedError:
            has_result = False  # GPT-Neo, GPT-J, OPT: no per-head results in the bridge
        prompts = prompt_set(name)[:4 if uses_gpt2_tokenizer(name) else 2]
        n = len(prompts)
        clean = torch.cat([model.to_tokens(p["clean"]) for p in prompts])
        corrupted = clean[[i ^ 1 for i in range(n)]]
        answers = answer_ids(model, prompts)
        L = model.cfg.n_layers

        def logit_diff(logits):
            last = logits[:, -1, :]
            return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean)
            clean_b, corr_b = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()
            t = {
                "clean_tokens": clean, "corrupted_tokens": corrupted, "answers": answers,
                "clean_baseline": torch.tensor([clean_b]), "corrupted_baseline": torch.tensor([corr_b]),
                "patch/resid_pre": patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff),
                "patch/z_all_pos": patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, logit_diff),
            }

        def metric(logits):
            return (logit_diff(logits) - corr_b) / (clean_b - corr_b)

        targets = {"resid_pre": ("hook_resid_pre", "layer_pos"), "z_all_pos": ("attn.hook_z", "layer_head")}
        names = sorted(f"blocks.{l}.{h}" for l in range(L) for h, _ in targets.values())
        acts, grads = fwd_bwd(model, corrupted, metric, names)
        for k, (h, a) in targets.items():
            t[f"atp/{k}"] = torch.cat([reduce((clean_cache[f"blocks.{l}.{h}"] - acts[f"blocks.{l}.{h}"]) * grads[f"blocks.{l}.{h}"], h, a)
                                       for l in range(L)])
        meta = {"prompts": json.dumps(prompts), "has_result": json.dumps(has_result)}
        dla = {"dla_layer": [], "dla_head": []}
        for i, p in enumerate(prompts):
            with torch.no_grad():
                _, cache = model.run_with_cache(model.to_tokens(p["clean"]))
            c, w = answers[i, 0], answers[i, 1]
            stacks = {}
            if "blocks.0.hook_attn_out" in cache.cache_dict:  # Bloom's hook_attn_out never fires in TL 4.3
                stacks["dla_layer"] = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
            if has_result:
                stacks["dla_head"] = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
            for key, (stack, labels) in stacks.items():
                dla[key].append(cache.logit_attrs(stack, tokens=c, incorrect_tokens=w, pos_slice=-1).reshape(-1))
                meta[key + "_labels"] = json.dumps(labels)
        for key, rows in dla.items():
            if rows:
                t[key] = torch.stack(rows)
        # experiments/causal_tracing.toml's kind (ROME noise, metric: probability of the correct
        # answer) on the first two prompts: noise 3.0 × std(W_E), 10 samples, seed 0, at the tokens
        # of " Mary" (GPT-2 tokenizer) or "Lily" (stories), patched back by patching.py.
        m, S = 2, 10
        word = model.to_tokens(" Mary" if uses_gpt2_tokenizer(name) else "Lily", prepend_bos=False)[0].tolist()
        toks = clean[:m]
        seq = toks.shape[1]
        mask = torch.zeros(m, seq, dtype=torch.bool)
        for i in range(m):
            row = toks[i].tolist()
            start = next(j for j in range(seq - len(word) + 1) if row[j:j + len(word)] == word)
            mask[i, start:start + len(word)] = True
        torch.manual_seed(0)
        noise = (torch.randn(S, m, seq, model.cfg.d_model) * (3.0 * model.W_E.std()) * mask[None, :, :, None]).reshape(S * m, seq, -1)
        tiled = toks.repeat(S, 1)
        ans = answers[:m].repeat(S, 1)

        def prob(logits):
            return logits[:, -1, :].softmax(-1).gather(1, ans[:, :1]).mean()

        with torch.no_grad():
            _, tiled_cache = model.run_with_cache(tiled)
            model.add_hook("hook_embed", lambda x, hook: x + noise, is_permanent=True)
            t["trace/corrupted_prob"] = prob(model(tiled)).reshape(1)
            for key, fn in [("resid_pre", patching.get_act_patch_resid_pre), ("attn_out", patching.get_act_patch_attn_out),
                            ("mlp_out", patching.get_act_patch_mlp_out)]:
                if f"blocks.0.hook_{key}" in tiled_cache.cache_dict:  # Bloom's hook_attn_out never fires in TL 4.3
                    t[f"trace/{key}"] = fn(model, tiled, tiled_cache, prob)
        model.reset_hooks(including_permanent=True)
        # experiments/induction.toml's stripes: 4 rows of 50 random tokens (seed 0; [1000, 10000)
        # for vocabularies over 10,000 tokens, else the whole vocabulary), each repeated, no BOS;
        # the Exploratory Analysis demo's mean attention on each stripe, [layer, head].
        batch, seq_len = 4, 50
        v = model.cfg.d_vocab
        lo, hi = (1000, 10000) if v > 10000 else (0, v)
        if 2 * seq_len <= model.cfg.n_ctx:
            torch.manual_seed(0)
            rand = torch.randint(lo, hi, (batch, seq_len))
            with torch.no_grad():
                _, cache = model.run_with_cache(torch.cat([rand, rand], dim=1))
            for label, offset in [("previous_token", -1), ("duplicate_token", -seq_len), ("induction", 1 - seq_len)]:
                t[f"induction/{label}"] = torch.stack([cache["pattern", l].diagonal(dim1=-2, dim2=-1, offset=offset).mean(dim=(0, 2))
                                                       for l in range(L)])
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in t.items()},
                  os.path.join(out_dir(out, name), "zoo.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
