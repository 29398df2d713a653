"""TransformerLens's patching.py on the fixtures: every activation-patching target, with the
IOI prompts of the Exploratory Analysis demo (corrupted prompt i = clean prompt i^1) and the
metric of the demo, the mean logit difference at the last position (raw, unnormalised; the
baselines are stored so normalisation can be checked too).

Writes OUT_DIR/<fixture>/patching.safetensors: one tensor per target (TL's own axis order),
plus clean/corrupted tokens, answer ids and the two baselines.

Usage: python tests/oracle/dump_patching.py FIXTURES_DIR OUT_DIR
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import answer_ids, load, out_dir, prompt_set  # noqa: E402

# fixture -> (number of prompts, targets). dest_src patching is one forward per (layer, head,
# dest, src) cell, so it runs on the smallest fixture only.
TARGETS = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "resid_mid": patching.get_act_patch_resid_mid,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
    "z_by_pos": patching.get_act_patch_attn_head_out_by_pos,
    "q_by_pos": patching.get_act_patch_attn_head_q_by_pos,
    "k_by_pos": patching.get_act_patch_attn_head_k_by_pos,
    "v_by_pos": patching.get_act_patch_attn_head_v_by_pos,
    "pattern_by_pos": patching.get_act_patch_attn_head_pattern_by_pos,
    "z_all_pos": patching.get_act_patch_attn_head_out_all_pos,
    "q_all_pos": patching.get_act_patch_attn_head_q_all_pos,
    "k_all_pos": patching.get_act_patch_attn_head_k_all_pos,
    "v_all_pos": patching.get_act_patch_attn_head_v_all_pos,
    "pattern_all_pos": patching.get_act_patch_attn_head_pattern_all_pos,
    "block_every": patching.get_act_patch_block_every,
    "all_pos_every": patching.get_act_patch_attn_head_all_pos_every,
    "by_pos_every": patching.get_act_patch_attn_head_by_pos_every,
}
FIXTURES = {
    "gpt2-tiny": (8, list(TARGETS) + ["pattern_dest_src", "resid_post", "resid_pre_logprob", "z_all_pos_prob"]),
    "gpt2-odd": (4, list(TARGETS) + ["resid_post"]),
    # Grouped-query attention (6 query heads over 2 key-value heads): k and v are patched over
    # key-value heads. Random token prompts; the corruption changes position 5.
    "llama-tiny": (4, [t for t in TARGETS if not t.endswith("_every")] + ["resid_post", "resid_pre_logprob", "z_all_pos_prob"]),
}


def resid_post(model, corrupted, cache, metric):
    return patching.generic_activation_patch(
        model, corrupted, cache, metric, patching.layer_pos_patch_setter, "resid_post",
        index_axis_names=("layer", "pos"))


def main() -> None:
    fixtures, out = sys.argv[1], sys.argv[2]
    for name, (n, targets) in FIXTURES.items():
        model = load(fixtures, name)
        if name.startswith("gpt2"):
            prompts = prompt_set(name)[:n]
            clean = model.to_tokens([p["clean"] for p in prompts])
            corrupted = clean[[i ^ 1 for i in range(n)]]
            answers = answer_ids(model, prompts)
        else:
            gen = torch.Generator().manual_seed(11)
            clean = torch.randint(3, model.cfg.d_vocab, (n, 12), generator=gen)
            clean[:, 0] = 1  # BOS
            corrupted = clean.clone()
            corrupted[:, 5] = torch.randint(3, model.cfg.d_vocab, (n,), generator=gen)
            answers = torch.randint(3, model.cfg.d_vocab, (n, 2), generator=gen)

        def logit_diff(logits):
            last = logits[:, -1, :]
            return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

        def logprob(logits):
            return logits[:, -1, :].log_softmax(-1).gather(1, answers[:, :1]).mean()

        def prob(logits):
            return logits[:, -1, :].softmax(-1).gather(1, answers[:, :1]).mean()

        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean)
            corrupted_logits = model(corrupted)
            out_t = {
                "clean_tokens": clean, "corrupted_tokens": corrupted, "answers": answers,
                "clean_baseline": logit_diff(clean_logits).reshape(1),
                "corrupted_baseline": logit_diff(corrupted_logits).reshape(1),
                "clean_logprob": logprob(clean_logits).reshape(1), "clean_prob": prob(clean_logits).reshape(1),
                "corrupted_logprob": logprob(corrupted_logits).reshape(1), "corrupted_prob": prob(corrupted_logits).reshape(1),
            }
            for t in targets:
                if t == "resid_pre_logprob":
                    r = TARGETS["resid_pre"](model, corrupted, clean_cache, logprob)
                elif t == "z_all_pos_prob":
                    r = TARGETS["z_all_pos"](model, corrupted, clean_cache, prob)
                elif t == "resid_post":
                    r = resid_post(model, corrupted, clean_cache, logit_diff)
                elif t == "pattern_dest_src":
                    r = patching.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, clean_cache, logit_diff)
                else:
                    try:
                        r = TARGETS[t](model, corrupted, clean_cache, logit_diff)
                    except Exception as e:  # TL issue #980: GQA k/v patching can crash
                        print(f"{name} {t}: TransformerLens failed: {e!r}", file=sys.stderr)
                        continue
                out_t[t] = torch.as_tensor(r).float().contiguous()
        save_file({k: v.contiguous() for k, v in out_t.items()}, os.path.join(out_dir(out, name), "patching.safetensors"))


if __name__ == "__main__":
    main()
