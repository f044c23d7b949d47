"""recall.py: the MQAR data generator, and the script end to end at tiny settings."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import recall  # noqa: E402

K, V, T = 16, 16, 40


def batch(n_pairs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return recall.mqar_batch(torch.tensor(n_pairs), T, K, V, gen)


def test_queries_target_their_keys_values():
    x, y = batch([1, 3, 5, 10, 3])
    for b, n in enumerate([1, 3, 5, 10, 3]):
        keys, vals = x[b, 0:2 * n:2], x[b, 1:2 * n:2]
        assert keys.unique().numel() == n                          # distinct keys
        assert ((keys >= 1) & (keys <= K)).all() and ((vals > K) & (vals <= K + V)).all()
        table = dict(zip(keys.tolist(), vals.tolist()))
        qpos = torch.arange(2 * n, 4 * n, 2)
        assert sorted(x[b, qpos].tolist()) == sorted(keys.tolist())   # every key is queried once
        for t in qpos.tolist():
            assert y[b, t].item() == table[x[b, t].item()]           # the target is that key's value
            assert x[b, t + 1].item() == y[b, t].item()              # and the next input is the value
        mask = torch.zeros(T, dtype=torch.bool)
        mask[qpos] = True
        assert (y[b][~mask] == -1).all()                             # scored only at the queries
        assert (x[b, 4 * n:] == 0).all()                             # then padding


def test_seeded_and_not_constant():
    x1, y1 = batch([4, 8, 2], seed=5)
    x2, y2 = batch([4, 8, 2], seed=5)
    x3, _ = batch([4, 8, 2], seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_accuracy_counts_only_queries():
    x, y = batch([4, 4])
    logits = torch.zeros(2, T, 1 + K + V)
    logits[y >= 0] = torch.nn.functional.one_hot(y[y >= 0], 1 + K + V).float()
    assert recall.query_accuracy(logits, y) == 1.0
    logits[0, 8] = 0                                                   # position 8 is the first query of row 0
    logits[0, 8, 0] = 1
    assert recall.query_accuracy(logits, y) == 7 / 8


@pytest.mark.parametrize('args, name', [(['--pairs=64', '--seq_len=100'], 'seq_len'),
                                        (['--smoke=True', '--jobs=0'], 'jobs')])
def test_bad_input_is_one_line(args, name):
    p = subprocess.run([sys.executable, '-m', 'experiments.recall'] + args,
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0 and name in p.stderr and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_end_to_end_smoke(tmp_path):
    out = tmp_path / 'recall'
    p = subprocess.run([sys.executable, '-m', 'experiments.recall', '--smoke=True', f'--out_dir={out}',
                        '--models=attention,fm_sparse:n_slots=16:top_k=4,mamba2:n_slots=4'],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ('recall.md', 'recall.png', 'curves.png', 'recall.json'):
        assert (out / name).stat().st_size > 0
    d = json.loads((out / 'recall.json').read_text())
    labels = [r['label'] for r in d['results']]
    assert labels == ['attention', 'fm_sparse m=16 k=4', 'mamba2 N=4']
    for r in d['results']:
        assert set(r['eval']) == {'2', '4'}
        assert all(0.0 <= e['acc'] <= 1.0 for e in r['eval'].values())
        assert r['state_bytes'] > 0 and r['ms_per_token'] > 0 and len(r['curve']) >= 2
    sparse = d['results'][1]
    assert sparse['touched_bytes'] < sparse['state_bytes']           # k of m rows
    for s in sparse['router']:                                       # router health, per layer
        assert 1 <= s['effective'] <= 16 and 0 <= s['read_write_overlap'] <= 1
        assert s['overlap_chance'] == 4 / 16
    assert 'router' not in d['results'][0] and 'router' not in d['results'][2]
    assert '| fm_sparse m=16 k=4 |' in (out / 'recall.md').read_text()

    # the worker processes (--jobs=2, the default) change nothing but the wall time
    p = subprocess.run([sys.executable, '-m', 'experiments.recall', '--smoke=True', '--jobs=1',
                        f"--out_dir={tmp_path / 'serial'}", '--models=attention,fm_sparse:n_slots=16:top_k=4,mamba2:n_slots=4'],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-2000:]
    serial = json.loads((tmp_path / 'serial' / 'recall.json').read_text())
    assert [(r['eval'], r['curve']) for r in serial['results']] == [(r['eval'], r['curve']) for r in d['results']]

    # --combine rewrites the outputs from recall.json alone (no training), in the default sweep's order
    p = subprocess.run([sys.executable, '-m', 'experiments.recall', f'--combine={out}',
                        f"--out_dir={tmp_path / 'combined'}"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    d2 = json.loads((tmp_path / 'combined' / 'recall.json').read_text())
    assert [r['label'] for r in d2['results']] == labels
    assert (tmp_path / 'combined' / 'recall.png').stat().st_size > 0
