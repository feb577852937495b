"""kNN top-1 against epoch of experiments/long.sh's runs, and its figure.

For each RUN/ep<E>.pt, the last block's patch mean and proxy mean (probe.py's features), DINO's
kNN (k 20, T 0.07) of the 10,000 test images against a fixed subset, the first 10,000 training
images (probe.py's final probe of RUN/checkpoint.pt uses all 60,000). Resumable: RUN/trend.json
keeps the epochs done.

    python experiments/trend.py runs/long8_semantic_s0                 # -> RUN/trend.json
    python experiments/summarize.py runs long8 --save    # -> experiments/results/long8.json
    python experiments/trend.py --plot experiments/results/long8.json --out docs/figures/trend.png
"""
import argparse
import glob
import json
import os
import re
import sys

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probe  # noqa: E402
import train  # noqa: E402

SUBSET = 10_000  # training images the per-epoch kNN votes with
MODELS = {"semantic": ("SemanticMIM", "C0"), "baseline": ("one-switch baseline", "C1"),
          "maskfeat": ("MaskFeat settings", "C2")}


@torch.no_grad()
def features(model, images, mean, std):
    """uint8 images (n, C, h, w) -> {pool: (n, D)} of the last block, in batches of 500."""
    S, L, parts = model.cfg.img_size, model.cfg.depth, []
    for s in range(0, len(images), 500):
        x = train.to_model_input(images[s:s + 500], S, mean, std)   # (b, 3, S, S)
        parts.append(probe.pool_features(model, x, [L], ["patch", "proxy"]))
    return {pool: torch.cat([p[pool, L] for p in parts]) for pool in ("patch", "proxy")}


def trend(run):
    path, done = os.path.join(run, "trend.json"), {}
    if os.path.exists(path):
        done = {r["epoch"]: r for r in json.load(open(path))["epochs"]}
    first = train.read_checkpoint(os.path.join(run, "ep1.pt"))
    args, size = first["args"], first["config"]["img_size"]
    mean, std = train.MEAN_STD[args["dataset"]]
    tr_x, tr_y, _ = train.load_split(args["dataset"], args["data"], "train", size)
    te_x, te_y, _ = train.load_split(args["dataset"], args["data"], "test", size)
    tr_x, tr_y, C = tr_x[:SUBSET], tr_y[:SUBSET], int(tr_y.max()) + 1
    for ckpt in sorted(glob.glob(os.path.join(run, "ep*.pt")),
                       key=lambda f: int(re.findall(r"\d+", os.path.basename(f))[0])):
        epoch = int(re.findall(r"\d+", os.path.basename(ckpt))[0])
        if epoch in done:
            continue
        model, c = train.load_model(ckpt)
        tr, te = features(model, tr_x, mean, std), features(model, te_x, mean, std)
        done[epoch] = {"epoch": epoch, "step": c["step"], **{
            f"knn_{pool}": (probe.knn_predict(tr[pool], tr_y, te[pool], C) == te_y)
            .float().mean().item() for pool in tr}}
        print(f"{run} epoch {epoch}: kNN patch {100 * done[epoch]['knn_patch']:.2f}%, proxy "
              f"{100 * done[epoch]['knn_proxy']:.2f}%", flush=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"train_subset": SUBSET, "epochs": sorted(done.values(),
                                                                key=lambda r: r["epoch"])}, f)
        os.replace(path + ".tmp", path)


def plot(results, out):
    """Every record's trend in summarize.py's results file: a line per seed and readout."""
    runs, drawn = json.load(open(results))["runs"], set()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, rec in sorted(runs.items()):
        if not rec.get("trend"):
            continue
        label, colour = MODELS[key.rsplit("_s", 1)[0]]
        for pool, col, style in (("patch", 1, "-"), ("proxy", 2, "--")):
            ax_label = None if (label, pool) in drawn else f"{label}, {pool} mean"
            drawn.add((label, pool))
            ax.plot([r[0] for r in rec["trend"]], [r[col] for r in rec["trend"]], style,
                    color=colour, lw=1, marker="o", ms=2.5, label=ax_label)
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%), 10k training images",
           title="Fashion-MNIST, last block: kNN against epoch (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="long.sh's run folders (--plot: a results file)")
    p.add_argument("--plot", action="store_true", help="draw summarize.py's results file")
    p.add_argument("--out", default="docs/figures/trend.png")
    a = p.parse_args()
    plot(a.runs[0], a.out) if a.plot else [trend(run) for run in a.runs]
