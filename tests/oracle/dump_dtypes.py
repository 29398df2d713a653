"""TransformerLens and HF transformers run in bfloat16 and float16 (and float32, for scale) on two
fixtures of different families, for tests/dtypes.rs's same-dtype comparison (issue #30).

Per dtype the model is booted in that dtype (TransformerBridge.boot_transformers(dtype=...): HF
loads the float32 checkpoint cast to the dtype) and put in compatibility mode, whose weight
processing (fold_ln, centering, fold_value_biases) upcasts the dtype's weights to float32, folds,
and casts the result back; every forward pass then runs in the dtype. The metric is
dump_zoo.py's, the mean logit difference at the last position (raw, unnormalised), taken on the
dtype's logits upcast to float32, as tl-run does. Prompts: the fixture's prompt set
(oracle_common.prompt_set; all of one token length, so nothing is padded) with each swap pair's
answers re-picked on the float32 model (pick_answers) as the tokens whose logit difference the
swap moves most, so that the signal is large against bf16's resolution (~0.01-0.02 logits of
rounding on these fixtures); corrupted prompt i = clean prompt i^1, answers stay with prompt i.

Writes OUT_DIR/<fixture>/dtypes.safetensors, every value float32 (tokens and answers int64):
  tokens, corrupted_tokens [n, pos], answers [n, 2]
  <dtype>/clean, <dtype>/corrupted       TL's mean logit difference on the clean / corrupted run [1]
  <dtype>/resid_pre                      patching.get_act_patch_resid_pre [layer, pos]
  <dtype>/z                              patching.get_act_patch_attn_head_out_all_pos [layer, head]
  <dtype>/tl_logprobs, <dtype>/hf_logprobs   log-softmax of the clean prompts' last-position logits [n, d_vocab]
  <dtype>/hf_clean, <dtype>/hf_corrupted, <dtype>/hf_resid_pre, <dtype>/hf_z
                                         the same metric and patching done on AutoModelForCausalLM in
                                         the dtype (eager attention, unprocessed weights) with
                                         forward hooks: how far two correct implementations in
                                         one dtype differ.
for <dtype> in float32, bfloat16, float16; metadata "prompts" (with the picked answers) as
dump_zoo.py. TransformerLens and transformers both run bfloat16 and float16 on the CPU.

Usage: python tests/oracle/dump_dtypes.py FIXTURES_DIR OUT_DIR [FIXTURE...]
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import answer_ids, fixture_dir, out_dir, prompt_set  # noqa: E402

# fixture -> indices of the prompts (one token length, so nothing is padded) of its prompt set.
# Two families whose swap effect with pick_answers's answers is large against bf16's resolution
# (clean − corrupted gap 2.6 logits, patching signals max |patched − corrupted| 1.4-2.7, bf16
# rounding ~0.01-0.02): Qwen3 (RMSNorm, per-head q/k norms, rotary, gated MLP) and GPT-Neo
# (LayerNorm, learned positions, a local-attention layer). gpt2-odd and llama-tiny reach signals of
# only 0.3-0.9 even with picked answers (0.05-0.2 with the IOI/stories answers), where two correct
# bf16 implementations differ by up to 6% of the signal, too close to the oracle guard's 1/20.
FIXTURES = {"qwen3-tiny": list(range(8)), "neo-tiny": list(range(8))}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tl(models: str, name: str, dtype: torch.dtype):
    model = TransformerBridge.boot_transformers(fixture_dir(models, name), device="cpu", dtype=dtype)
    model.enable_compatibility_mode(disable_warnings=True)
    return model


def pick_answers(model, prompts):
    """The prompts with each swap pair's answers replaced by the pair of tokens whose logit
    difference the swap moves most (float32 run): for clean prompts a, b (= a's corrupted) the
    gap clean − corrupted of the mean logit difference is D[c] − D[w], D = logits(a) − logits(b)
    at the last position, so c = argmax D, w = argmin D. Only tokens whose text (ASCII, printable,
    not blank) tokenizes back to that one token qualify."""
    def ok(tok):
        s = model.to_string(torch.tensor([tok]))
        if not (s.isascii() and s.isprintable() and s.strip()) or '"' in s or "\\" in s:
            return None
        back = model.to_tokens(s, prepend_bos=False)[0]
        return s if back.tolist() == [tok] else None

    out = []
    for a, b in zip(prompts[::2], prompts[1::2]):
        with torch.no_grad():
            logits = model(torch.cat([model.to_tokens(a["clean"]), model.to_tokens(b["clean"])]))[:, -1].float()
        d = logits[0] - logits[1]
        order = d.argsort(descending=True).tolist()
        c = next(s for s in map(ok, order) if s is not None)
        w = next(s for s in map(ok, reversed(order)) if s is not None)
        out += [{"clean": a["clean"], "answers": [c, w]}, {"clean": b["clean"], "answers": [w, c]}]
    return out


def hf_parts(hf, n_layers):
    """(decoder layers, each layer's attention output projection) of an HF causal LM: the
    ModuleList of n_layers blocks, and in each the attention's output projection, whose input is
    the heads' z concatenated ([batch, pos, n_heads * d_head])."""
    layers = next(m for m in hf.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers)
    ends = ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attn.c_proj", "attn.attention.out_proj")
    o_projs = [next(m for k, m in layer.named_modules() if k.endswith(ends)) for layer in layers]
    return layers, o_projs


def replace_first_arg(fn):
    """A forward pre-hook that rewrites a module's first input (positional or hidden_states=)."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    return hook


def hf_patching(hf, clean, corrupted, metric, n_heads):
    """patching.py's resid_pre [layer, pos] and z [layer, head] (all positions) on an HF model:
    resid_pre is a decoder layer's input, z the input of its attention output projection."""
    layers, o_projs = hf_parts(hf, hf.config.num_hidden_layers)
    cache = {}

    def saver(key):
        def hook(module, args, kwargs):
            cache[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [l.register_forward_pre_hook(saver(("resid", i)), with_kwargs=True) for i, l in enumerate(layers)]
    handles += [o.register_forward_pre_hook(saver(("z", i)), with_kwargs=True) for i, o in enumerate(o_projs)]
    hf(clean)
    for h in handles:
        h.remove()

    def patched(module, fn):
        h = module.register_forward_pre_hook(replace_first_arg(fn), with_kwargs=True)
        try:
            return metric(hf(corrupted).logits)
        finally:
            h.remove()

    L, seq = len(layers), clean.shape[1]
    resid = torch.zeros(L, seq)
    z = torch.zeros(L, n_heads)
    for l in range(L):
        for p in range(seq):
            def fn(x, l=l, p=p):
                x = x.clone()
                x[:, p] = cache[("resid", l)][:, p]
                return x
            resid[l, p] = patched(layers[l], fn)
        d_head = cache[("z", l)].shape[-1] // n_heads
        for h in range(n_heads):
            def fn(x, l=l, h=h):
                x = x.clone()
                x[..., h * d_head:(h + 1) * d_head] = cache[("z", l)][..., h * d_head:(h + 1) * d_head]
                return x
            z[l, h] = patched(o_projs[l], fn)
    return resid, z


def main() -> None:
    models, out = sys.argv[1], sys.argv[2]
    for name in sys.argv[3:] or FIXTURES:
        prompts = pick_answers(load_tl(models, name, torch.float32), [prompt_set(name)[i] for i in FIXTURES[name]])
        n = len(prompts)
        t = {}
        for key, dtype in DTYPES.items():
            model = load_tl(models, name, dtype)
            clean = torch.cat([model.to_tokens(p["clean"]) for p in prompts])
            corrupted = clean[[i ^ 1 for i in range(n)]]
            answers = answer_ids(model, prompts)
            if "tokens" in t:
                assert torch.equal(t["tokens"], clean) and torch.equal(t["answers"], answers)
            t["tokens"], t["corrupted_tokens"], t["answers"] = clean, corrupted, answers

            def logit_diff(logits):
                last = logits[:, -1, :].float()
                return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

            with torch.no_grad():
                clean_logits, clean_cache = model.run_with_cache(clean)
                assert clean_logits.dtype == dtype, f"{name} {key}: TransformerLens ran in {clean_logits.dtype}"
                t[f"{key}/clean"] = logit_diff(clean_logits).reshape(1)
                t[f"{key}/corrupted"] = logit_diff(model(corrupted)).reshape(1)
                t[f"{key}/tl_logprobs"] = clean_logits[:, -1, :].float().log_softmax(-1)
                t[f"{key}/resid_pre"] = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff)
                t[f"{key}/z"] = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, logit_diff)
                n_heads = model.cfg.n_heads
            del model, clean_cache

            hf = AutoModelForCausalLM.from_pretrained(fixture_dir(models, name), dtype=dtype, attn_implementation="eager").eval()
            with torch.no_grad():
                hf_logits = hf(clean).logits
                assert hf_logits.dtype == dtype, f"{name} {key}: transformers ran in {hf_logits.dtype}"
                t[f"{key}/hf_logprobs"] = hf_logits[:, -1, :].float().log_softmax(-1)
                t[f"{key}/hf_clean"] = logit_diff(hf_logits).reshape(1)
                t[f"{key}/hf_corrupted"] = logit_diff(hf(corrupted).logits).reshape(1)
                t[f"{key}/hf_resid_pre"], t[f"{key}/hf_z"] = hf_patching(hf, clean, corrupted, logit_diff, n_heads)
            del hf
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in t.items()},
                  os.path.join(out_dir(out, name), "dtypes.safetensors"), metadata={"prompts": json.dumps(prompts)})


if __name__ == "__main__":
    main()
