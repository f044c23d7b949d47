#!/bin/bash
# The late queues (written at 23:57, after the working tree's model.py default became 'paper', so
# every run names its formulation). Slot A: derived's Fig. 5 at m=256. Slot B: waits for the
# balance=none recall probe, then the router_conv probe at seed 1338, then derived's Fig. 5 at m=64.
cd /work/main
F=results/formulation/fig5
D=results/formulation/recall
fig() {  # name, then train.py arguments
    name=$1; shift
    start=$(date +%s)
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5/$name "$@" > $F/$name.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $F/$name.log
    cp out-form/fig5/$name/log.jsonl $F/$name.jsonl
}
one() {  # name, seed, models
    start=$(date +%s)
    OMP_NUM_THREADS=1 python -m experiments.recall --jobs=1 --seed=$2 --models=$3 --out_dir=$D/$1 > $D/$1.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $D/$1.log
}
figs() {  # m
    m=$1
    fig derived_dense_m$m --formulation=derived --mixer=fm --n_slots=$m
    fig derived_k$((m/4))_m$m --formulation=derived --n_slots=$m --top_k=$((m/4))
    fig derived_k4_m$m --formulation=derived --n_slots=$m --top_k=4
}
if [ "$1" = A ]; then
    figs 256
else
    while pgrep -f "router_balance=none:n_slots=64" > /dev/null; do sleep 10; done
    P=fm_sparse:formulation=paper:top_k=16
    one probe_routerconv_s1338_m64_256 1338 $P:router_conv=True:n_slots=64:seed_index=2,$P:router_conv=True:n_slots=256:seed_index=3
    figs 64
fi
