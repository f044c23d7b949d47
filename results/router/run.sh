#!/bin/bash
# The sparse-router study's language-model runs (results/README.md, "Sparse router health and
# capacity"): the default run (fm_sparse m=64 k=8, 1500 iterations) with the old router init and
# with each balancing, then loss at 1x and 16x and router health. Each run took 7-25 min on the
# shared 2-core CPU at 1 thread, two at a time. The old init was run from commit 289b0c6 as
# `python train.py --seed=S [--n_slots=256]`; on today's code `--router_conv_bias=True
# --router_balance=none` builds the same weights (checked tensor for tensor).
# The recall runs of the study are in results/recall/router_balance/: each recall.json holds its
# command (python -m experiments.recall --jobs=1 --seed=S --models=...).
set -e
R=results/router/lm
run() {   # name, then train.py arguments
    name=$1; shift
    OMP_NUM_THREADS=1 python train.py --device=cpu --out_dir=out-router/$name "$@" | tee $R/$name.log
    cp out-router/$name/log.jsonl $R/$name.jsonl
}
OLD='--router_conv_bias=True --router_balance=none'
run old_m64_s1337 --seed=1337 $OLD
run old_m64_s1338 --seed=1338 $OLD
run old_m256_s1337 --seed=1337 --n_slots=256 $OLD
run bias_m64_s1337 --seed=1337 --router_balance=bias
run bias_m64_s1338 --seed=1338 --router_balance=bias
run bias_m256_s1337 --seed=1337 --n_slots=256 --router_balance=bias
run aux_m64_s1337 --seed=1337 --router_balance=aux
run none_m64_s1337 --seed=1337 --router_balance=none
run bias0.001_m64_s1337 --seed=1337 --router_balance=bias --router_bias_rate=0.001
RUNS=$(ls -d out-router/* | paste -sd, -)
python -m experiments.evaluate --out_dirs=$RUNS --lengths=1,16 --threads=1 --json=$R/eval.json \
    --table= --plot=
python -m experiments.router --out_dirs=$RUNS --plot_dir=results/router | tee results/router/health_lm_all.txt
