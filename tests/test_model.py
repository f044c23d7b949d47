"""The LM: parallel forward == prefill + recurrent decoding, sparse decoding touches
k rows, every mixer can learn, and impossible configs fail with a clear error."""
import math

import pytest
import torch

from model import LM, MIXERS, ModelConfig, RecurrentMixer


def tiny(mixer, **kw):
    args = dict(vocab_size=32, block_size=32, n_layer=2, n_embd=64, n_head=4, mixer=mixer,
                head_dim=32, n_slots=16, top_k=4, chunk_size=16)
    args.update(kw)
    return ModelConfig(**args)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def decode_all(model, idx, n_prompt):
    """Logits for every position: prefill the first n_prompt tokens, then one token per step."""
    logits, caches = model.prefill(idx[:, :n_prompt])
    steps = [model.step(idx[:, t], caches)[:, None] for t in range(n_prompt, idx.shape[1])]
    return torch.cat([logits] + steps, dim=1), caches


@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('n_prompt', [1, 2, 21])
def test_parallel_forward_equals_recurrent_decoding(mixer, n_prompt):
    torch.manual_seed(0)
    model = LM(tiny(mixer)).eval()
    with torch.no_grad():   # larger weights than the init, so every mixer moves the logits a lot
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    idx = torch.randint(0, 32, (2, 45))          # longer than block_size: recurrent mixers extrapolate
    with torch.no_grad():
        full, _ = model(idx)
    stepped, _ = decode_all(model, idx, n_prompt)
    assert full.std() > 1.0                      # the check below is not vacuous
    assert rel_err(stepped, full) <= 1e-4


@pytest.mark.parametrize('scan', ['naive', 'chunked'])
def test_scan_choice_does_not_change_the_model(scan):
    torch.manual_seed(0)
    ref = LM(tiny('fm_sparse', scan='chunked'))
    other = LM(tiny('fm_sparse', scan=scan))
    other.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 32, (2, 37))
    assert rel_err(other(idx)[0], ref(idx)[0]) <= 1e-5


def test_sparse_decoding_updates_exactly_k_rows_per_head():
    torch.manual_seed(0)
    cfg = tiny('fm_sparse')
    model = LM(cfg).eval()
    idx = torch.randint(0, 32, (3, 12))
    _, caches = model.prefill(idx)
    for t in range(5):
        before = [c.S.clone() for c in caches]
        model.step(torch.randint(0, 32, (3,)), caches)
        for S0, c in zip(before, caches):
            rows_changed = (c.S != S0).any(-1).sum(-1)          # (B,H)
            assert (rows_changed == cfg.top_k).all()


def test_decoding_state_is_constant_for_recurrent_mixers():
    for mixer in MIXERS:
        model = LM(tiny(mixer)).eval()
        _, caches = model.prefill(torch.zeros(1, 4, dtype=torch.long))
        size0 = LM.cache_bytes(caches)
        for _ in range(20):
            model.step(torch.zeros(1, dtype=torch.long), caches)
        grows = LM.cache_bytes(caches) > size0
        assert grows == (mixer == 'attention')


def test_generate_extends_the_prompt():
    torch.manual_seed(0)
    model = LM(tiny('fm_sparse')).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=40, top_k=5)
    assert out.shape == (2, 43) and (out[:, :3] == 0).all() and out.max() < 32


def bigram_entropy(idx):
    """Loss of the best model that sees only the current token: H(next | current) on this batch."""
    pairs = torch.stack([idx[:, :-1].flatten(), idx[:, 1:].flatten()], 1)
    counts = torch.zeros(32, 32).index_put_(tuple(pairs.T), torch.ones(len(pairs)), accumulate=True)
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return -(counts * torch.log(p.clamp_min(1e-12))).sum().item() / len(pairs)


@pytest.mark.parametrize('mixer', MIXERS)
def test_tiny_model_overfits_one_batch(mixer):
    """One fixed batch of random tokens. A model that ignores the context scores ln(32) = 3.47
    nats; one that sees only the current token can't beat the batch's bigram entropy (~1 nat).
    Under 0.1 means the mixer carries information along the sequence (we measure ~0.01)."""
    torch.manual_seed(0)
    model = LM(tiny(mixer, n_layer=2))
    idx = torch.randint(0, 32, (4, 33))
    assert bigram_entropy(idx) > 0.5
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"{mixer}: loss {loss.item():.3f} after 150 steps"


@pytest.mark.parametrize('kw, field', [
    (dict(mixer='fm_sparse', top_k=0), 'top_k'),
    (dict(mixer='fm_sparse', top_k=16), 'top_k'),       # = n_slots: that is the dense mixer
    (dict(head_dim=48), 'head_dim'),                    # 128 is not divisible by 48
    (dict(mixer='transformer'), 'mixer'),
    (dict(scan='cuda'), 'scan'),
    (dict(chunk_size=24), 'chunk_size'),
    (dict(mixer='attention', n_head=3), 'n_head'),
    (dict(n_layer=0), 'n_layer'),
    (dict(dropout=1.0), 'dropout'),
])
def test_impossible_configs_raise_a_clear_error(kw, field):
    kw = dict(kw)
    with pytest.raises(ValueError, match=rf"^{field}="):
        tiny(kw.pop('mixer', 'fm'), **kw)


def test_mamba2_uses_one_decay_for_all_slots():
    torch.manual_seed(0)
    mixer = RecurrentMixer(tiny('mamba2'))
    r, q, dt = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 4)
    g, beta, q_read = mixer.gates(r, q, dt)
    assert g.shape == (5, 4, 1) and beta.shape == (5, 4, 16)
    assert (g < 0).all()


def test_fm_gates_follow_the_equations():
    torch.manual_seed(0)
    mixer = RecurrentMixer(tiny('fm_sparse'))
    r, q, dt = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 4)
    g, beta, q_read = mixer.gates(r, q, dt)
    delta = torch.nn.functional.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    w = beta / delta[..., None]                                  # beta = Δ·w
    assert torch.allclose(w.sum(-1), torch.ones(5, 4), atol=1e-6)   # w: a distribution over slots
    assert ((w > 0).sum(-1) == 4).all()                          # top-4 of 16
    assert torch.allclose(g, (delta * A)[..., None] * w, atol=1e-6)  # g = Δ·A·w
    assert ((q_read != 0) <= (w > 0)).all()                      # read only active slots
