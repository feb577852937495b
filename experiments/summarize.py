"""The README's Fashion-MNIST tables (markdown, on stdout) from what experiments/fmnist.sh wrote,
`python experiments/summarize.py`, or long.sh's runs/long8_<model>_s<seed>, `... runs long8`.
Reads, for each model and seed, the run's log.jsonl (final loss, training time),
probe_patch-proxy_Lall.json (linear and kNN top-1 of the patch and proxy means at every block)
and that checkpoint's numbers in any runs/*/attn_stats.json. Prints the mean of the seeds and each
seed; a run that is missing is a "-"."""
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402  (its read_log)

MODELS = {"semantic": "SemanticMIM (P 8, mask 0.8)",
          "baseline": "one-switch baseline (`--baseline`, P 8, mask 0.8)",
          "maskfeat": "authors' MaskFeat settings (`--baseline`, P 1, mask 0.4)"}
SEEDS = (0, 1)
STATS = ("proxy_share", "distance", "query_js", "fg_consistency", "bg_consistency", "proxy_js")


def run_dir(root, model, seed, prefix="fmnist"):
    """fmnist.sh's ROOT/fmnist_<model>[_s1]; long.sh's ROOT/<prefix>_<model>_s<seed>."""
    return os.path.join(root, f"{prefix}_{model}" + (f"_s{seed}" if seed or prefix != "fmnist"
                                                     else ""))


def load(path):
    """The JSON (or JSON lines, read as train.py reads them) file, or None where not written."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else train.read_log(path)


def training(folder, batch=256):
    """(final loss, minutes of training): each progress line's rate over its own interval."""
    log = load(os.path.join(folder, "log.jsonl"))
    if not log:
        return None, None
    steps = [0] + [r["step"] for r in log]
    seconds = sum((b - a) * batch / r["img_per_s"] for a, b, r in zip(steps, steps[1:], log))
    return log[-1]["loss"], seconds / 60


def accuracy(probe, pool, layer, kind):
    if probe is None:
        return None
    return next(100 * r[f"{kind}_top1"] for r in probe["rows"]
                if r["row"] == "checkpoint" and r["pool"] == pool and r["layer"] == layer)


def cell(values, fmt="{:.2f}"):
    """'mean (seed 0, seed 1)'; a missing seed is '-' and the mean is of the others."""
    have = [v for v in values if v is not None]
    if not have:
        return "-"
    return fmt.format(statistics.mean(have)) + " (" + ", ".join(
        "-" if v is None else fmt.format(v) for v in values) + ")"


def attention(root):
    """{checkpoint path: per-layer statistics, uniform} from every attn_stats.json under root."""
    out = {}
    for path in glob.glob(os.path.join(root, "*", "attn_stats.json")):
        for m in load(path)["models"]:
            out[os.path.abspath(m["checkpoint"])] = m     # as given, from the repository root
    return out


def main(root="runs", prefix="fmnist"):
    probes = {(m, s): load(os.path.join(run_dir(root, m, s, prefix),
                                        "probe_patch-proxy_Lall.json"))
              for m in MODELS for s in SEEDS}
    if probes[("semantic", 0)] is None:
        raise SystemExit(f"error: no probe in {run_dir(root, 'semantic', 0, prefix)}: run "
                         f"{'fmnist.sh' if prefix == 'fmnist' else 'long.sh'} first")
    depth = probes[("semantic", 0)]["config"]["depth"]
    print("| model | linear, patch mean | kNN, patch mean | linear, proxy mean | kNN, proxy mean "
          "| final loss | training min/run |\n|---|---|---|---|---|---|---|")
    for m, name in MODELS.items():
        runs = [training(run_dir(root, m, s, prefix)) for s in SEEDS]
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
        print(f"\n{kind} top-1 of the patch mean per block, mean (seed 0, seed 1)\n\n| model | "
              + " | ".join(f"block {i}" for i in range(1, depth + 1)) + " |\n|---|"
              + "---|" * depth)
        for m, name in MODELS.items():
            print(f"| {name} | " + " | ".join(
                cell([accuracy(probes[(m, s)], "patch", i, kind) for s in SEEDS])
                for i in range(1, depth + 1)) + " |")

    fine = {(m, s, r): load(os.path.join(run_dir(root, m, s, prefix), f"finetune{r}_s{s}.json"))
            for m in MODELS for s in SEEDS for r in ("", "_random")}
    if any(fine.values()):
        print("\nfine-tuned top-1 (experiments/finetune.py), mean (seed 0, seed 1)\n\n| model | "
              "test top-1 | epochs |\n|---|---|---|")
        for (m, r), name in [((m, ""), n) for m, n in MODELS.items()] + [
                (("semantic", "_random"), "the same ViT, timm's random init")]:
            got = [fine[m, s, r] for s in SEEDS]
            print(f"| {name} | {cell([g and 100 * g['top1_per_epoch'][-1] for g in got])} | "
                  f"{next((g['epochs'] for g in got if g), '-')} |")

    stats = attention(root)
    print("\nattention statistics per block, mean (seed 0, seed 1)\n\n| model | block | "
          + " | ".join(STATS) + " |\n|---|---|" + "---|" * len(STATS))
    for m, name in MODELS.items():
        got = [stats.get(os.path.abspath(os.path.join(run_dir(root, m, s, prefix),
                                                      "checkpoint.pt"))) for s in SEEDS]
        for layer in range(1, depth + 1):
            rows = [None if g is None else g["layers"][layer - 1] for g in got]
            print(f"| {name.split(' (')[0]} | {layer} | " + " | ".join(
                cell([None if r is None else r[st] for r in rows], "{:.3f}") for st in STATS)
                + " |")
    uniform = {m["config"]["num_proxies"]: m["uniform"] for m in stats.values()}
    for P, u in sorted(uniform.items()):
        print(f"| uniform attention, P {P} | any | " + " | ".join(
            "-" if u[st] is None else f"{u[st]:.3f}" for st in STATS) + " |")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main(*sys.argv[1:])
