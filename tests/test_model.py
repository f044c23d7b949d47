"""The LM: parallel forward == prefill + recurrent decoding, sparse decoding touches
k rows, every mixer can learn, and impossible configs fail with a clear error."""

import pytest
import torch

import scan
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


MODELS = ([(m, {}) for m in MIXERS] + [('attention', dict(attn_conv=True))]     # FM: 'paper'
          + [(m, dict(formulation='derived')) for m in ('fm', 'fm_sparse')]
          + [('fm_sparse', dict(router_conv=True))])


@pytest.mark.parametrize('mixer,kw', MODELS)
@pytest.mark.parametrize('n_prompt', [1, 2, 21])
def test_parallel_forward_equals_recurrent_decoding(scaled_model, mixer, kw, n_prompt):
    model = scaled_model(tiny(mixer, **kw))
    idx = torch.randint(0, 32, (2, 45))          # longer than block_size: recurrent mixers extrapolate
    with torch.no_grad():
        full, _ = model(idx)
    stepped, _ = decode_all(model, idx, n_prompt)
    assert full.std() > 1.0                      # the check below is not vacuous
    assert rel_err(stepped, full) <= 1e-4


def test_chunked_scan_model_equals_naive_scan_model():
    torch.manual_seed(0)
    ref = LM(tiny('fm_sparse', scan_impl='naive'))
    other = LM(tiny('fm_sparse', scan_impl='chunked'))
    other.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 32, (2, 37))
    assert rel_err(other(idx)[0], ref(idx)[0]) <= 1e-5


@pytest.mark.parametrize('mixer,kw', MODELS)
def test_decoding_from_an_empty_cache_equals_the_forward(mixer, kw):
    torch.manual_seed(0)
    model = LM(tiny(mixer, **kw)).eval()
    idx = torch.randint(0, 32, (2, 9))
    caches = model.new_cache(2, 'cpu')
    stepped = torch.stack([model.step(idx[:, t], caches) for t in range(9)], dim=1)
    with torch.no_grad():
        assert rel_err(stepped, model(idx)[0]) <= 1e-4


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
    (dict(scan_impl='cuda'), 'scan_impl'),
    (dict(chunk_size=24), 'chunk_size'),
    (dict(mixer='attention', n_head=3), 'n_head'),
    (dict(mixer='fm', attn_conv=True), 'attn_conv'),
    (dict(n_layer=0), 'n_layer'),
    (dict(dropout=1.0), 'dropout'),
    (dict(update_rate='topic'), 'update_rate'),
    (dict(mixer='mamba2', update_rate='slot'), 'update_rate'),
])
def test_impossible_configs_raise_a_clear_error(kw, field):
    kw = dict(kw)
    with pytest.raises(ValueError, match=rf"^{field}="):
        tiny(kw.pop('mixer', 'fm'), **kw)


def per_head(mixer, *args):
    """mixer.gates(*args) expanded to the per-head g, beta, q_read the scan takes, and idx."""
    gates, idx = mixer.gates(*args)
    return (*scan.expand_gates(gates.gw, gates.bw, gates.q, mixer.H, gates.A, gates.delta), idx)


def gate_inputs():
    torch.manual_seed(0)
    return torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 4)


def test_mamba2_gates_follow_the_equations():
    mixer = RecurrentMixer(tiny('mamba2'))
    r, q, dt = gate_inputs()                                     # r is Mamba-2's B, q its C
    g, beta, q_read, idx = per_head(mixer, r, q, dt)
    assert idx is None
    delta = torch.nn.functional.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    assert g.shape == (5, 4, 1)                                  # one decay for all slots
    assert torch.allclose(g, (delta * A)[..., None])             # g = Δ·A
    assert torch.allclose(beta, delta[..., None] * r[:, None, :])  # beta = Δ·B
    assert torch.equal(q_read, q[:, None, :].expand(5, 4, 16))   # q = C


@pytest.mark.parametrize('mixer', ['fm', 'fm_sparse'])
@pytest.mark.parametrize('update_rate', ['head', 'slot'])
def test_fm_gates_follow_the_equations(mixer, update_rate):
    m = RecurrentMixer(tiny(mixer, update_rate=update_rate, formulation='derived'))
    r, q, dt = gate_inputs()
    if update_rate == 'slot':
        dt = torch.randn(5, 16)                                  # one rate per slot, shared by the 4 heads
    g, beta, q_read, idx = per_head(m, r, q, dt)
    delta = torch.nn.functional.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    if mixer == 'fm':
        w = r.softmax(-1)
        assert idx is None
    else:                                                        # softmax over the top-4 of 16, 0 elsewhere
        top, top_idx = r.topk(4, dim=-1)
        w = torch.zeros_like(r).scatter(-1, top_idx, top.softmax(-1))
        assert torch.equal(idx.sort(-1).values, top_idx.sort(-1).values)
    if update_rate == 'head':
        rate = delta[..., None] * w[:, None, :]                  # Δ_h·w_i: (5,4,16)
    else:
        rate = (delta * w)[:, None, :].expand(5, 4, 16)          # Δ_i·w_i, the same in every head
    assert torch.allclose(g, A[:, None] * rate, atol=1e-7)       # g = Δ·A·w
    assert torch.allclose(beta, rate, atol=1e-7)                 # beta = Δ·w
    expected_q = q[:, None, :] * (w[:, None, :] > 0) if mixer == 'fm_sparse' else q[:, None, :]
    assert torch.equal(q_read, expected_q.expand(5, 4, 16))      # sparse: read only the active slots


@pytest.mark.parametrize('mixer', ['fm', 'fm_sparse'])
def test_per_slot_update_rate_decodes_like_the_forward(scaled_model, mixer):
    model = scaled_model(tiny(mixer, update_rate='slot', formulation='derived'))
    idx = torch.randint(0, 32, (2, 40))
    with torch.no_grad():
        full, _ = model(idx)
    stepped, _ = decode_all(model, idx, 5)
    assert full.std() > 1.0
    assert rel_err(stepped, full) <= 1e-4


def gated_output(m, y, x, z):
    """The read y and values x (B,T,H,P), gate z (B,T,E) -> the mixer's output, longhand:
    out_proj(rmsnorm((y + D_skip x) * silu(z)))."""
    y = (y + m.D_skip[:, None] * x).flatten(-2) * torch.nn.functional.silu(z)
    return m.out_proj(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight)


@pytest.mark.parametrize('mixer', ['fm', 'fm_sparse', 'mamba2'])
def test_mixer_equals_the_design_equations(mixer):
    """RecurrentMixer.forward against the layer's equations (README) written out longhand on scan_naive."""
    from scan import scan_naive
    F = torch.nn.functional
    torch.manual_seed(0)
    cfg = tiny(mixer, formulation='derived')
    m = RecurrentMixer(cfg)
    u = torch.randn(2, 11, cfg.n_embd)
    E, M, H, P = cfg.expand * cfg.n_embd, cfg.n_slots, m.H, cfg.head_dim
    with torch.no_grad():
        z, x, r, q, dt = torch.split(m.in_proj(u), [E, E, M, M, H], dim=-1)
        xrq = torch.cat([x, r, q], -1).transpose(1, 2)           # causal depthwise conv, width d_conv
        xrq = F.conv1d(F.pad(xrq, (cfg.d_conv - 1, 0)), m.conv.weight, m.conv.bias, groups=xrq.shape[1])
        x, r, q = torch.split(xrq.transpose(1, 2), [E, M, M], dim=-1)
        x, q = F.silu(x), F.silu(q)
        delta = F.softplus(dt + m.dt_bias)                       # (B,T,H)
        A = -torch.exp(m.A_log)
        if mixer == 'mamba2':
            g = (delta * A)[..., None]
            beta = delta[..., None] * F.silu(r)[:, :, None, :]
            q_read = q[:, :, None, :].expand_as(beta)
        else:
            if mixer == 'fm':
                w = r.softmax(-1)
            else:
                top, idx = r.topk(cfg.top_k, dim=-1)
                w = torch.zeros_like(r).scatter(-1, idx, top.softmax(-1))
            g = (delta * A)[..., None] * w[:, :, None, :]
            beta = delta[..., None] * w[:, :, None, :]
            q_read = (q * (w > 0) if mixer == 'fm_sparse' else q)[:, :, None, :].expand_as(beta)
        xh = x.view(2, 11, H, P)
        y, _ = scan_naive(xh, g, beta, q_read)
        assert rel_err(m(u), gated_output(m, y, xh, z)) <= 1e-5


def test_per_head_rate_when_heads_equal_slots():
    """H = m = 4: the per-head rate must still be Δ[h], not read as one rate per slot."""
    m = RecurrentMixer(tiny('fm', n_slots=4, formulation='derived'))
    assert m.H == m.M == 4
    torch.manual_seed(0)
    r, q, dt = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    g, beta, _, _ = per_head(m, r, q, dt)
    delta = torch.nn.functional.softplus(dt + m.dt_bias)         # (5, H)
    assert torch.allclose(beta, delta[..., None] * r.softmax(-1)[:, None, :], atol=1e-7)


@pytest.mark.parametrize('mixer', ['fm', 'fm_sparse'])
def test_paper_gates_follow_the_equations(mixer):
    """formulation='paper': θ = σ(η)·α, g = log(1 - θ), beta = θ, q = φ = σ(μ)·α, α = softmax(r/τ)
    (over the top-k for fm_sparse), the same in every head."""
    m = RecurrentMixer(tiny(mixer, formulation='paper', router_temp=0.5))
    torch.manual_seed(0)
    r, eta, mu = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
    gates, idx = m.paper_gates(r, eta, mu)
    if mixer == 'fm':
        alpha = (r / 0.5).softmax(-1)
        assert idx is None
    else:
        top, top_idx = (r / 0.5).topk(4, dim=-1)
        alpha = torch.zeros_like(r).scatter(-1, top_idx, top.softmax(-1))
        assert torch.equal(idx.sort(-1).values, top_idx.sort(-1).values)
    theta = torch.sigmoid(eta) * alpha
    g, beta, q_read = scan.expand_gates(gates.gw, gates.bw, gates.q, m.H, gates.A, gates.delta)
    assert torch.allclose(g, torch.log(1 - theta)[:, None, :].expand(5, m.H, 16), atol=1e-6)
    assert torch.allclose(beta, theta[:, None, :].expand(5, m.H, 16))
    assert torch.allclose(q_read, (torch.sigmoid(mu) * alpha)[:, None, :].expand(5, m.H, 16))
    assert (g <= 0).all() and (beta < 1).all()               # a convex update: decay tied to write


def test_paper_update_is_convex_at_full_affinity():
    """k = 1: α = 1 on the chosen slot, so that slot moves to x by θ = σ(η), S <- (1-θ)S + θx,
    and an η large enough that σ(η) rounds to 1 leaves g finite with a finite gradient."""
    m = RecurrentMixer(tiny('fm_sparse', formulation='paper', top_k=1))
    eta = torch.tensor([[0.0] * 16, [40.0] * 16], requires_grad=True)
    gates, idx = m.paper_gates(torch.randn(2, 16), eta, torch.zeros(2, 16))
    theta = gates.bw.gather(-1, idx)
    assert torch.allclose(theta[0], torch.tensor([0.5]))
    assert torch.allclose(gates.gw.gather(-1, idx)[0], torch.log(torch.tensor([0.5])))
    assert torch.isfinite(gates.gw).all()
    gates.gw.sum().backward()
    assert torch.isfinite(eta.grad).all()


@pytest.mark.parametrize('mixer', ['fm', 'fm_sparse'])
@pytest.mark.parametrize('router_conv', [False, True])
def test_paper_mixer_equals_its_equations(mixer, router_conv):
    """RecurrentMixer.forward, formulation='paper', against the equations longhand:
    per slot S_i <- (1 - θ_i) S_i + θ_i x, y = sum_i φ_i S_i; the router reads u, or with
    router_conv the conv's output of its channels."""
    F = torch.nn.functional
    torch.manual_seed(0)
    cfg = tiny(mixer, formulation='paper', router_conv=router_conv)
    m = RecurrentMixer(cfg)
    u = torch.randn(2, 11, cfg.n_embd)
    E, M, H, P = cfg.expand * cfg.n_embd, cfg.n_slots, m.H, cfg.head_dim
    with torch.no_grad():
        z, x, r, eta, mu = torch.split(m.in_proj(u), [E, E, M, M, M], dim=-1)   # either way
        xr = torch.cat([x, r], -1) if router_conv else x
        xr = F.conv1d(F.pad(xr.transpose(1, 2), (cfg.d_conv - 1, 0)), m.conv.weight, m.conv.bias,
                      groups=xr.shape[-1]).transpose(1, 2)
        x, r = (xr[..., :E], xr[..., E:]) if router_conv else (xr, r)
        x = F.silu(x).view(2, 11, H, P)
        if mixer == 'fm':
            alpha = r.softmax(-1)
        else:
            top, idx = r.topk(cfg.top_k, dim=-1)
            alpha = torch.zeros_like(r).scatter(-1, idx, top.softmax(-1))
        theta = torch.sigmoid(eta) * alpha
        phi = torch.sigmoid(mu) * alpha
        S = torch.zeros(2, H, M, P)
        ys = []
        for t in range(11):
            th = theta[:, t, None, :, None]                          # (B,1,M,1): every head
            S = (1 - th) * S + th * x[:, t, :, None, :]
            ys.append(torch.einsum('bm,bhmp->bhp', phi[:, t], S))
        assert rel_err(m(u), gated_output(m, torch.stack(ys, 1), x, z)) <= 1e-5


def test_short_conv_step_equals_its_forward():
    """The conv as shifted multiply-adds: its step equals its forward bit for bit, and both equal
    conv1d."""
    from model import ShortConv
    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    x = torch.randn(2, 9, 6)
    y, window = conv(x)
    F = torch.nn.functional
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=6)
    assert torch.allclose(y, ref.transpose(1, 2), atol=1e-6)
    w = conv.new_window(2, 'cpu')
    with torch.no_grad():
        for t in range(9):
            yt, w = conv.step(x[:, t], w)
            assert torch.equal(yt, y[:, t])
    assert torch.equal(w, window)
