"""SAEs made and run by SAELens 6.54 itself (in its own venv, scripts/sae_lens.sh): for each
architecture and normalisation, a random-init SAE saved in SAELens's on-disk format
(`save_model`: cfg.json + sae_weights.safetensors) and the values its hooks take on a seeded
input (`run_with_cache`: hook_sae_input, hook_sae_acts_pre, hook_sae_acts_post, hook_sae_recons,
hook_sae_output), written beside it as values.safetensors with the input as "x". One more folder
holds the TopK SAE's weights under a hand-written pre-6.0 flat cfg.json, with the values SAELens
computes after loading it back (`SAE.load_from_disk`).

Usage: python tests/oracle/sae_values.py OUT_DIR  (named so as not to shadow the sae_lens package)
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from sae_lens import (SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                      StandardSAEConfig, TopKSAE, TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata

out = sys.argv[1]
torch.manual_seed(0)
D_IN, D_SAE, HEADS = 16, 64, 4


def meta(hook="blocks.1.hook_resid_pre"):
    return SAEMetadata(hook_name=hook, model_name="fixture", hook_head_index=None, prepend_bos=True, context_size=16)


saes = {
    "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=meta())),
    "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True, metadata=meta())),
    "gated": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "hook_z": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, reshape_activations="hook_z",
                                            metadata=meta("blocks.1.attn.hook_z"))),
    "constant_norm_rescale": StandardSAE(StandardSAEConfig(
        d_in=D_IN, d_sae=D_SAE, normalize_activations="constant_norm_rescale", apply_b_dec_to_input=False,
        metadata=meta())),
    "layer_norm": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm",
                                                metadata=meta("blocks.1.hook_mlp_out"))),
}
HOOKS = ["hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"]


def values(sae, x):
    _, cache = sae.run_with_cache(x)
    return {h: cache[h].detach().clone().contiguous() for h in HOOKS}


with torch.no_grad():
    for name, sae in saes.items():
        # SAELens's init leaves biases, thresholds and gates at zero: every parameter drawn, so
        # each one changes the output.
        for _, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
        folder = os.path.join(out, name)
        sae.save_model(folder)
        x = torch.randn(3, 5, HEADS, D_IN // HEADS) if name == "hook_z" else torch.randn(3, 5, D_IN) * 2
        save_file({"x": x.contiguous(), **values(sae, x)}, os.path.join(folder, "values.safetensors"))

    # The TopK SAE under SAELens's pre-6.0 flat config, read back the way SAELens reads it.
    old = os.path.join(out, "topk_pre6")
    os.makedirs(old, exist_ok=True)
    shutil.copy(os.path.join(out, "topk", "sae_weights.safetensors"), old)
    with open(os.path.join(old, "cfg.json"), "w") as f:
        json.dump({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_point": "blocks.1.hook_resid_pre",
                   "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8},
                   "normalize_activations": False, "apply_b_dec_to_input": True, "model_name": "fixture",
                   "context_size": 16, "sae_lens_version": "3.5.0"}, f)
    loaded = SAE.load_from_disk(old)
    assert type(loaded).__name__ == "TopKSAE", type(loaded)
    x = torch.randn(3, 5, D_IN) * 2
    save_file({"x": x, **values(loaded, x)}, os.path.join(old, "values.safetensors"))
