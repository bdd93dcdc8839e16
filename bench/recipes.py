"""Every torch head on the demo under both training recipes: test accuracy, mean +- sample std over seeds.

    make extract                                   # data/demo and data/demo-store (rgb + DIS flow, 25 frames)
    PYTHONPATH=. .venv/bin/python bench/recipes.py --out bench/results/recipes.md [--heads ts-lstm,lstm]

Each run is `twostream train STORE --dataset DATA --split 1 --head H --streams rgb --seed N --set recipe=R`
plus what the store forces (the frames a head reads, as `twostream train` asks for them), written to --runs like any
other run, so an interrupted bench resumes: finished runs are read back from their run directories, not retrained.
The Markdown table (--out) is rewritten after every head, so a bench stopped part-way leaves the heads it finished,
and the heads it did not reach are listed as not measured.

RGB alone by default: flow features carry each frame's motion direction, which lets a head that pools over time
without order tell the demo's motion classes apart; on RGB, only a head that reads frame order can. These are the
runs tests/test_learning_demo.py makes for seed 0 (``TWOSTREAM_DEMO_RUNS`` points it at --runs to reuse them).

Heads run cheapest first (measured seconds per optimiser step on the machine at hand decide the order) so that a
time limit (--hours) leaves the most heads measured; ``--table-only`` tabulates the finished runs and trains nothing.
The last three columns are the default recipe's test accuracy on the demo classes that need each kind of evidence
(appearance, motion, frame order): heads that pool over time without order should sit near chance (50%) on
``order``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.demo_data import EVIDENCE
from pipeline.metrics import mean_std
from pipeline.registry import HEADS
from pipeline.training import batch_loss, build_head, make_optimizer, resolve_configs
from stages.train import TrainJob, plan_run, train

KINDS = ("appearance", "motion", "order")

# What the store forces, not tuning (as in tests/test_learning_demo.py and the README's "Frames a head reads"):
# Ng et al.'s heads read the store's 25 frames, Karpathy et al.'s clip heads count clips in stored frames, and
# conv-pool reads each frame's feature as a 1x1 map.
NG = ("conv-pool", "late-pool", "slow-pool", "local-pool", "time-conv", "deep-lstm")
STORE_SETTINGS = {**{h: (("frames", "25"),) for h in NG},
                  **{h: (("any_rate", "true"),) for h in ("early-fusion", "late-fusion", "slow-fusion")}}
STORE_SETTINGS["conv-pool"] += (("grid", "1"),)


def seconds_per_step(head: str, dim: int, stream_dims: tuple[int, ...], classes: int) -> float:
    """One optimiser step of the head's default recipe on random features (best of 3 after one warm-up)."""
    head_cfg, cfg = resolve_configs(head, dict(STORE_SETTINGS.get(head, ())), seed=0)
    model = build_head(head, head_cfg, dim, classes, stream_dims, 0)
    opt = make_optimizer(model, cfg)
    x = torch.randn(cfg.batch_size, 25, dim)
    mask = torch.ones(cfg.batch_size, 25, dtype=torch.bool)
    y = torch.randint(0, classes, (cfg.batch_size,))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        opt.zero_grad()
        batch_loss(model, x, mask, y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def cell(values: list[float], stuck: int) -> str:
    if not values:
        return "not measured"
    mean, std = mean_std(values)
    spread = f" ± {std:.1f}" if len(values) > 1 else " (1 seed)"
    return f"{mean:.1f}{spread}" + (f" ({stuck} of {len(values)} did not learn)" if stuck else "")


def write_table(path: Path | None, rows: dict, heads: list[str], recipes: list[str], header: str) -> str:
    lines = [header, "",
             "| head | " + " | ".join(f"`{r}` (%)" for r in recipes) + " | steps run (" + ", ".join(recipes)
             + ") | minutes per run (" + ", ".join(recipes) + ") | " + " | ".join(KINDS) + " |",
             "|---|" + "---:|" * len(recipes) + "---:|---:|" + "---:|" * len(KINDS)]
    for head in heads:
        cells, steps, minutes = [], [], []
        for r in recipes:
            ms = rows.get((head, r), [])
            cells.append(cell([100 * m["accuracy"] for m in ms], sum(bool(m.get("did_not_learn")) for m in ms))
                         if r != "paper" or has_paper_recipe(head) else "no paper recipe")
            steps.append(f"{np.mean([m.get('steps_run', 0) for m in ms]):.0f}" if ms else "-")
            minutes.append(f"{np.mean([m['fit_seconds'] for m in ms]) / 60:.1f}" if ms else "-")
        ms = rows.get((head, recipes[0]), [])
        kinds = [f"{100 * np.mean([evidence_accuracy(m, k) for m in ms]):.0f}" if ms else "-" for k in KINDS]
        lines.append(f"| `{head}` | {' | '.join(cells)} | {' / '.join(steps)} | {' / '.join(minutes)} | "
                     f"{' | '.join(kinds)} |")
    text = "\n".join(lines) + "\n"
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def evidence_accuracy(metrics: dict, kind: str) -> float:
    """Mean test accuracy over the demo classes that need one kind of evidence (appearance, motion or order)."""
    classes = [c for c, e in EVIDENCE.items() if e == kind]
    return float(np.mean([metrics["per_class_accuracy"][c] for c in classes]))


def has_paper_recipe(head: str) -> bool:
    """Heads beyond the papers carry no paper settings (``train_defaults``), so they have no `paper` recipe."""
    return bool(getattr(HEADS.get(head).config_cls, "train_defaults", None))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/demo-store")
    ap.add_argument("--dataset", default="data/demo")
    ap.add_argument("--runs", default="runs/bench-recipes", help="run directories (finished runs are reused)")
    ap.add_argument("--out", default=None, help="write the Markdown table here (e.g. bench/results/recipes.md)")
    ap.add_argument("--streams", default="rgb")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default="converge,paper")
    ap.add_argument("--heads", default=None, help="comma-separated (default: every torch head)")
    ap.add_argument("--hours", type=float, default=None, help="start no new head after this many hours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="train nothing: tabulate the finished runs in --runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # "did not learn" is counted in the table instead
    heads = args.heads.split(",") if args.heads else [n for n in HEADS.names() if HEADS.get(n).kind == "torch"]
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    streams = tuple(args.streams.split(","))
    table_heads = sorted(heads)
    if not args.table_only:
        step_s = {h: seconds_per_step(h, 1280 * len(streams), (1280,) * len(streams), 8) for h in heads}
        heads.sort(key=lambda h: step_s[h])
    header = (f"Demo split 1, streams {'+'.join(streams)}, seeds {','.join(map(str, seeds))}: test accuracy, mean ± "
              f"sample std over seeds; {platform.machine()}, {os.cpu_count()} cores.")
    rows: dict = {}
    out = Path(args.out) if args.out else None
    t_start = time.time()
    for head in heads:
        if args.hours is not None and time.time() - t_start > 3600 * args.hours:
            print(f"{head}: not started (--hours {args.hours} spent)", flush=True)
            continue
        for recipe in recipes:
            if recipe == "paper" and not has_paper_recipe(head):
                continue
            for seed in seeds:
                job = TrainJob(store=args.store, dataset=args.dataset, head=head, streams=streams, seed=seed,
                               out=args.runs, overrides=(*STORE_SETTINGS.get(head, ()), ("recipe", recipe)))
                if args.table_only:
                    run = plan_run(job).run
                    if run.complete:
                        rows.setdefault((head, recipe), []).append(run.read_json("metrics.json"))
                    continue
                rows.setdefault((head, recipe), []).append(train(job, progress=False, echo=lambda _: None).metrics)
            ms = rows.get((head, recipe), [])
            if not ms:
                continue
            print(f"{head} {recipe}: {cell([100 * m['accuracy'] for m in ms], 0)}, "
                  f"{np.mean([m.get('steps_run', 0) for m in ms]):.0f} steps, "
                  f"{np.mean([m['fit_seconds'] for m in ms]):.0f} s per run", flush=True)
        write_table(out, rows, table_heads, recipes, header)
    print()
    print(write_table(out, rows, table_heads, recipes, header))


if __name__ == "__main__":
    main()
