"""AutoCircuit 1.0.1's edge attribution scores on a local HF GPT-2 directory, in tl-run's edge names.

Runs in AutoCircuit's own venv (benches/autocircuit_vs_tl_run.sh makes it:
~/.cache/tl-run/autocircuit-venv, auto-circuit==1.0.1 with transformer-lens 2.x, the last major
version that still has the HookedTransformer and HookedTransformerKeyValueCache AutoCircuit imports).

    autocircuit_eap.py MODEL_DIR PROMPTS.json OUT.json [--ig-samples 5] [--no-process]

MODEL_DIR: config.json, model.safetensors, tokenizer.json of a GPT-2 (read offline; no pickle, no
model code). The HookedTransformer is built from config.json, the safetensors state dict converted
by transformer_lens.pretrained.weight_conversions.convert_gpt2_weights and processed as
HookedTransformer.from_pretrained does by default (fold_ln, center_writing_weights,
center_unembed, fold_value_biases = tl-run's [model] defaults); --no-process keeps the raw weights
(match it with those four set false in tl-run's spec).

PROMPTS.json: AutoCircuit's own prompt format {"prompts": [{"clean", "corrupt", "answers",
"wrong_answers"}]}, read by auto_circuit.data.load_datasets_from_json (BOS prepended, no shuffle,
all prompts in one batch: AutoCircuit sums its per-batch mean losses' gradients over batches, so one
batch keeps its scores a mean over prompts).

The graph is patchable_model(factorized=True, separate_qkv=True, slice_output="last_seq",
seq_len=None) on the model with use_attn_result, use_split_qkv_input and use_hook_mlp_in set.
OUT.json holds {method: {edge: score}} with the edges renamed to tl-run's names
("Resid Start" -> input, "A1.2" -> a1.h2, "A1.2.Q" -> a1.h2<q>, "MLP 0" -> m0,
"Resid End" -> logits), for these AutoCircuit algorithms, all with resample ablation from the
corrupt prompts, logit grad, answer_function "avg_diff" (mean over the batch of
logit(answer) - logit(wrong answer) at the last position):

- "eap": mask_gradient_prune_scores(mask_val=0.0) - AutoCircuit's "Edge Attribution Patching"
  (LOGIT_DIFF_GRAD_PRUNE_ALGO), the gradient of the loss -logit_diff w.r.t. each edge's mask,
  i.e. sum over batch, positions, d_model of (z_src(corrupt) - z_src(clean)) * d(-logit_diff)/d(dest
  input) / batch size.
- "eap_slow": edge_attribution_patching_prune_scores, AutoCircuit's hook-based replication of
  Syed et al.'s code (EDGE_ATTR_PATCH_PRUNE_ALGO), documented as equal to "eap".
- "ieg": mask_gradient_prune_scores(integrated_grad_samples=m) - AutoCircuit's "Integrated Edge
  Gradients": the mask gradients SUMMED (not averaged) over mask values k/m, k = 0..m, every edge's
  mask set at once (0 = clean edge, 1 = corrupt edge), each gradient multiplying
  (z_src(corrupt) - z_src in that interpolated run).

The scores are written exactly as AutoCircuit returns them (no sign flip, no rescaling).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch as t  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights  # noqa: E402

from auto_circuit.data import load_datasets_from_json  # noqa: E402
from auto_circuit.prune_algos.edge_attribution_patching import (  # noqa: E402
    edge_attribution_patching_prune_scores,
)
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.types import AblationType  # noqa: E402
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402


def tl_name(node_name: str) -> str:
    """AutoCircuit node name -> tl-run node name."""
    if node_name == "Resid Start":
        return "input"
    if node_name == "Resid End":
        return "logits"
    if node_name.startswith("MLP "):
        return f"m{int(node_name[4:])}"
    assert node_name.startswith("A"), node_name
    parts = node_name[1:].split(".")
    head = f"a{int(parts[0])}.h{int(parts[1])}"
    return head if len(parts) == 2 else f"{head}<{parts[2].lower()}>"


def hf_modules(sd: dict) -> SimpleNamespace:
    """The HF GPT2LMHeadModel attribute tree convert_gpt2_weights reads (gpt2.transformer.h[l]
    .attn.c_attn.weight, ...), made from the safetensors state dict's names."""
    root: dict = {}
    for key, tensor in sd.items():
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        node = root
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    root.setdefault("lm_head", {"weight": root["transformer"]["wte"]["weight"]})  # tied

    def wrap(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [wrap(node[str(i)]) for i in range(len(node))]
        return SimpleNamespace(**{k: wrap(v) for k, v in node.items()})

    return wrap(root)


def build_model(model_dir: Path, process: bool) -> HookedTransformer:
    hf = json.loads((model_dir / "config.json").read_text())
    assert hf["model_type"] == "gpt2", hf["model_type"]
    n_embd, n_head = hf["n_embd"], hf["n_head"]
    cfg = HookedTransformerConfig(
        n_layers=hf["n_layer"],
        d_model=n_embd,
        n_heads=n_head,
        d_head=n_embd // n_head,
        d_mlp=hf.get("n_inner") or 4 * n_embd,
        n_ctx=hf["n_positions"],
        d_vocab=hf["vocab_size"],
        act_fn=hf.get("activation_function", "gelu_new"),
        eps=hf.get("layer_norm_epsilon", 1e-5),
        normalization_type="LNPre" if process else "LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        tokenizer_prepends_bos=False,
        device="cpu",
        dtype=t.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # tokenizer.json, offline
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    sd = convert_gpt2_weights(hf_modules(load_file(str(model_dir / "model.safetensors"))), cfg)
    # from_pretrained's path: the config says LNPre when folding, then the state dict is folded,
    # centred and its value biases folded into b_O while loading.
    model.load_and_process_state_dict(
        sd,
        fold_ln=process,
        center_writing_weights=process,
        center_unembed=process,
        fold_value_biases=process,
    )
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    return model


def edge_scores(model, prune_scores) -> dict:
    out = {}
    for edge in model.edges:
        name = f"{tl_name(edge.src.name)}->{tl_name(edge.dest.name)}"
        assert name not in out, name
        out[name] = float(prune_scores[edge.dest.module_name][edge.patch_idx].item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("prompts", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ig-samples", type=int, default=5)
    ap.add_argument("--no-process", action="store_true")
    args = ap.parse_args()
    t.manual_seed(0)

    model = build_model(args.model_dir, process=not args.no_process)
    n = len(json.loads(args.prompts.read_text())["prompts"])
    loader, _ = load_datasets_from_json(
        model,
        args.prompts,
        device=t.device("cpu"),
        prepend_bos=True,
        batch_size=n,
        train_test_size=(n, 0),
        shuffle=False,
        pad=False,
    )
    model = patchable_model(
        model, factorized=True, slice_output="last_seq", seq_len=None, separate_qkv=True
    )
    common = dict(
        model=model,
        dataloader=loader,
        official_edges=None,
        grad_function="logit",
        answer_function="avg_diff",
        ablation_type=AblationType.RESAMPLE,
        clean_corrupt="corrupt",
    )
    results = {
        "eap": edge_scores(model, mask_gradient_prune_scores(**common, mask_val=0.0)),
        "eap_slow": edge_scores(model, edge_attribution_patching_prune_scores(model, loader, None)),
        "ieg": edge_scores(
            model, mask_gradient_prune_scores(**common, integrated_grad_samples=args.ig_samples)
        ),
    }
    batch = next(iter(loader))
    with t.no_grad():
        clean_logits = model(batch.clean)[model.out_slice]
    import auto_circuit.utils.tensor_ops as ops

    results["meta"] = {
        "n_prompts": n,
        "seq_len": int(batch.clean.shape[1]),
        "clean_tokens": batch.clean.tolist(),
        "corrupt_tokens": batch.corrupt.tolist(),
        "clean_logit_diff": float(ops.batch_avg_answer_diff(clean_logits, batch)),
        "ig_samples": args.ig_samples,
        "processed_weights": not args.no_process,
        "n_edges": len(model.edges),
    }
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} ({len(model.edges)} edges)", file=sys.stderr)


if __name__ == "__main__":
    main()
