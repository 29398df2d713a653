"""What the oracle scripts share: where each fixture model lives, loading it into
TransformerLens 4.3's TransformerBridge (compatibility mode = from_pretrained's processing), and
the prompt sets of experiments/prompts/ that the Rust tests use too."""
import json
import os
import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens.model_bridge import TransformerBridge

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def fixture_dir(models: str, name: str) -> str:
    if name == "stories260K":
        return os.path.join(ROOT, "tests", "models", "stories260K")
    return os.path.join(models, name)


def load(models: str, name: str, attn_result: bool = False):
    model = TransformerBridge.boot_transformers(fixture_dir(models, name), device="cpu")
    model.enable_compatibility_mode(disable_warnings=True)
    if attn_result:
        model.set_use_attn_result(True)
    return model


with open(os.path.join(ROOT, "configs", "fixtures.toml"), "rb") as _f:
    # fixture name -> "gpt2" or "stories" (its tokenizer); stories260K is the vendored real model.
    TOKENIZER = {name: spec["tokenizer"] for family in tomllib.load(_f).values() for name, spec in family.items()}
TOKENIZER["stories260K"] = "stories"


def uses_gpt2_tokenizer(name: str) -> bool:
    """A fixture's tokenizer; names outside configs/fixtures.toml (benchmark models) by prefix."""
    return TOKENIZER.get(name, "gpt2" if name.startswith("gpt2") else "stories") == "gpt2"


def prompt_set(name: str) -> list:
    """Prompts of experiments/prompts/<fixture's set>.jsonl: GPT-2 tokenizers read ioi.jsonl,
    the sentencepiece (stories) tokenizers stories.jsonl."""
    path = os.path.join(ROOT, "experiments", "prompts", "ioi.jsonl" if uses_gpt2_tokenizer(name) else "stories.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_ids(model, prompts) -> torch.Tensor:
    """[n, 2] correct/incorrect token ids; answers must be single tokens."""
    out = []
    for p in prompts:
        ids = []
        for a in p["answers"]:
            t = model.to_tokens(a, prepend_bos=False)[0]
            assert t.shape[0] == 1, f"answer {a!r} is not one token: {t}"
            ids.append(int(t[0]))
        out.append(ids)
    return torch.tensor(out)


def out_dir(out: str, fixture: str) -> str:
    d = os.path.join(out, fixture)
    os.makedirs(d, exist_ok=True)
    return d
