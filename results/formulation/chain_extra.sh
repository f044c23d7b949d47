#!/bin/bash
# Time permitting, after chain_late.sh: slot A derived's Fig. 5 at m=32 and 128's dense; slot B
# a τ probe (recall, paper, m=256, τ=0.5, seed 1337), then derived's sparse m=128 points.
cd /work/main
F=results/formulation/fig5
D=results/formulation/recall
fig() {
    name=$1; shift
    start=$(date +%s)
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5/$name "$@" > $F/$name.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $F/$name.log
    cp out-form/fig5/$name/log.jsonl $F/$name.jsonl
}
one() {
    start=$(date +%s)
    OMP_NUM_THREADS=1 python -m experiments.recall --jobs=1 --seed=$2 --models=$3 --out_dir=$D/$1 > $D/$1.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $D/$1.log
}
if [ "$1" = A ]; then
    while ! grep -q "^wall" $F/derived_k4_m256.log 2>/dev/null; do sleep 10; done
    fig derived_dense_m32 --formulation=derived --mixer=fm --n_slots=32
    fig derived_k8_m32 --formulation=derived --n_slots=32 --top_k=8
    fig derived_k4_m32 --formulation=derived --n_slots=32 --top_k=4
    fig derived_dense_m128 --formulation=derived --mixer=fm --n_slots=128
else
    while ! grep -q "^wall" $F/derived_k4_m64.log 2>/dev/null; do sleep 10; done
    one probe_tau0.5_s1337_m256 1337 fm_sparse:formulation=paper:top_k=16:router_temp=0.5:n_slots=256:seed_index=3
    fig derived_k32_m128 --formulation=derived --n_slots=128 --top_k=32
    fig derived_k4_m128 --formulation=derived --n_slots=128 --top_k=4
fi
