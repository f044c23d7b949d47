#!/bin/bash
# P4's queue (one process at a time): Fig. 5 at our scale, 500 iterations, seed 1337.
cd /work/main
F=results/formulation/fig5
while ! grep -q "^wall" results/formulation/lm/router.txt 2>/dev/null; do sleep 20; done
one() {  # name, then train.py arguments
    name=$1; shift
    start=$(date +%s)
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5/$name "$@" > $F/$name.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $F/$name.log
    cp out-form/fig5/$name/log.jsonl $F/$name.jsonl
}
FORM=${FORM:-paper}
for m in 64 256 32 128; do
    one ${FORM}_dense_m$m --formulation=$FORM --mixer=fm --n_slots=$m
    one ${FORM}_k$((m/4))_m$m --formulation=$FORM --n_slots=$m --top_k=$((m/4))
    one ${FORM}_k4_m$m --formulation=$FORM --n_slots=$m --top_k=4
done
