"""experiments/gpu_check.py without a GPU: its plan fits one 9-minute device call, its phases run
side by side then one at a time under a deadline, its results reach $OUT, the peers' import check
works where the GPU run's failed, and the training-step profile runs train.py itself (on CPU)."""
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments import gpu_check  # noqa: E402
from experiments.gpu_check import Step  # noqa: E402


def py(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_dry_run_plan_fits_one_call_of_9_minutes():
    p = py('-m', 'experiments.gpu_check', '--dry-run')
    assert p.returncode == 0, p.stderr
    cost = gpu_check.check_plan()
    assert sum(cost.values()) <= gpu_check.DEADLINE_S <= gpu_check.CALL_S == 540
    assert f"total {sum(cost.values())} s of the {gpu_check.DEADLINE_S} s deadline" in p.stdout
    assert 'timeout_s=540' in p.stdout
    for s in gpu_check.STEPS:                   # every step with its phase and budget
        assert any(line.split()[:3] == [str(s.phase), s.name, str(s.budget_s)] for line in p.stdout.splitlines())
    phase = {s.name: s.phase for s in gpu_check.STEPS}
    untimed = ['pytest_cuda', 'sanitizer', 'graph_breaks', 'autotune_fla', 'autotune_mamba']
    assert all(phase[n] == 1 for n in untimed)
    timed = ['scan_bf16', 'profile_train', 'quick_fm_sparse', 'quick_attention', 'decode', 'summary']
    timed += [f"train_{m}_T{T}" for m, T in gpu_check.TIMED_SHAPES]
    assert all(phase[n] == 2 for n in timed)
    assert phase['install_peers'] == 0 and phase['data'] == 0     # before the autotune and the warm-ups


def train_argv(cmd):
    """train.py's arguments in a step's command, less those that only name a run."""
    args = shlex.split(cmd.split('train.py', 1)[1])
    return [a for a in args if not a.startswith(('--out_dir=', '--max_iters=3'))]


def test_every_timed_training_run_is_warmed_with_its_own_arguments():
    """The warm-up fills the compile caches only for the graphs of the same arguments."""
    steps = {s.name: s for s in gpu_check.STEPS}
    timed = [n for n in steps if n.startswith(('train_', 'quick_'))]
    assert len(timed) == 6
    for name in timed:
        warm = steps[f"warm_{name[len('train_'):] if name.startswith('train_') else name}"]
        assert train_argv(warm.cmd) == train_argv(steps[name].cmd), name
        assert '--max_iters=3' in warm.cmd


def toy_steps(tmp_path):
    sleep = lambda name, phase, s, budget: Step(name, phase, budget, False, f"sleep {s}; echo {name} done", name)
    return [sleep('a', 0, 0.1, 1),
            sleep('b', 1, 1.5, 5), sleep('c', 1, 1.5, 5), sleep('slow', 1, 30, 1),
            sleep('d', 2, 0.1, 2), sleep('e', 2, 0.1, 30)]


def test_phases_side_by_side_then_in_turn_under_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'STEPS', toy_steps(tmp_path))
    out = tmp_path / 'out'
    out.mkdir()
    monkeypatch.setenv('OUT', str(out))
    rc = gpu_check.run_checklist(str(tmp_path / 'res'), deadline_s=5)
    recs = {r['step']: r for r in json.loads((out / 'checklist.json').read_text())['steps']}
    assert rc == 1                                            # a step timed out
    assert recs['slow']['status'] == 'timeout' and recs['slow']['seconds'] < 10
    assert recs['a']['status'] == recs['b']['status'] == recs['c']['status'] == recs['d']['status'] == 'passed'
    assert abs(recs['b']['start_s'] - recs['c']['start_s']) < 0.5           # side by side
    ends = max(recs[n]['start_s'] + recs[n]['seconds'] for n in ('b', 'c', 'slow'))
    assert recs['d']['start_s'] >= ends - 0.2 and ends < 2.9               # after phase 1, which took no 3 s
    assert recs['e']['status'] == 'not reached'          # 30 s budget, ~3 s of the deadline left
    with tarfile.open(out / 'gpu.tar.gz') as tar:
        names = tar.getnames()
    assert {'./checklist.json', './logs/b.log', './logs/d.log'} <= set(names)
    assert (tmp_path / 'res' / 'logs' / 'd.log').read_text().rstrip().endswith('d done')


def test_without_cuda_the_cuda_steps_are_skipped_and_packed(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    p = py('-m', 'experiments.gpu_check', '--only=env,pytest_cuda', f"--results={tmp_path / 'res'}",
           env=dict(OUT=str(out), CUDA_VISIBLE_DEVICES=''))
    assert p.returncode == 0, p.stdout + p.stderr
    steps = {s['step']: s for s in json.loads((out / 'checklist.json').read_text())['steps']}
    assert steps['env']['status'] == 'passed' and steps['pytest_cuda']['status'] == 'skipped'
    with tarfile.open(out / 'gpu.tar.gz') as tar:
        assert {'./env.json', './logs/env.log'} <= set(tar.getnames())


PROBE = """
import importlib, os, sys
sys.path.insert(0, {repo!r})
from experiments import gpu_check
site = {site!r}
os.makedirs(os.path.join(site, 'peer_probe', 'ops'))   # installed after this interpreter started
for f in ('peer_probe/__init__.py', 'peer_probe/ops/__init__.py'):
    open(os.path.join(site, f), 'w').close()
sys.path.insert(0, site)
try:
    importlib.import_module('peer_probe.ops')
    print('in-process: ok')
except ImportError:
    print('in-process: failed')
print('fresh:', gpu_check.importable('peer_probe.ops', site))
print('missing:', gpu_check.importable('peer_probe.nothing', site))
"""


def test_peer_import_check_sees_an_install_made_after_the_start(tmp_path):
    """The GPU run's install_peers: SITE was on PYTHONPATH before it existed, so the in-process
    import failed though the install worked; the check in a fresh interpreter finds it."""
    site = tmp_path / 'site'
    p = py('-c', PROBE.format(repo=str(REPO), site=str(site)), env=dict(PYTHONPATH=str(site)))
    assert p.returncode == 0, p.stderr
    assert 'in-process: failed' in p.stdout        # the failure it replaces, reproduced
    assert "fresh: (True, 'ok')" in p.stdout
    assert "missing: (False, \"ModuleNotFoundError: No module named 'peer_probe.nothing'\")" in p.stdout


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    words = 'the king and queen of the night shall love thy heart o lord'.split()
    text = '\n'.join(' '.join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(3000))
    (d / 'text.txt').write_text(text)
    p = py('data/shakespeare_char/prepare.py', '--input', d / 'text.txt', '--out_dir', d / 'shakespeare_char')
    assert p.returncode == 0, p.stderr
    return d


def test_profile_train_profiles_train_py_steps_on_cpu(tmp_path, data_dir):
    res = tmp_path / 'res'
    res.mkdir()
    p = py('-m', 'experiments.gpu_check', 'profile_train', res, '--device=cpu', '--dtype=float32',
           '--compile=False', '--n_layer=1', '--n_embd=64', '--block_size=64', '--batch_size=2',
           '--eval_iters=1', f'--data_dir={data_dir}', f"--out_dir={tmp_path / 'o'}",
           env=dict(OMP_NUM_THREADS='1'), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    prof = json.loads((res / 'profile_train.json').read_text())
    assert prof['steps_profiled'] == gpu_check.PROFILE_ITERS['active'] and prof['time_on'] == 'CPU'
    assert prof['host_syncs'] is None                                 # the sync debug mode needs CUDA
    assert prof['self_ms_per_step'] > 0 and len(prof['top']) == 25
    names = [r['name'] for r in prof['top']]
    assert any(n.startswith('aten::') for n in names)
    # the profiled steps are train.py's, whole: one AdamW step in each
    assert [r['calls_per_step'] for r in prof['top'] if r['name'].startswith('Optimizer.step#AdamW')] == [1.0], names
    md = (res / 'profile_train.md').read_text()
    assert '| kernel / op | ms per step | calls per step | share |' in md and '--mixer=fm_sparse' in md


H200 = REPO / 'results' / 'gpu' / 'h200-9efe7a3' / 'train'


@pytest.mark.skipif(not (H200 / 'quick.jsonl').exists(), reason='the H200 logs are not in results/gpu/train')
def test_summary_of_the_h200_logs(tmp_path):
    """train.json of the H200 run (its own summary, the code before) from its logs, again."""
    train = tmp_path / 'train'
    train.mkdir()
    for m, T in gpu_check.TIMED_SHAPES:
        (train / f"{m}_T{T}.jsonl").write_bytes((H200 / f"{m}_T{T}.jsonl").read_bytes())
    (train / 'quick_fm_sparse.jsonl').write_bytes((H200 / 'quick.jsonl').read_bytes())
    gpu_check.summary(str(tmp_path))
    old = json.loads((H200.parent / 'train.json').read_text())
    new = json.loads((tmp_path / 'train.json').read_text())
    for T in ('T1024', 'T8192'):
        assert new['fm_sparse_vs_attention'][T]['fm_sparse_over_attention'] == \
            old['fm_sparse_vs_attention'][T]['fm_sparse_over_attention']
        assert new['fm_sparse_vs_attention'][T]['met'] is False
    quick = json.loads((tmp_path / 'quick.json').read_text())['runs']
    assert quick['fm_sparse']['best_iter'] == 500 and quick['fm_sparse']['last_iter'] == 1000
    assert round(quick['fm_sparse']['best_val_loss'], 3) == 1.537 and 'attention' not in quick


def test_targets_of_the_h200_run(tmp_path):
    """targets.json from the H200 run's scan and decode rows: the issue's numbers (scan 1.23x
    fla's time; fm_sparse 4.8-4.9 ms/token; the sparse step 0.5x the dense at m = 16384, batch 1)."""
    for name in ('scan_bf16.json', 'decode.json'):
        (tmp_path / name).write_bytes((H200.parent / name).read_bytes())
    got = gpu_check.scan_and_decode_targets(str(tmp_path))
    assert got['scan_over_fla']['ratio'] == 1.234 and got['scan_over_fla']['met'] is False
    assert got['scan_variants_over_triton'] == {}          # the run had no variant rows
    assert got['decode_batch1']['met'] is False
    assert all(4.5 < at['fm_sparse'] < 5 for at in got['decode_batch1']['ms_per_token'].values())
    speedup = got['sparse_step_speedup_m16384']
    assert speedup['batch_size'] == 1 and speedup['met'] is False and speedup['dense_over_sparse'] < 1
