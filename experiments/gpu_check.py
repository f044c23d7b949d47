"""
The GPU checklist, in device calls that each finish inside a lease, most valuable first.

    python -m experiments.gpu_check --dry-run        # the plan: steps, budgets, which call each is in
    python -m experiments.gpu_check prepare          # here, before the calls: fills .gpu_carry/
    python -m experiments.gpu_check --call=1         # on the GPU machine: the steps of call 1 (then 2, 3)

The plan (--dry-run prints it with the commands) is three calls of at most 300 s of steps each,
690 s in all (at most 720), so that with the machine's start (a minute or two) it fits 15 minutes of device time:

    call 1  env, pytest_cuda (tests/test_cuda.py only: CI runs the CPU tests), our scan fwd and
            fwd+bwd in bf16 and fp32 beside the chunked PyTorch scan
    call 2  decode (sparse vs dense step, context sweep), graph_breaks (torch._dynamo.explain of
            each model's compiled training forward), install_peers, peers_autotune (fla's
            chunk_gla and mamba_ssm's kernel, once, to fill the autotune and JIT caches),
            peers (the same, timed)
    call 3  data, train.py (fm_sparse and attention at T = 1024 and 8192, bf16, compiled),
            train_summary, sanitizer (compute-sanitizer memcheck on the masked-tile CUDA tests)

Each step runs under its own timeout (its budget); a step that fails or times out is recorded and
the next one runs. Benchmarks rewrite their JSON after every row, so a timeout keeps what was
measured. After every step the results so far are packed into $OUT (gpu_callN.tar.gz, and
checklist_callN.json): the device tool returns only $OUT, and a later call starts on a bare
machine. Unpack them here with `tar xzf gpu_callN.tar.gz -C results/gpu`.

With the device tool (`run`), from the repo root here:

    1. python -m experiments.gpu_check prepare       # wheels of fla-core and mamba-ssm, the text
    2. run(command="python3 -m experiments.gpu_check --call=1", carry=[".gpu_carry"], timeout_s=285)
    3. run(command="python3 -m experiments.gpu_check --call=2", carry=[".gpu_carry"], timeout_s=265)
    4. run(command="python3 -m experiments.gpu_check --call=3", carry=[".gpu_carry"], timeout_s=230)
    5. for each call: tar xzf <files_at>/gpu_callN.tar.gz -C results/gpu; then give_back

Make the calls back to back (the machine stays warm about 30 s after a call; a cold start costs a
minute or more of the 15). A call's timeout_s (the dry run prints it) is its steps' budget plus 30 s
for packing and the interpreter's start: 285 + 265 + 230 s, with a start of 1-2 min, is under 15 min. A call that comes back timed out still returns what $OUT holds.

Options: --call=1|2|3|all, --only=step,step (a subset of the call's steps), --results=DIR
(default results/gpu), --dry-run. On a machine without CUDA the CUDA steps are recorded as
skipped. Exit code: 0 if every step that ran passed, 1 otherwise.
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run it from the repo root as a module: python -m experiments.gpu_check ...')
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY = os.path.join(REPO, '.gpu_carry')
SITE = '/tmp/fm_gpu_site'              # where install_peers puts fla and mamba_ssm (on PYTHONPATH)
CALL_LIMIT_S, TOTAL_LIMIT_S = 300, 720
PY = sys.executable


@dataclass
class Step:
    name: str
    call: int
    budget_s: int
    cuda: bool                         # needs a CUDA device
    cmd: str                           # a shell command, run from the repo root; {res}: results dir
    what: str


SCAN = (f"{PY} -m experiments.bench scan --device=cuda --B=8 --T=2048 --H=8 --M=64 --P=64 --naive=False "
        f"--repeats=10")
TRAIN = (f"{PY} train.py config/shakespeare_char_gpu.py --device=cuda --dtype=bfloat16 --compile=True "
         f"--dropout=0.0 --max_iters=40 --lr_decay_iters=40 --warmup_iters=5 --eval_interval=1000 "
         f"--eval_iters=2 --log_interval=5 --always_save_checkpoint=False")


def subcommand(name, call, budget_s, cuda, what):
    """A step running this file's subcommand `name` (env, graph_breaks, train_summary) on {res}."""
    return Step(name, call, budget_s, cuda, f"{PY} -m experiments.gpu_check {name} {{res}}", what)


def scan_step(dtype, budget_s, what):
    """Our Triton scan alone (--impls=ours) in `dtype` at SCAN's shape -> scan_<bf16|fp32>.json."""
    name = 'scan_' + {'bfloat16': 'bf16', 'float32': 'fp32'}[dtype]
    return Step(name, 1, budget_s, True,
                f"{SCAN} --dtype={dtype} --impls=ours --json={{res}}/{name}.json", what)


def train_step(mixer, T):
    batch = 16 * 1024 // T                     # 16,384 tokens per iteration at every T
    out = f"out-gpu/{mixer}_T{T}"
    # the log is copied on any exit, also when the step's timeout stops it (SIGTERM -> exit -> EXIT trap)
    keep = f"mkdir -p {{res}}/train; cp {out}/log.jsonl {{res}}/train/{mixer}_T{T}.jsonl 2>/dev/null"
    return Step(f"train_{mixer}_T{T}", 3, 35, True,
                f"trap '{keep}' EXIT; trap 'exit 143' TERM; "
                f"{TRAIN} --mixer={mixer} --block_size={T} --batch_size={batch} --out_dir={out}",
                f"train.py, {mixer}, T={T}, batch {batch}, 40 iterations (log.jsonl kept even if stopped)")


STEPS = [
    subcommand('env', 1, 10, False, 'versions, GPU, driver, commit -> env.json'),
    Step('pytest_cuda', 1, 150, True,      # 8 xdist workers where pytest-xdist is (the JIT compiles in parallel)
         f"{PY} -m pytest -q -rs -p no:cacheprovider $({PY} -c 'import xdist' 2>/dev/null && printf -- '-n 8') "
         f"tests/test_cuda.py --junitxml={{res}}/pytest_cuda.xml",
         'tests/test_cuda.py only: scan vs scan_naive (fwd, every gradient), decode steps, LM on CUDA = CPU'),
    scan_step('bfloat16', 50, 'our Triton scan fwd and fwd+bwd vs the chunked scan, bf16, '
                              'B=8 T=2048 H=8 M=P=64 (rows as they finish)'),
    scan_step('float32', 45, 'the same in fp32'),
    Step('decode', 2, 50, True,
         f"{PY} -m experiments.bench decode --device=cuda --slots=1024,4096,16384 --slot_top_k=16 "
         f"--contexts=1024,8192,32768 --tokens=20 --slot_repeats=30 --json={{res}}/decode.json",
         'sparse vs dense decode step as m grows; per-token latency vs context'),
    subcommand('graph_breaks', 2, 35, True,
               "torch._dynamo.explain of each mixer's training forward on CUDA -> graph_breaks.json"),
    Step('install_peers', 2, 15, False, f"{PY} -m experiments.gpu_check install_peers",
         'fla-core and mamba_ssm (Triton kernels only) from .gpu_carry/whl into ' + SITE),
    Step('peers_autotune', 2, 90, True,
         f"TRITON_CACHE_AUTOTUNING=1 {SCAN} --dtype=bfloat16 --impls=peers --repeats=1 "
         f"--json={{res}}/peers_autotune.json",
         "fla chunk_gla and mamba_chunk_scan_combined once each: their autotune and JIT, cached on disk"),
    Step('peers', 2, 45, True,
         f"TRITON_CACHE_AUTOTUNING=1 {SCAN} --dtype=bfloat16 --impls=peers,triton "
         f"--json={{res}}/peers_bf16.json",
         'the peers timed beside our scan, bf16, at the same shape'),
    Step('data', 3, 10, False,
         f"test -f data/shakespeare_char/train.bin || {PY} data/shakespeare_char/prepare.py "
         f"--input {CARRY}/tinyshakespeare.txt",
         'tiny-Shakespeare characters for train.py (the text from .gpu_carry)'),
    train_step('fm_sparse', 1024), train_step('attention', 1024),
    train_step('fm_sparse', 8192), train_step('attention', 8192),
    subcommand('train_summary', 3, 5, False,
               'tokens/s and MFU of each run, fm_sparse / attention -> train.json'),
    Step('sanitizer', 3, 45, True,
         f"PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 "
         f"{PY} -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "
         f"'test_scan_triton_equals_naive_on_cuda and (100-48 or 5-3) or test_step and (100 or 5-1-3)'",
         'compute-sanitizer memcheck over the CUDA scan and step tests at masked (non power of 2) shapes'),
]


def plan_text(commands=False):
    lines = [f"{'call':>4}  {'step':<22}{'budget s':>9}{'in call':>9}{'total':>7}  what"]
    total = 0
    for call in sorted({s.call for s in STEPS}):
        in_call = 0
        for s in (s for s in STEPS if s.call == call):
            in_call += s.budget_s
            total += s.budget_s
            lines.append(f"{call:>4}  {s.name:<22}{s.budget_s:>9}{in_call:>9}{total:>7}  "
                         f"{'[cuda] ' if s.cuda else ''}{s.what}")
            if commands:
                lines.append(f"{'':>6}$ {s.cmd.format(res='results/gpu')}")
        lines.append(f"{'':>4}  {'= call ' + str(call):<22}{in_call:>9} s of at most {CALL_LIMIT_S}; run with "
                     f"timeout_s={in_call + 30}")
    lines.append(f"total {total} s of at most {TOTAL_LIMIT_S} (plus the machine's start, 1-2 min)")
    return '\n'.join(lines), total


def check_plan():
    per_call = {}
    for s in STEPS:
        per_call[s.call] = per_call.get(s.call, 0) + s.budget_s
    assert all(v <= CALL_LIMIT_S for v in per_call.values()), per_call
    assert sum(per_call.values()) <= TOTAL_LIMIT_S, per_call
    assert [s.call for s in STEPS] == sorted(s.call for s in STEPS)     # priority order = call order
    return per_call


# --- running ------------------------------------------------------------------------------------

def have_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def run_step(step, res, cuda):
    logs = os.path.join(res, 'logs')
    os.makedirs(logs, exist_ok=True)
    entry = dict(step=step.name, call=step.call, budget_s=step.budget_s, log=f"logs/{step.name}.log")
    if step.cuda and not cuda:
        return dict(entry, status='skipped', rc=None, seconds=0, note='no CUDA device')
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join(
        [SITE, REPO] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    cmd = step.cmd.format(res=res)
    t0 = time.time()
    print(f"== {step.name} (budget {step.budget_s} s): {cmd}", flush=True)
    with open(os.path.join(logs, f"{step.name}.log"), 'w') as log:
        log.write(f"== {step.name} (budget {step.budget_s} s): {cmd}\n")
        log.flush()
        proc = subprocess.Popen(['bash', '-c', cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=step.budget_s)
            status = 'passed' if rc == 0 else 'failed'
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, 'timeout'
    with open(os.path.join(logs, f"{step.name}.log")) as f:
        tail = [l.rstrip() for l in f.read().splitlines() if l.strip()][-3:]
    note = f"stopped at {step.budget_s} s" if status == 'timeout' else (tail[-1][:300] if tail else '')
    return dict(entry, status=status, rc=rc, seconds=round(time.time() - t0, 1), note=note)


def save(res, call, records):
    path = os.path.join(res, 'checklist.json')
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = {r['step']: r for r in json.load(f).get('steps', [])}
    old.update({r['step']: r for r in records})
    order = [s.name for s in STEPS]
    steps = sorted(old.values(), key=lambda r: order.index(r['step']) if r['step'] in order else len(order))
    with open(path, 'w') as f:
        json.dump({'steps': steps}, f, indent=1)
    out = os.environ.get('OUT')
    if out and os.path.isdir(out):                 # what the device tool brings back
        tmp = os.path.join(out, f"gpu_call{call}.tar.gz.part")
        with tarfile.open(tmp, 'w:gz') as tar:
            tar.add(res, arcname='.')
        os.replace(tmp, os.path.join(out, f"gpu_call{call}.tar.gz"))
        shutil.copy(path, os.path.join(out, f"checklist_call{call}.json"))


def run_calls(calls, only, res):
    cuda = have_cuda()
    os.makedirs(res, exist_ok=True)
    print(f"gpu_check: calls {calls}, CUDA {'yes' if cuda else 'no'}, results in {res}", flush=True)
    records, failed = [], False
    for step in STEPS:
        if step.call not in calls or (only and step.name not in only):
            continue
        rec = run_step(step, res, cuda)
        records.append(rec)
        failed |= rec['status'] in ('failed', 'timeout')
        print(f"   {rec['status']:<8} rc={rec['rc']} {rec['seconds']} s  {rec['note'][:120]}", flush=True)
        save(res, min(calls), records)
    print('\nchecklist:')
    for r in records:
        print(f"  {r['step']:<22} {r['status']:<8} {r['seconds']:>6} s / {r['budget_s']} s  {r['note'][:90]}")
    return 1 if failed else 0


# --- the steps that are Python of their own -------------------------------------------------------

def env_info(res):
    import platform

    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as e:
            return f"error: {e}"
    info = dict(date_utc=sh('date -u +%Y-%m-%dT%H:%M:%SZ'), python=platform.python_version(),
                git_commit=sh(f"git -C {REPO} rev-parse HEAD 2>/dev/null"), cpus=os.cpu_count(),
                nvidia_smi=sh('nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader'))
    import torch
    import triton
    info.update(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    with open(os.path.join(res, 'env.json'), 'w') as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


def graph_breaks(res, device='cuda', mixers=('fm', 'fm_sparse', 'mamba2', 'attention')):
    """torch._dynamo.explain of each mixer's training forward (loss): graphs, breaks and their reasons.
    The Triton scan and steps are torch.compiler.disable boundaries: expect one break per layer there."""
    import torch
    from model import LM, ModelConfig
    out = {}
    for mixer in mixers:
        torch._dynamo.reset()
        model = LM(ModelConfig(vocab_size=65, block_size=256, n_layer=2, n_embd=128, mixer=mixer)).to(device)
        idx = torch.randint(0, 65, (2, 256), device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            e = torch._dynamo.explain(model)(idx, idx)
        reasons = collections.Counter(str(r.reason).splitlines()[0] for r in e.break_reasons)
        out[mixer] = dict(graph_count=e.graph_count, graph_break_count=e.graph_break_count,
                          reasons=dict(reasons.most_common()), n_layer=2)
        print(mixer, out[mixer])
    torch._dynamo.reset()
    with open(os.path.join(res, 'graph_breaks.json'), 'w') as f:
        json.dump({'device': device, 'models': out}, f, indent=1)


def install_peers():
    """fla-core (pure Python + Triton) and mamba_ssm's Triton kernels from .gpu_carry/whl, into SITE.
    mamba_ssm's own __init__ imports its CUDA extension (not built): it is replaced by an empty one,
    so `mamba_ssm.ops.triton.ssd_combined` imports alone."""
    import glob
    import importlib
    os.makedirs(SITE, exist_ok=True)
    whl = glob.glob(os.path.join(CARRY, 'whl', 'fla_core-*.whl'))
    ok = True
    if whl:
        ok &= subprocess.run([PY, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                              '--target', SITE, whl[-1]]).returncode == 0
    sdist = sorted(glob.glob(os.path.join(CARRY, 'whl', 'mamba_ssm-*.tar.gz')))
    if sdist:
        with tarfile.open(sdist[-1]) as tar:
            tar.extractall('/tmp/mamba_src')
        src = glob.glob('/tmp/mamba_src/mamba_ssm-*/mamba_ssm')[0]
        shutil.copytree(src, os.path.join(SITE, 'mamba_ssm'), dirs_exist_ok=True)
        open(os.path.join(SITE, 'mamba_ssm', '__init__.py'), 'w').close()
    sys.path.insert(0, SITE)
    for mod in ('fla.ops.gla', 'mamba_ssm.ops.triton.ssd_combined'):
        try:
            importlib.import_module(mod)
            print(f"{mod}: ok")
        except Exception as e:
            ok = False
            print(f"{mod}: {type(e).__name__}: {e}")
    sys.exit(0 if ok else 1)


def train_summary(res):
    import statistics
    runs = {}
    for path in sorted(os.listdir(os.path.join(res, 'train'))) if os.path.isdir(os.path.join(res, 'train')) else []:
        recs = [json.loads(l) for l in open(os.path.join(res, 'train', path)) if l.strip()]
        steps = [r for r in recs if 'tokens_per_s' in r and r.get('iter', 0) > 5]     # past compile and warm-up
        med = lambda k: statistics.median(r[k] for r in steps) if steps and k in steps[0] else None
        runs[path[:-len('.jsonl')]] = dict(iters=max((r['iter'] for r in steps), default=None),
                                           tokens_per_s=med('tokens_per_s'), ms_per_iter=med('ms_per_iter'),
                                           mfu=med('mfu'))
    ratios = {}
    for T, target in ((1024, 0.5), (8192, 1.0)):
        fm, at = runs.get(f"fm_sparse_T{T}", {}), runs.get(f"attention_T{T}", {})
        if fm.get('tokens_per_s') and at.get('tokens_per_s'):
            r = fm['tokens_per_s'] / at['tokens_per_s']
            ratios[f"T{T}"] = dict(fm_sparse_over_attention=round(r, 3), target=target, met=r >= target)
    out = dict(runs=runs, fm_sparse_vs_attention=ratios, command=TRAIN + ' --mixer=M --block_size=T')
    with open(os.path.join(res, 'train.json'), 'w') as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    if not runs:
        sys.exit('no training run left a log')


def prepare():
    """Here, before the device calls: what the GPU machine cannot download, into .gpu_carry/."""
    os.makedirs(os.path.join(CARRY, 'whl'), exist_ok=True)
    text = os.environ.get('FM_TEXT', os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt'))
    if os.path.exists(text):
        shutil.copy(text, os.path.join(CARRY, 'tinyshakespeare.txt'))
    else:
        print(f"no {text}: set FM_TEXT to the tiny-Shakespeare text (the data step needs it)")
    pip = [PY, '-m', 'pip', 'download', '-q', '--no-deps', '-d', os.path.join(CARRY, 'whl')]
    subprocess.run(pip + ['--only-binary=:all:', 'fla-core'], timeout=180)
    subprocess.run(pip + ['--no-binary=:all:', '--no-build-isolation', 'mamba-ssm'], timeout=180,
                   env=dict(os.environ, MAMBA_SKIP_CUDA_BUILD='TRUE'))
    for name in sorted(os.listdir(CARRY)) + sorted(os.listdir(os.path.join(CARRY, 'whl'))):
        print(name)


def main(argv):
    sub = {'env': env_info, 'graph_breaks': graph_breaks, 'train_summary': train_summary}
    if argv and argv[0] in sub:
        return sub[argv[0]](*argv[1:])
    if argv and argv[0] == 'install_peers':
        return install_peers()
    if argv and argv[0] == 'prepare':
        return prepare()
    opts = dict(a[2:].split('=', 1) if '=' in a else (a[2:], '1') for a in argv if a.startswith('--'))
    unknown = set(opts) - {'call', 'only', 'results', 'dry-run'}
    if unknown or any(not a.startswith('--') for a in argv):
        sys.exit(__doc__)
    check_plan()
    if 'dry-run' in opts:
        print(plan_text(commands=True)[0])
        return 0
    call = opts.get('call', '1')
    calls = sorted({s.call for s in STEPS}) if call == 'all' else [int(call)]
    only = set(opts['only'].split(',')) if opts.get('only') else set()
    res = os.path.abspath(opts.get('results', os.path.join(REPO, 'results', 'gpu')))
    return run_calls(calls, only, res)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
