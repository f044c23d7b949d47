"""
Reproduce a comparison: train every config, evaluate beyond the training context, benchmark
decoding.

    python -m experiments.reproduce              # the four config/shakespeare_char_<mixer>.py
    python -m experiments.reproduce --max_iters=600 --train_minutes=25
    python -m experiments.reproduce --configs=config/long_fm.py,config/long_attention.py \\
        --runs_dir=out-long --results_dir=results/long --lengths=1,2,4,8,16 --decode=False

1. Train: `python train.py <config>` for every config, into runs_dir/<config name>. Training runs
   in rounds of --round_iters iterations per config (train.py --init_from=resume continues a run
   exactly: optimizer, schedule, data order), so that on a slow or busy machine it stops after the
   last round that fits in --train_minutes with every config at the same iteration count. The
   learning-rate schedule is always the one of --max_iters (0: the configs' own max_iters, which
   must agree), so a run cut short ends before its learning rate has decayed.
2. Evaluate: `python -m experiments.evaluate` on every checkpoint at --lengths (multiples of
   block_size).
3. Decode: `python -m experiments.bench decode` on the checkpoints (--decode=False skips it).

Everything goes to results_dir: eval.md/.png/.json, decode.md/.json, reproduce.json (timings,
parameter counts) and summary.md, which collects them.
"""
if __name__ == '__main__' and not __package__:   # run as a module, so that the core imports
    raise SystemExit('run it from the repo root as a module: python -m experiments.reproduce ...')
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from common import REPO_DIR, load_checkpoint, log, parse_config, read_config_file

MIXERS = ('fm', 'fm_sparse', 'mamba2', 'attention')
CONFIGS = ','.join(f'config/shakespeare_char_{m}.py' for m in MIXERS)


@dataclass
class ReproduceConfig:
    configs: str = CONFIGS               # comma-separated train.py config files
    runs_dir: str = 'out-repro'          # checkpoints go to runs_dir/<config file name without .py>
    results_dir: str = 'results'
    max_iters: int = 0                   # 0 = the configs' max_iters (also the LR schedule's)
    round_iters: int = 100               # a round: every config this many iterations, then the next
    train_minutes: float = 45.0          # no round that would end past this; 0 = no limit
    skip_trained: bool = False           # continue from runs_dir's checkpoints (else refuse)
    train_args: str = '--eval_iters=10'  # extra train.py arguments
    lengths: str = '1,2,4,8,16'          # evaluate.py: context lengths, as multiples of block_size
    eval_args: str = '--device=cpu'      # extra evaluate.py arguments (e.g. --eval_tokens=16384)
    decode: bool = True                  # run `bench.py decode` on the trained models
    decode_args: str = '--device=cpu --contexts=1024,8192,16384'   # its arguments


def run_logged(cmd, log_path):
    """Run cmd (a list), streaming its output to stdout and to log_path; exit if it fails."""
    log(f"$ {shlex.join(cmd)}    (log: {log_path})")
    t0 = time.time()
    with open(log_path, 'w') as f:
        p = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        for line in p.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            f.write(line)
        rc = p.wait()
    if rc != 0:
        raise SystemExit(f"reproduce.py: command failed with exit status {rc}: {shlex.join(cmd)} "
                         f"(log: {log_path})")
    return time.time() - t0


def config_max_iters(conf):
    """The config file's max_iters, else train.py's default (`train.py --help` prints it)."""
    path = conf if os.path.isfile(conf) else os.path.join(REPO_DIR, conf)
    values = read_config_file(path)
    if 'max_iters' in values:
        return values['max_iters']
    p = subprocess.run([sys.executable, script('train.py'), conf, '--help'], capture_output=True,
                       text=True)
    m = re.search(r'^\s*--max_iters=(\d+)', p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise SystemExit(f"reproduce.py: could not read max_iters of {conf}: "
                         f"{p.stderr.strip() or p.stdout.strip()}")
    return int(m.group(1))


def done_iters(out_dir):
    """The iteration of out_dir/ckpt.pt (0 if there is none)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    return int(load_checkpoint(path)['iter_num']) if os.path.exists(path) else 0


def script(name):
    return os.path.join(REPO_DIR, name)


def main(argv=None):
    cfg = ReproduceConfig()
    argv = sys.argv[1:] if argv is None else argv
    parse_config(cfg, argv, prog='reproduce.py')
    t_start = time.time()
    py, res = sys.executable, cfg.results_dir
    confs = [c for c in cfg.configs.split(',') if c]
    for c in confs:
        if not (os.path.isfile(c) or os.path.isfile(os.path.join(REPO_DIR, c))):
            raise SystemExit(f"reproduce.py: no config file {c}")
    names = [os.path.splitext(os.path.basename(c))[0] for c in confs]
    if len(set(names)) != len(names):
        raise SystemExit(f"reproduce.py: two configs share a file name ({', '.join(names)}); "
                         "their runs would collide")
    out_dirs = [os.path.join(cfg.runs_dir, n) for n in names]
    for d in (res, *out_dirs):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"reproduce.py: cannot create the directory {d} ({e.strerror}); "
                             "pick another --runs_dir or --results_dir") from None
    trained = [d for d in out_dirs if os.path.exists(os.path.join(d, 'ckpt.pt'))]
    if trained and not cfg.skip_trained:   # never overwrite a finished run's checkpoint
        raise SystemExit(f"reproduce.py: {', '.join(trained)} already hold a checkpoint; continue "
                         "from it with --skip_trained=True, or pick another --runs_dir")
    total = cfg.max_iters
    if not total:
        its = {config_max_iters(c) for c in confs}
        if len(its) != 1:
            raise SystemExit(f"reproduce.py: the configs disagree on max_iters ({sorted(its)}); "
                             "pass --max_iters")
        total = its.pop()

    # --- 1. train, in rounds that keep every config at the same iteration ---
    timings = {}
    skipped = []
    if cfg.skip_trained:
        skipped = [f"{n} (from iteration {done_iters(d)})"
                   for n, d in zip(names, out_dirs) if done_iters(d)]
    step = cfg.round_iters or total
    reached = min(done_iters(d) for d in out_dirs)
    last_round = None
    while reached < total:
        target = min(total, reached + step)
        elapsed = (time.time() - t_start) / 60
        next_round = last_round * (target - reached) / step / 60 if last_round else 0.0  # minutes
        if next_round and cfg.train_minutes and elapsed + next_round > cfg.train_minutes:
            log(f"[reproduce] stopping training at {reached} of {total} iterations: another round, "
                f"as long as the last, would end past --train_minutes={cfg.train_minutes:g} "
                f"({elapsed:.1f} min so far)")
            break
        t_round = time.time()
        for conf, name, out_dir in zip(confs, names, out_dirs):
            if done_iters(out_dir) >= target:
                continue
            resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
            cmd = [py, script('train.py'), conf, f'--out_dir={out_dir}', f'--max_iters={target}',
                   f'--lr_decay_iters={total}', f'--init_from={"resume" if resume else "scratch"}']
            cmd += shlex.split(cfg.train_args)
            timings[f'train {name}'] = timings.get(f'train {name}', 0.0) + \
                run_logged(cmd, os.path.join(out_dir, f'train_{target}.log'))
        last_round = time.time() - t_round
        reached = target
        log(f"[reproduce] every config at iteration {reached} of {total} "
            f"({(time.time() - t_start) / 60:.1f} min so far)")
    timings['train (all)'] = time.time() - t_start

    # --- 2. evaluate beyond the training context ---
    cmd = [py, '-m', 'experiments.evaluate', f'--out_dirs={",".join(out_dirs)}',
           f'--lengths={cfg.lengths}', f'--table={res}/eval.md', f'--plot={res}/eval.png',
           f'--json={res}/eval.json'] + shlex.split(cfg.eval_args)
    timings['eval'] = run_logged(cmd, os.path.join(res, 'eval.log'))
    with open(os.path.join(res, 'eval.json')) as f:
        results = json.load(f)['results']

    # --- 3. decoding speed and state size ---
    if cfg.decode:
        cmd = [py, '-m', 'experiments.bench', 'decode', f'--out_dirs={",".join(out_dirs)}',
               f'--json={res}/decode.json', f'--table={res}/decode.md']
        cmd += shlex.split(cfg.decode_args)
        timings['bench decode'] = run_logged(cmd, os.path.join(res, 'decode.log'))
    timings['total'] = time.time() - t_start

    params = {r['out_dir']: r['params'] for r in results}
    spread = (max(params.values()) / min(params.values()) - 1) * 100
    with open(os.path.join(res, 'reproduce.json'), 'w') as f:
        json.dump({'config': asdict(cfg), 'argv': argv, 'timings_s': timings, 'iters': reached,
                   'total_iters': total, 'params': params, 'param_spread_percent': spread,
                   'torch': torch.__version__, 'cpu_count': os.cpu_count()}, f, indent=1)
    with open(os.path.join(res, 'summary.md'), 'w') as f:
        command = shlex.join(['python', '-m', 'experiments.reproduce'] + argv)
        f.write(f"# Reproduction: `{command}`\n\n")
        if skipped:
            f.write("(training continued from an earlier run's checkpoints with "
                    f"--skip_trained=True: {', '.join(skipped)}; the earlier run's time is not in "
                    "the wall time below)\n\n")
        parts = ', '.join(f"{k} {v / 60:.1f} min" for k, v in timings.items() if k != 'total')
        f.write(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; parameter counts differ "
                f"by {spread:.1f} % at most; wall time {timings['total'] / 60:.1f} min "
                f"({parts}).\n\n")
        cut = ', so it stopped before decaying' if reached < total else ''
        tokens = results[0]['train_tokens'] / 1e6
        f.write(f"Trained {reached} of {total} iterations per config (the learning-rate schedule "
                f"is the one of {total}{cut}), {tokens:.2f}M training tokens per config.\n\n")
        f.write("## Validation loss beyond the training context\n\n")
        with open(os.path.join(res, 'eval.md')) as g:
            f.write(g.read())
        f.write("\n![loss vs length and by position](eval.png)\n")
        if cfg.decode:
            f.write("\n## Decoding\n\n")
            with open(os.path.join(res, 'decode.md')) as g:
                f.write(g.read())
    decoded = ', decode.md, decode.json' if cfg.decode else ''
    log(f"[reproduce] done in {timings['total'] / 60:.1f} min; results in {res}/ (summary.md, "
        f"eval.md, eval.png, eval.json{decoded}, reproduce.json)")


if __name__ == '__main__':
    main()
