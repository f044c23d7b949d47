#!/bin/bash
# The CPU benchmarks of results/README.md, "Benchmarks" (2-core CPU, torch 2.13.0+cpu). The scan
# and training-step benches are timed side by side in one run each; compare numbers within a file.
# PATH/ssd_minimal.py: state-spaces/mamba's mamba_ssm/modules/ssd_minimal.py (needs einops).
set -e
B=results/bench
# quiet machine, 2 threads
python -m experiments.bench scan --threads=2 --naive=False --ssd_minimal=PATH/ssd_minimal.py \
    --json=$B/scan_2threads_quiet.json | tee $B/scan_2threads_quiet.log
python -m experiments.bench train --threads=2 --repeats=5 --json=$B/train_2threads_quiet.json \
    | tee $B/train_2threads_quiet.log
# loaded machine, 1 thread
python -m experiments.bench scan --threads=1 --ssd_minimal=PATH/ssd_minimal.py \
    --json=$B/scan_final2.json | tee $B/scan_final2.log
python -m experiments.bench train --threads=1 --repeats=7 --json=$B/train_final.json | tee $B/train_final.log
python -m experiments.bench train --threads=1 --compile=True --mixers=fm,fm_sparse,attention \
    --shapes=256x16,4096x1 --repeats=5 --json=$B/train_final_compile.json | tee $B/train_final_compile.log
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m experiments.bench train --threads=1 --compile=True \
    --mixers=fm,attention --shapes=256x16 --repeats=3 | tee $B/compile_cold.log
# sparse vs dense decode step (two runs: decode_quiet_before.json, then this one)
python -m experiments.bench decode --contexts= --slots=256,1024,4096 \
    --json=$B/decode_final.json | tee $B/decode_final.log
# HBM bytes of one scan_triton fwd+bwd, modelled on CPU (launches recorded, not run), before/after
# the glue moved into the kernels
python -m experiments.bench scan --bytes=True --bytes_before=46f870e --B=8 --T=2048 --H=8 --M=64 \
    --P=64 --json=results/gpu/hbm_bytes.json | tee $B/hbm_bytes.md
