# Writes a GPT-2-small-shaped model (random weights) in HF safetensors layout with torch alone.
import json, struct, sys, os, torch
out = sys.argv[1]
cfg = json.load(open(os.path.join(out, "config.json")))
d, L, V, P = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
g = torch.Generator().manual_seed(0)
r = lambda *s: (torch.randn(*s, generator=g) * 0.02)
t = {"transformer.wte.weight": r(V, d), "transformer.wpe.weight": r(P, d),
     "transformer.ln_f.weight": 1 + r(d) * 10, "transformer.ln_f.bias": r(d)}
for l in range(L):
    p = f"transformer.h.{l}."
    t.update({p + "ln_1.weight": 1 + r(d) * 10, p + "ln_1.bias": r(d), p + "ln_2.weight": 1 + r(d) * 10, p + "ln_2.bias": r(d),
              p + "attn.c_attn.weight": r(d, 3 * d), p + "attn.c_attn.bias": r(3 * d), p + "attn.c_proj.weight": r(d, d), p + "attn.c_proj.bias": r(d),
              p + "mlp.c_fc.weight": r(d, 4 * d), p + "mlp.c_fc.bias": r(4 * d), p + "mlp.c_proj.weight": r(4 * d, d), p + "mlp.c_proj.bias": r(d)})
header, off, blobs = {}, 0, []
for k, v in t.items():
    b = v.contiguous().view(torch.uint8).flatten().numpy().tobytes()
    header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    off += len(b); blobs.append(b)
h = json.dumps(header).encode(); h += b" " * ((8 - len(h) % 8) % 8)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for b in blobs: f.write(b)
