# Max abs diff per hook between two safetensors files (torch only, no safetensors package).
import json, struct, sys, torch
def load(p):
    data = open(p, "rb").read(); n = struct.unpack("<Q", data[:8])[0]; hdr = json.loads(data[8:8 + n]); base = 8 + n
    return {k: torch.frombuffer(bytearray(data[base + v["data_offsets"][0]: base + v["data_offsets"][1]]), dtype=torch.float32).reshape(v["shape"])
            for k, v in hdr.items() if k != "__metadata__"}
a, b = load(sys.argv[1]), load(sys.argv[2])
assert a.keys() == b.keys(), (set(a) ^ set(b))
worst = {}
for k in a:
    fam = k.split(".", 2)[-1] if k.startswith("blocks.") else k
    d = (a[k] - b[k]).abs(); d = d[~torch.isnan(d)].max().item() if d.numel() else 0.0
    worst[fam] = max(worst.get(fam, 0.0), d)
print(json.dumps(worst, indent=0)); print("MAX", max(worst.values()))
