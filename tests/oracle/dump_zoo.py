"""The experiment kinds on one fixture per further decoder family (configs/fixtures.toml):
TransformerLens's patching.py (resid_pre over [layer, pos], z over [layer, head]), the Attribution
Patching demo's AtP for the same two targets, and direct logit attribution per layer
(decompose_resid + logit_attrs) and, where the bridge computes per-head results, per head
(stack_head_results), causal_tracing.toml's noise tracing (patching.py on noised embeddings) and
induction.toml's stripe scores on repeated random tokens.
IOI prompts for GPT-2-tokenizer fixtures, the stories prompts otherwise;
corrupted prompt i = clean prompt i^1; metric: mean logit difference at the last position.

Where TransformerLens 4.3 cannot (per-head results for GPT-Neo, GPT-J and OPT; hook_attn_out for
Bloom), the per-head and per-layer DLA come from HF transformers itself (hf_reference below):
each head's output z_h·W_O[h] read off the unprocessed HF model's output projection, and each
layer's attention and MLP output, taken to the processed model's quantity by the known
transformation of TransformerLens's processing and then through apply_ln_to_stack + logit_attrs
as TransformerLens would; the HF per-head outputs and attention outputs themselves are written
too (hf_result/blocks.{l} [batch, pos, head, d_model], hf_attn_out/blocks.{l} [batch, pos,
d_model], on clean_tokens) for the unprocessed hook_result check. metadata dla_*_source says
which ("transformer_lens" or "hf").

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
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dump_attribution import fwd_bwd, reduce  # noqa: E402
from oracle_common import answer_ids, fixture_dir, load, out_dir, prompt_set, uses_gpt2_tokenizer  # noqa: E402

ZOO = ["llama3-tiny", "llama-linear-tiny", "neo-tiny", "gptj-tiny", "neox-tiny", "opt-tiny", "mistral-tiny", "qwen2-tiny",
       "qwen3-tiny", "gemma-tiny", "gemma2-tiny", "phi-tiny", "phi3-tiny", "stablelm-tiny", "bloom-tiny"]


def hf_parts(hf) -> dict:
    """The HF modules the reference reads, per family: each layer's attention output projection
    (its input is z, heads concatenated head-major; its output, with bias, is attn_out), value
    projection (a vector's values, heads concatenated) and the norm before it (for the value-bias
    fold), MLP output; the modules whose
    outputs start the residual stream (embed, pos_embed); the final norm and the unembedding."""
    t = hf.config.model_type
    if t == "gpt_neo":
        tr, blocks = hf.transformer, hf.transformer.h
        attn = [b.attn.attention for b in blocks]
        return dict(out=[a.out_proj for a in attn], v=[a.v_proj for a in attn], ln1=[b.ln_1 for b in blocks],
                    mlp=[b.mlp for b in blocks], embeds=[tr.wte, tr.wpe], ln_f=tr.ln_f, n_heads=hf.config.num_heads)
    if t == "gptj":
        tr, blocks = hf.transformer, hf.transformer.h
        return dict(out=[b.attn.out_proj for b in blocks], v=[b.attn.v_proj for b in blocks], ln1=[b.ln_1 for b in blocks],
                    mlp=[b.mlp for b in blocks], embeds=[tr.wte], ln_f=tr.ln_f, n_heads=hf.config.n_head)
    if t == "opt":
        dec, blocks = hf.model.decoder, hf.model.decoder.layers
        assert dec.project_in is None and dec.project_out is None and hf.config.do_layer_norm_before
        return dict(out=[b.self_attn.out_proj for b in blocks], v=[b.self_attn.v_proj for b in blocks],
                    ln1=[b.self_attn_layer_norm for b in blocks], mlp=[b.fc2 for b in blocks],
                    embeds=[dec.embed_tokens, dec.embed_positions], ln_f=dec.final_layer_norm, n_heads=hf.config.num_attention_heads)
    if t == "bloom":
        tr, blocks = hf.transformer, hf.transformer.h
        assert hf.config.pretraining_tp == 1 or not hf.config.slow_but_exact  # self.dense is called
        assert not hf.config.apply_residual_connection_post_layernorm
        # hook_embed is the embedding norm's output (the residual stream starts there).
        H, e = hf.config.n_head, hf.config.hidden_size // hf.config.n_head
        # The fused query_key_value's output is [head, (q, k, v), d_head].
        v = [lambda x, a=b.self_attention: a.query_key_value(x).view(H, 3, e)[:, 2].reshape(-1) for b in blocks]
        return dict(out=[b.self_attention.dense for b in blocks], v=v, ln1=[b.input_layernorm for b in blocks], mlp=[b.mlp.dense_4h_to_h for b in blocks],
                    embeds=[tr.word_embeddings_layernorm], ln_f=tr.ln_f, n_heads=hf.config.n_head)
    raise NotImplementedError(f"no HF reference for model_type {t}")


def hf_reference(models: str, name: str, tokens: torch.Tensor) -> dict:
    """The unprocessed HF model's own components on `tokens`, read by forward hooks: per layer z
    (out projection's input) split into heads, each head's output z_h·W_O[h] (the h-th column
    slice of the out projection's weight, no bias), attn_out (the out projection's output, bias
    included), mlp_out; the embeddings; the final norm's input. Asserts that the components sum
    to that input and that each layer's heads plus b_O sum to attn_out."""
    hf = AutoModelForCausalLM.from_pretrained(fixture_dir(models, name), dtype=torch.float32).eval()
    p = hf_parts(hf)
    seen, handles = {}, []

    def keep(key, take_input=False):
        return lambda mod, inp, out: seen.__setitem__(key, (inp[0] if take_input else out).detach())

    for l, m in enumerate(p["out"]):
        handles += [m.register_forward_hook(keep(("z", l), take_input=True)), m.register_forward_hook(keep(("attn_out", l)))]
    for l, m in enumerate(p["mlp"]):
        handles.append(m.register_forward_hook(keep(("mlp_out", l))))
    for i, m in enumerate(p["embeds"]):
        handles.append(m.register_forward_hook(keep(("embed", i))))
    handles.append(p["ln_f"].register_forward_hook(keep("resid_final", take_input=True)))
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    H, d = p["n_heads"], hf.config.hidden_size
    e = d // H
    # (Position embeddings may come out as [1, pos, d_model].)
    r = {"embeds": [seen[("embed", i)].expand(*tokens.shape, -1) for i in range(len(p["embeds"]))], "result": [], "z": [], "attn_out": [], "mlp_out": [],
         "fold": [], "W_O": [], "ln_f_w": p["ln_f"].weight.detach(),
         "W_U": hf.get_output_embeddings().weight.detach().T, "resid_final": seen["resid_final"]}
    total = sum(r["embeds"])
    for l, out in enumerate(p["out"]):
        z = seen[("z", l)].reshape(*tokens.shape, H, e)
        W_O = out.weight.detach().reshape(d, H, e).permute(1, 2, 0)  # [head, d_head, d_model]
        result = torch.einsum("bphe,hed->bphd", z, W_O)
        b_O = out.bias.detach() if out.bias is not None else torch.zeros(d)
        assert (result.sum(2) + b_O - seen[("attn_out", l)]).abs().max() < 1e-5 * seen[("attn_out", l)].abs().max()
        # fold_ln + fold_value_biases: the processed model's values lack the constant v_proj(ln1.bias)
        # (ln1's bias through W_V, plus b_V) that every value vector of this layer carries; the
        # pattern sums to one, so its z_h is the HF z_h minus that constant's head-h slice.
        fold = p["v"][l](p["ln1"][l].bias).detach().reshape(H, e)
        r["z"].append(z), r["result"].append(result), r["W_O"].append(W_O), r["fold"].append(fold)
        mlp_out = seen[("mlp_out", l)].reshape(*tokens.shape, d)  # OPT's MLP runs on [batch·pos, d_model]
        r["attn_out"].append(seen[("attn_out", l)]), r["mlp_out"].append(mlp_out)
        total = total + seen[("attn_out", l)] + mlp_out
    assert (total - r["resid_final"]).abs().max() < 1e-4 * r["resid_final"].abs().max(), f"{name}: HF components do not sum to ln_f's input"
    return r


def hf_logit_attrs(ref: dict, stack: torch.Tensor, scale: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """TransformerLens's apply_ln_to_stack + logit_attrs on the processed model, from unprocessed
    components `stack` [n, components, d_model] at the last position: centre each component
    (LayerNorm; center_writing_weights has already centred the processed one, and centring
    twice is centring once), divide by the prompt's ln_final scale [n] (TransformerLens's cache;
    the processed residual is the HF one centred, which LayerNorm's scale does not see), dot with
    the processed answer direction W_U[:, c] − W_U[:, w], where fold_ln multiplied W_U's rows by
    ln_final's weight (its bias went into b_U, which logit_attrs leaves out) and center_unembed
    subtracted from each row a constant that the difference cancels. [n, components]"""
    W_U = ref["W_U"]
    direction = ref["ln_f_w"][None, :] * (W_U[:, answers[:, 0]] - W_U[:, answers[:, 1]]).T  # [n, d]
    centred = stack - stack.mean(-1, keepdim=True)
    return (centred / scale[:, None, None] * direction[:, None, :]).sum(-1)


def hf_dla(ref: dict, scale: torch.Tensor, answers: torch.Tensor, n_layers: int) -> dict:
    """dla_layer (decompose_resid's components) and dla_head (stack_head_results') from the HF
    reference, [n, components] each, with their labels."""
    n = answers.shape[0]
    last = lambda t: t[:n, -1]  # noqa: E731
    layer = [last(x) for x in ref["embeds"]]
    labels = ["embed", "pos_embed"][:len(layer)]
    for l in range(n_layers):
        layer += [last(ref["attn_out"][l]), last(ref["mlp_out"][l])]
        labels += [f"{l}_attn_out", f"{l}_mlp_out"]
    heads, head_labels = [], []
    for l in range(n_layers):
        z = last(ref["z"][l]) - ref["fold"][l]  # [n, head, d_head]
        heads.append(torch.einsum("nhe,hed->nhd", z, ref["W_O"][l]))
        head_labels += [f"L{l}H{h}" for h in range(z.shape[1])]
    return {"dla_layer": (hf_logit_attrs(ref, torch.stack(layer, 1), scale, answers), labels),
            "dla_head": (hf_logit_attrs(ref, torch.cat(heads, 1), scale, answers), head_labels)}


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
        scales, by_hand = [], {"dla_layer": [], "dla_head": []}
        for i, p in enumerate(prompts):
            with torch.no_grad():
                _, cache = model.run_with_cache(model.to_tokens(p["clean"]))
            c, w = answers[i, 0], answers[i, 1]
            scales.append(cache["ln_final.hook_scale"][0, -1, 0])
            stacks = {}
            if "blocks.0.hook_attn_out" in cache.cache_dict:  # Bloom's hook_attn_out never fires in TL 4.3
                stacks["dla_layer"] = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
            if has_result:
                stacks["dla_head"] = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
            else:
                # TransformerLens's own processed z·W_O through its logit_attrs, to check the HF
                # reference's transformation against (not written out).
                with torch.no_grad():
                    stack = torch.cat([torch.einsum("bhe,hed->hbd", cache[f"blocks.{l}.attn.hook_z"][:, -1], model.blocks[l].attn.W_O)
                                       for l in range(L)])
                    by_hand["dla_head"].append(cache.logit_attrs(stack, tokens=c, incorrect_tokens=w, pos_slice=-1).reshape(-1))
            if "dla_layer" not in stacks:
                # The same for the layers: attn_out as resid_mid − resid_pre.
                parts = [cache[k][:, -1] for k in ["hook_embed", "hook_pos_embed"] if k in cache.cache_dict]
                for l in range(L):
                    parts += [cache[f"blocks.{l}.hook_resid_mid"][:, -1] - cache[f"blocks.{l}.hook_resid_pre"][:, -1],
                              cache[f"blocks.{l}.hook_mlp_out"][:, -1]]
                with torch.no_grad():
                    by_hand["dla_layer"].append(cache.logit_attrs(torch.stack(parts), tokens=c, incorrect_tokens=w, pos_slice=-1).reshape(-1))
            for key, (stack, labels) in stacks.items():
                dla[key].append(cache.logit_attrs(stack, tokens=c, incorrect_tokens=w, pos_slice=-1).reshape(-1))
                meta[key + "_labels"] = json.dumps(labels)
                meta[key + "_source"] = json.dumps("transformer_lens")
        for key, rows in dla.items():
            if rows:
                t[key] = torch.stack(rows)
        if not has_result or "dla_layer" not in t:
            ref = hf_reference(models, name, clean)
            ours = hf_dla(ref, torch.stack(scales), answers, L)
            for key, (values, labels) in ours.items():
                # Where TransformerLens computed it (or else its own processed components through
                # its logit_attrs), the HF reference must agree with it: the transformation is right.
                tl = torch.stack(by_hand[key]) if by_hand[key] else t[key]
                if key in t:
                    assert json.loads(meta[key + "_labels"]) == labels, (name, key, labels)
                else:
                    t[key] = values
                    meta[key + "_labels"] = json.dumps(labels)
                    meta[key + "_source"] = json.dumps("hf")
                err = (tl - values).abs().max().item()
                print(f"{name} {key} ({json.loads(meta[key + '_source'])}): max |value| {values.abs().max().item():.3e}; "
                      f"HF reference vs TransformerLens max |diff| {err:.2e}", file=sys.stderr)
                assert err < 1e-5 * tl.abs().max().item(), f"{name} {key}: the HF reference differs from TransformerLens by {err:.2e}"
            if not has_result:
                for l in range(L):
                    t[f"hf_result/blocks.{l}"] = ref["result"][l]
                    t[f"hf_attn_out/blocks.{l}"] = ref["attn_out"][l]
                print(f"{name} hf_result: max |value| {max(x.abs().max().item() for x in ref['result']):.3e}; hf_attn_out: "
                      f"{max(x.abs().max().item() for x in ref['attn_out']):.3e}", file=sys.stderr)
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
