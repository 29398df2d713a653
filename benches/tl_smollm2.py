"""Writes SmolLM2-135M-Instruct's dequantized weights once as an HF safetensors directory
(transformers' own GGUF loading), so that TransformerLens can boot the same weights tl-run reads
from the GGUF; benches/smollm2_vs_transformer_lens.sh then times benches/gpu/tl_patching.py on it.

Usage: python benches/tl_smollm2.py GGUF_FILE HF_DIR
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

gguf, hf_dir = sys.argv[1], sys.argv[2]
if not os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
    d, f = os.path.split(os.path.realpath(gguf))
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    plain = LlamaForCausalLM(hf.config)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(hf_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(hf_dir)
