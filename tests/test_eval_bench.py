"""Smoke tests of eval.py (loss at several context lengths, table, plot, JSON) and of
`bench.py decode` (rows, keys, state bytes), on tiny models: CPU, a few seconds."""
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import bench  # noqa: E402
from experiments import evaluate  # noqa: E402
from model import LM, ModelConfig  # noqa: E402
from common import CKPT_FORMAT  # noqa: E402

VOCAB = 16


def make_dataset(root):
    d = root / 'data' / 'tiny'
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', 4000), ('val', 2000)):
        rng.integers(0, VOCAB, n).astype(np.uint16).tofile(d / f'{split}.bin')
    with open(d / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': VOCAB, 'tokenizer': 'char',
                     'itos': {i: chr(97 + i) for i in range(VOCAB)}}, f)
    return str(root / 'data')


def make_checkpoint(out_dir, mixer, data_dir, world_size=1):
    """A checkpoint in train.py's format, with random weights (and no train_tokens, as older ones)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_embd=64, n_head=2, mixer=mixer,
                         head_dim=32, n_slots=16, top_k=4, chunk_size=16)
    model = LM(config)
    os.makedirs(out_dir)
    torch.save({'format': CKPT_FORMAT, 'model': model.state_dict(), 'model_args': asdict(config),
                'iter_num': 3, 'best_val_loss': 2.8, 'world_size': world_size,
                'config': {'dataset': 'tiny', 'data_dir': data_dir, 'batch_size': 2,
                           'gradient_accumulation_steps': 1, 'max_iters': 3}},
               os.path.join(out_dir, 'ckpt.pt'))
    return out_dir


def test_eval_smoke(tmp_path):
    data_dir = make_dataset(tmp_path)
    runs = [make_checkpoint(str(tmp_path / m), m, data_dir, world_size=w)
            for m, w in (('fm_sparse', 1), ('attention', 2))]
    res = tmp_path / 'res'
    evaluate.main([f'--out_dirs={",".join(runs)}', '--lengths=1,2', '--eval_tokens=256', '--threads=1',
                  f'--table={res / "eval.md"}', f'--plot={res / "eval.png"}', f'--json={res / "eval.json"}'])
    for name in ('eval.md', 'eval.png', 'eval.json'):
        assert (res / name).stat().st_size > 0, name
    table = (res / 'eval.md').read_text()
    rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| model')]
    assert len(rows) == 2
    assert any('| fm_sparse |' in r for r in rows) and any('| attention |' in r for r in rows)
    out = json.loads((res / 'eval.json').read_text())['results']
    assert [r['mixer'] for r in out] == ['fm_sparse', 'attention']
    assert [r['train_tokens'] for r in out] == [3 * 2 * 32, 3 * 2 * 32 * 2]   # iters x batch x block x processes
    for r in out:
        assert [l['length'] for l in r['lengths']] == [32, 64]
        for l in r['lengths']:
            assert math.isfinite(l['loss']) and l['loss'] > 0
            assert len(l['loss_by_position']) == l['length']
            assert all(math.isfinite(v) for v in l['loss_by_position'])
            # a random-weight model is close to uniform over the vocabulary
            assert abs(l['loss'] - math.log(VOCAB)) < 1.0


def test_loss_so_far():
    pos = [4.0, 2.0, 3.0, 1.0, 5.0]
    assert np.allclose(evaluate.loss_so_far(pos), [4.0, 3.0, 3.0, 2.5, 3.0])
    assert evaluate.so_far_points(pos) == {'1': 4.0, '2': 3.0, '4': 2.5, '5': 3.0}


def test_eval_so_far(tmp_path):
    data_dir = make_dataset(tmp_path)
    run = make_checkpoint(str(tmp_path / 'fm_sparse'), 'fm_sparse', data_dir)
    res = tmp_path / 'res'
    evaluate.main([f'--out_dirs={run}', '--lengths=1,2', '--eval_tokens=256', '--threads=1', '--table=',
                  '--plot=', f'--json={res / "eval.json"}', f'--so_far={res / "so_far.png"}'])
    assert (res / 'so_far.png').stat().st_size > 0
    for l in json.loads((res / 'eval.json').read_text())['results'][0]['lengths']:
        sf = l['loss_so_far']
        assert list(sf) == [str(t) for t in (1, 2, 4, 8, 16, 32, 64) if t <= l['length']]
        # the loss so far at the last position is the length's loss
        assert math.isclose(sf[str(l['length'])], l['loss'], abs_tol=1e-4)
        assert math.isclose(sf['1'], l['loss_by_position'][0], abs_tol=1e-4)


def test_eval_rejects_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match='no checkpoint'):
        evaluate.main([f'--out_dirs={tmp_path / "nothing"}', '--lengths=1'])


REQUIRED = ('mixer', 'n_slots', 'top_k', 'context', 'ms_per_token', 'state_bytes')


def test_bench_decode_smoke(tmp_path):
    path = tmp_path / 'decode.json'
    cfg = bench.DecodeBench(contexts='64,128', n_layer=1, n_embd=64, n_head=2, n_slots=16, top_k=4,
                            vocab_size=VOCAB, warmup=1, tokens=3, slots='32,64', slot_top_k=4,
                            slot_repeats=3, json=str(path), table=str(tmp_path / 'decode.md'))
    bench.bench_decode(cfg)
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        for key in REQUIRED:
            assert key in r, key
        assert r['ms_per_token'] > 0 and r['state_bytes'] > 0
    ctx = {(r['mixer'], r['context']): r for r in rows if r['bench'] == 'context'}
    assert set(ctx) == {(m, c) for m in ('fm', 'fm_sparse', 'mamba2', 'attention') for c in (64, 128)}
    assert ctx['attention', 128]['state_bytes'] == 2 * ctx['attention', 64]['state_bytes']
    for m in ('fm', 'fm_sparse', 'mamba2'):
        assert ctx[m, 128]['state_bytes'] == ctx[m, 64]['state_bytes']
    slots = [r for r in rows if r['bench'] == 'slots']
    assert {(r['mixer'], r['n_slots'], r['part']) for r in slots} == \
        {(m, n, p) for m in ('fm', 'fm_sparse') for n in (32, 64) for p in ('layer', 'scan')}
    assert all(r['top_k'] == 4 for r in slots if r['mixer'] == 'fm_sparse')
    assert '| target | measured | met |' in (tmp_path / 'decode.md').read_text()


def test_bench_decode_cli(tmp_path):
    path = tmp_path / 'd.json'
    out = subprocess.run([sys.executable, '-m', 'experiments.bench', 'decode', '--device=cpu',
                          '--contexts=64,128', '--mixers=fm_sparse,attention', '--n_layer=1', '--n_embd=64',
                          '--n_head=2', '--n_slots=16', '--top_k=4', '--warmup=1', '--tokens=2', '--slots=',
                          f'--json={path}'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '| context |' in out.stdout
    rows = json.loads(path.read_text())
    assert {r['mixer'] for r in rows} == {'fm_sparse', 'attention'}
    bad = subprocess.run([sys.executable, '-m', 'experiments.bench', 'decode', '--nonsense=1'],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and 'nonsense' in bad.stderr


def test_bench_scan_and_train_smoke(tmp_path):
    scan_path, train_path = tmp_path / 'scan.json', tmp_path / 'train.json'
    bench.bench_scan(bench.ScanBench(device='cpu', B=1, T=40, H=2, M=8, P=4, chunk_size=16, repeats=1,
                                     json=str(scan_path)))
    rows = json.loads(scan_path.read_text())
    assert {(r['impl'], r['decay']) for r in rows} == {
        ('naive', 'slot'), ('chunked', 'slot'), ('chunked, scalar decay', 'scalar')}
    assert all(r['fwd_ms'] > 0 and r['fwd_bwd_ms'] > 0 and r['T'] == 40 for r in rows)
    bench.bench_train(bench.TrainBench(shapes='32x2', mixers='fm_sparse,attention', warmup=1, repeats=1,
                                       json=str(train_path)))
    rows = json.loads(train_path.read_text())
    assert {(r['mixer'], r['T'], r['batch_size']) for r in rows} == {('fm_sparse', 32, 2), ('attention', 32, 2)}
    at = {r['mixer']: r for r in rows}
    assert at['attention']['n_layer'] == 5 and at['fm_sparse']['n_layer'] == 4   # the shakespeare_char sizes
    assert all(r['ms_per_step'] > 0 for r in rows)
