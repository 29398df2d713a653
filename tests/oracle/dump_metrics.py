"""The metrics beyond one answer pair, through TransformerLens's patching.py on two fixtures
(GPT-2 and the grouped-query Llama): resid_pre patched over [layer, pos] with

- logit_diff over token sets: mean logit of each prompt's correct set minus the mean (or the max)
  of its incorrect set;
- prob_diff: p(correct set) − p(incorrect set) (greater-than's metric);
- logprob of a token set: log Σ p(correct set);
- kl_divergence: KL(clean ‖ patched) of the next-token distributions at the last position;
- a multi-token answer: Σ_j log p(answer token j), teacher-forced (the answer's tokens but its
  last appended to the clean and the corrupted prompt).

Sets have different sizes per prompt (padded, with a mask). Each value is the mean over prompts,
as the demo's metrics. Writes OUT_DIR/<fixture>/metrics.safetensors.

Usage: python tests/oracle/dump_metrics.py FIXTURES_DIR OUT_DIR
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformer_lens.patching as patching
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import answer_ids, load, out_dir, prompt_set  # noqa: E402

FIXTURES = {"gpt2-tiny": 8, "llama-tiny": 4}
ANSWER_LEN = 3


def token_sets(gen, first, n, vocab, sizes):
    """[n, 3] ids and mask: each prompt's set starts with `first[i]`, then random tokens."""
    ids = torch.randint(3, vocab, (n, 3), generator=gen)
    ids[:, 0] = first
    mask = torch.arange(3)[None, :] < sizes[:, None]
    ids = torch.where(mask, ids, ids[:, :1])
    return ids, mask


# Multi-token answers as a spec gives them (strings), 2 GPT-2 tokens each (one length: TL's
# patching takes no attention mask), different within each swap pair so that the corrupted prompt
# must carry the clean prompt's answer, not its own.
E2E_ANSWERS = [" Johnny boy", " Tomato soup", " Sidney Crosby", " Martin Luther",
               " Amy Adams", " Dan Brown", " James Bond", " John Lennon"]


def teacher_forced_from_text(model, prompts):
    """The metric of a spec with multi-token answers, built here from the strings: each
    answer's tokens but the last appended to its clean prompt and to its corrupted prompt (the
    pair partner), the sum of the answer tokens' log-probs, resid_pre patched over [layer, pos]."""
    n = len(prompts)
    ids = [model.to_tokens(a, prepend_bos=False)[0] for a in E2E_ANSWERS[:n]]
    assert all(len(t) == 2 for t in ids), [len(t) for t in ids]
    clean_rows = [model.to_tokens(p["clean"])[0] for p in prompts]
    clean = torch.stack([torch.cat([clean_rows[i], ids[i][:-1]]) for i in range(n)])
    corrupted = torch.stack([torch.cat([clean_rows[i ^ 1], ids[i][:-1]]) for i in range(n)])
    answer = torch.stack(ids)

    def answer_logprob(logits):
        lp = logits[:, -2:, :].log_softmax(-1)
        return lp.gather(2, answer[:, :, None]).squeeze(2).sum(1).mean()

    logits, cache = model.run_with_cache(clean)
    return {
        "e2e_clean": answer_logprob(logits).reshape(1),
        "e2e_corrupted": answer_logprob(model(corrupted)).reshape(1),
        "e2e_resid_pre": patching.get_act_patch_resid_pre(model, corrupted, cache, answer_logprob).float(),
        "e2e_clean_tokens": clean,
    }


def main() -> None:
    fixtures, out = sys.argv[1], sys.argv[2]
    for name, n in FIXTURES.items():
        model = load(fixtures, name)
        vocab = model.cfg.d_vocab
        gen = torch.Generator().manual_seed(23)
        if name.startswith("gpt2"):
            prompts = prompt_set(name)[:n]
            clean = model.to_tokens([p["clean"] for p in prompts])
            corrupted = clean[[i ^ 1 for i in range(n)]]
            pair = answer_ids(model, prompts)
        else:
            clean = torch.randint(3, vocab, (n, 12), generator=gen)
            clean[:, 0] = 1  # BOS
            corrupted = clean.clone()
            corrupted[:, 5] = torch.randint(3, vocab, (n,), generator=gen)
            pair = torch.randint(3, vocab, (n, 2), generator=gen)
        c_sizes = torch.tensor([1 + i % 3 for i in range(n)])
        w_sizes = torch.tensor([1 + (i + 1) % 3 for i in range(n)])
        correct, c_mask = token_sets(gen, pair[:, 0], n, vocab, c_sizes)
        wrong, w_mask = token_sets(gen, pair[:, 1], n, vocab, w_sizes)
        # Sets must not overlap: redraw any wrong token that is also correct.
        for i in range(n):
            for j in range(3):
                while bool((correct[i][c_mask[i]] == wrong[i, j]).any()):
                    wrong[i, j] = int(torch.randint(3, vocab, (1,), generator=gen))
            wrong[i] = torch.where(w_mask[i], wrong[i], wrong[i, 0])
        answer = torch.randint(3, vocab, (n, ANSWER_LEN), generator=gen)

        def set_logits(last, ids):
            return last.gather(1, ids)

        def logit_diff_mean(logits):
            last = logits[:, -1, :]
            c = (set_logits(last, correct) * c_mask).sum(1) / c_mask.sum(1)
            w = (set_logits(last, wrong) * w_mask).sum(1) / w_mask.sum(1)
            return (c - w).mean()

        def logit_diff_max(logits):
            last = logits[:, -1, :]
            c = (set_logits(last, correct) * c_mask).sum(1) / c_mask.sum(1)
            w = set_logits(last, wrong).masked_fill(~w_mask, float("-inf")).max(1).values
            return (c - w).mean()

        def set_prob(logits, ids, mask):
            p = logits[:, -1, :].softmax(-1)
            return (p.gather(1, ids) * mask).sum(1)

        def prob_diff(logits):
            return (set_prob(logits, correct, c_mask) - set_prob(logits, wrong, w_mask)).mean()

        def logprob_set(logits):
            return set_prob(logits, correct, c_mask).log().mean()

        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean)
            corrupted_logits = model(corrupted)
            clean_lp = clean_logits[:, -1, :].log_softmax(-1)

            def kl(logits):
                lp = logits[:, -1, :].log_softmax(-1)
                return torch.nn.functional.kl_div(lp, clean_lp, log_target=True, reduction="none").sum(-1).mean()

            out_t = {
                "clean_tokens": clean, "corrupted_tokens": corrupted,
                "correct": correct, "correct_mask": c_mask.long(), "wrong": wrong, "wrong_mask": w_mask.long(),
            }
            metrics = {"logit_diff_mean": logit_diff_mean, "logit_diff_max": logit_diff_max,
                       "prob_diff": prob_diff, "logprob_set": logprob_set, "kl_divergence": kl}
            for key, metric in metrics.items():
                out_t[f"{key}_clean"] = metric(clean_logits).reshape(1)
                out_t[f"{key}_corrupted"] = metric(corrupted_logits).reshape(1)
                out_t[key] = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric).float()

            # A multi-token answer, teacher-forced: the prompts run with its tokens but the last.
            tail = answer[:, : ANSWER_LEN - 1]
            clean_mt, corrupted_mt = torch.cat([clean, tail], 1), torch.cat([corrupted, tail], 1)

            def answer_logprob(logits):
                lp = logits[:, -ANSWER_LEN:, :].log_softmax(-1)
                return lp.gather(2, answer[:, :, None]).squeeze(2).sum(1).mean()

            mt_logits, mt_cache = model.run_with_cache(clean_mt)
            out_t.update({
                "answer": answer, "clean_tokens_mt": clean_mt, "corrupted_tokens_mt": corrupted_mt,
                "answer_logprob_clean": answer_logprob(mt_logits).reshape(1),
                "answer_logprob_corrupted": answer_logprob(model(corrupted_mt)).reshape(1),
                "answer_logprob": patching.get_act_patch_resid_pre(
                    model, corrupted_mt, mt_cache, answer_logprob).float(),
            })
            if name.startswith("gpt2"):
                out_t.update(teacher_forced_from_text(model, prompts))
                metadata = {"e2e_prompts": json.dumps([p["clean"] for p in prompts]), "e2e_answers": json.dumps(E2E_ANSWERS)}
            else:
                metadata = {}
        save_file({k: v.contiguous() for k, v in out_t.items()}, os.path.join(out_dir(out, name), "metrics.safetensors"), metadata)


if __name__ == "__main__":
    main()
