#!/usr/bin/env bash
# The GPU checklist in one command: correctness on CUDA, scan and decode benchmarks, and
# train.py on one GPU. Every step's outcome (passed / failed / timeout / skipped, with its
# exit code, seconds and log) goes to results/gpu/checklist.json; a failing step is recorded
# and the script goes on to the next one.
#
#   bash scripts/gpu_check.sh prepare   # where the data is (TIKTOKEN_CACHE_DIR: a tiktoken cache;
#                                       # FM_TEXT: the tiny-Shakespeare text): fills .gpu_carry/
#   bash scripts/gpu_check.sh           # on the GPU machine: run the checklist
#
# .gpu_carry/ holds what the GPU machine cannot download: the GPT-2 BPE ranks (a tiktoken
# cache, TIKTOKEN_CACHE_DIR points here), the tiny-Shakespeare text, and the wheels of fla-core
# and mamba-ssm (pure Python; mamba-ssm without its CUDA extension: only its Triton kernels
# are used). Take it along to the GPU machine (the device tool's `carry: [".gpu_carry"]`).
#
# Steps, in order of priority (a step that would pass the time budget is skipped):
#   env          versions, GPU, driver -> results/gpu/env.json
#   install      fla-core, mamba-ssm from .gpu_carry/whl (else pip, short timeout); may fail
#   pytest       tests/test_cuda.py + the kernel tests (interpreter, sm_80/sm_90 compile) -> pytest.xml, pytest.json
#   scan_bf16    bench.py scan, B=8 T=4096 H=16 M=64 P=64, bfloat16 -> scan_bf16.json
#   scan_fp32    the same in float32 -> scan_fp32.json
#   decode       bench.py decode on CUDA, m in {1024, 4096, 16384}, k=16, contexts 1k..32k -> decode.json
#   data         data/shakespeare/prepare.py (GPT-2 BPE) from .gpu_carry
#   train_*      train.py, bf16 autocast, torch.compile, 300 iterations of the GPT-2-BPE config
#                (fm_sparse) and of attention at the same depth and width, at block_size 1024
#                (batch 16) and 8192 (batch 2): 16,384 tokens per iteration each; if a compiled
#                run fails, 150 eager iterations of it (train_*_eager, marked compile: false)
#   train_summary  tokens/s and MFU (median over the logged iterations after the first) -> train.json
#   sanitizer    compute-sanitizer memcheck over the CUDA scan and step tests at shapes that
#                are not powers of 2 (masked tiles), PyTorch's caching allocator off
#   pack         results/gpu/ -> $OUT/gpu_results.tar.gz (the device tool returns only $OUT)
#
# Environment: GPU_CHECK_BUDGET_S (default 510: the whole run, seconds), GPU_CHECK_ONLY (a
# comma-separated list of steps to run, e.g. "env,pytest"; "train" selects every train_* step),
# PYTHON (default python3), GPU_CHECK_ASSUME_CUDA=1 (run the CUDA steps without a GPU, to test
# this script: they fail, and are recorded as failed).
# Exit code: 0 every step that ran passed; 1 a step failed or timed out; 2 no CUDA device
# (every GPU step recorded as skipped; nothing measured).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
CARRY=$REPO/.gpu_carry
RES=$REPO/results/gpu
SITE=/tmp/fm_gpu_site                       # where install puts fla / mamba_ssm (on PYTHONPATH)
export PYTHONUNBUFFERED=1

# --- prepare: run before the GPU call, where the data is -----------------------------------
if [ "${1:-}" = "prepare" ]; then
    set -e
    TIK=${TIKTOKEN_CACHE_DIR:-}                                   # a tiktoken cache holding the GPT-2 ranks
    TEXT=${FM_TEXT:-$REPO/data/shakespeare_char/input.txt}       # the tiny-Shakespeare text
    mkdir -p "$CARRY/whl"
    EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
    if [ -n "$EXCLUDE" ] && ! grep -qx '/.gpu_carry/' "$EXCLUDE" 2>/dev/null; then
        mkdir -p "$(dirname "$EXCLUDE")" && echo '/.gpu_carry/' >> "$EXCLUDE"
    fi
    if [ -n "$TIK" ] && [ -d "$TIK" ]; then
        rm -rf "$CARRY/tiktoken" && cp -r "$TIK" "$CARRY/tiktoken" && chmod -R u+w "$CARRY/tiktoken"
    else
        echo "TIKTOKEN_CACHE_DIR is not a directory: the BPE data step will need network (or copy a tiktoken cache to $CARRY/tiktoken)"
    fi
    if [ -f "$TEXT" ]; then
        rm -f "$CARRY/tinyshakespeare.txt" && cp "$TEXT" "$CARRY/tinyshakespeare.txt"
    else
        echo "no $TEXT (set FM_TEXT): put the tiny-Shakespeare text at $CARRY/tinyshakespeare.txt"
    fi
    set +e
    timeout 120 $PY -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/whl" fla-core \
        || echo "could not download fla-core; the GPU run will try pip there and skip it if that fails"
    MAMBA_SKIP_CUDA_BUILD=TRUE timeout 180 $PY -m pip download -q --no-deps --no-binary=:all: \
        --no-build-isolation -d "$CARRY/whl" mamba-ssm \
        || echo "could not download mamba-ssm; the GPU run will skip it"
    du -sh "$CARRY"; ls -la "$CARRY" "$CARRY/whl"
    exit 0
fi

# --- the checklist ----------------------------------------------------------------------------
BUDGET=${GPU_CHECK_BUDGET_S:-510}
ONLY=${GPU_CHECK_ONLY:-}
T0=$(date +%s)
mkdir -p "$RES/logs"
STEPS=$RES/logs/steps.jsonl
: > "$STEPS"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$CARRY/tiktoken}

record() {  # name status rc seconds note
    $PY -c 'import json, sys; n, s, rc, t, note = sys.argv[1:6]; print(json.dumps({"step": n, "status": s,
        "rc": int(rc) if rc else None, "seconds": int(t), "note": note, "log": f"logs/{n}.log"}))' \
        "$1" "$2" "$3" "$4" "$5" >> "$STEPS"
    printf '%-16s %-8s rc=%-4s %4ss  %s\n' "$1" "$2" "$3" "$4" "$5"
}

FAILED=0
LAST_STATUS=""
run_step() {  # name needs(cuda|any) limit_s command-string
    local name=$1 needs=$2 limit=$3 cmd=$4
    LAST_STATUS=not_run
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]] && [[ ",$ONLY," != *",${name%%_*},"* ]]; then
        return
    fi
    if [ "$needs" = cuda ] && [ "$HAVE_CUDA" != 1 ]; then
        record "$name" skipped "" 0 "no CUDA device"; return
    fi
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if [ "$left" -lt 30 ]; then
        record "$name" skipped "" 0 "time budget spent (GPU_CHECK_BUDGET_S=$BUDGET)"; return
    fi
    [ "$limit" -gt $(( left - 15 )) ] && limit=$(( left - 15 ))
    local log=$RES/logs/$name.log t=$(date +%s)
    echo "== $name (limit ${limit}s)"
    printf '%s\n' "== $name (limit ${limit}s): $cmd" > "$log"
    timeout -k 10 "$limit" bash -c "$cmd" >> "$log" 2>&1
    local rc=$? status=passed note=""
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=timeout; note="stopped at ${limit}s"; FAILED=1
    elif [ $rc -ne 0 ]; then
        status=failed; note=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-300); FAILED=1
    fi
    record "$name" "$status" "$rc" $(( $(date +%s) - t )) "$note"
    LAST_STATUS=$status
    [ "$status" = passed ] || tail -n 8 "$log"
}

HAVE_CUDA=0
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAVE_CUDA=1
[ "${GPU_CHECK_ASSUME_CUDA:-0}" = 1 ] && HAVE_CUDA=1     # to test this script on a CPU machine

run_step env any 60 "$PY - <<'EOF'
import json, os, platform, subprocess
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        return f'error: {e}'
info = {'date_utc': sh('date -u +%Y-%m-%dT%H:%M:%SZ'), 'host': platform.node(), 'cpus': os.cpu_count(),
        'python': platform.python_version(), 'git_commit': sh('git rev-parse HEAD 2>/dev/null'),
        'nvidia_smi': sh('nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader')}
try:
    import torch, triton
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton.__version__,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    info['torch_error'] = repr(e)
json.dump(info, open('$RES/env.json', 'w'), indent=1)
print(json.dumps(info, indent=1))
EOF"

# fla-core (pure Python + Triton) and mamba-ssm's Triton kernels: wanted for comparisons, never required.
run_step install any 150 "
mkdir -p $SITE; ok=0
if ls $CARRY/whl/fla_core-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target $SITE $CARRY/whl/fla_core-*.whl || ok=1
else
    timeout 60 $PY -m pip install -q --retries 0 --timeout 5 --no-deps --target $SITE fla-core || ok=1
fi
$PY -c 'from fla.ops.gla import chunk_gla; import fla; print(\"fla\", getattr(fla, \"__version__\", \"?\"))' || ok=1
# mamba-ssm: its package __init__ imports a CUDA extension that is not built here; its Triton
# kernels (mamba_ssm.ops.triton.ssd_combined) need none. Unpack the pure-Python source.
if ls $CARRY/whl/mamba_ssm-*.tar.gz >/dev/null 2>&1; then
    tar xzf \$(ls $CARRY/whl/mamba_ssm-*.tar.gz | tail -n 1) -C /tmp && cp -r /tmp/mamba_ssm-*/mamba_ssm $SITE/ || ok=1
else
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE timeout 90 $PY -m pip install -q --retries 0 --timeout 5 \
        --no-deps --no-build-isolation --target $SITE mamba-ssm || ok=1
fi
$PY - <<'EOF' || ok=1
import importlib.util, sys, types
# load the Triton SSD kernels without mamba_ssm/__init__.py (it imports the CUDA extension)
spec = importlib.util.find_spec('mamba_ssm')
pkg = types.ModuleType('mamba_ssm'); pkg.__path__ = list(spec.submodule_search_locations)
sys.modules['mamba_ssm'] = pkg
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
print('mamba_ssm.ops.triton.ssd_combined: ok')
EOF
exit \$ok"

# pytest-xdist, if there, runs the three files side by side (one file per worker: --dist loadfile).
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 3 --dist loadfile"
run_step pytest cuda 240 "$PY -m pytest -q -rs -p no:cacheprovider $XDIST tests/test_cuda.py tests/test_kernels.py \
    tests/test_kernels_compile_gputarget.py --junitxml=$RES/pytest.xml; rc=\$?
$PY - <<'EOF'
import json, xml.etree.ElementTree as ET
root = ET.parse('$RES/pytest.xml').getroot()
suite = root if root.tag == 'testsuite' else root.find('testsuite')
out = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
out['seconds'] = float(suite.get('time', 0))
out['failed'] = [{'test': f\"{c.get('classname')}::{c.get('name')}\", 'message': (e.get('message') or '')[:500]}
                 for c in suite.iter('testcase') for e in list(c) if e.tag in ('failure', 'error')]
out['skipped_tests'] = [f\"{c.get('classname')}::{c.get('name')}\" for c in suite.iter('testcase')
                        if c.find('skipped') is not None]
json.dump(out, open('$RES/pytest.json', 'w'), indent=1)
print({k: out[k] for k in ('tests', 'failures', 'errors', 'skipped')})
import torch
if torch.cuda.is_available() and any('test_cuda' in t for t in out['skipped_tests']):
    raise SystemExit('CUDA is available but tests in test_cuda.py were skipped: see logs/pytest.log')
EOF
[ \$? -eq 0 ] || rc=1
exit \$rc"

SCAN="$PY -m experiments.bench scan --device=cuda --B=8 --T=4096 --H=16 --M=64 --P=64"
run_step scan_bf16 cuda 150 "$SCAN --dtype=bfloat16 --json=$RES/scan_bf16.json"
run_step scan_fp32 cuda 150 "$SCAN --dtype=float32 --json=$RES/scan_fp32.json"
run_step decode cuda 150 "$PY -m experiments.bench decode --device=cuda --slots=1024,4096,16384 --slot_top_k=16 \
    --contexts=1024,2048,4096,8192,16384,32768 --json=$RES/decode.json"

run_step data any 90 "
if [ -f data/shakespeare/train.bin ] && [ -f data/shakespeare/val.bin ]; then echo 'already prepared'; exit 0; fi
text=$CARRY/tinyshakespeare.txt; [ -f \$text ] || text=data/shakespeare/input.txt
if [ -f \$text ]; then $PY data/shakespeare/prepare.py --input \$text; else $PY data/shakespeare/prepare.py; fi"

TRAIN="$PY train.py config/shakespeare_bpe_fm_sparse.py --device=cuda --dtype=bfloat16 --compile=True \
    --max_iters=300 --lr_decay_iters=300 --warmup_iters=30 --eval_interval=300 --eval_iters=5 --log_interval=25"
for T in 1024 8192; do
    BS=$(( 16 * 1024 / T ))
    for MIXER in fm_sparse attention; do
        run_step "train_${MIXER}_T$T" cuda 120 "$TRAIN --mixer=$MIXER --block_size=$T --batch_size=$BS \
            --out_dir=out-gpu/${MIXER}_T$T && cp out-gpu/${MIXER}_T$T/log.jsonl $RES/logs/train_${MIXER}_T$T.jsonl"
        if [ "$LAST_STATUS" = failed ]; then     # torch.compile broke: eager numbers, marked as such
            run_step "train_${MIXER}_T${T}_eager" cuda 90 "$TRAIN --compile=False --max_iters=150 --lr_decay_iters=150 \
                --eval_interval=150 --mixer=$MIXER --block_size=$T --batch_size=$BS --out_dir=out-gpu/${MIXER}_T${T}_eager \
                && cp out-gpu/${MIXER}_T${T}_eager/log.jsonl $RES/logs/train_${MIXER}_T${T}_eager.jsonl"
        fi
    done
done

run_step train_summary cuda 30 "$PY - <<'EOF'
import json, os, re, statistics
runs = {}
for T in (1024, 8192):
  for mixer in ('fm_sparse', 'attention'):
    for name in (f'{mixer}_T{T}', f'{mixer}_T{T}_eager'):
        path = f'out-gpu/{name}/log.jsonl'
        if not os.path.exists(path):
            continue
        recs = [json.loads(l) for l in open(path) if l.strip()]
        steps = [r for r in recs if 'tokens_per_s' in r and r['iter'] > 0]   # iter 0 holds the compile
        evals = [r for r in recs if 'val_loss' in r]
        text = open('$RES/logs/train_' + name + '.log').read() if os.path.exists('$RES/logs/train_' + name + '.log') else ''
        params = re.search(r'([0-9.]+)M params', text)
        tpi = re.search(r'([0-9,]+) tokens/iter', text)
        med = lambda k: statistics.median([r[k] for r in steps if k in r]) if any(k in r for r in steps) else None
        runs[name] = {'mixer': mixer, 'block_size': T, 'batch_size': 16 * 1024 // T, 'compile': 'eager' not in name,
                      'tokens_per_iter': int(tpi.group(1).replace(',', '')) if tpi else None,
                      'params_M': float(params.group(1)) if params else None,
                      'iters': max([r['iter'] for r in steps], default=None),
                      'tokens_per_s': med('tokens_per_s'), 'ms_per_iter': med('ms_per_iter'), 'mfu': med('mfu'),
                      'final_val_loss': evals[-1]['val_loss'] if evals else None}
ratios = {}
for T, target in ((1024, 0.5), (8192, 1.0)):
    fm = runs.get(f'fm_sparse_T{T}') or runs.get(f'fm_sparse_T{T}_eager')
    at = runs.get(f'attention_T{T}') or runs.get(f'attention_T{T}_eager')
    if fm and at and fm['tokens_per_s'] and at['tokens_per_s']:
        r = fm['tokens_per_s'] / at['tokens_per_s']
        ratios[f'T{T}'] = {'fm_over_attention_tokens_per_s': round(r, 3), 'target': target, 'met': r >= target,
                           'fm_compiled': fm['compile'], 'attention_compiled': at['compile']}
out = {'runs': runs, 'fm_vs_attention': ratios,
       'command': 'train.py config/shakespeare_bpe_fm_sparse.py --device=cuda --dtype=bfloat16 --compile=True '
                  '--max_iters=300 --mixer=M --block_size=T --batch_size=16384/T'}
json.dump(out, open('$RES/train.json', 'w'), indent=1)
print(json.dumps(out, indent=1))
if not runs:
    raise SystemExit('no training run left a log')
EOF"

run_step sanitizer cuda 120 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    -k 'test_scan_triton_equals_naive_on_cuda and (100-48 or 5-3 or 1-3) or test_step and (100 or 5-1-3 or 1-3)'"

# --- summary and packing ----------------------------------------------------------------------
$PY - "$STEPS" "$RES/checklist.json" "$BUDGET" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = {'steps': steps, 'budget_s': int(sys.argv[3]), 'total_s': int(sys.argv[4]),
       'counts': {s: sum(x['status'] == s for x in steps) for s in ('passed', 'failed', 'timeout', 'skipped')}}
json.dump(out, open(sys.argv[2], 'w'), indent=1)
print('\nchecklist (results/gpu/checklist.json):')
for x in steps:
    print(f"  {x['step']:<22} {x['status']:<8} {x['seconds']:>4} s  {x['note'][:100]}")
print(' ', out['counts'], f"in {out['total_s']} s")
EOF
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tar.gz" -C "$RES" . && cp "$RES/checklist.json" "$OUT/" \
        && echo "packed results/gpu into \$OUT/gpu_results.tar.gz (unpack: tar xzf gpu_results.tar.gz -C results/gpu)"
fi
if [ "$HAVE_CUDA" != 1 ]; then
    echo "no CUDA device: every GPU step was skipped (exit 2)"; exit 2
fi
exit $FAILED
