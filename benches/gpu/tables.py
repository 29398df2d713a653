"""Prints the tables of benches/gpu/bench.sh from what its steps left in WORK.

  ioi WORK:     TransformerLens vs tl-run per model and dtype (sweeps and whole command), and
                the max |difference| of their patching values
  llama8b WORK: the 8B attribution and head x position timings, peak GPU memory, and the
                attribution time against one HF forward + backward
"""
import glob
import json
import os
import sys

import pyarrow.parquet as pq

mode, work = sys.argv[1], sys.argv[2]
SUFFIX = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
          "z": "attn.hook_z", "v": "attn.hook_v", "pattern": "attn.hook_pattern"}


def tl_run_values(out_dir):
    """{hook short name: {(layer, pos or head): value}} over the mean rows of every Parquet."""
    vals = {}
    for f in glob.glob(os.path.join(out_dir, "*.parquet")):
        t = pq.read_table(f).to_pydict()
        for i, hook in enumerate(t["hook"]):
            if t["prompt"][i] is not None:
                continue
            short = next(k for k, s in SUFFIX.items() if hook.endswith(s))
            idx = t["pos"][i] if t["pos"][i] is not None else t["head"][i]
            vals.setdefault(short, {})[(t["layer"][i], idx)] = t["value"][i]
    return vals


def sweeps_seconds(manifest):
    t = manifest["timings_seconds"]
    return sum(v for k, v in t.items() if k == "clean and corrupted runs" or ": patch " in k)


if mode == "ioi":
    rows, gaps = [], []
    for tl_json in sorted(glob.glob(os.path.join(work, "tl_*.json"))):
        tag = os.path.basename(tl_json)[3:-5]
        tl = json.load(open(tl_json))
        run_dir = os.path.join(work, f"tlrun_{tag}")
        m = json.load(open(os.path.join(run_dir, "manifest.json")))
        wall = json.load(open(os.path.join(work, f"wall_{tag}.json")))
        ours = tl_run_values(run_dir)
        worst = 0.0
        for hook, grid in tl["values"].items():
            for layer, row in enumerate(grid):
                for j, v in enumerate(row):
                    worst = max(worst, abs(v - ours[hook][(layer, j)]))
        sw = sweeps_seconds(m)
        rows.append((tag, tl["patching_s"], wall["tl"], sw, wall["tl_run"], worst))
        # The normalised values divide by clean - corrupted: with a small gap (random weights)
        # a low-precision dtype's rounding is magnified, so the gaps and the raw difference.
        gap_tl = tl["clean"] - tl["corrupted"]
        gap_ours = m["metric"]["clean_baseline"] - m["metric"]["corrupted_baseline"]
        gaps.append(f"{tag}: clean - corrupted logit diff {gap_tl:.4f} (TL) {gap_ours:.4f} (tl-run); max |TL - tl-run| in logit units {worst * abs(gap_tl):.3e}")
    print(f"{'model / dtype':<32} {'TL sweeps':>10} {'TL whole':>9} {'tl-run sweeps':>14} {'tl-run whole':>13} {'ratio sweeps':>13} {'ratio whole':>12} {'max |TL - tl-run|':>18}")
    for tag, tls, tlw, sw, w, worst in rows:
        print(f"{tag:<32} {tls:>9.2f}s {tlw:>8.2f}s {sw:>13.3f}s {w:>12.2f}s {tls / sw:>12.1f}x {tlw / w:>11.1f}x {worst:>18.2e}")
    for g in gaps:
        print(g)
    # The device warm-up beside the load (src/engine/warm.rs): the same command without it.
    for tag, tls, tlw, sw, w, worst in rows:
        wall = json.load(open(os.path.join(work, f"wall_{tag}.json")))
        m = json.load(open(os.path.join(work, f"tlrun_{tag}", "manifest.json")))
        warm = m["timings_seconds"].get("load model (device warm-up beside it)")
        try:
            cold = json.load(open(os.path.join(work, f"tlrun_nowarm_{tag}", "manifest.json")))
            cold_sw = sweeps_seconds(cold)
            print(f"{tag}: warm-up {warm if warm is None else round(warm, 3)} s beside the load; without it sweeps {cold_sw:.3f} s "
                  f"(clean and corrupted {cold['timings_seconds'].get('clean and corrupted runs', float('nan')):.3f} s), "
                  f"whole {wall.get('tl_run_no_warm_up', float('nan')):.2f} s; with it sweeps {sw:.3f} s "
                  f"(clean and corrupted {m['timings_seconds'].get('clean and corrupted runs', float('nan')):.3f} s), whole {w:.2f} s")
        except (OSError, KeyError, ValueError) as e:
            print(f"{tag}: no run without the warm-up ({e})")
    # The patching schedule (activation_patching::Schedule): the same command with the other one.
    def schedule(m):
        return next(iter(m["runs"].values()))["sweeps"][0].get("schedule", "?")

    def max_difference(dir_a, dir_b):
        a, b = tl_run_values(dir_a), tl_run_values(dir_b)
        return max(abs(v - b[hook][cell]) for hook, grid in a.items() for cell, v in grid.items())

    for tag, tls, tlw, sw, w, worst in rows:
        wall = json.load(open(os.path.join(work, f"wall_{tag}.json")))
        m = json.load(open(os.path.join(work, f"tlrun_{tag}", "manifest.json")))
        try:
            other_dir = os.path.join(work, f"tlrun_other_{tag}")
            other = json.load(open(os.path.join(other_dir, "manifest.json")))
            osw = sweeps_seconds(other)
            print(f"{tag}: schedule {schedule(m)} sweeps {sw:.3f} s, whole {w:.2f} s; schedule {schedule(other)} sweeps {osw:.3f} s, "
                  f"whole {wall.get('tl_run_other_schedule', float('nan')):.2f} s; ratio sweeps {tls / sw:.1f}x and {tls / osw:.1f}x; "
                  f"max |difference| {max_difference(os.path.join(work, f'tlrun_{tag}'), other_dir):.2e}")
        except (OSError, KeyError, ValueError, StopIteration) as e:
            print(f"{tag}: no run with the other schedule ({e})")
    # Attention (engine/attention.rs): the same command with the explicit steps everywhere.
    for tag, tls, tlw, sw, w, worst in rows:
        wall = json.load(open(os.path.join(work, f"wall_{tag}.json")))
        try:
            explicit_dir = os.path.join(work, f"tlrun_explicit_{tag}")
            esw = sweeps_seconds(json.load(open(os.path.join(explicit_dir, "manifest.json"))))
            print(f"{tag}: fused attention sweeps {sw:.3f} s, whole {w:.2f} s; explicit attention sweeps {esw:.3f} s, "
                  f"whole {wall.get('tl_run_explicit_attention', float('nan')):.2f} s; ratio sweeps {tls / sw:.1f}x and {tls / esw:.1f}x; "
                  f"max |difference| {max_difference(os.path.join(work, f'tlrun_{tag}'), explicit_dir):.2e}")
        except (OSError, KeyError, ValueError) as e:
            print(f"{tag}: no run with explicit attention ({e})")
elif mode == "llama8b":
    def peak(name):
        try:
            return max(int(x) for x in open(os.path.join(work, f"gpumem_{name}.csv")).read().split() if x.strip().isdigit()) / 1024
        except (OSError, ValueError):
            return float("nan")
    atp = json.load(open(os.path.join(work, "atp", "manifest.json")))
    t = atp["timings_seconds"]
    # The clean and corrupted runs (the corrupted one kept for the backward), the backward, and
    # every target's products and rows.
    attribution = sum(v for k, v in t.items() if k == "clean and corrupted runs" or k.startswith("corrupted run's backward") or "attribution of" in k)
    wall = json.load(open(os.path.join(work, "wall_llama8b.json")))
    print("attribution of every target:", {k: round(v, 3) for k, v in t.items()})
    print(f"  clean + corrupted runs, the corrupted run's backward and every target's products: {attribution:.2f} s; whole command {wall['atp']:.1f} s; peak GPU memory {peak('atp'):.1f} GiB")
    try:
        hf = json.loads(open(os.path.join(work, "hf_fwd_bwd.json")).read().strip().splitlines()[-1])
        print(f"  one HF transformers forward+backward of the same batch: {hf['fwd_bwd_s']:.3f} s (peak {hf['peak_gib']} GiB): attribution = {attribution / hf['fwd_bwd_s']:.2f}x that")
    except (OSError, ValueError, IndexError, KeyError) as e:
        print("  no HF forward+backward reference:", e)
    bwd = t.get("corrupted run's backward")
    if bwd:
        print(f"  of which the corrupted run's backward: {bwd:.3f} s")
    plan = json.load(open(os.path.join(work, "plan_heads.json")))
    jobs = [j for j in plan if j["task"] == "patch"] if isinstance(plan, list) else []
    total_cost = sum(j["cost"] for j in jobs)
    stored = {os.path.basename(p)[:-8] for p in glob.glob(os.path.join(work, "heads", ".tl-run", "jobs", "*.parquet"))}
    done = [j for j in jobs if j["key"] in stored]
    done_cost = sum(j["cost"] for j in done)
    hm = os.path.join(work, "heads", "manifest.json")
    complete = os.path.exists(hm) and json.load(open(hm)).get("complete")
    print(f"head x position sweep: {len(done)} of {len(jobs)} layer jobs stored, {done_cost / max(total_cost, 1e-9):.1%} of the plan's cost; "
          f"whole command {wall['heads']:.1f} s ({'complete' if complete else 'stopped at its time limit'}); peak GPU memory {peak('heads'):.1f} GiB")
    if complete:
        ht = json.load(open(hm))["timings_seconds"]
        print("  timings:", {k: round(v, 2) for k, v in ht.items() if not k.startswith("heads-by-pos: patch")})
        print(f"  sweep jobs: {sum(v for k, v in ht.items() if k.startswith('heads-by-pos: patch')):.1f} s")
    elif done_cost > 0:
        last = max(os.path.getmtime(os.path.join(work, "heads", ".tl-run", "jobs", j["key"] + ".parquet")) for j in done)
        so_far = last - wall["heads_start"]
        print(f"  {so_far:.0f} s from the start to the last stored job; by the plan's cost that puts the whole command at about "
              f"{so_far * total_cost / done_cost:.0f} s (an upper estimate: load and the clean/corrupted runs are scaled too; not a measurement)")
