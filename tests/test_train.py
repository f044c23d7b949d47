"""
train.py, sample.py, reproduce.py and the data prepare scripts, end to end on CPU with tiny models.

The text is generated here (play-like lines from a small vocabulary of words), so the tests need
nothing beside the repository. Datasets are prepared into a temporary directory (train.py's
--data_dir), so the repo's data/ is never touched. train.py is a script: the tests run it in a
subprocess, or in this process with runpy where they patch the model.
"""
import hashlib
import json
import os
import pickle
import random
import re
import runpy
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import model  # noqa: E402
from model import ModelConfig  # noqa: E402

TINY = ['--dataset=shakespeare_char', '--mixer=fm_sparse', '--n_layer=2', '--n_embd=64', '--block_size=64',
        '--batch_size=4', '--eval_interval=10', '--eval_iters=2', '--device=cpu', '--compile=False',
        '--log_interval=1', '--learning_rate=1e-2', '--warmup_iters=5', '--lr_decay_iters=30', '--min_lr=1e-3',
        '--peak_flops=1e12']


def run(*args, env=None, check=True, timeout=240):
    """Run a repo script with this interpreter; returns the CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), **(env or {}))
    p = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def assert_one_line_error(p, *needles):
    assert p.returncode != 0, p.stdout + p.stderr
    err = p.stderr.strip()
    assert 'Traceback' not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / 'log.jsonl').read_text().splitlines()]


def train_in_process(monkeypatch, *argv):
    """Run train.py in this process (so that a test can patch model.LM); returns its globals."""
    monkeypatch.setattr(sys, 'argv', ['train.py', *map(str, argv)])
    return runpy.run_path(str(REPO / 'train.py'), run_name='__main__')


WORDS = ('the and to of my a i that in is not with you it for be his this your he but have as thou so '
         'what will me by thy him all do no shall if are our we good now lord o come they love here more '
         'there she would let sir then how well hath king man death night heart blood may upon eyes day').split()
NAMES = ('ROMEO', 'JULIET', 'FIRST CITIZEN', 'MENENIUS', 'KING RICHARD III', 'QUEEN ELIZABETH', 'NURSE')


def play_text(n_chars, seed=0):
    """A play-like text: speaker lines followed by verse made of common words."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < n_chars:
        lines = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + rng.choice(',.;!?')
                 for _ in range(rng.randint(1, 4))]
        block = f"{rng.choice(NAMES)}:\n" + '\n'.join(lines) + '\n\n'
        out.append(block)
        n += len(block)
    return ''.join(out)[:n_chars]


TEXT_CHARS = 40_000


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """shakespeare_char prepared from a generated text of TEXT_CHARS characters."""
    d = tmp_path_factory.mktemp('data')
    src = d / 'play.txt'
    src.write_text(play_text(TEXT_CHARS), encoding='utf-8')
    p = run('data/shakespeare_char/prepare.py', '--input', src, '--out_dir', d / 'shakespeare_char')
    assert f'train.bin {TEXT_CHARS * 9 // 10:,} tokens, val.bin {TEXT_CHARS // 10:,} tokens' in p.stdout, p.stdout
    return d


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    """A 30-iteration run, and a 20-iteration run resumed to 30, with the same settings."""
    full, part = tmp_path_factory.mktemp('full'), tmp_path_factory.mktemp('part')
    args = [*TINY, f'--data_dir={data_dir}']
    run('train.py', *args, '--max_iters=30', f'--out_dir={full}')
    run('train.py', *args, '--max_iters=20', f'--out_dir={part}')
    ckpt20 = torch.load(part / 'ckpt.pt', weights_only=True)
    p = run('train.py', *args, '--max_iters=30', f'--out_dir={part}', '--init_from=resume')
    return {'full': full, 'part': part, 'ckpt20': ckpt20, 'resume_stdout': p.stdout}


# --- data ----------------------------------------------------------------------------------


def test_prepare_char(data_dir):
    d = data_dir / 'shakespeare_char'
    meta = pickle.loads((d / 'meta.pkl').read_bytes())
    text = (data_dir / 'play.txt').read_text(encoding='utf-8')
    assert meta['vocab_size'] == len(set(text)) == len(meta['itos'])
    train_ids = np.fromfile(d / 'train.bin', dtype=np.uint16)
    val_ids = np.fromfile(d / 'val.bin', dtype=np.uint16)
    assert ''.join(meta['itos'][i] for i in train_ids) + ''.join(meta['itos'][i] for i in val_ids) == text


def test_prepare_refuses_empty_split(tmp_path):
    (tmp_path / 'tiny.txt').write_text('a')   # 90% of one character is an empty train split
    p = run('data/shakespeare_char/prepare.py', '--input', tmp_path / 'tiny.txt', '--out_dir', tmp_path / 'out',
            check=False)
    assert_one_line_error(p, 'too short')
    assert not (tmp_path / 'out' / 'train.bin').exists()


TIKTOKEN_CACHE = os.environ.get('TIKTOKEN_CACHE_DIR', '')


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason='the GPT-2 BPE ranks are a download: set '
                    'TIKTOKEN_CACHE_DIR to a tiktoken cache to test data/shakespeare/prepare.py offline')
def test_prepare_bpe(tmp_path):
    src = tmp_path / 'play.txt'
    src.write_text(play_text(5000), encoding='utf-8')
    run('data/shakespeare/prepare.py', '--input', src, '--out_dir', tmp_path)
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    ids = np.concatenate([np.fromfile(tmp_path / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')])
    assert enc.decode(ids.tolist()) == src.read_text(encoding='utf-8')
    assert pickle.loads((tmp_path / 'meta.pkl').read_bytes())['vocab_size'] == 50257


# --- configuration -------------------------------------------------------------------------


@dataclass
class Cfg:   # a config of each field type
    out_dir: str = 'out'
    max_iters: int = 10
    learning_rate: float = 1e-3
    compile: bool = False
    top_p: Optional[float] = None


def test_parse_config_types_and_files(tmp_path):
    cfg = Cfg()
    f = tmp_path / 'c.py'
    f.write_text("# a comment\nmax_iters = 7\nlearning_rate = 1  # an int is a valid float\nn_slots = 32\n")
    got = common.parse_config(cfg, [str(f), '--max_iters=9', '--compile=True', '--dropout=0.1', '--out_dir=1,2'],
                              extra=ModelConfig)
    assert (cfg.max_iters, cfg.learning_rate, cfg.compile, cfg.out_dir) == (9, 1.0, True, '1,2')
    assert isinstance(cfg.learning_rate, float)
    assert got == {'max_iters': 9, 'learning_rate': 1.0, 'n_slots': 32, 'compile': True, 'dropout': 0.1,
                   'out_dir': '1,2'}


def test_config_file_is_flat_assignments(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("max_iters = 7\nexec(open('other.py').read())\n")
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg(), [str(f)])
    assert 'c.py:2' in str(e.value.code) and 'key = literal' in str(e.value.code)
    f.write_text("learning_rate = 'fast'\n")
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg(), [str(f)])
    assert "learning_rate = 'fast' in config file" in str(e.value.code) and 'not a valid float' in str(e.value.code)


@pytest.mark.parametrize('argv,needle', [
    (['--bogus=1'], "unknown key 'bogus'"),
    (['--n_layer=abc'], '--n_layer=abc is not a valid int'),
    (['--compile=maybe'], '--compile=maybe is not a valid bool'),
    (['--max_iters=1.5'], 'is not a valid int'),
    (['--max_iters', '5'], 'expected --key=value'),
])
def test_parse_config_rejects(argv, needle):
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg(), argv, extra=ModelConfig, prog='train.py')
    msg = str(e.value.code)
    assert needle in msg and 'valid keys:' in msg and 'learning_rate' in msg and 'n_slots' in msg
    assert '\n' not in msg


def test_bad_key_exits_with_one_line():
    p = run('train.py', '--n_layrs=2', check=False)   # as a user sees it: one line on stderr, no traceback
    assert_one_line_error(p, "unknown key 'n_layrs'", 'valid keys:', 'n_layer', 'top_k')


def one_line_exit(monkeypatch, *argv):
    """train.py's SystemExit message, run in this process."""
    with pytest.raises(SystemExit) as e:
        train_in_process(monkeypatch, *argv)
    msg = str(e.value.code)
    assert '\n' not in msg, msg
    return msg


def test_bad_values_exit_with_one_line(monkeypatch, tmp_path):
    assert 'mixer' in one_line_exit(monkeypatch, '--mixer=transformer', '--device=cpu')
    assert 'batch_size=0 must be >= 1' in one_line_exit(monkeypatch, '--batch_size=0')
    assert 'data/shakespeare/prepare.py' in one_line_exit(
        monkeypatch, '--dataset=shakespeare', f'--data_dir={tmp_path}', '--device=cpu', f'--out_dir={tmp_path}/o')


def test_help_lists_keys_with_the_default_run(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        train_in_process(monkeypatch, 'config/shakespeare_char_attention.py', '--help')
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ('--max_iters=1500', "--mixer='attention'", '--n_layer=5', '--n_embd=128', '--peak_flops=0.0'):
        assert line in out, line


# --- training, resume, sampling ------------------------------------------------------------


def test_train_writes_log_and_checkpoint(runs):
    log = read_log(runs['part'])
    steps = [r for r in log if 'loss' in r]
    evals = [r for r in log if 'val_loss' in r]
    assert [r['iter'] for r in steps] == list(range(30))
    assert [r['iter'] for r in evals] == [0, 10, 20, 30]     # the resumed run does not re-evaluate iter 20
    assert all({'lr', 'ms_per_iter', 'tokens_per_s', 'mfu'} <= set(r) for r in steps)
    vocab = len(set(play_text(TEXT_CHARS)))
    cfg = ModelConfig(mixer='fm_sparse', n_layer=2, n_embd=64, block_size=64, vocab_size=vocab)
    flops = model.LM(cfg).flops_per_token(64)
    for r in steps:   # MFU: model FLOPs per second over the peak (--peak_flops=1e12)
        assert r['mfu'] == pytest.approx(flops * r['tokens_per_s'] / 1e12, rel=1e-3, abs=1e-5)
    assert evals[-1]['val_loss'] < evals[0]['val_loss']
    ck = torch.load(runs['part'] / 'ckpt.pt', weights_only=True)
    assert ck['format'] == common.CKPT_FORMAT and ck['iter_num'] == 30
    assert ck['model_args']['mixer'] == 'fm_sparse' and ck['model_args']['n_embd'] == 64
    assert ck['config']['max_iters'] == 30 and ck['meta']['tokenizer'] == 'char'
    assert ck['world_size'] == 1 and ck['train_tokens'] == 30 * 4 * 64 == common.train_tokens(ck)
    assert runs['ckpt20']['iter_num'] == 20
    assert 'resuming at iter 20' in runs['resume_stdout']


def test_resume_reproduces_uninterrupted_run(runs):
    full = {(r['iter'], k): r[k] for r in read_log(runs['full']) for k in ('loss', 'val_loss') if k in r}
    part = {(r['iter'], k): r[k] for r in read_log(runs['part']) for k in ('loss', 'val_loss') if k in r}
    assert full.keys() == part.keys()
    for key in sorted(full):
        assert part[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    a = torch.load(runs['full'] / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(runs['part'] / 'ckpt.pt', weights_only=True)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_derived_formulation_resumes_exactly(data_dir, tmp_path):
    """As test_resume_reproduces_uninterrupted_run (the default, formulation='paper'), for the
    derived formulation: 20 iterations resumed to 30 end where 30 uninterrupted ones do."""
    args = [*TINY, f'--data_dir={data_dir}', '--formulation=derived']
    run('train.py', *args, '--max_iters=30', f'--out_dir={tmp_path / "full"}')
    run('train.py', *args, '--max_iters=20', f'--out_dir={tmp_path / "part"}')
    p = run('train.py', *args, '--max_iters=30', f'--out_dir={tmp_path / "part"}',
            '--init_from=resume')
    assert 'resuming at iter 20' in p.stdout
    a = torch.load(tmp_path / 'full' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'part' / 'ckpt.pt', weights_only=True)
    assert a['model_args']['formulation'] == b['model_args']['formulation'] == 'derived'
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6)


def test_router_health_is_logged_at_each_evaluation(runs):
    evals = [r for r in read_log(runs['full']) if 'val_loss' in r]
    for r in evals:
        assert len(r['router']) == 2                              # one per layer
        assert all({'effective', 'dead', 'm', 'max_share', 'top10_share'} <= set(s) for s in r['router'])
        assert all(s['m'] == 64 and 1 <= s['effective'] <= 64 for s in r['router'])
    assert 'slots eff ' in runs['resume_stdout'] and 'dead ' in runs['resume_stdout']


def test_resume_keeps_the_selection_bias(runs):
    """The default router_balance='bias': the bias moved while training, is in the checkpoint,
    and the resumed run continued from it (it ends where the uninterrupted run ends)."""
    assert ModelConfig().router_balance == 'bias'
    full = torch.load(runs['full'] / 'ckpt.pt', weights_only=True)['model']
    part = torch.load(runs['part'] / 'ckpt.pt', weights_only=True)['model']
    at20 = runs['ckpt20']['model']
    for layer in range(2):
        key = f'blocks.{layer}.mixer.route_bias'
        assert at20[key].abs().sum() > 0 and not torch.equal(at20[key], part[key])
        torch.testing.assert_close(part[key], full[key])


def test_resume_from_an_older_checkpoint_rewrites_the_log(runs, data_dir, tmp_path):
    """A run stopped after its last checkpoint logged steps that the resumed run repeats: each appears once."""
    (tmp_path / 'log.jsonl').write_text((runs['part'] / 'log.jsonl').read_text() + '{"iter": 30, "lo')   # cut off
    torch.save(runs['ckpt20'], tmp_path / 'ckpt.pt')
    run('train.py', *TINY, f'--data_dir={data_dir}', '--max_iters=30', f'--out_dir={tmp_path}', '--init_from=resume')
    strip = [{k: v for k, v in r.items() if k in ('iter', 'loss', 'val_loss')} for r in read_log(tmp_path)]
    assert strip == [{k: v for k, v in r.items() if k in ('iter', 'loss', 'val_loss')} for r in read_log(runs['part'])]


def sample_in_process(capsys, *argv):
    import sample
    sample.main([*map(str, argv), '--device=cpu'])
    return capsys.readouterr().out


def test_sample_prints_requested_length(runs, capsys):
    out = sample_in_process(capsys, f"--out_dir={runs['part']}", '--max_new_tokens=40', '--num_samples=2',
                            '--start=ROMEO:')
    samples = out.split('\n---------------\n')
    assert len(samples) == 3 and samples[2] == ''
    for s in samples[:2]:
        assert s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 40


def test_sample_refuses_characters_outside_vocabulary(runs):
    p = run('sample.py', f"--out_dir={runs['part']}", '--device=cpu', '--start=ROMEO: {é}', check=False)
    err = assert_one_line_error(p, 'outside the vocabulary')
    assert "'é'" in err and "'{'" in err


def test_prompt_from_file(runs, tmp_path, capsys):
    (tmp_path / 'prompt.txt').write_text('JULIET:\n')
    out = sample_in_process(capsys, f"--out_dir={runs['part']}", '--max_new_tokens=5', '--num_samples=1',
                            f"--start=FILE:{tmp_path / 'prompt.txt'}")
    assert out.startswith('JULIET:\n')


def test_corrupt_or_foreign_checkpoint_is_refused(runs, data_dir, tmp_path, monkeypatch):
    """train.py (as a user runs it) and sample.py (here) load checkpoints with common.load_checkpoint."""
    import sample
    good = (runs['part'] / 'ckpt.pt').read_bytes()
    cases = {'truncated': (good[:len(good) // 2], 'not a readable checkpoint'),
             'garbage': (b'not a checkpoint at all' * 100, 'not a readable checkpoint'),
             'foreign': (None, 'not a checkpoint of this project'), 'missing': (None, 'no checkpoint at')}
    for name, (blob, needle) in cases.items():
        d = tmp_path / name
        if name != 'missing':
            d.mkdir()
        if blob is not None:
            (d / 'ckpt.pt').write_bytes(blob)
        if name == 'foreign':
            torch.save({'model': {}, 'iter_num': 3}, d / 'ckpt.pt')   # e.g. a nanoGPT checkpoint
        if name == 'truncated':
            p = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={d}', '--max_iters=40',
                    '--init_from=resume', check=False)
            assert_one_line_error(p, needle)
        with pytest.raises(SystemExit) as e:
            sample.main([f'--out_dir={d}', '--device=cpu'])
        assert needle in str(e.value.code) and '\n' not in str(e.value.code), name


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    good = {'format': common.CKPT_FORMAT, 'model': {'w': torch.ones(3)}, 'model_args': {}, 'iter_num': 10,
            'config': {}}
    common.save_checkpoint(good, str(path))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):   # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(100)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint({**good, 'iter_num': 20, 'model': {'w': torch.zeros(3)}}, str(path))
    monkeypatch.setattr(torch, 'save', real_save)
    ck = common.load_checkpoint(str(path))
    assert ck['iter_num'] == 10 and torch.equal(ck['model']['w'], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt']   # no temporary file left behind


def nan_after(monkeypatch, n_calls):
    """LM.forward's loss is NaN from its (n_calls+1)-th call on."""
    real_forward = model.LM.forward
    calls = {'n': 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        calls['n'] += 1
        if calls['n'] > n_calls and loss is not None:
            loss = loss * float('nan')
        return logits, loss
    monkeypatch.setattr(model.LM, 'forward', forward)


# eval at 0 (2 splits x 2 batches), 10 steps, eval at 10: 18 calls; steps 10, 11: 20
@pytest.mark.parametrize('calls,log_interval,bad_iter', [
    (18, 1, 10),    # read every step
    (20, 5, 12),    # read at the log interval (iter 15): the message names the first bad step
    (20, 25, 12),   # no log before iter 25: read before the evaluation at 20, which then never runs
])
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch, calls, log_interval,
                                                        bad_iter):
    nan_after(monkeypatch, calls)
    with pytest.raises(SystemExit) as e:
        train_in_process(monkeypatch, *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=30',
                         f'--log_interval={log_interval}')
    msg = str(e.value.code)
    assert msg.startswith('train.py: the loss is nan'), msg       # the training step's guard, not the evaluation's
    assert 'not finite' in msg and f'at iter {bad_iter},' in msg and 'last good checkpoint' in msg and '\n' not in msg
    assert common.load_checkpoint(str(tmp_path / 'ckpt.pt'))['iter_num'] == 10
    logged = [r['iter'] for r in read_log(tmp_path)]
    assert max(logged) < 20 and all(r < bad_iter for r in logged if r > 10)   # nothing logged after the bad step


def test_compile_defaults_off_on_cpu_and_logs_its_wait(data_dir, tmp_path, monkeypatch, capsys):
    g = train_in_process(monkeypatch, *[a for a in TINY if not a.startswith('--compile')], f'--data_dir={data_dir}',
                         f'--out_dir={tmp_path / "a"}', '--max_iters=2')
    assert g['cfg'].compile is False and g['model'] is g['raw_model']
    assert 'compiling' not in capsys.readouterr().out
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda m: compiled.append(m) or m)   # the wait, not the compiler
    train_in_process(monkeypatch, *TINY, '--compile=True', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "b"}',
                     '--max_iters=2')
    out = capsys.readouterr().out
    assert len(compiled) == 1
    assert re.search(r'compiling: the first evaluation took \d+\.\d s', out), out
    assert len(re.findall(r'compiling: the first step took \d+\.\d s', out)) == 1, out


def test_bad_paths_exit_with_one_line(runs, data_dir, tmp_path, monkeypatch):
    """A file where a directory belongs, a missing --input, a bad --lengths: one line, nothing lost."""
    import importlib
    from experiments import reproduce
    import sample
    evaluate = importlib.import_module('experiments.evaluate')
    file = tmp_path / 'a_file'
    file.write_text('x')
    cases = [(lambda: train_in_process(monkeypatch, f'--out_dir={file}'), 'must be a directory'),
             (lambda: sample.main([f'--out_dir={file}']), 'is a file'),
             (lambda: evaluate.main([f'--out_dirs={file}', '--table=', '--plot=', '--json=']), 'is a file'),
             (lambda: evaluate.main([f"--out_dirs={runs['part']}", '--lengths=1,x']), 'comma-separated integers'),
             (lambda: evaluate.main([f"--out_dirs={runs['part']}", f'--table={file}/eval.md']), 'cannot write'),
             (lambda: evaluate.main(['--out_dirs=,']), '--out_dirs is empty')]
    for call, needle in cases:
        with pytest.raises(SystemExit) as e:
            call()
        assert needle in str(e.value.code) and '\n' not in str(e.value.code), (needle, e.value.code)
    for args, needle in [(['--input', tmp_path / 'nothing.txt'], 'is not a file'), (['--out_dir', file], 'is a file')]:
        assert_one_line_error(run('data/shakespeare_char/prepare.py', *args, check=False), needle)
    # reproduce.py continues from existing checkpoints only when asked; it never deletes them
    ckpt = tmp_path / 'runs' / 'shakespeare_char_fm' / 'ckpt.pt'
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes((runs['part'] / 'ckpt.pt').read_bytes())
    with pytest.raises(SystemExit, match='already hold a checkpoint.*--skip_trained=True'):
        reproduce.main(['--configs=config/shakespeare_char_fm.py', f"--runs_dir={tmp_path / 'runs'}",
                        f"--results_dir={tmp_path / 'res'}"])
    assert ckpt.read_bytes() == (runs['part'] / 'ckpt.pt').read_bytes()


# --- data parallel -------------------------------------------------------------------------

DIGEST_WRAPPER = """
import hashlib, os, runpy, sys
sys.path.insert(0, {repo!r})
sys.argv[0] = os.path.join({repo!r}, 'train.py')
model = runpy.run_path(sys.argv[0], run_name='__main__')['raw_model']
h = hashlib.sha256()
for name, p in sorted(model.state_dict().items()):
    h.update(name.encode()); h.update(p.detach().cpu().contiguous().numpy().tobytes())
with open(os.path.join({out!r}, 'digest.rank' + os.environ['RANK']), 'w') as f:
    f.write(h.hexdigest())
"""


def test_torchrun_ddp_ranks_end_identical(data_dir, tmp_path):
    wrapper = tmp_path / 'ddp_train.py'
    wrapper.write_text(textwrap.dedent(DIGEST_WRAPPER.format(repo=str(REPO), out=str(tmp_path))))
    out = tmp_path / 'out'
    p = run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', wrapper, *TINY,
            f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=6', '--eval_interval=3', timeout=300)
    d0, d1 = (tmp_path / 'digest.rank0').read_text(), (tmp_path / 'digest.rank1').read_text()
    assert d0 == d1, 'the two ranks ended with different weights'
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    h = hashlib.sha256()
    for name, t in sorted(ck['model'].items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest() == d0 and ck['iter_num'] == 6
    assert ck['world_size'] == 2 and common.train_tokens(ck) == 6 * 2 * 4 * 64   # both processes' batches
    assert '2 process(es), 512 tokens/iter' in p.stdout   # only rank 0 logs: the line appears once
    assert p.stdout.count('training from scratch') == 1
    assert [r['iter'] for r in read_log(out) if 'loss' in r] == list(range(6))


def test_torchrun_missing_dataset_is_one_line_per_rank(tmp_path):
    """Every rank checks the dataset (none prepares it under torchrun), so none is left in a collective."""
    p = run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', *TINY,
            f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}', check=False, timeout=120)
    assert p.returncode != 0
    assert p.stderr.count("dataset 'shakespeare_char' is not prepared") == 2, p.stderr
    assert 'run: python data/shakespeare_char/prepare.py' in p.stderr and '[rank' not in p.stderr, p.stderr


# --- reproduce.py --------------------------------------------------------------------------


def test_reproduce_two_configs(data_dir, tmp_path):
    """Two configs trained in rounds of 3 iterations to 6, evaluated at 1x and 2x; no decode bench."""
    confs = []
    for mixer in ('fm_sparse', 'mamba2'):
        f = tmp_path / f'tiny_{mixer}.py'
        f.write_text(f"mixer = '{mixer}'\nn_layer = 1\nn_embd = 64\nblock_size = 32\nbatch_size = 4\n"
                     f"max_iters = 6\neval_interval = 3\neval_iters = 1\ndata_dir = '{data_dir}'\n")
        confs.append(str(f))
    res, runs_dir = tmp_path / 'res', tmp_path / 'runs'
    p = run('-m', 'experiments.reproduce', f'--configs={",".join(confs)}', f'--runs_dir={runs_dir}', f'--results_dir={res}',
            '--round_iters=3', '--lengths=1,2', '--eval_args=--device=cpu --eval_tokens=256', '--decode=False',
            '--train_args=--device=cpu')
    assert 'every config at iteration 6 of 6' in p.stdout
    for mixer in ('fm_sparse', 'mamba2'):
        ck = torch.load(runs_dir / f'tiny_{mixer}' / 'ckpt.pt', weights_only=True)
        assert ck['iter_num'] == 6 and ck['config']['lr_decay_iters'] == 6 and ck['train_tokens'] == 6 * 4 * 32
        assert sorted(os.listdir(runs_dir / f'tiny_{mixer}')) == ['ckpt.pt', 'log.jsonl', 'train_3.log', 'train_6.log']
    results = json.loads((res / 'eval.json').read_text())['results']
    assert [r['mixer'] for r in results] == ['fm_sparse', 'mamba2']
    assert all([l['length'] for l in r['lengths']] == [32, 64] and r['train_tokens'] == 768 for r in results)
    summary = (res / 'summary.md').read_text()
    assert 'Trained 6 of 6 iterations per config' in summary and '| tiny_mamba2 | mamba2 |' in summary
    assert json.loads((res / 'reproduce.json').read_text())['iters'] == 6
    from experiments import reproduce
    with pytest.raises(SystemExit, match='no config file config/nothing.py'):
        reproduce.main(['--configs=config/nothing.py'])
    # a config that does not set max_iters trains for train.py's default
    assert reproduce.config_max_iters('config/shakespeare_char_fm.py') == 1500
