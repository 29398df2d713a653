"""Ablations and noise corruption on the fixtures with TransformerLens hooks, the reference for
tl-run's ablation runs and kind = "noise" corruption.

Ablations (run_with_hooks, one forward per ablated unit): zero / mean (over the prompts, per
position) / resample (the swapped prompt's activation) of each head's hook_z, mean of each
layer's attn_out and mlp_out, zero of each neuron's mlp.hook_post, mean of hook_z at the last
position only, zero of hook_z measured by the next-token loss; and the knock-out experiment:
mean-ablate two heads together, then per-head direct logit attribution of that run.
Noise (ROME causal tracing): torch.manual_seed(seed); noise = randn(samples, n, seq, d_model) *
noise * W_E.std() at the positions of a word, added at hook_embed by a permanent hook; then
patching.py's resid_pre / attn_out / mlp_out patching from the clean run with metric = mean
probability of the answer.

Writes OUT/<fixture>/ablation.safetensors. Usage: python tests/oracle/dump_ablation.py MODELS OUT
"""
import json
import sys

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file

sys.path.insert(0, __import__("os").path.dirname(__file__))
from oracle_common import answer_ids, load, out_dir, prompt_set  # noqa: E402

FIXTURES = {"gpt2-tiny": 8, "llama-tiny": 2}
KNOCKOUT = [(1, 0), (1, 2)]
NOISE = {"word": {"gpt2-tiny": " Mary", "llama-tiny": "Tim"}, "noise": 3.0, "samples": 3, "seed": 7, "prompts": 2}


def main() -> None:
    models, out = sys.argv[1], sys.argv[2]
    for name, n in FIXTURES.items():
        model = load(models, name, attn_result=True)
        prompts = prompt_set(name)[:n]
        clean = torch.cat([model.to_tokens(p["clean"]) for p in prompts])
        corrupted = clean[[i ^ 1 for i in range(n)]]
        answers = answer_ids(model, prompts)
        L, H, seq = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]

        def logit_diff(logits):
            last = logits[:, -1, :]
            return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean)
            _, corr_cache = model.run_with_cache(corrupted)
        t = {"clean_baseline": logit_diff(model(clean)).reshape(1), "clean_loss": model(clean, return_type="loss").reshape(1)}

        def sweep(hook, units, value, measure=logit_diff, positions=None, loss=False):
            vals = []
            for l in range(L):
                for u in units:
                    def fn(x, hook, l=l, u=u):
                        x = x.clone()
                        v = value(l).expand_as(x)
                        pos = slice(None) if positions is None else positions
                        if u is None:
                            x[:, pos] = v[:, pos]
                        else:
                            x[:, pos, u] = v[:, pos, u]
                        return x
                    with torch.no_grad():
                        if loss:
                            vals.append(model.run_with_hooks(clean, return_type="loss", fwd_hooks=[(f"blocks.{l}.{hook}", fn)]))
                        else:
                            vals.append(measure(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{l}.{hook}", fn)])))
            return torch.stack(vals)

        z = "attn.hook_z"
        zero = lambda h: (lambda l: torch.zeros_like(clean_cache[f"blocks.{l}.{h}"]))  # noqa: E731
        mean = lambda h: (lambda l: clean_cache[f"blocks.{l}.{h}"].mean(0, keepdim=True))  # noqa: E731
        heads = list(range(H))
        t["z_zero"] = sweep(z, heads, zero(z))
        t["z_mean"] = sweep(z, heads, mean(z))
        t["z_resample"] = sweep(z, heads, lambda l: corr_cache[f"blocks.{l}.{z}"])
        t["z_mean_last"] = sweep(z, heads, mean(z), positions=[seq - 1])
        t["z_zero_loss"] = sweep(z, heads, zero(z), loss=True)
        t["attn_out_mean"] = sweep("hook_attn_out", [None], mean("hook_attn_out"))
        t["mlp_out_mean"] = sweep("hook_mlp_out", [None], mean("hook_mlp_out"))
        t["mlp_post_zero"] = sweep("mlp.hook_post", list(range(model.cfg.d_mlp)), zero("mlp.hook_post"))
        # Knock out two heads together (mean), then per-head DLA of that run, per prompt.
        def knock(x, hook):
            x = x.clone()
            for kl, kh in KNOCKOUT:
                if f"blocks.{kl}." in hook.name:
                    x[:, :, kh] = clean_cache[f"blocks.{kl}.{z}"].mean(0, keepdim=True)[:, :, kh]
            return x
        for kl, _ in KNOCKOUT:
            model.add_hook(f"blocks.{kl}.{z}", knock)
        with torch.no_grad():
            logits, cache = model.run_with_cache(clean)
        model.reset_hooks()
        stack = cache.stack_head_results(layer=-1, pos_slice=-1)
        # [components, batch] -> [prompt, L*H]
        t["knockout_dla"] = cache.logit_attrs(stack, tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1).T
        t["knockout_logit_diff"] = logit_diff(logits).reshape(1)

        # Noise corruption (causal tracing) on the first prompts.
        m = NOISE["prompts"]
        word = model.to_tokens(NOISE["word"][name], prepend_bos=False)[0]
        toks = clean[:m]
        mask = torch.zeros(m, seq, dtype=torch.bool)
        for i in range(m):
            row = toks[i].tolist()
            w = word.tolist()
            start = next(j for j in range(seq - len(w) + 1) if row[j:j + len(w)] == w)
            mask[i, start:start + len(w)] = True
        torch.manual_seed(NOISE["seed"])
        S = NOISE["samples"]
        noise = torch.randn(S, m, seq, model.cfg.d_model) * (NOISE["noise"] * model.W_E.std()) * mask[None, :, :, None]
        noise = noise.reshape(S * m, seq, -1)
        tiled = toks.repeat(S, 1)
        ans = answers[:m].repeat(S, 1)

        def prob(logits):
            return logits[:, -1, :].softmax(-1).gather(1, ans[:, :1]).mean()

        with torch.no_grad():
            _, tiled_cache = model.run_with_cache(tiled)
            t["noise_clean_prob"] = prob(model(tiled)).reshape(1)
            model.add_hook("hook_embed", lambda x, hook: x + noise, is_permanent=True)
            t["noise_corrupted_prob"] = prob(model(tiled)).reshape(1)
            t["noise_resid_pre"] = patching.get_act_patch_resid_pre(model, tiled, tiled_cache, prob)
            t["noise_attn_out"] = patching.get_act_patch_attn_out(model, tiled, tiled_cache, prob)
            t["noise_mlp_out"] = patching.get_act_patch_mlp_out(model, tiled, tiled_cache, prob)
        model.reset_hooks(including_permanent=True)
        t["noise_mask"] = mask.to(torch.int64)
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in t.items()},
                  f"{out_dir(out, name)}/ablation.safetensors",
                  metadata={"prompts": json.dumps(prompts), "knockout": json.dumps(KNOCKOUT), "noise": json.dumps(NOISE)})


if __name__ == "__main__":
    main()
