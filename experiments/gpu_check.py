"""
The GPU checklist in one device call of at most 9 minutes (540 s).

    python -m experiments.gpu_check --dry-run        # the plan: phases, steps, budgets, commands
    python -m experiments.gpu_check prepare          # here, before the call: fills .gpu_carry/
    python -m experiments.gpu_check                  # on the GPU machine: the whole checklist

With the device tool (`run`), from the repo root here:

    1. python -m experiments.gpu_check prepare       # wheels of fla-core and mamba-ssm, the text
    2. run(command="python3 -m experiments.gpu_check", carry=[".gpu_carry"], timeout_s=540)
    3. d=results/gpu/<gpu>-<commit>; mkdir $d; tar xzf <files_at>/gpu.tar.gz -C $d;
       then give_back (results/gpu/h200-9efe7a3/ is the first run's)

The plan, in three phases (--dry-run prints it with every command and budget):

    phase 0, one at a time: data (tiny-Shakespeare from .gpu_carry), install_peers (fla-core and
            mamba_ssm's Triton kernels into SITE, then imported by a fresh interpreter)
    phase 1, side by side, untimed, within one window: env, the CUDA tests, compute-sanitizer,
            graph breaks, the peers' autotune (fla and Mamba-2, each its own process), our
            scans' JIT, and a 3-iteration torch.compile warm-up of every training shape phase 2
            times, which fills the on-disk inductor/Triton caches so that the timed runs do not
            compile
    phase 2, one at a time, timed: the scan beside the peers (then ours on factored gates, at
            twice the chunk, and with one reverse sweep); train.py at T = 1024 and 8192 for
            fm_sparse and attention; a torch.profiler table of fm_sparse's training step with its
            host syncs; the README's GPU quick start to its end for fm_sparse and attention;
            decode; then the summary (train.json, quick.json, targets.json)

Each step runs under its own timeout; a step that fails or times out is recorded and the next one
runs; a phase-2 step that the deadline no longer leaves room for is recorded as 'not reached'.
Benchmarks rewrite their JSON after every row and train.py's log is kept when it is stopped.
After every step the results so far are packed into $OUT/gpu.tar.gz (and $OUT/checklist.json):
the device tool returns only $OUT.

Options: --only=step,step (a subset), --results=DIR (default out-gpu/results: a run's own folder,
so no earlier run's files are packed with it), --deadline_s=S (default 520: the call's 540 s less
the interpreter's start and the last pack), --dry-run. On a machine
without CUDA the CUDA steps are recorded as skipped. Exit code: 0 if every step that ran passed.
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run it from the repo root as a module: python -m experiments.gpu_check ...')
import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY = os.path.join(REPO, '.gpu_carry')
SITE = '/tmp/fm_gpu_site'              # where install_peers puts fla and mamba_ssm (on PYTHONPATH)
CALL_S = 540                           # the device call's timeout_s
DEADLINE_S = 520                       # the steps' share of it: the rest starts Python and packs
PHASE1_WINDOW_S = 115                  # phase 1's steps all end (or are stopped) within this
PEER_MODULES = ('fla.ops.gla', 'mamba_ssm.ops.triton.ssd_combined')
PY = sys.executable


@dataclass
class Step:
    name: str
    phase: int                         # 0 and 2: one at a time; 1: side by side
    budget_s: int
    cuda: bool                         # needs a CUDA device
    cmd: str                           # a shell command, run from the repo root; {res}: results dir
    what: str


SCAN = (f"{PY} -m experiments.bench scan --device=cuda --B=8 --T=2048 --H=8 --M=64 --P=64 "
        f"--naive=False --dtype=bfloat16")
GPU_CONFIG = 'config/shakespeare_char_gpu.py'
TRAIN = (f"{PY} train.py {GPU_CONFIG} --device=cuda --dtype=bfloat16 --compile=True "
         f"--dropout=0.0 --max_iters=40 --lr_decay_iters=40 --warmup_iters=5 --eval_interval=1000 "
         f"--eval_iters=2 --log_interval=5 --always_save_checkpoint=False")
TIMED_SHAPES = [('fm_sparse', 1024), ('attention', 1024), ('fm_sparse', 8192), ('attention', 8192)]
PROFILE_ITERS = dict(wait=6, warmup=2, active=5)   # the profiled steps have no log line (no sync)


def subcommand(name, phase, budget_s, cuda, what):
    """A step running this file's subcommand `name` on {res}."""
    return Step(name, phase, budget_s, cuda, f"{PY} -m experiments.gpu_check {name} {{res}}", what)


def keep_log(out, name):
    """A shell prefix that copies train.py's log to {res}/train/name.jsonl on any exit, also when
    the step's timeout stops it (SIGTERM -> exit -> EXIT trap)."""
    keep = f"mkdir -p {{res}}/train; cp {out}/log.jsonl {{res}}/train/{name}.jsonl 2>/dev/null"
    return f"trap '{keep}' EXIT; trap 'exit 143' TERM; "


def train_args(mixer, T):
    return f"--mixer={mixer} --block_size={T} --batch_size={16 * 1024 // T}"   # 16,384 tokens


def timed_train(mixer, T):
    out = f"out-gpu/{mixer}_T{T}"
    return Step(f"train_{mixer}_T{T}", 2, 30, True,
                keep_log(out, f"{mixer}_T{T}") + f"{TRAIN} {train_args(mixer, T)} --out_dir={out}",
                f"train.py, {mixer}, T={T}, 16,384 tokens/iter, 40 iterations, compiled, bf16")


def quick_cmd(mixer):
    return f"{PY} train.py {GPU_CONFIG} --mixer={mixer}"


def quick_start(mixer, budget_s):
    out = f"out-quick/{mixer}"
    return Step(f"quick_{mixer}", 2, budget_s, True,
                keep_log(out, f"quick_{mixer}") + f"{quick_cmd(mixer)} --out_dir={out}",
                f"the README's GPU quick start with --mixer={mixer}, to its end")


def warm(name, cmd):
    """3 iterations (compile, evaluation, step) of a phase-2 run: its graphs into the caches."""
    return Step(f"warm_{name}", 1, PHASE1_WINDOW_S, True,
                f"{cmd} --max_iters=3 --out_dir=out-warm/{name}",
                'torch.compile warm-up, untimed: fills the inductor and Triton caches')


def autotune(impl, name):
    return Step(f"autotune_{name}", 1, PHASE1_WINDOW_S, True,
                f"{SCAN} --impls={shlex.quote(impl)} --repeats=1 "
                f"--json={{res}}/autotune_{name}.json",
                f"{impl} once: its autotune and JIT, cached on disk (TRITON_CACHE_AUTOTUNING=1)")


PYTEST_CUDA = (f"{PY} -m pytest -q -rs -p no:cacheprovider $({PY} -c 'import xdist' 2>/dev/null && "
               f"printf -- '-n 6') tests/test_cuda.py tests/test_decode.py "
               f"--junitxml={{res}}/pytest_cuda.xml")
SANITIZER = (f"PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck "
             f"--error-exitcode 9 "
             f"{PY} -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "
             f"'test_scan_triton_equals_naive_on_cuda and (100-48 or 5-3) or test_step and "
             f"(100 or 5-1-3)'")

STEPS = [
    Step('data', 0, 5, False,
         f"test -f data/shakespeare_char/train.bin || {PY} data/shakespeare_char/prepare.py "
         f"--input {CARRY}/tinyshakespeare.txt",
         'tiny-Shakespeare characters for train.py (the text from .gpu_carry)'),
    Step('install_peers', 0, 25, False, f"{PY} -m experiments.gpu_check install_peers",
         f"fla-core and mamba_ssm's Triton kernels from .gpu_carry/whl into {SITE}, imported by a "
         f"fresh interpreter"),
    subcommand('env', 1, PHASE1_WINDOW_S, False, 'versions, GPU, driver, commit -> env.json'),
    Step('pytest_cuda', 1, PHASE1_WINDOW_S, True, PYTEST_CUDA,
         'tests/test_cuda.py: the Triton scan and steps against the reference, the LM on CUDA'),
    Step('sanitizer', 1, PHASE1_WINDOW_S, True, SANITIZER,
         'compute-sanitizer memcheck over the scan and step tests at masked (not power of 2) '
         'shapes'),
    subcommand('graph_breaks', 1, PHASE1_WINDOW_S, True,
               "torch._dynamo.explain of each mixer's training forward -> graph_breaks.json"),
    autotune('fla chunk_gla', 'fla'), autotune('mamba_chunk_scan_combined', 'mamba'),
    Step('warm_scan', 1, PHASE1_WINDOW_S, True,
         f"{SCAN} --impls=triton,variants --repeats=1 --json={{res}}/warm_scan.json",
         'our Triton scans once, untimed (per-head and the variants): their JIT, cached'),
    *[warm(f"{m}_T{T}", f"{TRAIN} {train_args(m, T)}") for m, T in TIMED_SHAPES],
    *[warm(f"quick_{m}", quick_cmd(m)) for m in ('fm_sparse', 'attention')],
    Step('scan_bf16', 2, 40, True,
         f"{SCAN} --impls=ours,peers,variants --repeats=10 --json={{res}}/scan_bf16.json",
         'our scan, the chunked PyTorch scan, fla chunk_gla and Mamba-2, then ours factored, at '
         'twice the chunk and with one reverse sweep; fwd and fwd+bwd, B=8 T=2048 H=8 M=P=64 '
         '(rows as they finish)'),
    *[timed_train(m, T) for m, T in TIMED_SHAPES],
    subcommand('profile_train', 2, 35, True,
               "torch.profiler table of fm_sparse's compiled training step (T=1024), host syncs"),
    quick_start('fm_sparse', 100), quick_start('attention', 40),
    Step('decode', 2, 15, True,
         f"{PY} -m experiments.bench decode --device=cuda --mode=graph --slots= "
         f"--contexts=1024,8192,32768 --tokens=20 --json={{res}}/decode.json",
         'per-token latency vs context, batch 1, each step a CUDA graph replay (issue 23)'),
    Step('decode_slots', 2, 15, True,
         f"{PY} -m experiments.bench decode --device=cuda --mode=graph --contexts= "
         f"--slots=1024,4096,16384 --slot_top_k=16 --batch_size=64 --slot_repeats=30 "
         f"--json={{res}}/decode_slots.json",
         'sparse vs dense scan step as m grows at batch 64, GB/s of the rows each touches'),
    subcommand('summary', 2, 5, False,
               'tokens/s of the timed runs, fm_sparse / attention -> train.json; quick starts -> '
               'quick.json; the scan and decode targets, the scan A/B -> targets.json'),
]


def phase_costs():
    """{phase: seconds}: phases 0 and 2 cost the sum of their budgets, phase 1 its window."""
    cost = collections.Counter()
    for s in STEPS:
        cost[s.phase] += 0 if s.phase == 1 else s.budget_s
    cost[1] = PHASE1_WINDOW_S
    return dict(sorted(cost.items()))


def check_plan():
    assert all(s.budget_s <= PHASE1_WINDOW_S for s in STEPS if s.phase == 1)
    assert [s.phase for s in STEPS] == sorted(s.phase for s in STEPS)
    assert len({s.name for s in STEPS}) == len(STEPS)
    cost = phase_costs()
    assert sum(cost.values()) <= DEADLINE_S <= CALL_S, cost
    return cost


def plan_text(commands=False):
    lines = [f"{'phase':>5}  {'step':<24}{'budget s':>9}  what"]
    cost = phase_costs()
    for phase, how in ((0, 'one at a time'), (1, 'side by side'), (2, 'one at a time, timed')):
        lines.append(f"phase {phase}, {how}: {cost[phase]} s")
        for s in (s for s in STEPS if s.phase == phase):
            lines.append(f"{phase:>5}  {s.name:<24}{s.budget_s:>9}  "
                         f"{'[cuda] ' if s.cuda else ''}{s.what}")
            if commands:
                lines.append(f"{'':>7}$ {s.cmd.format(res='out-gpu/results')}")
    lines.append(f"total {sum(cost.values())} s of the {DEADLINE_S} s deadline; run with "
                 f"timeout_s={CALL_S} (9 minutes)")
    return '\n'.join(lines)


# --- running ------------------------------------------------------------------------------------

def have_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def step_env():
    """What every step runs with: the peers' install path, and autotune results cached on disk
    (so that the phase-1 autotune serves phase 2)."""
    path = [SITE, REPO] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
    return dict(os.environ, PYTHONUNBUFFERED='1', TRITON_CACHE_AUTOTUNING='1',
                PYTHONPATH=os.pathsep.join(path))


def wait_or_stop(proc, budget_s):
    """The exit code, or None after stopping the step's process group at its budget."""
    try:
        return proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None


def run_step(step, res, cuda, budget_s, t0):
    """Runs one step (its log in res/logs/) under budget_s; its record."""
    entry = dict(step=step.name, phase=step.phase, budget_s=budget_s, log=f"logs/{step.name}.log",
                 start_s=round(time.time() - t0, 1))
    if step.cuda and not cuda:
        return dict(entry, status='skipped', rc=None, seconds=0, note='no CUDA device')
    cmd = step.cmd.format(res=res)
    log_path = os.path.join(res, 'logs', f"{step.name}.log")
    with open(log_path, 'w') as log:
        log.write(f"== {step.name} (budget {budget_s} s): {cmd}\n")
        log.flush()
        proc = subprocess.Popen(['bash', '-c', cmd], cwd=REPO, env=step_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        rc = wait_or_stop(proc, budget_s)
    status = 'timeout' if rc is None else 'passed' if rc == 0 else 'failed'
    with open(log_path) as f:
        tail = [line.rstrip() for line in f if line.strip()][-1:]
    note = f"stopped at {budget_s} s" if rc is None else (tail[0][:300] if tail else '')
    return dict(entry, status=status, rc=rc, seconds=round(time.time() - t0 - entry['start_s'], 1),
                note=note)


class Checklist:
    """The records so far; each new one is saved to res/checklist.json and packed into $OUT."""

    def __init__(self, res):
        self.res, self.records, self.lock = res, [], threading.Lock()

    def add(self, rec):
        with self.lock:
            self.records.append(rec)
            print(f"   [{rec['start_s'] + rec['seconds']:6.1f} s] {rec['step']:<24} "
                  f"{rec['status']:<11} {rec['seconds']} s  {rec['note'][:100]}", flush=True)
            self.save()

    def save(self):
        path = os.path.join(self.res, 'checklist.json')
        with open(path, 'w') as f:
            json.dump({'steps': self.records}, f, indent=1)
        out = os.environ.get('OUT')
        if out and os.path.isdir(out):
            tmp = os.path.join(out, 'gpu.tar.gz.part')
            with tarfile.open(tmp, 'w:gz') as tar:
                tar.add(self.res, arcname='.')
            os.replace(tmp, os.path.join(out, 'gpu.tar.gz'))
            shutil.copy(path, os.path.join(out, 'checklist.json'))


def run_side_by_side(steps, res, cuda, t0, checklist):
    threads = [threading.Thread(target=lambda s=s: checklist.add(
        run_step(s, res, cuda, s.budget_s, t0))) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_in_turn(steps, res, cuda, t0, deadline_s, checklist):
    for s in steps:
        left = int(deadline_s - (time.time() - t0))
        if left < min(s.budget_s, 10):
            checklist.add(dict(step=s.name, phase=s.phase, budget_s=s.budget_s,
                               status='not reached', rc=None, seconds=0,
                               start_s=round(time.time() - t0, 1),
                               note=f"{max(left, 0)} s left of the deadline", log=''))
            continue
        checklist.add(run_step(s, res, cuda, min(s.budget_s, left), t0))


def run_checklist(res, only=(), deadline_s=DEADLINE_S):
    cuda = have_cuda()
    t0 = time.time()
    os.makedirs(os.path.join(res, 'logs'), exist_ok=True)
    print(f"gpu_check: CUDA {'yes' if cuda else 'no'}, deadline {deadline_s} s, results in {res}",
          flush=True)
    checklist = Checklist(res)
    chosen = [s for s in STEPS if not only or s.name in only]
    run_in_turn([s for s in chosen if s.phase == 0], res, cuda, t0, deadline_s, checklist)
    run_side_by_side([s for s in chosen if s.phase == 1], res, cuda, t0, checklist)
    run_in_turn([s for s in chosen if s.phase == 2], res, cuda, t0, deadline_s, checklist)
    print(f"\nchecklist, {time.time() - t0:.0f} s:")
    for r in checklist.records:
        print(f"  {r['step']:<24} {r['status']:<11} {r['seconds']:>6} s / {r['budget_s']} s  "
              f"{r['note'][:80]}")
    return 1 if any(r['status'] in ('failed', 'timeout') for r in checklist.records) else 0


# --- the steps that are Python of their own -------------------------------------------------------

def env_info(res):
    import platform

    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception as e:
            return f"error: {e}"
    info = dict(date_utc=sh('date -u +%Y-%m-%dT%H:%M:%SZ'), python=platform.python_version(),
                git_commit=sh(f"git -C {REPO} rev-parse HEAD 2>/dev/null"), cpus=os.cpu_count(),
                nvidia_smi=sh('nvidia-smi --query-gpu=name,driver_version,memory.total '
                              '--format=csv,noheader'))
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
    """torch._dynamo.explain of each mixer's training forward (loss): graphs, breaks, reasons."""
    import torch
    from model import LM, ModelConfig
    out = {}
    for mixer in mixers:
        torch._dynamo.reset()
        model = LM(ModelConfig(vocab_size=65, block_size=256, n_layer=2, n_embd=128,
                               mixer=mixer)).to(device)
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


def importable(module, site=SITE):
    """(ok, message): imports `module` in a fresh interpreter with site first on PYTHONPATH, as
    every step runs. Not in this process: it started with site on its path before site
    existed, so its import system caches site as a directory without modules."""
    env = dict(step_env(), PYTHONPATH=os.pathsep.join([site, REPO]))
    p = subprocess.run([PY, '-c', f"import {module}"], env=env, capture_output=True, text=True,
                       timeout=60)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    if p.returncode == 0:
        return True, 'ok'
    return False, err[-1] if err else f"rc {p.returncode}"


def install_peers():
    """fla-core (pure Python + Triton) and mamba_ssm's Triton kernels from .gpu_carry/whl into SITE.
    mamba_ssm's own __init__ imports its CUDA extension (not built): it is replaced by an empty one,
    so `mamba_ssm.ops.triton.ssd_combined` imports alone."""
    import glob
    os.makedirs(SITE, exist_ok=True)
    ok = True
    whl = glob.glob(os.path.join(CARRY, 'whl', 'fla_core-*.whl'))
    if whl:
        ok &= subprocess.run([PY, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps',
                              '--no-compile', '--target', SITE, whl[-1]]).returncode == 0
    sdist = sorted(glob.glob(os.path.join(CARRY, 'whl', 'mamba_ssm-*.tar.gz')))
    if sdist:
        with tarfile.open(sdist[-1]) as tar:
            tar.extractall('/tmp/mamba_src')
        src = glob.glob('/tmp/mamba_src/mamba_ssm-*/mamba_ssm')[0]
        shutil.copytree(src, os.path.join(SITE, 'mamba_ssm'), dirs_exist_ok=True)
        open(os.path.join(SITE, 'mamba_ssm', '__init__.py'), 'w').close()
    for mod in PEER_MODULES:
        good, msg = importable(mod)
        ok &= good
        print(f"{mod}: {msg}")
    sys.exit(0 if ok else 1)


# --- the training step's profile ------------------------------------------------------------------

def sync_warnings(caught):
    """{'file:line': count} of the host syncs torch.cuda's sync debug mode warned about."""
    sites = (f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in caught
             if 'synchroniz' in str(w.message))
    return dict(collections.Counter(sites).most_common())


def profile_train(res, *overrides):
    """train.py itself (in this process), fm_sparse at T=1024 by default: torch.profiler over
    PROFILE_ITERS['active'] steps, hooked at each optimizer step, with torch.cuda's sync debug mode
    on for those steps (train.py reads the device only at its log lines: none fall among them).
    -> profile_train.md (the kernel table) and profile_train.json (per step: device time, syncs)."""
    import runpy
    import warnings
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    n = PROFILE_ITERS
    first, last = n['wait'] + n['warmup'], n['wait'] + n['warmup'] + n['active']
    argv = [*shlex.split(TRAIN)[2:], *train_args('fm_sparse', 1024).split(), '--max_iters=20',
            '--log_interval=1000', '--out_dir=out-gpu/profile', *overrides]
    cuda = have_cuda() and '--device=cpu' not in overrides
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU] +
        ([torch.profiler.ProfilerActivity.CUDA] if cuda else []),
        schedule=torch.profiler.schedule(wait=n['wait'], warmup=n['warmup'], active=n['active'],
                                         repeat=1))
    done = []

    def after_step(*_):
        done.append(1)
        if cuda and len(done) in (first, last):
            torch.cuda.set_sync_debug_mode('warn' if len(done) == first else 0)
        prof.step()
    handle = register_optimizer_step_post_hook(after_step)
    old_argv = sys.argv
    sys.argv = ['train.py', *argv]
    try:
        with prof, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            runpy.run_path(os.path.join(REPO, 'train.py'), run_name='__main__')
    finally:
        sys.argv = old_argv
        handle.remove()
    write_profile(res, prof, argv, cuda, sync_warnings(caught) if cuda else None)


def kernel_rows(prof, cuda, active):
    """The top 25 by self time per profiled step: CUDA kernels (an op's device time is its
    kernels', so ops would count it twice), or on CPU the ops."""
    from torch.autograd import DeviceType
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    events = [e for e in prof.key_averages() if not cuda or e.device_type == DeviceType.CUDA]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [dict(name=e.key[:90], ms_per_step=round(getattr(e, key) / 1e3 / active, 3),
                 calls_per_step=round(e.count / active, 2),
                 share=round(getattr(e, key) / total, 4)) for e in events[:25]], total


def write_profile(res, prof, argv, cuda, syncs):
    active = PROFILE_ITERS['active']
    rows, total = kernel_rows(prof, cuda, active)
    where = 'device (CUDA)' if cuda else 'CPU'
    out = dict(argv=argv, steps_profiled=active, time_on=where,
               self_ms_per_step=round(total / 1e3 / active, 3),
               host_syncs=None if syncs is None else sum(syncs.values()), sync_sites=syncs,
               top=rows)
    with open(os.path.join(res, 'profile_train.json'), 'w') as f:
        json.dump(out, f, indent=1)
    lines = [f"# One training step of train.py, profiled ({active} steps)", '',
             f"`python train.py {' '.join(argv)}`", '',
             f"Self time on the {where}: {out['self_ms_per_step']} ms per step. Host syncs in the "
             f"profiled steps (torch.cuda sync debug mode): "
             f"{'not measured (no CUDA)' if syncs is None else out['host_syncs']}"
             f"{'' if not syncs else ' at ' + ', '.join(f'{k} x{v}' for k, v in syncs.items())}.",
             '', '| kernel / op | ms per step | calls per step | share |', '|---|---|---|---|']
    lines += [f"| `{r['name']}` | {r['ms_per_step']} | {r['calls_per_step']} | "
              f"{100 * r['share']:.1f} % |" for r in rows]
    with open(os.path.join(res, 'profile_train.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


# --- summaries ------------------------------------------------------------------------------------

TARGETS = {1024: 0.8, 8192: 1.5}      # issue 20: fm_sparse tokens/s over attention's


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.rstrip().endswith('}')]


def timed_runs(train_dir):
    import statistics
    runs = {}
    for m, T in TIMED_SHAPES:
        path = os.path.join(train_dir, f"{m}_T{T}.jsonl")
        steps = [r for r in (read_jsonl(path) if os.path.exists(path) else [])
                 if 'tokens_per_s' in r and r['iter'] > 5]               # past compile and warm-up
        if steps:
            runs[f"{m}_T{T}"] = {k: statistics.median(r[k] for r in steps)
                                 for k in ('tokens_per_s', 'ms_per_iter', 'mfu') if k in steps[0]}
            runs[f"{m}_T{T}"]['iters'] = max(r['iter'] for r in steps)
    ratios = {}
    for T, target in TARGETS.items():
        fm, at = runs.get(f"fm_sparse_T{T}"), runs.get(f"attention_T{T}")
        if fm and at:
            r = fm['tokens_per_s'] / at['tokens_per_s']
            ratios[f"T{T}"] = dict(fm_sparse_over_attention=round(r, 3), target=target,
                                   met=r >= target)
    return dict(runs=runs, fm_sparse_vs_attention=ratios,
                command=TRAIN + ' --mixer=M --block_size=T --batch_size=16384/T')


def quick_runs(train_dir):
    out = {}
    for mixer in ('fm_sparse', 'attention'):
        path = os.path.join(train_dir, f"quick_{mixer}.jsonl")
        recs = read_jsonl(path) if os.path.exists(path) else []
        evals = [r for r in recs if 'val_loss' in r]
        steps = [r for r in recs if 'ms_per_iter' in r and r['iter'] > 0]
        if evals:
            best = min(evals, key=lambda r: r['val_loss'])
            out[mixer] = dict(last_iter=evals[-1]['iter'], time_s=evals[-1]['time_s'],
                              best_val_loss=best['val_loss'], best_iter=best['iter'],
                              last_val_loss=evals[-1]['val_loss'],
                              last_train_loss=evals[-1]['train_loss'],
                              ms_per_iter=round(sum(r['ms_per_iter'] for r in steps)
                                                / max(len(steps), 1), 1))
    return dict(runs=out, command=f"python train.py {GPU_CONFIG} --mixer=M")


def read_rows(res, name):
    path = os.path.join(res, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def scan_and_decode_targets(res):
    """Issues 20 and 23's other targets, and the A/B of the changes made on predictions, read off
    scan_bf16.json, decode.json and decode_slots.json (what is missing is left out)."""
    out = {}
    scan = {r['impl']: r['fwd_bwd_ms'] for r in read_rows(res, 'scan_bf16.json') if 'impl' in r}
    if 'triton' in scan and 'fla chunk_gla' in scan:
        r = scan['triton'] / scan['fla chunk_gla']
        out['scan_over_fla'] = dict(ratio=round(r, 3), target=0.8, met=r <= 0.8)
    if 'triton' in scan:      # < 1: the variant is faster than what the code runs now
        out['scan_variants_over_triton'] = {k: round(v / scan['triton'], 3) for k, v in scan.items()
                                            if k.startswith('triton, ') and 'scalar' not in k}
    ctx = {}
    for r in read_rows(res, 'decode.json'):
        if r.get('bench') == 'context':
            ctx.setdefault(r['context'], {})[r['mixer']] = r['ms_per_token']
    if ctx:
        ok = lambda at: (at.get('fm_sparse', 1e9) <= 0.5 and
                         all(at['fm_sparse'] < at.get(m, 1e9) for m in ('attention', 'mamba2')))
        out['decode_batch1'] = dict(ms_per_token=ctx, target='fm_sparse <= 0.5 ms, below attention '
                                    'and mamba2, at every context', met=all(map(ok, ctx.values())))
    rows = read_rows(res, 'decode.json') + read_rows(res, 'decode_slots.json')
    slots = {(r['mixer'], r['n_slots']): r for r in rows
             if r.get('bench') == 'slots' and r['part'] == 'scan'}
    if ('fm', 16384) in slots and ('fm_sparse', 16384) in slots:
        dense, sparse = slots['fm', 16384], slots['fm_sparse', 16384]
        r = dense['ms_per_token'] / sparse['ms_per_token']
        batch = sparse.get('batch_size', 1)
        out['sparse_step_speedup_m16384'] = dict(dense_over_sparse=round(r, 2), batch_size=batch,
                                                 target='>= 4 at batch >= 32',
                                                 met=r >= 4 and batch >= 32)
    return out


def summary(res):
    train_dir = os.path.join(res, 'train')
    outs = {'train.json': timed_runs(train_dir), 'quick.json': quick_runs(train_dir),
            'targets.json': scan_and_decode_targets(res)}
    for name, out in outs.items():
        with open(os.path.join(res, name), 'w') as f:
            json.dump(out, f, indent=1)
        print(name, json.dumps(out, indent=1))
    if not outs['train.json']['runs'] and not outs['quick.json']['runs']:
        sys.exit('no training run left a log')


def prepare():
    """Here, before the device call: what the GPU machine cannot download, into .gpu_carry/."""
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
    sub = {'env': env_info, 'graph_breaks': graph_breaks, 'summary': summary,
           'profile_train': profile_train, 'install_peers': install_peers, 'prepare': prepare}
    if argv and argv[0] in sub:
        return sub[argv[0]](*argv[1:])
    opts = dict(a[2:].split('=', 1) if '=' in a else (a[2:], '1') for a in argv)
    if set(opts) - {'only', 'results', 'deadline_s', 'dry-run'} or \
            any(not a.startswith('--') for a in argv):
        sys.exit(__doc__)
    check_plan()
    if 'dry-run' in opts:
        print(plan_text(commands=True))
        return 0
    only = set(opts['only'].split(',')) if opts.get('only') else set()
    unknown = only - {s.name for s in STEPS}
    if unknown:
        sys.exit(f"gpu_check: --only: unknown steps {sorted(unknown)}")
    res = os.path.abspath(opts.get('results', os.path.join(REPO, 'out-gpu', 'results')))
    return run_checklist(res, only, int(opts.get('deadline_s', DEADLINE_S)))


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
