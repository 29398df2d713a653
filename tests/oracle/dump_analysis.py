"""TransformerLens's cache analysis and head detector on the fixtures, the reference for
tl-run's logit_lens, direct_logit_attribution and head_scores runs.

Per prompt of experiments/prompts/<set>.jsonl, each run alone (no padding): the logit lens
(accumulated_resid(incl_mid=True, apply_ln=True) along W_U[:, correct] - W_U[:, incorrect] at the
last position, and the top-5 tokens there), direct logit attribution per layer (decompose_resid),
per head (stack_head_results) and per neuron (stack_neuron_results) through logit_attrs, and the
final logit difference. head_detector.detect_head over the prompt list for each named pattern,
error measure and exclusion; a custom lower-triangular pattern on one prompt; and the
Exploratory Analysis demo's stripe scores on repeated random tokens.

Writes OUT/<fixture>/analysis.safetensors (labels in its metadata).
Usage: python tests/oracle/dump_analysis.py MODELS_DIR OUT_DIR
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformer_lens.head_detector import detect_head

sys.path.insert(0, __import__("os").path.dirname(__file__))
from oracle_common import answer_ids, load, out_dir, prompt_set  # noqa: E402

FIXTURES = ["gpt2-tiny", "gpt2-odd", "llama-tiny", "stories260K"]
TOP_K = 5
# Repeated random tokens (the Exploratory Analysis demo): batch, seq_len, seed, token range.
REPEATED = {"gpt2": (3, 10, 5, 1000, 10000), "other": (3, 10, 5, 3, 512)}


def custom_pattern(seq: int) -> torch.Tensor:
    """Attends to the token two back and to the first token (lower triangular, 0/1)."""
    d = torch.zeros(seq, seq)
    for i in range(seq):
        d[i, 0] = 1
        if i >= 2:
            d[i, i - 2] = 1
    return d


def main() -> None:
    models, out = sys.argv[1], sys.argv[2]
    for name in FIXTURES:
        model = load(models, name, attn_result=True)
        prompts = prompt_set(name)
        texts = [p["clean"] for p in prompts]
        answers = answer_ids(model, prompts)
        t = {"answers": answers}
        meta = {}
        lens, topk_ids, topk_probs, dla_layer, dla_head, dla_neuron, final = [], [], [], [], [], [], []
        for i, text in enumerate(texts):
            tokens = model.to_tokens(text)
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens)
            c, w = answers[i, 0], answers[i, 1]
            direction = model.W_U[:, c] - model.W_U[:, w]
            final.append(logits[0, -1, c] - logits[0, -1, w])
            acc, labels = cache.accumulated_resid(layer=-1, incl_mid=True, apply_ln=True, return_labels=True)
            meta["lens_labels"] = labels
            last = acc[:, 0, -1, :]  # [labels, d_model]
            lens.append(last @ direction)
            probs = (last @ model.W_U + model.b_U).softmax(-1)
            p, ix = probs.topk(TOP_K, dim=-1)
            topk_ids.append(ix)
            topk_probs.append(p)
            for key, (stack, labels) in {
                "dla_layer": cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True),
                "dla_head": cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True),
                "dla_neuron": cache.stack_neuron_results(layer=-1, pos_slice=-1, return_labels=True),
            }.items():
                attrs = cache.logit_attrs(stack, tokens=c, incorrect_tokens=w, pos_slice=-1)
                {"dla_layer": dla_layer, "dla_head": dla_head, "dla_neuron": dla_neuron}[key].append(attrs.reshape(-1))
                meta[key + "_labels"] = labels
        t.update(lens=torch.stack(lens), lens_topk_ids=torch.stack(topk_ids), lens_topk_probs=torch.stack(topk_probs),
                 dla_layer=torch.stack(dla_layer), dla_head=torch.stack(dla_head), dla_neuron=torch.stack(dla_neuron),
                 final_logit_diff=torch.stack(final))
        # The head detector, over the whole prompt list (TL scores prompt by prompt and averages).
        for pattern in ["previous_token_head", "duplicate_token_head", "induction_head"]:
            for measure in ["mul", "abs"]:
                for excl in [False, True]:
                    s = detect_head(model, texts, pattern, exclude_bos=excl, exclude_current_token=excl, error_measure=measure)
                    t[f"heads/{pattern.removesuffix('_head')}/{measure}/{'excl' if excl else 'all'}"] = s
        seq = model.to_tokens(texts[0]).shape[1]
        t["heads/custom/mul/all"] = detect_head(model, texts[0], custom_pattern(seq), error_measure="mul")
        t["heads/custom/abs/excl"] = detect_head(model, texts[0], custom_pattern(seq), error_measure="abs",
                                                 exclude_bos=True, exclude_current_token=True)
        # Repeated random tokens, scored as the Exploratory Analysis demo does (mean of stripes).
        batch, seq_len, seed, lo, hi = REPEATED["gpt2" if name.startswith("gpt2") else "other"]
        torch.manual_seed(seed)
        rand = torch.randint(lo, hi, (batch, seq_len))
        rep = torch.cat([rand, rand], dim=1)
        with torch.no_grad():
            _, cache = model.run_with_cache(rep)
        for label, offset in [("previous_token", -1), ("duplicate_token", -seq_len), ("induction", 1 - seq_len)]:
            t[f"repeated/{label}"] = torch.stack([
                cache["pattern", l].diagonal(dim1=-2, dim2=-1, offset=offset).mean(dim=(0, 2))
                for l in range(model.cfg.n_layers)])
        t["repeated/tokens"] = rep
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in t.items()},
                  f"{out_dir(out, name)}/analysis.safetensors",
                  metadata={k: json.dumps(v) for k, v in meta.items()} | {"prompts": json.dumps(texts)})


if __name__ == "__main__":
    main()
