#!/bin/bash
# Longer-context comparison, run from a frozen snapshot (commit recorded in results/long/commit.txt).
set -e
export OMP_NUM_THREADS=1
mkdir -p results/long out-long
git rev-parse HEAD > results/long/commit.txt
t0=$(date +%s)
echo "start $(date -u)" > results/long/timing.txt
for m in mamba2 fm_sparse attention fm; do
  ts=$(date +%s)
  python train.py config/long_$m.py --out_dir=out-long/$m --device=cpu > out-long/train_$m.log 2>&1
  echo "train $m $(( $(date +%s) - ts )) s" >> results/long/timing.txt
  cp out-long/$m/log.jsonl results/long/train_$m.jsonl
done
ts=$(date +%s)
python eval.py --out_dirs=out-long/fm,out-long/fm_sparse,out-long/mamba2,out-long/attention \
  --lengths=1,2,4,8,16 --eval_tokens=65536 --threads=1 --device=cpu \
  --table=results/long/eval.md --plot=results/long/eval.png --json=results/long/eval.json > out-long/eval.log 2>&1
echo "eval $(( $(date +%s) - ts )) s" >> results/long/timing.txt
echo "total $(( $(date +%s) - t0 )) s; end $(date -u)" >> results/long/timing.txt
