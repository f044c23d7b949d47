#!/bin/bash
# Second driver (replaces run_long.sh after mamba2, to finish by the deadline): fm trains now,
# in parallel with fm_sparse (already running, pid 17212); attention after fm_sparse; then eval.
export OMP_NUM_THREADS=1
train() {
  ts=$(date +%s)
  python train.py config/long_$1.py --out_dir=out-long/$1 --device=cpu > out-long/train_$1.log 2>&1
  echo "train $1 $(( $(date +%s) - ts )) s (ended $(date -u +%H:%M:%S))" >> results/long/timing.txt
  cp out-long/$1/log.jsonl results/long/train_$1.jsonl
}
train fm &
FM=$!
while kill -0 17212 2>/dev/null; do sleep 10; done
echo "train fm_sparse ended $(date -u +%H:%M:%S) (started 04:59 by run_long.sh)" >> results/long/timing.txt
cp out-long/fm_sparse/log.jsonl results/long/train_fm_sparse.jsonl
train attention
wait $FM
ts=$(date +%s)
python eval.py --out_dirs=out-long/fm,out-long/fm_sparse,out-long/mamba2,out-long/attention \
  --lengths=1,2,4,8,16 --eval_tokens=65536 --threads=1 --device=cpu \
  --table=results/long/eval.md --plot=results/long/eval.png --json=results/long/eval.json > out-long/eval.log 2>&1
echo "eval $(( $(date +%s) - ts )) s; end $(date -u)" >> results/long/timing.txt
