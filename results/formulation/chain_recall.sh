#!/bin/bash
# P3's queue (one process at a time): waits for s1337 m64_256 (started by hand), then the rest.
cd /work/main
D=results/formulation/recall
while ! grep -q "^wall" $D/paper_s1337_m64_256.log 2>/dev/null; do sleep 20; done
one() {  # name, seed, models
    start=$(date +%s)
    OMP_NUM_THREADS=1 python -m experiments.recall --jobs=1 --seed=$2 --models=$3 --out_dir=$D/$1 > $D/$1.log 2>&1
    echo "wall $(( $(date +%s)-start )) s" >> $D/$1.log
}
P=fm_sparse:formulation=paper:top_k=16
one paper_s1338_m64_256 1338 $P:n_slots=64:seed_index=2,$P:n_slots=256:seed_index=3
one paper_s1337_m1024 1337 $P:n_slots=1024:seed_index=4
one paper_s1338_m1024 1338 $P:n_slots=1024:seed_index=4
