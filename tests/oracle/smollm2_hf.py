"""SmolLM2-135M-Instruct's Q4_1 GGUF as a plain HF directory for TransformerLens: transformers
dequantizes it (with the `gguf` package), and a GGUF-loaded model refuses save_pretrained, so its
state dict goes into a fresh LlamaForCausalLM saved as safetensors. (dump_smollm2.py does the same
inline; it is not changed here so that its cached oracle stays valid.)"""
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM


def save_hf_dir(gguf_path: str, out_dir: str) -> None:
    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    plain = LlamaForCausalLM(hf.config).eval()
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
