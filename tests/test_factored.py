"""kernels.scan_factored under the Triton interpreter (CPU), against scan.py's definition.

The factored entry takes a layer's gates as their factors (scan.expand_gates):

    g[b,t,h,i] = A[h] delta[b,t,h] gw[b,t,i]    beta = delta[b,t,h] bw[b,t,i]    q_read = q[b,t,i]

and forms them per head inside the kernels. Its forward and every gradient (x, gw, bw, q, A,
delta, initial state) must equal scan_naive run on expand_gates' per-head tensors, with autograd
through both (so the heads' sums of the factors' gradients are the reference's own). The cases
are the gates the model's mixers build: FM with Δ per head (gw = bw = w, delta = Δ, A), FM with Δ
per slot (gw = bw = Δ·w, A), the paper's formulation (gw = log1p(-θ), bw = θ, q = φ, no A, no
delta) and Mamba-2 (gw = ones (B,T,1), bw = B, q = C, delta = Δ, A); dense and sparse (w, q zero
outside a top-k); a -20 nats/step decay; M and P not powers of 2 (M = 5, P = 12, masked tiles);
M = 100 (four slot blocks: the heads' and the blocks' shares added atomically); bf16 x. Every
buffer kernels.py allocates with torch.empty starts as NaN (poisoned_empty): one a kernel fails
to write shows up. Shapes are small: the interpreter runs every program in Python.

Also: no (B,T,H,M) tensor is allocated by the factored glue, forward or backward (the launches
are recorded, not run); a function calling scan_factored is one dynamo graph with 0 breaks, and
compiled (aot_eager) equals eager; torch.library.opcheck of the ops.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
import scan

pytestmark = pytest.mark.triton_mode('interpreter')

F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: 1e-4, BF16: 1e-2}      # as tests/test_kernels.py (its header says why)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-2)).item()


def factors(kind, routing, B, T, H, M, P, dtype=F32, seed=0, k=3):
    """x and the factors (gw, bw, q, A, delta) of one of the model's mixers, initial state."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen)
    randn = lambda *s: torch.randn(*s, generator=gen)
    r = randn(B, T, M)
    if routing == 'sparse':
        idx = r.topk(k, -1).indices
        w = torch.zeros_like(r).scatter(-1, idx, r.gather(-1, idx).softmax(-1))
    else:
        w = r.softmax(-1)
    on = (w > 0).float()
    q = F.silu(randn(B, T, M)) * on
    A = -(1 + 15 * rand(H))                                     # Mamba-2's init range [-16, -1]
    dt = F.softplus(randn(B, T, H) - 1)
    if kind == 'fm_head':
        gw, bw, delta = w, w, dt
    elif kind == 'fm_slot':
        dts = F.softplus(randn(B, T, M) - 1)
        gw = bw = dts * w
        delta = None
    elif kind == 'paper':
        theta = rand(B, T, M) * 0.9 * on
        gw, bw, A, delta = torch.log1p(-theta), theta, None, None
    elif kind == 'strong':                                      # every slot decays 20 nats a step
        gw, bw, A, delta = torch.full((B, T, M), -20.0), w, None, None
    elif kind == 'mamba2':
        gw, bw, delta = torch.ones(B, T, 1), F.silu(randn(B, T, M)) * on, dt
    else:
        raise ValueError(kind)
    x = randn(B, T, H, P).to(dtype)
    return x, gw, bw, q, A, delta, randn(B, H, M, P)


def naive_factored(x, gw, bw, q, A=None, delta=None, initial_state=None, chunk_size=None):
    return scan.scan_naive(x, *scan.expand_gates(gw, bw, q, x.shape[2], A, delta),
                           initial_state=initial_state)


NAMES = ['y', 'S_final', 'dx', 'dgw', 'dbw', 'dq', 'dA', 'ddelta', 'dS_initial']


def errors(kind, routing, B, T, H, M, P, init, chunk, dtype=F32):
    x, gw, bw, q, A, delta, S0 = factors(kind, routing, B, T, H, M, P, dtype)
    leaves = [x, gw, bw, q, A, delta, S0 if init else None]
    gen = torch.Generator().manual_seed(1)
    dy, dS = torch.randn(B, T, H, P, generator=gen), torch.randn(B, H, M, P, generator=gen)
    results = []
    for fn in (naive_factored, kernels.scan_factored):
        ls = [None if t is None else t.clone().requires_grad_() for t in leaves]
        y, S = fn(*ls[:4], A=ls[4], delta=ls[5], initial_state=ls[6], chunk_size=chunk)
        assert y.dtype == dtype and S.dtype == F32
        ((y.float() * dy).sum() + (S * dS).sum()).backward()
        results.append([y.detach(), S.detach()] + [None if t is None else t.grad for t in ls])
    errs = {}
    for name, got, ref in zip(NAMES, results[1], results[0]):
        if ref is None:
            assert got is None, name
            continue
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert torch.isfinite(got).all(), f"{name} has inf/NaN"
        errs[name] = rel_err(got, ref)
    return errs


CASES = [  # kind, routing, B, T, H, M, P, initial state, chunk, x dtype
    ('fm_head', 'dense', 1, 40, 3, 5, 12, True, 16, F32),     # odd M, P; 3 chunks, a masked tail
    ('fm_head', 'sparse', 2, 33, 2, 16, 16, False, 32, F32),
    ('fm_slot', 'sparse', 1, 17, 2, 16, 12, True, 16, F32),
    ('paper', 'dense', 1, 20, 2, 5, 3, True, 16, F32),
    ('strong', 'dense', 1, 64, 2, 5, 12, True, 64, F32),      # 1280 nats over a chunk
    ('mamba2', 'dense', 1, 40, 3, 16, 12, True, 16, F32),     # broadcast gw (B,T,1)
    ('mamba2', 'sparse', 1, 20, 2, 100, 48, True, 16, F32),   # 4 slot blocks, broadcast
    ('fm_head', 'sparse', 1, 20, 2, 100, 48, True, 16, F32),  # 4 slot blocks, per slot
    ('fm_head', 'dense', 1, 64, 2, 64, 64, True, 64, BF16),   # the model's M, P; bf16 x
    ('fm_head', 'sparse', 1, 64, 2, 64, 64, True, 64, F32),   # fp32: two blocks of 32 slots
]


@pytest.mark.parametrize('kind,routing,B,T,H,M,P,init,chunk,dtype', CASES,
                         ids=lambda v: str(v).replace('torch.', ''))
def test_scan_factored_equals_naive(kind, routing, B, T, H, M, P, init, chunk, dtype,
                                    poisoned_empty):
    errs = errors(kind, routing, B, T, H, M, P, init, chunk, dtype)
    print(f"{kind} {routing} T={T} H={H} M={M} P={P}: worst {max(errs, key=errs.get)} "
          f"{max(errs.values()):.1e}")
    assert all(e <= TOL[dtype] for e in errs.values()), errs


def test_scan_factored_equals_scan_py():
    """The CPU twin (scan.scan_factored, the chunked PyTorch scan) gives the same forward."""
    x, gw, bw, q, A, delta, S0 = factors('fm_head', 'dense', 1, 24, 2, 5, 12)
    ref = scan.scan_factored(x, gw, bw, q, A, delta, S0, chunk_size=16)
    got = kernels.scan_factored(x, gw, bw, q, A, delta, S0, chunk_size=16)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-4


def test_no_per_head_gate_tensor_is_allocated(monkeypatch):
    """The factored glue, forward and backward, at the model's shapes: no tensor with a
    (B,T,H,M) shape is allocated or read by a PyTorch op (the per-head path allocates dbeta,
    dq and dg so: checked too, so the check is not vacuous). Launches are recorded, not run."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    B, T, H, M, P = 2, 200, 12, 64, 32                 # P != M: x's shape is not a gate's
    monkeypatch.setattr(kernels, '_launch', lambda *a, **k: None)
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend((func._opname, tuple(t.shape)) for t in tree_leaves((args, kwargs, out))
                        if isinstance(t, torch.Tensor))
            return out

    for kind in ('fm_head', 'mamba2'):
        x, gw, bw, q, A, delta, S0 = factors(kind, 'dense', B, T, H, M, P, BF16)
        with Shapes():
            y, S, S_in, Gc = kernels._scan_fwd(x, gw, bw, q, S0, 64, A, delta, factored=True)
            kernels._scan_bwd(x, gw, bw, q, S_in, Gc, torch.randn_like(y), S, 64, A, delta,
                              factored=True)
    per_head_gate = lambda: [(op, s) for op, s in seen if s == (B, T, H, M)]
    assert not per_head_gate(), per_head_gate()
    g, beta, q_read = scan.expand_gates(gw, bw, q, H, A, delta)
    with Shapes():
        y, S, S_in, Gc = kernels._scan_fwd(x, g, beta, q_read, S0, 64)
        kernels._scan_bwd(x, g, beta, q_read, S_in, Gc, torch.randn_like(y), S, 64)
    assert per_head_gate()


def scan_factored_then_sum(x, gw, bw, q, A, delta):
    y, S = kernels.scan_factored(x, gw * 1.5, bw, q, A, delta, chunk_size=16)
    return (y * y).sum() + S.sum()


def test_scan_factored_traces_into_one_graph():
    """A function calling scan_factored is one dynamo graph (0 breaks), and torch.compile
    (aot_eager: the fake shapes and the registered backward) computes what eager does."""
    args = factors('mamba2', 'dense', 1, 16, 2, 5, 3)[:6]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(scan_factored_then_sum)(*args)
    print('scan_factored_then_sum', explained.graph_count, 'graphs,',
          explained.graph_break_count, 'breaks')
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(scan_factored_then_sum, backend='aot_eager', fullgraph=True)
    outs = []
    for f in (scan_factored_then_sum, compiled):
        leaves = [t.clone().requires_grad_() for t in args]
        loss = f(*leaves)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])
    for got, ref in zip(outs[1], outs[0]):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_scan_factored_opcheck():
    """torch.library.opcheck of fm::scan_factored_fwd (and, through its autograd, _bwd), with
    A, delta and the initial state given and absent."""
    x, gw, bw, q, A, delta, S0 = factors('fm_head', 'dense', 1, 17, 2, 5, 3)
    leaves = [t.clone().requires_grad_() for t in (x, gw, bw, q, A, delta, S0)]
    op = torch.ops.fm.scan_factored_fwd.default
    torch.library.opcheck(op, (*leaves, 16))
    torch.library.opcheck(op, (*leaves[:4], None, None, None, 16))
