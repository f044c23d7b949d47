#!/bin/bash
# Issue 21's measurements: formulation='paper' vs 'derived', with Mamba-2 and attention beside them.
# Machine: the shared 2-core CPU (torch 2.13.0+cpu), 1 thread per process, two processes at a time
# (plus other workers' tests). Wall times (also the last line of each .log) are under that load.
# The commands ran as queues of one process each, two queues at a time; this file lists them by
# measurement.
# The model.py default formulation changed to 'paper' while these ran (at 23:52, before its commit);
# every run here started after that names its formulation.
set -e
R=results/formulation/lm
run() {   # name, then train.py arguments
    name=$1; shift
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --out_dir=out-form/$name "$@" > $R/$name.log 2>&1
    cp out-form/$name/log.jsonl $R/$name.jsonl
}
# P1: the default LM run (fm_sparse m=64 k=8, 4x128, block 64, 1500 iterations), seed 1337
run derived --formulation=derived    # 993 s  (paired with paper; ran without the flag, when 'derived' was the default)
run paper --formulation=paper        # 958 s
run mamba2 --mixer=mamba2            # 466 s  (paired with attention, then with recall)
run attention --mixer=attention      # 265 s
RUNS=out-form/derived,out-form/paper,out-form/mamba2,out-form/attention
# 1x and 16x, 32768 tokens per length (32 windows at 16x)                              21 s
python -m experiments.evaluate --out_dirs=$RUNS --lengths=1,16 --threads=1 --json=$R/eval.json \
    --table=$R/eval.md --plot=$R/eval.png --so_far=$R/loss_so_far.png
# P2 and the main P1 numbers: the whole val split (1742 windows at 1x, 108 at 16x)       58 s
python -m experiments.evaluate --out_dirs=$RUNS --lengths=1,16 --threads=1 --eval_tokens=1000000 \
    --json=$R/full/eval.json --table=$R/full/eval.md --plot=$R/full/eval.png --so_far=$R/full/loss_so_far.png
# P1, second seed (a later session; 1 thread each, two at a time, nothing else running):
# the names take _s1338, e.g. out-form/paper_s1338, results/formulation/lm/paper_s1338.log
run1338() { name=$1; shift
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1338 --out_dir=out-form/${name}_s1338 "$@" \
        > $R/${name}_s1338.log 2>&1
    cp out-form/${name}_s1338/log.jsonl $R/${name}_s1338.jsonl
}
run1338 paper --formulation=paper      # 393 s  (paired with derived)
run1338 derived --formulation=derived  # 411 s
run1338 mamba2 --mixer=mamba2          # 312 s  (paired with attention)
run1338 attention --mixer=attention    # 142 s
S=out-form/derived_s1338,out-form/paper_s1338,out-form/mamba2_s1338,out-form/attention_s1338
python -m experiments.evaluate --out_dirs=$S --lengths=1,16 --threads=2 --eval_tokens=1000000 \
    --json=$R/full_s1338/eval.json --table=$R/full_s1338/eval.md --plot=$R/full_s1338/eval.png \
    --so_far=$R/full_s1338/loss_so_far.png                                              # 36 s
python -m experiments.router --out_dirs=out-form/derived_s1338,out-form/paper_s1338 \
    --labels=derived_s1338,paper_s1338 > $R/router_s1338.txt                            # 3 s
# router health of the two FM runs                                                       3 s
python -m experiments.router --out_dirs=out-form/derived,out-form/paper --labels=derived,paper \
    --plot_dir=$R/router > $R/router.txt
# P3: recall (MQAR, 2400 steps), the paper formulation; derived's are results/recall/router_balance/bias_*
D=results/formulation/recall
P=fm_sparse:formulation=paper:top_k=16
rec() { OMP_NUM_THREADS=1 python -m experiments.recall --jobs=1 --seed=$2 --models=$3 --out_dir=$D/$1 > $D/$1.log 2>&1; }
rec paper_s1337_m64_256 1337 $P:n_slots=64:seed_index=2,$P:n_slots=256:seed_index=3   # 372 s
rec paper_s1338_m64_256 1338 $P:n_slots=64:seed_index=2,$P:n_slots=256:seed_index=3   # 359 s
rec paper_s1337_m1024 1337 $P:n_slots=1024:seed_index=4                               # 1093 s
rec paper_s1338_m1024 1338 $P:n_slots=1024:seed_index=4                               # 866 s
# probes of choices the sources leave open (paper_rconv_s1337_m64_256 was run and committed by
# another session, c12719e: the same spec with router_conv=True, seed 1337)
rec probe_none_s1337_m64_256 1337 $P:router_balance=none:n_slots=64:seed_index=2,$P:router_balance=none:n_slots=256:seed_index=3
rec probe_routerconv_s1338_m64_256 1338 $P:router_conv=True:n_slots=64:seed_index=2,$P:router_conv=True:n_slots=256:seed_index=3
rec probe_tau0.5_s1337_m256 1337 $P:router_temp=0.5:n_slots=256:seed_index=3
rec probe_tau0.5_s1338_m256 1338 $P:router_temp=0.5:n_slots=256:seed_index=3     # 271 s (a later session)
# P4: Fig. 5 at our scale, 500 iterations (a shorter schedule than the default 1500), seed 1337
F=results/formulation/fig5
fig() {
    name=$1; shift
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1337 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5/$name "$@" > $F/$name.log 2>&1
    cp out-form/fig5/$name/log.jsonl $F/$name.jsonl
}
for FORM in paper derived; do
    for m in 32 64 128 256; do
        fig ${FORM}_dense_m$m --formulation=$FORM --mixer=fm --n_slots=$m          # paper: 89/116/166/491 s
        fig ${FORM}_k$((m/4))_m$m --formulation=$FORM --n_slots=$m --top_k=$((m/4))  # paper: 95/119/170/282 s
        fig ${FORM}_k4_m$m --formulation=$FORM --n_slots=$m --top_k=4              # paper: 93/118/170/269 s
    done
done
# every Fig. 5 checkpoint on the whole val split at 1x, then the tables and fig5/fig5.png
# (run as two: eval_a over the 22 checkpoints done at 00:19, eval_b over derived_k32_m128, derived_k4_m128)
python -m experiments.evaluate --out_dirs=$(ls -d out-form/fig5/* | paste -sd, -) --lengths=1 --threads=1 \
    --eval_tokens=1000000 --json=$F/eval_a.json --table=$F/eval_a.md --plot=
python results/formulation/summarize.py
# Fig. 5's second seed (a later session; two queues at a time, 88-303 s each), then its
# checkpoints on the whole val split at 1x (paper's 12 alone: 111 s)
fig1338() {
    name=$1; shift
    OMP_NUM_THREADS=1 python train.py --device=cpu --seed=1338 --max_iters=500 --lr_decay_iters=500 \
        --out_dir=out-form/fig5_s1338/$name "$@" > ${F}_s1338/$name.log 2>&1
    cp out-form/fig5_s1338/$name/log.jsonl ${F}_s1338/$name.jsonl
}
for FORM in paper derived; do
    for m in 32 64 128 256; do
        fig1338 ${FORM}_dense_m$m --formulation=$FORM --mixer=fm --n_slots=$m
        fig1338 ${FORM}_k$((m/4))_m$m --formulation=$FORM --n_slots=$m --top_k=$((m/4))
        fig1338 ${FORM}_k4_m$m --formulation=$FORM --n_slots=$m --top_k=4
    done
done
python -m experiments.evaluate --out_dirs=$(ls -d out-form/fig5_s1338/* | paste -sd, -) --lengths=1 \
    --threads=2 --eval_tokens=1000000 --json=${F}_s1338/eval.json --table=${F}_s1338/eval.md --plot=
# looking inside the dense Fig. 5 models: the read's share on the slots a sparse twin keeps  (~20 s)
python results/formulation/read_share.py out-form/fig5/paper_dense_m128 out-form/fig5/derived_dense_m128 \
    out-form/fig5_s1338/paper_dense_m128 out-form/fig5_s1338/derived_dense_m128 \
    out-form/fig5/paper_dense_m256 out-form/fig5/derived_dense_m256 \
    out-form/fig5_s1338/paper_dense_m256 out-form/fig5_s1338/derived_dense_m256 \
    out-form/fig5/paper_dense_m32 out-form/fig5/derived_dense_m32 > results/formulation/fig5_read_share.txt
