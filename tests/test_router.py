"""The sparse router uses its slots: a fresh model's top-k spreads over most of m, the Switch
loss reaches every slot's logit, the loss-free bias evens a skewed load, decoding with a bias
equals the forward, and experiments/router.py reports health or refuses bad input in one line."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from model import (LM, ModelConfig, RecurrentMixer, health_summary, router_health,  # noqa: E402
                   switch_aux_loss)


def tiny(**kw):
    args = dict(vocab_size=32, block_size=32, n_layer=2, n_embd=64, head_dim=32, n_slots=16,
                top_k=4, chunk_size=16, mixer='fm_sparse')
    args.update(kw)
    return ModelConfig(**args)


# Bounds from measurement (4 seeds, the default 4 x 128 model on 64 x 64 random tokens), per layer:
#   m=64:  this init 52-58 effective, 0-2 dead;    the old init (PyTorch's conv bias) 14-22, 24-34
#   m=256: this init 143-169 effective, 9-26 dead; the old init 33-51, 146-170
BOUNDS = {64: (40, 6), 256: (110, 51)}   # m: (min effective slots, max dead slots)


@pytest.mark.parametrize('m', [64, 256])
def test_a_fresh_router_spreads_over_the_slots(m):
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=65, n_slots=m, formulation='derived'))   # its router's conv
    idx = torch.randint(0, 65, (64, 64), generator=torch.Generator().manual_seed(0))
    min_eff, max_dead = BOUNDS[m]
    for s in router_health(model, idx):
        assert s['effective'] >= min_eff and s['dead'] <= max_dead, s
    for block in model.blocks:   # the old init: the conv's default bias on the router channels too
        torch.nn.Conv1d.reset_parameters(block.mixer.conv)
    old = router_health(model, idx)
    assert all(s['effective'] < min_eff and s['dead'] > max_dead for s in old), old
    torch.manual_seed(0)         # router_conv_bias=True is that old init
    again = router_health(LM(ModelConfig(vocab_size=65, n_slots=m, router_conv_bias=True,
                                         formulation='derived')), idx)
    assert max(s['effective'] for s in again) < min_eff


def test_health_statistics():
    torch.manual_seed(0)
    model = LM(tiny())
    stats = router_health(model, torch.randint(0, 32, (4, 32)))
    assert len(stats) == 2
    for s in stats:
        assert 1 <= s['effective'] <= 16 and 0 <= s['dead'] < 16 and s['m'] == 16
        assert 1 / 16 <= s['max_share'] <= s['top10_share'] <= 1
    assert health_summary(stats).startswith('slots eff ')
    dense = router_health(LM(tiny(mixer='fm')), torch.randint(0, 32, (4, 32)))
    assert all(s['dead'] == 0 and s['effective'] > 12 for s in dense)   # softmax mass: all slots
    with pytest.raises(ValueError, match='FM mixers'):
        router_health(LM(tiny(mixer='mamba2')), torch.randint(0, 32, (1, 8)))


def test_switch_loss_reaches_the_logits_of_unselected_slots():
    torch.manual_seed(0)
    r = torch.randn(2, 8, 16, requires_grad=True)                  # (B,T,M)
    idx = r.topk(4, dim=-1).indices
    loss = switch_aux_loss(r, idx, 16)
    loss.backward()
    unselected = torch.ones_like(r, dtype=torch.bool).scatter(-1, idx, False)
    assert (r.grad[unselected] != 0).all()
    uniform = torch.arange(16).repeat(4, 1).reshape(-1, 4)         # every slot picked equally
    assert switch_aux_loss(torch.zeros(16, 16), uniform, 16).item() == pytest.approx(1.0)


def test_aux_balance_adds_the_loss_in_training_only():
    torch.manual_seed(0)
    model = LM(tiny(router_balance='aux', router_aux_coef=0.5))
    x, y = torch.randint(0, 32, (2, 32)), torch.randint(0, 32, (2, 32))
    _, train_loss = model.train()(x, y)
    aux = sum(b.mixer.aux_loss for b in model.blocks)
    _, eval_loss = model.eval()(x, y)
    assert train_loss.item() == pytest.approx(eval_loss.item() + 0.5 * aux.item(), rel=1e-5)
    assert aux.item() >= 2 * 1.0 - 1e-4                            # >= 1 per layer


def test_bias_update_evens_a_skewed_load():
    torch.manual_seed(0)
    mixer = RecurrentMixer(tiny(n_slots=32, top_k=4, router_bias_rate=0.02))
    r = torch.randn(2048, 32) + torch.linspace(0, 6, 32)           # (N,M): high slots favoured
    load = lambda: torch.bincount(mixer.route(r)[1].flatten(), minlength=32).float()
    before = load()
    for _ in range(300):
        mixer.update_router_bias(load())
    after = load()
    assert (before == 0).sum() >= 8 and before.max() > 3 * before.mean()
    assert (after > 0).all() and after.max() < 1.5 * after.mean()
    w, idx = mixer.route(r)                      # the bias picks, the raw logits weigh
    torch.testing.assert_close(w.gather(-1, idx), r.gather(-1, idx).softmax(-1))


def test_training_forwards_count_the_load_for_the_bias():
    torch.manual_seed(0)
    model = LM(tiny(router_bias_rate=0.1))                         # router_balance='bias'
    x = torch.randint(0, 32, (2, 32))
    model.eval()(x)
    model.update_router_bias()                                     # nothing counted in eval
    assert all((b.mixer.route_bias == 0).all() for b in model.blocks)
    model.train()(x)
    model(x)                                                       # two micro-steps, one update
    loads = [b.mixer.slot_load.clone() for b in model.blocks]
    assert all(load.sum() == 2 * 2 * 32 * 4 for load in loads)    # 2 x (B·T·k)
    model.update_router_bias()
    for b, load in zip(model.blocks, loads):
        torch.testing.assert_close(b.mixer.route_bias, 0.1 * torch.sign(load.mean() - load))
        assert (b.mixer.slot_load == 0).all()                     # the counts restart


def test_decoding_with_a_selection_bias_equals_the_forward(scaled_model):
    model = scaled_model(tiny())
    idx = torch.randint(0, 32, (2, 40))
    with torch.no_grad():
        plain, _ = model(idx)
        for b in model.blocks:
            b.mixer.route_bias.normal_(0, 3.0)
        full, _ = model(idx)
        logits, caches = model.prefill(idx[:, :5])
        steps = [model.step(idx[:, t], caches)[:, None] for t in range(5, 40)]
    stepped = torch.cat([logits] + steps, dim=1)
    assert (full - plain).abs().max() > 0.1                       # the bias changed the selection
    assert ((stepped - full).abs().max() / full.abs().max()).item() <= 1e-4


def test_a_checkpoint_from_before_the_bias_loads():
    torch.manual_seed(0)
    model = LM(tiny())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith('route_bias')}
    fresh = LM(tiny())
    fresh.load_state_dict(state)                                   # strict: the bias is filled in
    assert all((b.mixer.route_bias == 0).all() for b in fresh.blocks)


# --- experiments/router.py ---------------------------------------------------------------


def write_run(tmp_path, name, **kw):
    """A tiny checkpoint and a char dataset, as train.py writes them."""
    data = tmp_path / 'data' / 'shakespeare_char'
    data.mkdir(parents=True, exist_ok=True)
    np.random.default_rng(0).integers(0, 32, 4000).astype(np.uint16).tofile(data / 'val.bin')
    torch.manual_seed(0)
    cfg = tiny(**kw)
    model = LM(cfg)
    out = tmp_path / name
    out.mkdir()
    common.save_checkpoint({'format': common.CKPT_FORMAT, 'model': model.state_dict(),
                            'model_args': cfg.__dict__, 'iter_num': 3,
                            'config': {'dataset': 'shakespeare_char',
                                       'data_dir': str(tmp_path / 'data')},
                            'meta': {'itos': [chr(97 + i % 26) for i in range(32)]}},
                           str(out / 'ckpt.pt'))
    return out


def test_router_script_prints_health_and_draws(tmp_path, capsys):
    from experiments import router
    a, b = write_run(tmp_path, 'a'), write_run(tmp_path, 'b', mixer='fm')
    router.main([f'--out_dirs={a},{b}', '--labels=sparse,dense', f'--plot_dir={tmp_path / "p"}',
                 '--tokens=512', '--sample_chars=24'])
    out = capsys.readouterr().out
    assert 'sparse (fm_sparse, iter 3)' in out and '| 1 |' in out
    for name in ('usage.png', 'routing.png', 'router.json'):
        assert (tmp_path / 'p' / name).stat().st_size > 0
    d = json.loads((tmp_path / 'p' / 'router.json').read_text())
    assert [len(r['router']) for r in d['runs']] == [2, 2]


@pytest.mark.parametrize('case', ['missing', 'mamba2'])
def test_router_script_bad_input_is_one_line(tmp_path, case):
    from experiments import router
    out = tmp_path / 'none' if case == 'missing' else write_run(tmp_path, 'm', mixer='mamba2')
    with pytest.raises(SystemExit) as e:
        router.main([f'--out_dir={out}'])
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and ('no checkpoint' in msg or 'mamba2' in msg), msg
