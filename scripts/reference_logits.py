"""Reference logits for `tl-run check`, made with HF transformers: the ground truth that owes
nothing to tl-run. For each prompt it stores the token ids it ran and the logits at every
position, unprocessed, in float32 (safetensors: `tokens.<i>` [pos] int64, `logits.<i>` [pos,
vocab] float32; the prompts and the source in the metadata).

Tokens follow TransformerLens's `to_tokens`: a BOS is prepended unless the family's
TransformerLens default is not to (Bloom, GPT-NeoX, Phi, Qwen2, Qwen3), and `--prepend-bos yes|no`
overrides it (a zoo model's `prepend_bos` does the same).

Usage:
  python scripts/reference_logits.py MODEL --prompts FILE --out F.safetensors [--revision R]
      MODEL: a local directory, a .gguf file (read by transformers with the `gguf` package) or a
      hub id; FILE: .txt (one prompt per line), JSONL ({"clean"|"prompt": ...}) or pair JSON.
  python scripts/reference_logits.py --zoo ZOO.toml [--only NAME ...] [--out-dir DIR]
      every model of a zoo file, each written to its `reference` path (or DIR/<name>.safetensors).
"""
import argparse
import json
import os
import sys
import tomllib

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# TransformerLens's to_tokens prepends no BOS for these families' tokenizers.
NO_BOS_FAMILIES = {"bloom", "gpt_neox", "phi", "qwen2", "qwen3"}


def read_prompts(path: str) -> list:
    with open(path) as f:
        text = f.read()
    if path.endswith(".txt"):
        return [line for line in text.splitlines() if line.strip()]
    if text.lstrip().startswith("{") and '"prompts"' in text[:200]:
        try:
            return [p["clean"] for p in json.loads(text)["prompts"]]
        except json.JSONDecodeError:
            pass
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r.get("clean", r.get("prompt")) for r in rows]


def load(model: str, revision):
    """(model, tokenizer) in float32 from a directory, a .gguf file or a hub id."""
    kw = {"dtype": torch.float32}
    if model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(model))
        return (AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kw).eval(),
                AutoTokenizer.from_pretrained(d, gguf_file=f))
    rev = {"revision": revision} if revision else {}
    return (AutoModelForCausalLM.from_pretrained(model, **kw, **rev).eval(),
            AutoTokenizer.from_pretrained(model, **rev))


def tokens(tok, cfg, text: str, prepend_bos: str) -> list:
    bos = tok.bos_token_id if tok.bos_token_id is not None else getattr(cfg, "bos_token_id", None)
    want = cfg.model_type not in NO_BOS_FAMILIES if prepend_bos == "auto" else prepend_bos == "yes"
    ids = tok(text).input_ids
    adds_itself = len(tok("").input_ids) > 0
    if want and not adds_itself:
        if bos is None:
            sys.exit(f"prepend_bos is on but the tokenizer has no BOS token")
        ids = [bos] + ids
    elif not want and adds_itself and ids and ids[0] == bos:
        ids = ids[1:]
    return ids


def write(model: str, revision, prompts: list, out: str, prepend_bos: str) -> None:
    hf, tok = load(model, revision)
    t = {}
    with torch.no_grad():
        for i, text in enumerate(prompts):
            ids = tokens(tok, hf.config, text, prepend_bos)
            t[f"tokens.{i}"] = torch.tensor(ids, dtype=torch.int64)
            t[f"logits.{i}"] = hf(torch.tensor([ids])).logits[0].float().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    save_file(t, tmp, metadata={
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "source": f"transformers {transformers.__version__} float32",
        "model": model,
    })
    os.replace(tmp, out)
    print(f"wrote {out} ({len(prompts)} prompts, {model})")


def from_zoo(zoo: str, only: list, out_dir) -> None:
    with open(zoo, "rb") as f:
        z = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(zoo))
    defaults = z.get("defaults", {})
    for m in z["model"]:
        if only and m["name"] not in only:
            continue
        prompts = m.get("prompts") or (None if "prompts_file" in m else defaults.get("prompts"))
        if prompts is None:
            prompts = read_prompts(os.path.join(base, m.get("prompts_file") or defaults["prompts_file"]))
        model = m["id"] if "id" in m else os.path.join(base, m["path"])
        bos = {None: "auto", True: "yes", False: "no"}[m.get("prepend_bos")]
        out = os.path.join(out_dir, m["name"] + ".safetensors") if out_dir else os.path.join(base, m["reference"])
        write(model, m.get("revision"), prompts, out, bos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--revision")
    ap.add_argument("--prompts", help="prompt file (.txt, JSONL or pair JSON)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--out")
    ap.add_argument("--prepend-bos", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--zoo")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--out-dir")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.zoo:
        return from_zoo(a.zoo, a.only, a.out_dir)
    if not a.model or not a.out or not (a.prompts or a.prompt):
        ap.error("give MODEL, --out and --prompts (or --prompt), or --zoo")
    prompts = read_prompts(a.prompts) if a.prompts else a.prompt
    write(a.model, a.revision, prompts, a.out, a.prepend_bos)


if __name__ == "__main__":
    main()
