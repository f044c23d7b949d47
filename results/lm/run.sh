#!/bin/bash
# The language-model comparison at block 64 (results/README.md, "Language modelling").
# Made at commit 23d4853 by this procedure under its old name (summary.md's first line);
# in the current layout, from the repo root, with the router as it was then (train_args):
set -e
python data/shakespeare_char/prepare.py   # offline: --input PATH/input.txt
python -m experiments.reproduce --results_dir=results/lm --runs_dir=out-repro-full --train_minutes=38 \
    --train_args='--eval_iters=10 --router_conv_bias=True --router_balance=none'
