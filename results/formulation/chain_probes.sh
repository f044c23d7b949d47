#!/bin/bash
# After P4's queue: the 1x/16x evaluation over the whole val split, then recall probes of the
# choices the sources leave open (router through the conv; no balancing), then derived's Fig. 5
# at m=64 (FIG_MS); chain_derived256.sh runs derived's m=256 after P3's queue.
cd /work/main
while ! grep -q "^wall" results/formulation/fig5/paper_k4_m128.log 2>/dev/null; do sleep 20; done
R=results/formulation/lm
mkdir -p $R/full
start=$(date +%s)
OMP_NUM_THREADS=1 python -m experiments.evaluate --out_dirs=out-form/derived,out-form/paper,out-form/mamba2,out-form/attention \
    --lengths=1,16 --threads=1 --eval_tokens=1000000 --json=$R/full/eval.json --table=$R/full/eval.md \
    --plot=$R/full/eval.png --so_far=$R/full/loss_so_far.png > $R/full/eval.log 2>&1
echo "wall $(( $(date +%s)-start )) s" >> $R/full/eval.log
D=results/formulation/recall
one() {  # name, seed, models
    start=$(date +%s)
    OMP_NUM_THREADS=1 python -m experiments.recall --jobs=1 --seed=$2 --models=$3 --out_dir=$D/$1 > $D/$1.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $D/$1.log
}
P=fm_sparse:formulation=paper:top_k=16
one probe_routerconv_s1337_m64_256 1337 $P:router_conv=True:n_slots=64:seed_index=2,$P:router_conv=True:n_slots=256:seed_index=3
one probe_none_s1337_m64_256 1337 $P:router_balance=none:n_slots=64:seed_index=2,$P:router_balance=none:n_slots=256:seed_index=3
one probe_routerconv_s1338_m64_256 1338 $P:router_conv=True:n_slots=64:seed_index=2,$P:router_conv=True:n_slots=256:seed_index=3
F=results/formulation/fig5
fig() {  # name, then train.py arguments
    name=$1; shift
    start=$(date +%s)
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5/$name "$@" > $F/$name.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $F/$name.log
    cp out-form/fig5/$name/log.jsonl $F/$name.jsonl
}
for m in ${FIG_MS:-64}; do
    fig derived_dense_m$m --mixer=fm --n_slots=$m
    fig derived_k$((m/4))_m$m --n_slots=$m --top_k=$((m/4))
    fig derived_k4_m$m --n_slots=$m --top_k=4
done
