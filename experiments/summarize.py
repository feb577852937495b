"""The results tables (markdown) from the runs of experiments/fmnist.sh or experiments/long.sh,
and the pages that show them:

    python experiments/summarize.py                       # fmnist.sh's runs/fmnist_<model>[_s1]
    python experiments/summarize.py runs long8 --save     # long.sh's runs/long8_<model>_s<seed>
    python experiments/summarize.py --pages               # the pages, from experiments/results/

Each run becomes a record of its figures: from its log.jsonl the final loss and training time,
from probe_patch-proxy_Lall.json linear and kNN top-1 of the patch and proxy means at every block
(and the raw pixels), from probe_dense-<set>_Lall.json the dense probe's mean IoU at every block
(beside the random weights and raw pixels), the fine-tunes of both recipes
(finetune[_random][_ours]_s<seed>.json), the per-epoch kNN (trend.json) and that checkpoint's
attention statistics from any ROOT/*/attn_stats.json.
A run's folder dies with the machine that ran it (checkpoints stay out of git); its record need
not: --save merges the records into experiments/results/<prefix>.json, which is kept in git, and a
run missing under ROOT is read from there. Prints the mean of the seeds and each seed; a run in
neither place is a "-".

No table in README.md or docs/results.md is typed: each stands between `<!-- results NAME all -->`
(every table), `<!-- results NAME summary -->` or `<!-- results NAME dense -->` (the README's
probe and dense-probe tables) and `<!-- end of results -->`,
and --pages, or --save after writing its file, writes it from experiments/results/NAME.json. The
prose around the tables is written by hand."""
import glob
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402  (its read_log)

MODELS = {"semantic": "SemanticMIM (P 8, mask 0.8)",
          "baseline": "one-switch baseline (`--baseline`, P 8, mask 0.8)",
          "maskfeat": "authors' MaskFeat settings (`--baseline`, P 1, mask 0.4)"}
SEEDS = (0, 1)
DENSE = ("single", "mosaic")                    # probe.py --dense sets
FINETUNES = ("finetune_authors", "finetune_ours",  # experiments/finetune.py --recipe, and --random
             "finetune_random_authors", "finetune_random_ours")
STATS = ("proxy_share", "distance", "query_js", "fg_consistency", "bg_consistency", "proxy_js")
RESULTS = os.path.join(REPO, "experiments", "results")
PAGES = [os.path.join(REPO, "README.md"), os.path.join(REPO, "docs", "results.md")]


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


def attention(root):
    """{checkpoint path: per-layer statistics, uniform} from every attn_stats.json under root."""
    out = {}
    for path in glob.glob(os.path.join(root, "*", "attn_stats.json")):
        for m in load(path)["models"]:
            out[os.path.abspath(m["checkpoint"])] = m     # as given, from the repository root
    return out


def dense_record(folder):
    """{dense_<set>: {row: mean IoU (%) per block}} of a run's probe_dense-<set>_Lall.json."""
    out = {}
    for s in DENSE:
        d = load(os.path.join(folder, f"probe_dense-{s}_Lall.json"))
        out[f"dense_{s}"] = d and {row: [100 * r["miou"] for r in d["rows"] if r["row"] == row]
                                   for row in ("checkpoint", "random weights", "raw pixels")}
    return out


def record(folder, seed, stats):
    """A run's figures (top-1 in %), or None where it has no probe yet."""
    probe = load(os.path.join(folder, "probe_patch-proxy_Lall.json"))
    if probe is None:
        return None
    depth, (loss, minutes) = probe["config"]["depth"], training(folder)
    rows = {(r["row"], r["pool"], r["layer"]): r for r in probe["rows"]}
    pixels = next((r for r in probe["rows"] if r["row"] == "raw pixels"), None)
    fine = {k: load(os.path.join(folder, f"finetune{k[8:].replace('_authors', '')}_s{seed}.json"))
            for k in FINETUNES}                             # finetune[_random][_ours]_s<seed>
    trend = load(os.path.join(folder, "trend.json"))
    attn = stats.get(os.path.abspath(os.path.join(folder, "checkpoint.pt")))
    return {"source": folder, "depth": depth, "loss": loss, "minutes": minutes,
            **{f"{kind}_{pool}": [100 * rows["checkpoint", pool, i][f"{kind}_top1"]
                                  for i in range(1, depth + 1)]
               for kind in ("linear", "knn") for pool in ("patch", "proxy")},
            "pixels": pixels and {"dims": pixels["dims"], "linear": 100 * pixels["linear_top1"],
                                  "knn": 100 * pixels["knn_top1"]},
            **{k: f and {"top1": [100 * t for t in f["top1_per_epoch"]], "minutes": f["minutes"],
                         "probe": f["probe_top1"] and 100 * f["probe_top1"]}
               for k, f in fine.items()},
            **dense_record(folder),
            "trend": trend and [[r["epoch"], 100 * r["knn_patch"], 100 * r["knn_proxy"]]
                                for r in trend["epochs"]],
            "attention": attn and [{s: layer[s] for s in STATS} for layer in attn["layers"]],
            "uniform": attn and {"num_proxies": attn["config"]["num_proxies"], **attn["uniform"]}}


def cell(values, fmt="{:.2f}"):
    """'mean (seed 0, seed 1)'; a missing seed is '-' and the mean is of the others."""
    have = [v for v in values if v is not None]
    if not have:
        return "-"
    return fmt.format(statistics.mean(have)) + " (" + ", ".join(
        "-" if v is None else fmt.format(v) for v in values) + ")"


def collect(root="runs", prefix="fmnist", save=False):
    """{<model>_s<seed>: record} of the runs under root, else of the results file; --save keeps
    them in experiments/results/<prefix>.json."""
    saved_path = os.path.join(RESULTS, f"{prefix}.json")
    saved = (load(saved_path) or {"runs": {}})["runs"]
    stats = attention(root)
    runs = {f"{m}_s{s}": record(run_dir(root, m, s, prefix), s, stats) or saved.get(f"{m}_s{s}")
            for m in MODELS for s in SEEDS}
    if runs["semantic_s0"] is None and runs["semantic_s1"] is None:
        raise SystemExit(f"error: no probe in {run_dir(root, 'semantic', 0, prefix)}: run "
                         f"{'fmnist.sh' if prefix == 'fmnist' else 'long.sh'} first")
    if save:
        os.makedirs(RESULTS, exist_ok=True)
        with open(saved_path + ".tmp", "w") as f:
            json.dump({"runs": {k: v for k, v in runs.items() if v}}, f, indent=1)
        os.replace(saved_path + ".tmp", saved_path)
        print(f"wrote {os.path.relpath(saved_path)}")
    return runs


def get(runs, m, key, i=None):
    """The seeds' values of one figure of model m; None where a run lacks it."""
    recs = [runs.get(f"{m}_s{s}") for s in SEEDS]
    return [None if r is None or r.get(key) is None else r[key] if i is None else r[key][i]
            for r in recs]


def last(runs, m, key):
    """The seeds' top-1 after the last epoch of one fine-tune."""
    return [f and f["top1"][-1] for f in get(runs, m, key)]


def summary(runs):
    """The README's one table: the last block's four readouts, both fine-tunes, the raw pixels."""
    fine = 2 * any(r and r.get("finetune_ours") for r in runs.values())
    head = ["model", "linear, patch mean", "kNN, patch mean", "linear, proxy mean",
            "kNN, proxy mean"] + ["fine-tuned, authors' recipe", "fine-tuned, ours"][:fine]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def row(name, cells):
        out.append("| " + " | ".join([name] + cells) + " |")
    for m, name in MODELS.items():
        row(name, [cell(get(runs, m, f"{kind}_{pool}", -1)) for pool in ("patch", "proxy")
                   for kind in ("linear", "knn")]
            + [cell(last(runs, m, f"finetune_{r}")) for r in ("authors", "ours")][:fine])
    if fine:
        row("the same ViT, timm's random init", [""] * 4 + [
            cell(last(runs, "semantic", f"finetune_random_{r}")) for r in ("authors", "ours")])
    pixels = next((p for p in get(runs, "semantic", "pixels") if p), None)
    if pixels:
        row(f"raw pixels ({pixels['dims']} dims)",
            [f"{pixels['linear']:.2f}", f"{pixels['knn']:.2f}"] + [""] * (2 + fine))
    return "\n".join(out) + "\n"


def dense(runs):
    """The dense probe's tables: mean IoU (%) per block on each garment set, beside the same
    network at its random initial weights (SemanticMIM's) and the raw pixels of each patch."""
    out, depth = [], next(r["depth"] for r in runs.values() if r)
    for s in DENSE:
        if not any(r and r.get(f"dense_{s}") for r in runs.values()):
            continue
        out.append(f"probe.py --dense {s}: mean IoU per block, mean (seed 0, seed 1)\n\n| model | "
                   + " | ".join(f"block {i}" for i in range(1, depth + 1)) + " |\n|---|"
                   + "---|" * depth)
        for m, name in MODELS.items():
            out.append(f"| {name} | " + " | ".join(cell([d and d["checkpoint"][i] for d in get(
                runs, m, f"dense_{s}")]) for i in range(depth)) + " |")
        semantic = get(runs, "semantic", f"dense_{s}")
        out.append("| the same network, random weights (SemanticMIM's) | " + " | ".join(cell(
            [d and d["random weights"][i] for d in semantic]) for i in range(depth)) + " |")
        pixels = cell([d and d["raw pixels"][0] for d in semantic])
        out.append(f"| raw pixels of each patch | {pixels}" + " |" * depth + "\n")
    return "\n".join(out)


def tables(runs):
    """Every table of one results file (markdown): the seeds' mean, then each seed."""
    out = []
    emit = out.append
    depth = next(r["depth"] for r in runs.values() if r)
    emit("| model | linear, patch mean | kNN, patch mean | linear, proxy mean | kNN, proxy mean "
         "| final loss | training min/run |\n|---|---|---|---|---|---|---|")
    for m, name in MODELS.items():
        emit(f"| {name} | " + " | ".join(cell(get(runs, m, f"{kind}_{pool}", -1)) for pool in (
            "patch", "proxy") for kind in ("linear", "knn"))
             + f" | {cell(get(runs, m, 'loss'), '{:.4f}')} | "
             f"{cell(get(runs, m, 'minutes'), '{:.1f}')} |")
    pixels = next((p for p in get(runs, "semantic", "pixels") if p), None)
    if pixels:
        emit(f"| raw pixels ({pixels['dims']} dims) | {pixels['linear']:.2f} | "
             f"{pixels['knn']:.2f} | | | | |")

    for kind in ("knn", "linear"):
        emit(f"\n{kind} top-1 of the patch mean per block, mean (seed 0, seed 1)\n\n| model | "
             + " | ".join(f"block {i}" for i in range(1, depth + 1)) + " |\n|---|"
             + "---|" * depth)
        for m, name in MODELS.items():
            emit(f"| {name} | " + " | ".join(cell(get(runs, m, f"{kind}_patch", i))
                                             for i in range(depth)) + " |")

    if any(r and r.get("finetune_ours") for r in runs.values()):
        epochs = len(next(r["finetune_ours"]["top1"] for r in runs.values()
                          if r and r.get("finetune_ours")))
        emit("\nfine-tuned top-1 per epoch (experiments/finetune.py), mean (seed 0, seed 1); ours "
             "starts from the linear probe (LP; from random init, a new head)\n\n| model | "
             + " | ".join(
                 [f"authors' recipe, epoch {e}" for e in range(1, epochs + 1)] + ["ours: LP"]
                 + [f"ours, epoch {e}" for e in range(1, epochs + 1)]) + " | minutes, authors' "
             "recipe; ours |\n|---|" + "---|" * (2 * epochs + 2))
        for m, init, name in [(m, "", n) for m, n in MODELS.items()] + [
                ("semantic", "random_", "the same ViT, timm's random init")]:
            a, o = (get(runs, m, f"finetune_{init}{r}") for r in ("authors", "ours"))
            emit(f"| {name} | " + " | ".join(
                [cell([f and f["top1"][e] for f in a]) for e in range(epochs)]
                + [cell([f and f["probe"] for f in o])]
                + [cell([f and f["top1"][e] for f in o]) for e in range(epochs)]) + " | "
                + "; ".join(cell([f and f["minutes"] for f in x], "{:.1f}").split(" (")[0]
                            for x in (a, o)) + " |")

    if any(r and r.get("trend") for r in runs.values()):
        epochs = len(next(r["trend"] for r in runs.values() if r and r.get("trend")))
        emit("\nkNN top-1 per epoch (last block, 10,000 training images), patch / proxy mean, "
             "seed 0; seed 1\n\n| model | " + " | ".join(
                 f"epoch {e}" for e in range(1, epochs + 1)) + " |\n|---|" + "---|" * epochs)
        for m, name in MODELS.items():
            per_seed = [t or [] for t in get(runs, m, "trend")]
            emit(f"| {name.split(' (')[0]} | " + " | ".join("; ".join(
                f"{t[i][1]:.1f}/{t[i][2]:.1f}" if i < len(t) else "-" for t in per_seed)
                for i in range(epochs)) + " |")

    emit("\nattention statistics per block, mean (seed 0, seed 1)\n\n| model | block | "
         + " | ".join(STATS) + " |\n|---|---|" + "---|" * len(STATS))
    for m, name in MODELS.items():
        for layer in range(depth):
            emit(f"| {name.split(' (')[0]} | {layer + 1} | " + " | ".join(cell(
                [None if a is None or a[layer][st] is None else a[layer][st]
                 for a in get(runs, m, "attention")], "{:.3f}") for st in STATS) + " |")
    uniform = {u["num_proxies"]: u for r in runs.values() if r and (u := r["uniform"])}
    for P, u in sorted(uniform.items()):
        emit(f"| uniform attention, P {P} | any | " + " | ".join(
            "-" if u[st] is None else f"{u[st]:.3f}" for st in STATS) + " |")
    return "\n".join(out) + "\n"


MARKED = re.compile(r"(<!-- results (\w+) (all|summary|dense)\b.*?-->\n).*?"
                    r"(<!-- end of results -->)", re.S)


def pages():
    """{path: text} of README.md and docs/results.md with every marked block written anew from
    its results file: `<!-- results NAME all|summary ... -->` ... `<!-- end of results -->`."""
    def block(m):
        path = os.path.join(RESULTS, f"{m[2]}.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: a marker names experiments/results/{m[2]}.json, which does "
                             f"not exist: save it (summarize.py ROOT {m[2]} --save) or fix it")
        runs = load(path)["runs"]
        return f"{m[1]}\n{dict(all=tables, summary=summary, dense=dense)[m[3]](runs)}\n{m[4]}"
    out = {}
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            out[page] = MARKED.sub(block, f.read())
    return out


def write_pages():
    """Rewrite the marked tables; a results file that no page shows is named."""
    new = pages()
    for path, text in new.items():
        with open(path, encoding="utf-8") as f:
            same = f.read() == text
        if not same:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        print(f"{'unchanged' if same else 'wrote'} {os.path.relpath(path)}")
    shown = {m[2] for text in new.values() for m in MARKED.finditer(text)}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        if os.path.basename(path)[:-5] not in shown:
            print(f"note: no page shows {os.path.relpath(path)}: add its marked block to "
                  f"docs/results.md")


def main(argv):
    if "--pages" in argv:
        return write_pages()
    args = [a for a in argv if a != "--save"]
    runs = collect(*args, save="--save" in argv)
    if "--save" in argv:
        write_pages()
    print(tables(runs) + "\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main(sys.argv[1:])
