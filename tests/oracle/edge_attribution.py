"""Edge attribution scores from TransformerLens 4.3 hooks, written from the definitions of
Hanna et al. 2024 and the EAP-IG code (not from tl-run): senders are hook_embed,
blocks.L.attn.hook_result (one per head) and blocks.L.hook_mlp_out; receivers are
blocks.L.hook_q_input / hook_k_input / hook_v_input (one per head; keys and values per key-value
head, as TransformerLens 4.3 splits them), blocks.L.hook_mlp_in and the last hook_resid_post.

  score(u -> v) = sum_{batch,pos,d} (z_u^corrupted - z_u^clean) * d metric / d input_v / N

with metric = sum over prompts of logit[correct] - logit[incorrect] at the last position, the
gradient taken on the clean run ("eap"), averaged over the clean and corrupted runs
("clean_corrupted"), or over STEPS runs on the clean tokens with hook_embed replaced by
corrupted + k/STEPS (clean - corrupted), k = 0..STEPS-1 ("eap_ig", the reference code's loop).

Circuits from the EAP scores (with "circuits" in the input): the top n edges by |score|, or n
edges grown greedily from the logits (a heap over the incoming edges of the nodes reached), then
pruned until every node left sends along a kept edge and receives along one (the input exempt,
the logits always kept; a key or value input of a grouped model belongs to every query head of
its group). Faithfulness: the clean prompts run with each receiver's input plus the sum over its
senders outside the circuit of (ablated output - output in this run), the ablated output being
the corrupted run's ("patching"), zero, or the clean run's mean over prompts ("mean").

Usage: python tests/oracle/edge_attribution.py MODEL_DIR INPUT_JSON OUT_JSON
INPUT_JSON: {"clean": [[ids]], "corrupted": [[ids]], "correct": [id], "incorrect": [id], "steps": m,
             "circuits": [{"top_n": [n], "greedy": [n], "intervention": "patching"}, ...]}
OUT_JSON: {"eap": {edge: score}, "eap_ig": {...}, "clean_corrupted": {...}, "clean_metric": x,
           "corrupted_metric": y, "circuits": [[{"selection", "requested", "edges": [names], "nodes",
           "metric"}]] (per input entry: each requested circuit, then the empty circuit and the whole graph),
           "exact": {edge: change} (with "exact": true: each edge alone patched, from the whole graph's metric)}
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens.model_bridge import TransformerBridge


def graph(cfg):
    """Senders and receivers as (name, hook, index) and the edges between them, by definition."""
    L, H = cfg.n_layers, cfg.n_heads
    KV = getattr(cfg, "n_key_value_heads", None) or H
    grouped = KV != H
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    senders = [("input", "hook_embed", None, -1, "input")]
    receivers = []
    for l in range(L):
        senders += [(f"a{l}.h{h}", f"blocks.{l}.attn.hook_result", h, l, "head") for h in range(H)]
        senders.append((f"m{l}", f"blocks.{l}.hook_mlp_out", None, l, "mlp"))
        receivers += [(f"a{l}.h{h}<q>", f"blocks.{l}.hook_q_input", h, l, "head") for h in range(H)]
        for x in "kv":
            name = "kv" if grouped else "h"
            receivers += [(f"a{l}.{name}{g}<{x}>", f"blocks.{l}.hook_{x}_input", g, l, "head") for g in range(KV)]
        receivers.append((f"m{l}", f"blocks.{l}.hook_mlp_in", None, l, "mlp"))
    receivers.append(("logits", f"blocks.{L - 1}.hook_resid_post", None, L, "logits"))

    def connects(s, r):
        _, _, _, ls, sk = s
        _, _, _, lr, rk = r
        if rk == "logits" or sk == "input":
            return True
        if rk == "mlp" and sk == "head":
            return ls < lr or (ls == lr and not parallel)
        return ls < lr

    edges = [(s, r) for r in receivers for s in senders if connects(s, r)]
    return senders, receivers, edges


def main() -> None:
    model_dir, inp, out = sys.argv[1:4]
    spec = json.load(open(inp))
    model = TransformerBridge.boot_transformers(model_dir, device="cpu")
    model.enable_compatibility_mode(disable_warnings=True)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    clean = torch.tensor(spec["clean"])
    corrupted = torch.tensor(spec["corrupted"])
    correct = torch.tensor(spec["correct"])
    incorrect = torch.tensor(spec["incorrect"])
    n = clean.shape[0]
    senders, receivers, edges = graph(model.cfg)
    sender_hooks = sorted({s[1] for s in senders})
    receiver_hooks = sorted({r[1] for r in receivers})

    def metric(logits):
        last = logits[:, -1]
        rows = torch.arange(n)
        return (last[rows, correct] - last[rows, incorrect]).sum()

    def sender_acts(tokens):
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=lambda h: h in sender_hooks)
        return {h: cache[h].detach().clone() for h in sender_hooks}, metric(logits).item()

    def receiver_grads(tokens, embed=None):
        saved = {}

        def keep(name):
            def hook(act, hook):
                # A copy: the bridge's hook_mlp_in hands ln2 the residual tensor itself, so the
                # residual stream's own gradient would land on it too; the receiver is the MLP's
                # input alone (an edit there changes the MLP alone).
                act = act.clone()
                act.retain_grad()
                saved[name] = act
                return act

            return hook

        # Keyed by the name asked for: the bridge may report an alias's canonical name.
        hooks = [(h, keep(h)) for h in receiver_hooks]
        if embed is not None:
            hooks.insert(0, ("hook_embed", lambda act, hook: embed.clone().requires_grad_(True)))
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            metric(logits).backward()
        return {h: saved[h].grad.detach().clone() for h in receiver_hooks}

    clean_acts, clean_metric = sender_acts(clean)
    corr_acts, corr_metric = sender_acts(corrupted)

    def delta(s):
        _, hook, idx, _, _ = s
        d = corr_acts[hook] - clean_acts[hook]
        return d[:, :, idx] if idx is not None else d

    def grad_of(grads, r):
        _, hook, idx, _, _ = r
        g = grads[hook]
        return g[:, :, idx] if idx is not None else g

    def scores(grad_sets):
        total = {}
        for s, r in edges:
            d = delta(s)
            total[f"{s[0]}->{r[0]}"] = sum(float((d * grad_of(g, r)).sum()) for g in grad_sets) / (n * len(grad_sets))
        return total

    result = {"clean_metric": clean_metric / n, "corrupted_metric": corr_metric / n}
    result["eap"] = scores([receiver_grads(clean)])
    result["clean_corrupted"] = scores([receiver_grads(clean), receiver_grads(corrupted)])
    steps = spec["steps"]
    e_clean, e_corr = clean_acts["hook_embed"], corr_acts["hook_embed"]
    result["eap_ig"] = scores(
        [receiver_grads(clean, e_corr + (k / steps) * (e_clean - e_corr)) for k in range(steps)]
    )
    if "circuits" in spec:
        result["circuits"] = [
            circuits(model, c, graph(model.cfg), result["eap"], clean, corrupted, lambda lg: metric_rows(lg, correct, incorrect))
            for c in spec["circuits"]
        ]
    if spec.get("exact"):
        result["exact"] = exact(model, graph(model.cfg), clean, corrupted, lambda lg: metric_rows(lg, correct, incorrect))
    with open(out, "w") as f:
        json.dump(result, f)


def metric_rows(logits, correct, incorrect):
    last = logits[:, -1]
    rows = torch.arange(last.shape[0])
    return last[rows, correct] - last[rows, incorrect]


def node_of_sender(s):
    return s[0]


def nodes_of_receiver(r, cfg):
    """The nodes whose input receiver r is (a grouped k/v input: every query head of its group)."""
    name = r[0]
    if name == "logits":
        return ["logits"]
    if name.startswith("m"):
        return [name]
    layer, rest = name[1:].split(".", 1)
    if rest.startswith("kv"):
        g = int(rest[2:].split("<")[0])
        group = cfg.n_heads // cfg.n_key_value_heads
        return [f"a{layer}.h{h}" for h in range(g * group, (g + 1) * group)]
    return [f"a{layer}.h{rest[1:].split('<')[0]}"]


def prune(edges, keep, cfg):
    while True:
        sends, receives = set(), set()
        for (s, r), k in zip(edges, keep):
            if k:
                sends.add(s[0])
                receives.update(nodes_of_receiver(r, cfg))

        def alive(node):
            return node == "logits" or (node in sends and (node == "input" or node in receives))

        changed = False
        for i, (s, r) in enumerate(edges):
            if keep[i] and not (alive(s[0]) and any(alive(x) for x in nodes_of_receiver(r, cfg))):
                keep[i] = False
                changed = True
        if not changed:
            return keep


def top_n(edges, scores, n, cfg):
    order = sorted(range(len(edges)), key=lambda i: (-abs(scores[i]), i))
    keep = [False] * len(edges)
    for i in order[:n]:
        keep[i] = True
    return prune(edges, keep, cfg)


def greedy(edges, scores, n, cfg):
    import heapq

    into = {}
    for i, (s, r) in enumerate(edges):
        for node in nodes_of_receiver(r, cfg):
            into.setdefault(node, []).append(i)
    heap = [(-abs(scores[i]), i) for i in into["logits"]]
    heapq.heapify(heap)
    queued = set(into["logits"])
    reached = {"logits"}
    keep = [False] * len(edges)
    added = 0
    while added < n and heap:
        _, i = heapq.heappop(heap)
        keep[i] = True
        added += 1
        sender = edges[i][0][0]
        if sender not in reached:
            reached.add(sender)
            for j in into.get(sender, []):
                if j not in queued:
                    queued.add(j)
                    heapq.heappush(heap, (-abs(scores[j]), j))
    return prune(edges, keep, cfg)


def circuits(model, spec, g, scores_by_name, clean, corrupted, metric_rows):
    senders, receivers, edges = g
    cfg = model.cfg
    names = [f"{s[0]}->{r[0]}" for s, r in edges]
    scores = [scores_by_name[n] for n in names]
    chosen = [("top_n", n, top_n(edges, scores, n, cfg)) for n in spec.get("top_n", [])]
    chosen += [("greedy", n, greedy(edges, scores, n, cfg)) for n in spec.get("greedy", [])]
    chosen += [("none", None, [False] * len(edges)), ("graph", None, [True] * len(edges))]
    metrics = evaluate(model, g, [keep for _, _, keep in chosen], spec["intervention"], clean, corrupted, metric_rows)
    out = []
    for (selection, requested, keep), m in zip(chosen, metrics):
        out.append({
            "selection": selection,
            "requested": requested,
            "edges": sorted(n for n, k in zip(names, keep) if k),
            "nodes": len({s[0] for (s, r), k in zip(edges, keep) if k} | {x for (s, r), k in zip(edges, keep) if k for x in nodes_of_receiver(r, cfg)}),
            "metric": m,
        })
    return out


def exact(model, g, clean, corrupted, metric_rows):
    """Each edge alone carrying its sender's corrupted output (every other edge its live one):
    the change of the metric's mean from the whole graph's."""
    _, _, edges = g
    masks = [[j != i for j in range(len(edges))] for i in range(len(edges))] + [[True] * len(edges)]
    metrics = evaluate(model, g, masks, "patching", clean, corrupted, metric_rows)
    return {f"{s[0]}->{r[0]}": m - metrics[-1] for (s, r), m in zip(edges, metrics[:-1])}


def evaluate(model, g, masks, intervention, clean, corrupted, metric_rows):
    """The metric's mean over prompts with each mask's edges live and the others ablated."""
    senders, receivers, edges = g
    sender_hooks = sorted({s[1] for s in senders})
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupted if intervention == "patching" else clean, names_filter=lambda h: h in sender_hooks)
    ablated = {h: cache[h].clone() for h in sender_hooks}
    if intervention == "zero":
        ablated = {h: torch.zeros_like(a) for h, a in ablated.items()}
    elif intervention == "mean":
        ablated = {h: a.mean(0, keepdim=True).expand_as(a).clone() for h, a in ablated.items()}

    def sender_value(acts, s):
        _, hook, idx, _, _ = s
        return acts[hook][:, :, idx] if idx is not None else acts[hook]

    out = []
    for keep in masks:
        off = {}
        for (s, r), k in zip(edges, keep):
            if not k:
                off.setdefault(r[0], []).append(s)
        live = {}

        def record(name):
            def hook(act, hook):
                live[name] = act
                return act

            return hook

        def patch(name):
            rs = [r for r in receivers if r[1] == name]

            def hook(act, hook):
                act = act.clone()
                for r in rs:
                    update = sum((sender_value(ablated, s) - sender_value(live, s) for s in off.get(r[0], [])), torch.zeros(()))
                    if r[2] is None:
                        act = act + update
                    else:
                        act[:, :, r[2]] += update
                return act

            return hook

        hooks = [(h, record(h)) for h in sender_hooks] + [(h, patch(h)) for h in sorted({r[1] for r in receivers})]
        with torch.no_grad():
            logits = model.run_with_hooks(clean, fwd_hooks=hooks)
        out.append(metric_rows(logits).mean().item())
    return out


if __name__ == "__main__":
    main()
