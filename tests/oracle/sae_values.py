"""SAEs made and run by SAELens 6.54 itself (in its own venv, scripts/sae_lens.sh): for each
architecture and normalisation, a random-init SAE saved in SAELens's on-disk format
(`save_model`: cfg.json + sae_weights.safetensors) and the values its hooks take on a seeded
input (`run_with_cache`: hook_sae_input, hook_sae_acts_pre, hook_sae_acts_post, hook_sae_recons,
hook_sae_output), written beside it as values.safetensors with the input as "x", and the config
SAELens reads back as cfg_read.json. Every folder's values come from the SAE SAELens loads back
(`SAE.load_from_disk`), so its reading of the file is what is compared. More folders hold the
TopK and hook_z SAEs' weights under hand-written pre-6.0 flat cfg.json files. Two fixtures put
the activation's edge cases on the inputs: a TopK SAE whose rows have fewer than k positive
pre-activations (its ReLU after the selection matters), and a JumpReLU SAE whose threshold
equals pre-activations it reaches exactly (strict >), with a gated SAE whose gate pre-activation
is exactly 0 in places (gate > 0).

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
D_IN, D_SAE, HEADS = 16, 64, 2


def meta(hook="blocks.1.hook_resid_pre"):
    return SAEMetadata(hook_name=hook, model_name="fixture", hook_head_index=None, prepend_bos=True, context_size=16)


saes = {
    "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=meta())),
    "topk_few_positive": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=meta())),
    "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True, metadata=meta())),
    "gated": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "jumprelu_at_threshold": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "gated_at_zero": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
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


def record(folder, x):
    """The values of the SAE SAELens loads from `folder` on x, and the config it reads."""
    loaded = SAE.load_from_disk(folder)
    save_file({"x": x.contiguous(), **values(loaded, x)}, os.path.join(folder, "values.safetensors"))
    cfg = loaded.cfg.to_dict()
    cfg["class"] = type(loaded).__name__
    with open(os.path.join(folder, "cfg_read.json"), "w") as f:
        json.dump(cfg, f, default=str)


def encoder_product(sae, x):
    """x' W_enc as SAELens's encode computes it (before the bias)."""
    return sae.process_sae_in(x) @ sae.W_enc


with torch.no_grad():
    for name, sae in saes.items():
        # SAELens's init leaves biases, thresholds and gates at zero: every parameter drawn, so
        # each one changes the output.
        for _, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
        x = torch.randn(3, 5, HEADS, D_IN // HEADS) if name == "hook_z" else torch.randn(3, 5, D_IN) * 2
        if name == "topk_few_positive":
            sae.b_enc.sub_(3.0)
        if name in ("jumprelu_at_threshold", "gated_at_zero"):
            # Thresholds (gate biases) set to pre-activations the input reaches exactly: SAELens
            # keeps a latent only where h > threshold (gate pre-activation > 0), strictly.
            t = encoder_product(sae, x)[0, 0]
            if name == "jumprelu_at_threshold":
                h = t + sae.b_enc
                chosen = (h > 0).nonzero().flatten()
                sae.threshold[chosen] = h[chosen]
            else:
                chosen = torch.arange(0, D_SAE, 2)
                sae.b_gate[chosen] = -t[chosen]
        folder = os.path.join(out, name)
        sae.save_model(folder)
        record(folder, x)

    # SAELens's pre-6.0 flat configs (converted by its handle_pre_6_0_config): TopK from
    # activation_fn_kwargs, hook_z from the hook's name, normalize_activations as a bool, and a
    # config with no version at all.
    flat = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_point_head_index": None,
            "apply_b_dec_to_input": True, "model_name": "fixture", "context_size": 16}
    for name, weights, cfg in [
        ("topk_pre6", "topk", {"hook_point": "blocks.1.hook_resid_pre", "activation_fn_str": "topk",
                               "activation_fn_kwargs": {"k": 8}, "normalize_activations": False,
                               "sae_lens_version": "3.5.0"}),
        ("hook_z_pre6", "hook_z", {"hook_point": "blocks.1.attn.hook_z", "activation_fn_str": "relu",
                                   "normalize_activations": True, "sae_lens_version": "5.9.1"}),
        ("standard_unversioned", "standard", {"hook_point": "blocks.1.hook_resid_pre"}),
    ]:
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(out, weights, "sae_weights.safetensors"), folder)
        with open(os.path.join(folder, "cfg.json"), "w") as f:
            json.dump({**flat, **cfg}, f)
        shape = (3, 5, HEADS, D_IN // HEADS) if weights == "hook_z" else (3, 5, D_IN)
        record(folder, torch.randn(*shape) * 2)
