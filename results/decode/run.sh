#!/bin/bash
# Decoding cost of the four trained language models, 200 steps per point
# (results/README.md, "Decoding"), on the checkpoints of a 600-iteration run of the reproduction
# (commit 7493955; its loss table is superseded by results/lm/).
set -e
python -m experiments.reproduce --max_iters=600 --train_minutes=25 --runs_dir=out-repro \
    --results_dir=out-repro/results \
    --train_args='--eval_iters=10 --router_conv_bias=True --router_balance=none'   # the router then
MODELS=out-repro/shakespeare_char_fm,out-repro/shakespeare_char_fm_sparse,out-repro/shakespeare_char_mamba2,out-repro/shakespeare_char_attention
python -m experiments.bench decode --device=cpu --contexts=1024,8192,16384 --tokens=200 \
    --slot_repeats=200 --out_dirs=$MODELS \
    --json=results/decode/decode.json --table=results/decode/decode.md | tee results/decode/decode.log
# the same at 2 threads, fewer points (its exact command was not recorded: these are the settings
# its files state)
python -m experiments.bench decode --device=cpu --threads=2 --contexts=1024,16384 --slots=1024,4096 \
    --tokens=200 --slot_repeats=200 --out_dirs=$MODELS \
    --json=results/decode/decode_2threads.json --table=results/decode/decode_2threads.md \
    | tee results/decode/decode_2threads.log
