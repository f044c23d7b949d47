"""scan_chunked and the one-token steps against scan_naive, the definition of FM."""
import pytest
import torch

import scan
from scan import scan_chunked, scan_naive, scan_step, scan_step_sparse

B, H, M, P = 2, 3, 16, 8
CHUNK = 16


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def inputs(T, routing, decay, seed=0):
    """Gates shaped as model.py builds them: g = Δ·A·w (or Δ·A broadcast), beta = Δ·w."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, M, generator=gen)
    if routing == 'dense':
        w = r.softmax(-1)
    elif routing == 'sparse':                      # top-4: exact zeros elsewhere
        top, idx = r.topk(4, dim=-1)
        w = torch.zeros_like(r).scatter(-1, idx, top.softmax(-1))
    else:                                          # 'broadcast': Mamba-2, one decay for all slots
        w = None
    # Per-step log-decays: weak down to -0.5, strong down to -20 (before the routing weight).
    scale = {'weak': 0.5, 'strong': 20.0}[decay]
    dA = -scale * torch.rand(B, T, H, 1, generator=gen)
    if w is None:
        g, beta = dA, torch.rand(B, T, H, M, generator=gen)
    else:
        # Make strong decays reach -20 on the routed slots, not just -20/M.
        g, beta = dA * (w * M if decay == 'strong' else w).clamp(max=1.0), w
    q = torch.randn(B, T, H, M, generator=gen)
    if routing == 'sparse':
        q = q * (w > 0)
    x = torch.randn(B, T, H, P, generator=gen)
    return x, g, beta, q


@pytest.mark.parametrize('T', [1, 7, CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize('routing', ['dense', 'sparse', 'broadcast'])
@pytest.mark.parametrize('decay', ['weak', 'strong'])
def test_chunked_equals_naive_forward_and_grad(T, routing, decay):
    x, g, beta, q = inputs(T, routing, decay)
    S0 = torch.randn(B, H, M, P)
    leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
    results = []
    for scan in (scan_naive, lambda *a, **kw: scan_chunked(*a, **kw, chunk_size=CHUNK)):
        for t in leaves:
            t.grad = None
        y, S = scan(*leaves[:4], initial_state=leaves[4])
        assert torch.isfinite(y).all() and torch.isfinite(S).all()
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        gS = torch.randn(S.shape, generator=torch.Generator().manual_seed(2))
        ((y * gy).sum() + (S * gS).sum()).backward()
        results.append([y.detach(), S.detach()] + [t.grad.clone() for t in leaves])
    names = ['y', 'S_final', 'dx', 'dg', 'dbeta', 'dq', 'dS0']
    for name, a, b in zip(names, results[1], results[0]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


def test_chunked_mixes_factored_and_pairwise_diagonal_blocks():
    """Per-slot decay: a sub-chunk decaying by less than scan.MAX_SPAN nats computes its diagonal
    block as one matmul through the sub-chunk's start, a faster-decaying one pairwise. Here one head
    decays by 10 nats a step (pairwise) and the others by at most 0.1 (factored), in one call."""
    x, g, beta, q = inputs(3 * CHUNK + 5, 'dense', 'weak')
    g = g * 0.2
    g[:, :, 0] = -10.0 * beta[:, :, 0] * M         # routed slots of head 0: ~ -10 nats a step
    G = scan._chunks(g, CHUNK).cumsum(3)
    wide = scan._sub_decays(G, min(scan.SUB, CHUNK))[-1]          # (B,H,n,k)
    assert wide is not None and wide.any() and not wide.all()
    S0 = torch.randn(B, H, M, P)
    leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
    grads = []
    for fn in (scan_naive, lambda *a, **kw: scan_chunked(*a, **kw, chunk_size=CHUNK)):
        y, S = fn(*leaves[:4], initial_state=leaves[4])
        grads.append([y, S] + list(torch.autograd.grad((y * y).sum() + S.sum(), leaves)))
    for name, a, b in zip(['y', 'S_final', 'dx', 'dg', 'dbeta', 'dq', 'dS0'], grads[1], grads[0]):
        assert rel_err(a.detach(), b.detach()) <= 1e-4, name


@pytest.mark.parametrize('chunk', [64, 128])
@pytest.mark.parametrize('routing', ['dense', 'broadcast'])
@pytest.mark.parametrize('decay', ['weak', 'strong'])
def test_chunked_with_sub_chunks_forward_and_grad(chunk, routing, decay):
    """Chunks of several sub-chunks (scan.SUB steps each): the state W between them, and
    its adjoint in the backward, against the recurrence."""
    assert chunk > scan.SUB
    x, g, beta, q = inputs(2 * chunk + 5, routing, decay)
    S0 = torch.randn(B, H, M, P)
    leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (scan_naive, lambda *a, **kw: scan_chunked(*a, **kw, chunk_size=chunk)):
        y, S = fn(*leaves[:4], initial_state=leaves[4])
        results.append([y, S] + list(torch.autograd.grad((y * gy).sum() + (S * S).sum(), leaves)))
    names = ['y', 'S_final', 'dx', 'dg', 'dbeta', 'dq', 'dS0']
    for name, a, b in zip(names, results[1], results[0]):
        a, b = a.detach(), b.detach()
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


def test_chunked_default_chunk_and_no_initial_state():
    x, g, beta, q = inputs(200, 'dense', 'weak')
    y1, S1 = scan_naive(x, g, beta, q)
    y2, S2 = scan_chunked(x, g, beta, q)             # chunk 64, padded to 256
    assert rel_err(y2, y1) <= 1e-4 and rel_err(S2, S1) <= 1e-4


def test_chunked_stays_finite_at_extreme_decay():
    """-20 nats per step on every slot: a chunk of 64 decays by 1280 nats. Factoring the
    intra-chunk term through exp(-G) from the chunk start would give inf * 0 = NaN."""
    x, _, beta, q = inputs(130, 'dense', 'weak')
    g = torch.full_like(beta, -20.0)
    y1, S1 = scan_naive(x, g, beta, q)
    y2, S2 = scan_chunked(x, g, beta, q, chunk_size=64)
    assert torch.isfinite(y2).all() and torch.isfinite(S2).all()
    assert rel_err(y2, y1) <= 1e-4 and rel_err(S2, S1) <= 1e-4


def test_bf16_values_keep_fp32_state():
    x, g, beta, q = inputs(40, 'dense', 'weak')
    y, S = scan_chunked(x.bfloat16(), g, beta, q, chunk_size=CHUNK)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y_ref, _ = scan_naive(x.bfloat16().float(), g, beta, q)
    assert rel_err(y.float(), y_ref) <= 1e-2     # bf16 rounding of y only (8 bits of mantissa)


def test_sparse_step_touches_only_active_rows():
    torch.manual_seed(0)
    K = 4
    S = torch.randn(B, H, M, P)
    x = torch.randn(B, H, P)
    idx = torch.stack([torch.randperm(M)[:K] for _ in range(B)])   # (B,K), shared by heads
    g, beta, q = -torch.rand(B, H, K), torch.rand(B, H, K), torch.randn(B, H, K)
    dense = lambda v: torch.zeros(B, H, M).scatter(2, idx[:, None].expand(B, H, K), v)
    y_ref, S_ref = scan_step(S, x, dense(g), dense(beta), dense(q))
    S_sparse = S.clone()
    y, S_new = scan_step_sparse(S_sparse, x, g, beta, q, idx)
    assert S_new is S_sparse                                         # in place
    assert rel_err(y, y_ref) <= 1e-6 and rel_err(S_new, S_ref) <= 1e-6
    changed = (S_new != S).any(-1)                                   # (B,H,M)
    assert (changed.sum(-1) == K).all()


@pytest.mark.parametrize('routing', ['dense', 'broadcast'])
def test_chunked_scan_computes_in_float32_under_autocast(routing):
    """train.py --dtype=bfloat16 runs the forward under autocast (and the backward after it, as
    PyTorch advises): the scan must still compute in float32, not hand its matmuls to bf16."""
    x, g, beta, q = (t.requires_grad_() for t in inputs(40, routing, 'weak'))
    y, S = scan_chunked(x, g, beta, q, chunk_size=CHUNK)
    ref = torch.autograd.grad((y.square().sum() + S.sum()), (x, g, beta, q))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_ac, S_ac = scan_chunked(x, g, beta, q, chunk_size=CHUNK)
    # the backward outside autocast, as train.py runs it
    got = torch.autograd.grad((y_ac.square().sum() + S_ac.sum()), (x, g, beta, q))
    assert y_ac.dtype == torch.float32 and rel_err(y_ac, y) <= 1e-6 and rel_err(S_ac, S) <= 1e-6
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5
