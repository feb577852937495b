"""The README's Fashion-MNIST tables from what experiments/fmnist.sh wrote into runs/.

    python experiments/summarize.py            # markdown tables on stdout

Reads, for each model and seed, runs/fmnist_<model>[_s1]/log.jsonl (final loss, training time),
probe_patch-proxy_Lall.json (linear and kNN top-1 of the patch and proxy means at every block)
and the attn_stats.json that visualize.py --stats wrote beside each seed's SemanticMIM run (the
three models side by side). Prints the mean of the seeds and each seed.
"""
import json
import os
import statistics
import sys

MODELS = {"semantic": "SemanticMIM (P 8, mask 0.8)",
          "baseline": "one-switch baseline (`--baseline`, P 8, mask 0.8)",
          "maskfeat": "authors' MaskFeat settings (`--baseline`, P 1, mask 0.4)"}
SEEDS = (0, 1)
STATS = ("proxy_share", "distance", "query_js", "fg_consistency", "bg_consistency", "proxy_js")


def run_dir(root, model, seed):
    return os.path.join(root, f"fmnist_{model}" + (f"_s{seed}" if seed else ""))


def load(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: run experiments/fmnist.sh first")
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else [json.loads(ln) for ln in f]


def training(folder, batch=256):
    """(final loss, minutes of training): each progress line's rate over its own interval."""
    log = load(os.path.join(folder, "log.jsonl"))
    steps = [0] + [r["step"] for r in log]
    seconds = sum((b - a) * batch / r["img_per_s"] for a, b, r in zip(steps, steps[1:], log))
    return log[-1]["loss"], seconds / 60


def accuracy(probe, pool, layer, kind):
    return next(100 * r[f"{kind}_top1"] for r in probe["rows"]
                if r["row"] == "checkpoint" and r["pool"] == pool and r["layer"] == layer)


def cell(values, fmt="{:.2f}"):
    """'mean (seed 0, seed 1)'."""
    if any(v is None for v in values):
        return "-"
    return fmt.format(statistics.mean(values)) + " (" + ", ".join(fmt.format(v)
                                                                   for v in values) + ")"


def main(root="runs"):
    probes = {(m, s): load(os.path.join(run_dir(root, m, s), "probe_patch-proxy_Lall.json"))
              for m in MODELS for s in SEEDS}
    depth = probes[("semantic", 0)]["config"]["depth"]
    print("| model | linear, patch mean | kNN, patch mean | linear, proxy mean | kNN, proxy mean "
          "| final loss | training min/run |\n|---|---|---|---|---|---|---|")
    for m, name in MODELS.items():
        runs = [training(run_dir(root, m, s)) for s in SEEDS]
        acc = {(pool, kind): [accuracy(probes[(m, s)], pool, depth, kind) for s in SEEDS]
               for pool in ("patch", "proxy") for kind in ("linear", "knn")}
        print(f"| {name} | " + " | ".join(cell(acc[k]) for k in (
            ("patch", "linear"), ("patch", "knn"), ("proxy", "linear"), ("proxy", "knn")))
              + f" | {cell([r[0] for r in runs], '{:.4f}')} | "
              f"{cell([r[1] for r in runs], '{:.1f}')} |")
    pixels = [r for r in probes[("semantic", 0)]["rows"] if r["row"] == "raw pixels"]
    if pixels:
        print(f"| raw pixels ({pixels[0]['dims']} dims) | {100 * pixels[0]['linear_top1']:.2f} | "
              f"{100 * pixels[0]['knn_top1']:.2f} | | | | |")

    for kind in ("knn", "linear"):
        print(f"\n{kind} top-1 of the patch mean per block (mean of the seeds)\n\n| model | "
              + " | ".join(f"block {i}" for i in range(1, depth + 1)) + " |\n|---|"
              + "---|" * depth)
        for m, name in MODELS.items():
            print(f"| {name} | " + " | ".join(
                f"{statistics.mean(accuracy(probes[(m, s)], 'patch', i, kind) for s in SEEDS):.2f}"
                for i in range(1, depth + 1)) + " |")

    stats = [load(os.path.join(run_dir(root, "semantic", s), "attn_stats.json")) for s in SEEDS]
    print(f"\nattention statistics of the last block ({depth}), mean (seed 0, seed 1), "
          f"{stats[0]['images']['count']} test images\n\n| model | " + " | ".join(STATS)
          + " |\n|---|" + "---|" * len(STATS))
    for k, name in enumerate(MODELS.values()):
        last = [s["models"][k]["layers"][-1] for s in stats]
        print(f"| {name} | " + " | ".join(cell([r[st] for r in last], "{:.3f}") for st in STATS)
              + " |")
    for k, name in enumerate(MODELS.values()):
        uniform = stats[0]["models"][k]["uniform"]
        print(f"| uniform attention, {name.split(' (')[0]} | " + " | ".join(
            "-" if uniform[st] is None else f"{uniform[st]:.3f}" for st in STATS) + " |")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main(*sys.argv[1:])
