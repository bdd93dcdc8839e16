"""Every torch head on the demo under both training recipes: test accuracy, mean +- std over seeds.

    make extract                                   # data/demo and data/demo-store (rgb + DIS flow, 25 frames)
    PYTHONPATH=. .venv/bin/python bench/recipes.py [--streams rgb,flow] [--seeds 0,1,2] [--heads ts-lstm,lstm]

Each run is `twostream train STORE --dataset DATA --split 1 --head H --streams S --seed N --set recipe=R`, written
to --out like any other run (so an interrupted bench resumes: finished runs are cached). Prints a Markdown table:
head, default (``converge``) recipe accuracy, ``paper`` recipe accuracy, the paper recipe's "did not learn" count,
and the mean optimiser steps and fit seconds of each recipe.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.registry import HEADS
from stages.train import TrainJob, train

# What the store forces, not tuning (as in tests/test_learning_demo.py).
STORE_SETTINGS = {"conv-pool": (("grid", "1"),)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/demo-store")
    ap.add_argument("--dataset", default="data/demo")
    ap.add_argument("--out", default="runs/bench-recipes")
    ap.add_argument("--streams", default="rgb,flow")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default="converge,paper")
    ap.add_argument("--heads", default=None, help="comma-separated (default: every torch head)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # "did not learn" is counted in the table instead
    heads = args.heads.split(",") if args.heads else [n for n in HEADS.names() if HEADS.get(n).kind == "torch"]
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    streams = tuple(args.streams.split(","))
    table = {}
    for head in heads:
        for recipe in recipes:
            ms = []
            for seed in seeds:
                job = TrainJob(store=args.store, dataset=args.dataset, head=head, streams=streams, seed=seed,
                               out=args.out, overrides=(*STORE_SETTINGS.get(head, ()), ("recipe", recipe)))
                ms.append(train(job, progress=False, echo=lambda _: None).metrics)
            acc = 100 * np.array([m["accuracy"] for m in ms])
            table[head, recipe] = (acc.mean(), acc.std(), sum(bool(m.get("did_not_learn")) for m in ms),
                                   np.mean([m.get("steps_run", 0) for m in ms]), np.mean([m["fit_seconds"] for m in ms]))
            a, sd, stuck, steps, secs = table[head, recipe]
            print(f"{head} {recipe}: {a:.1f} +- {sd:.1f} (did not learn {stuck}/{len(ms)}, {steps:.0f} steps, "
                  f"{secs:.0f} s)", flush=True)
    print()
    print(f"| head | {' | '.join(f'`{r}` accuracy (%)' for r in recipes)} | did not learn ({', '.join(recipes)}) | "
          f"steps ({', '.join(recipes)}) |")
    print("|---|" + "---:|" * len(recipes) + "---|---|")
    for head in heads:
        cells = [f"{table[head, r][0]:.1f} ± {table[head, r][1]:.1f}" for r in recipes]
        stuck = " / ".join(f"{table[head, r][2]}" for r in recipes)
        steps = " / ".join(f"{table[head, r][3]:.0f}" for r in recipes)
        print(f"| `{head}` | {' | '.join(cells)} | {stuck} | {steps} |")


if __name__ == "__main__":
    main()
