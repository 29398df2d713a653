"""The edge-attribution bench's Python reference: the work of benches/edge_attribution_smollm2.toml
done the way the EAP-IG code does it (Hanna et al. 2024), vectorized, on TransformerLens 4.3's
hooks (attn.hook_result, hook_q/k/v_input, hook_mlp_in) and the same weights:

- the senders' activation differences (corrupted - clean) in one [batch, pos, senders, d_model]
  tensor, filled by forward hooks in one corrupted and one clean forward;
- EAP: one clean forward + backward, each receiver's gradient contracted with the differences of
  the senders before it in a backward hook (einsum); EAP-IG: 5 such passes with hook_embed
  interpolated from corrupted to clean (k = 0..4);
- faithfulness of the top 10 .. 3000 EAP-IG edges (pruned to paths from the input to the
  logits): one clean forward per circuit in which each receiver's input gets
  sum over its senders outside the circuit of (corrupted output - this run's output).

Also times one plain forward + backward of HF transformers' model on the same batch (the bound
for EAP alone). Prints JSON: seconds per phase, the peak RSS, and the results (scores written to
OUT_DIR/{eap,eap_ig}.pt for the comparison with tl-run's).

Usage: python benches/ref_edge_attribution.py MODEL_DIR PROMPTS_JSONL OUT_DIR
"""
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformer_lens.model_bridge import TransformerBridge

model_dir, prompts_file, out_dir = sys.argv[1:4]
STEPS, SIZES = 5, [10, 30, 100, 300, 1000, 3000]
prompts = [json.loads(line) for line in open(prompts_file) if line.strip()]
model = TransformerBridge.boot_transformers(model_dir, device="cpu")
model.enable_compatibility_mode(disable_warnings=True)
model.set_use_attn_result(True)
model.set_use_split_qkv_input(True)
model.set_use_hook_mlp_in(True)
model.requires_grad_(False)
cfg = model.cfg
L, H, D = cfg.n_layers, cfg.n_heads, cfg.d_model
KV = getattr(cfg, "n_key_value_heads", None) or H
parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
clean = model.to_tokens([p["clean"] for p in prompts])
corrupted = model.to_tokens([p["corrupt"] for p in prompts])
correct = torch.tensor([model.to_single_token(p["answers"][0]) for p in prompts])
incorrect = torch.tensor([model.to_single_token(p["answers"][1]) for p in prompts])
N, P = clean.shape
rows = torch.arange(N)


def metric(logits):
    last = logits[:, -1]
    return last[rows, correct] - last[rows, incorrect]


# Senders: input, then per layer its heads and its MLP. Receivers: per layer q (H), k (KV),
# v (KV), mlp; then the logits. first[l]: the index of layer l's first sender.
S = 1 + L * (H + 1)
first = [1 + l * (H + 1) for l in range(L)]
R_LAYER = H + 2 * KV + 1
R = L * R_LAYER + 1
valid = torch.zeros(S, R, dtype=torch.bool)
for l in range(L):
    c = l * R_LAYER
    valid[: first[l], c : c + H + 2 * KV] = True
    valid[: first[l] + (0 if parallel else H), c + H + 2 * KV] = True
valid[:, R - 1] = True


def receiver_slots():
    """(hook name, column of its first receiver, senders before it, heads or None)."""
    out = []
    for l in range(L):
        c = l * R_LAYER
        out += [(f"blocks.{l}.hook_q_input", c, first[l], H), (f"blocks.{l}.hook_k_input", c + H, first[l], KV),
                (f"blocks.{l}.hook_v_input", c + H + KV, first[l], KV),
                (f"blocks.{l}.hook_mlp_in", c + H + 2 * KV, first[l] + (0 if parallel else H), None)]
    out.append((f"blocks.{L - 1}.hook_resid_post", R - 1, S, None))
    return out


def sender_slots():
    out = [("hook_embed", 0, None)]
    for l in range(L):
        out += [(f"blocks.{l}.attn.hook_result", first[l], H), (f"blocks.{l}.hook_mlp_out", first[l] + H, None)]
    return out


def fill(store, sign):
    def make(start, heads):
        def hook(act, hook):
            part = act if heads is not None else act.unsqueeze(2)
            store[:, :, start : start + part.shape[2]] += sign * part
            return act
        return hook
    return [(name, make(start, heads)) for name, start, heads in sender_slots()]


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


seconds = {}
with torch.no_grad():
    # The differences, and the corrupted outputs themselves for the faithfulness runs.
    def differences():
        diff = torch.zeros(N, P, S, D)
        corr = torch.zeros(N, P, S, D)
        m_corr = metric(model.run_with_hooks(corrupted, fwd_hooks=fill(corr, 1.0))).mean().item()
        diff += corr
        m_clean = metric(model.run_with_hooks(clean, fwd_hooks=fill(diff, -1.0))).mean().item()
        return diff, corr, m_clean, m_corr
    (diff, corr, m_clean, m_corr), seconds["clean and corrupted forwards"] = timed(differences)


def scores_from(passes):
    scores = torch.zeros(S, R)

    def make(col, prev, heads):
        def hook(act, hook):
            act = act.clone().requires_grad_(True)

            def backward(grad):
                g = grad if heads is not None else grad.unsqueeze(2)
                assert g.shape[2] == (heads or 1), f"{hook.name}: {g.shape[2]} receivers, expected {heads or 1}"
                scores[:prev, col : col + g.shape[2]] += torch.einsum("bpnd,bphd->nh", diff[:, :, :prev], g)
            act.register_hook(backward)
            return act
        return hook

    hooks = [(name, make(col, prev, heads)) for name, col, prev, heads in receiver_slots()]
    for embed in passes:
        fwd = list(hooks)
        if embed is not None:
            fwd.insert(0, ("hook_embed", lambda act, hook, e=embed: e.clone().requires_grad_(True)))
        with torch.enable_grad():
            metric(model.run_with_hooks(clean, fwd_hooks=fwd)).sum().backward()
    return scores / (N * len(passes)) * valid


eap, seconds["eap (1 forward + backward)"] = timed(lambda: scores_from([None]))
e_clean, e_corr = model.embed(clean), model.embed(corrupted)
eap_ig, seconds["eap_ig (5 forwards + backwards)"] = timed(
    lambda: scores_from([e_corr + (k / STEPS) * (e_clean - e_corr) for k in range(STEPS)]))

# A receiver is the input of one node (a k/v input of a grouped model: of each query head of its group).
member = torch.zeros(R, S + 1, dtype=torch.bool)
for l in range(L):
    c, group = l * R_LAYER, H // KV
    for h in range(H):
        member[c + h, first[l] + h] = True
        member[c + H + h // group, first[l] + h] = True
        member[c + H + KV + h // group, first[l] + h] = True
    member[c + H + 2 * KV, first[l] + H] = True
member[R - 1, S] = True


def prune(keep):
    while True:
        sends = torch.cat([keep.any(1), torch.tensor([False])])
        receives = (keep.any(0).float() @ member.float()) > 0
        alive = (sends & (receives | (torch.arange(S + 1) == 0))) | (torch.arange(S + 1) == S)
        new = keep & alive[:S, None] & ((member.float() @ alive.float()) > 0)[None, :]
        if torch.equal(new, keep):
            return keep
        keep = new


def top_n(scores, n):
    flat = scores.abs().where(valid, torch.tensor(-1.0)).flatten()
    keep = torch.zeros(S * R, dtype=torch.bool)
    keep[flat.topk(n).indices] = True
    return prune(keep.view(S, R))


def faithfulness(keep):
    off = (valid & ~keep).float()
    delta = torch.zeros(N, P, S, D)

    def sender(start, heads):
        def hook(act, hook):
            part = act if heads is not None else act.unsqueeze(2)
            delta[:, :, start : start + part.shape[2]] = corr[:, :, start : start + part.shape[2]] - part
            return act
        return hook

    def receiver(col, prev, heads):
        def hook(act, hook):
            width = heads or 1
            update = torch.einsum("bpnd,nr->bprd", delta[:, :, :prev], off[:prev, col : col + width])
            return act + (update if heads is not None else update[:, :, 0])
        return hook

    hooks = [(n, sender(s, h)) for n, s, h in sender_slots()] + [(n, receiver(c, p, h)) for n, c, p, h in receiver_slots()]
    with torch.no_grad():
        m = metric(model.run_with_hooks(clean, fwd_hooks=hooks)).mean().item()
    return {"edges": int(keep.sum()), "metric": m, "faithfulness": (m - m_corr) / (m_clean - m_corr)}


circuits, seconds["faithfulness (6 circuits)"] = timed(lambda: [dict(top_n=n, **faithfulness(top_n(eap_ig, n))) for n in SIZES])
work = sum(seconds.values())
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
os.makedirs(out_dir, exist_ok=True)

# Edge names as tl-run writes them (sender -> receiver), for the comparison.
sender_names = ["input"] + [n for l in range(L) for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
kvname = "kv" if KV != H else "h"
receiver_names = [n for l in range(L) for n in [f"a{l}.h{h}<q>" for h in range(H)]
                  + [f"a{l}.{kvname}{g}<k>" for g in range(KV)] + [f"a{l}.{kvname}{g}<v>" for g in range(KV)]
                  + [f"m{l}"]] + ["logits"]
at = valid.nonzero().tolist()
with open(os.path.join(out_dir, "scores.json"), "w") as f:
    json.dump({m: {f"{sender_names[s]}->{receiver_names[r]}": float(t[s, r]) for s, r in at}
               for m, t in [("eap", eap), ("eap_ig", eap_ig)]}, f)

# One plain forward + backward of HF transformers' model on the same batch (weights frozen).
from transformers import AutoModelForCausalLM

hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
hf.requires_grad_(False)


def fwd_bwd():
    embeds = hf.get_input_embeddings()(clean).detach().requires_grad_(True)
    metric(hf(inputs_embeds=embeds).logits).sum().backward()


fwd_bwd()
fwd_bwd_s = statistics.median(timed(fwd_bwd)[1] for _ in range(3))
print(json.dumps({"seconds": {k: round(v, 2) for k, v in seconds.items()}, "work_seconds": round(work, 2),
                  "fwd_bwd_seconds": round(fwd_bwd_s, 2), "peak_rss_gb": round(peak_gb, 2),
                  "clean_metric": m_clean, "corrupted_metric": m_corr, "circuits": circuits}))
