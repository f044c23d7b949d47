#!/bin/bash
# After P3's queue: derived's Fig. 5 points at m=256 (the same fig() as chain_probes.sh).
cd /work/main
while ! grep -q "^wall" results/formulation/recall/paper_s1338_m1024.log 2>/dev/null; do sleep 20; done
F=results/formulation/fig5
fig() {  # name, then train.py arguments
    name=$1; shift
    start=$(date +%s)
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5/$name "$@" > $F/$name.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $F/$name.log
    cp out-form/fig5/$name/log.jsonl $F/$name.jsonl
}
m=256
fig derived_dense_m$m --mixer=fm --n_slots=$m
fig derived_k$((m/4))_m$m --n_slots=$m --top_k=$((m/4))
fig derived_k4_m$m --n_slots=$m --top_k=4
