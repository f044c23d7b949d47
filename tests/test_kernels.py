"""kernels.py under the Triton interpreter (CPU), against scan.py's definition.

Forward and every gradient of scan_triton equal scan_naive's (autograd through the
recurrence); the decode steps equal scan_step / scan_step_sparse. The matrix is
not a full product (the interpreter is slow) but covers each value of each axis:
routing {dense, sparse top-k, broadcast g}, decay {weak, strong down to -20},
T {1, 17, 33, 40, 64, 80, 130, 200}, M {1, 5, 16, 64, 100}, P {3, 32, 48, 64} (any M, P:
the kernels mask their power-of-2 tiles), initial state {no, yes}, fp32 and bf16.
Every buffer the kernels fill is poisoned with NaN first: an element they fail to
write shows up. The interpreter is brought closer to a GPU in two ways: fp32 -> bf16
stores round to nearest even as a GPU does (the interpreter truncates), and, in
test_scan_triton_with_tf32_dots, tl.dot rounds its operands to tf32 as tensor cores do,
so the error a GPU should show is measured against the CUDA tolerances
(results/gpu/tf32_emulated.json). test_scan_and_steps_trace_into_one_graph checks with
torch._dynamo.explain that a function calling scan_triton or the steps (custom ops) is one
graph with no break, and test_custom_ops_opcheck runs torch.library.opcheck on the ops.

The interpreter must be on before triton is first imported, so this module asks
for it (triton_mode, tests/conftest.py): a pytest process that imported triton
without it runs these tests in a child process with TRITON_INTERPRET=1.

Tolerances are relative to the largest reference value:
- fp32: 1e-4. Both sides compute in fp32; only the summation order differs.
- bf16: 1e-2. Both sides read the same bf16 inputs, compute in fp32 and round
  their outputs (y, gradients) once to bf16. Two roundings of nearby values
  differ by at most one bf16 ulp, 2^-8 = 3.9e-3 of the largest value; 1e-2
  leaves room for that plus fp32 reassociation, and is far below what a wrong
  term would cost (errors of order 1).
"""
import json
import os

import pytest
import torch
import triton

import kernels
import scan

pytestmark = pytest.mark.triton_mode('interpreter')

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel_err(a, b):
    # The floor compares an exactly-zero reference in absolute terms (dg at T=1 with no
    # initial state: the decay acts on nothing, and the kernel's dg is fp32 noise ~1e-7).
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-2)).item()


def inputs(T, M, P, routing, decay, dtype, B=2, H=2, seed=0):
    """Gates shaped as model.py builds them: beta = Δ·w, g = -(per-step magnitude)·w; sparse: top-4 of M."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, 1, M, generator=gen).expand(B, T, H, M)   # routing shared by heads
    if routing == 'sparse':
        top, idx = r.topk(4, dim=-1)
        w = torch.zeros_like(r).scatter(-1, idx, top.softmax(-1))   # exact zeros off the top-k
    else:
        w = r.softmax(-1)
    delta = torch.nn.functional.softplus(torch.randn(B, T, H, 1, generator=gen))
    lo, hi = {'weak': (0.01, 0.5), 'strong': (0.01, 20.0)}[decay]
    shape = (B, T, H, 1) if routing == 'broadcast' else (B, T, H, M)
    # per-step log-decays spread log-uniformly over [-hi, -lo]: strong ones reach -20 in one step
    mag = torch.exp(torch.empty(shape).uniform_(torch.log(torch.tensor(lo)), torch.log(torch.tensor(hi)),
                                                generator=gen))
    g = -mag if routing == 'broadcast' else -mag * (w > 0)
    beta = delta * w
    q = torch.nn.functional.silu(torch.randn(B, T, H, M, generator=gen)) * (w > 0)
    x = torch.randn(B, T, H, P, generator=gen)
    S0 = torch.randn(B, H, M, P, generator=gen)
    return [t.to(dtype) for t in (x, g, beta, q)] + [S0]


F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def bf16_rounding_as_on_gpu(monkeypatch):
    """The interpreter casts fp32 to bf16 by truncation (triton 3.9, cast_impl); a GPU rounds to
    nearest even (cvt.rn.bf16.f32), as torch does. Kernels that store bf16 outputs directly
    (y, dx, dq, dg) are checked with the GPU's rounding: the interpreter's cast is replaced."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    orig = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return orig(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, 'cast_impl', cast_impl)
# The interpreter's cost grows with the programs launched (chunks x B*H x slot blocks)
# times the chunk length, so long sequences run with a small batch. M <= 64 is one slot
# block (y, dx, dg written directly); M = 100 at P = 48 is blocks of BM = 32 (three and a
# partial one of 4), so the partial sums of y, dx and a broadcast dg are exercised too.
# T not a multiple of the chunk (1, 17, 33, 40, 80, 130, 200) masks the last chunk's tail.
CASES = [  # routing, decay, T, M, P, initial state, dtype, chunk_size, B, H
    ('dense', 'weak', 1, 5, 3, False, F32, 16, 2, 2),
    ('dense', 'strong', 130, 64, 64, True, F32, 64, 1, 1),      # the model's M, P
    ('dense', 'strong', 40, 100, 48, True, F32, 16, 1, 1),       # one sub-chunk per chunk
    ('sparse', 'strong', 17, 100, 3, True, F32, 16, 2, 1),
    ('sparse', 'weak', 33, 5, 48, False, F32, 32, 1, 2),
    ('sparse', 'strong', 200, 16, 32, False, F32, 64, 1, 1),
    ('dense', 'weak', 33, 24, 40, True, F32, 16, 2, 2),          # state pass: columns 16+16+8
    ('broadcast', 'strong', 64, 1, 3, True, F32, 64, 1, 2),      # Mamba-2 with one slot
    ('broadcast', 'weak', 200, 16, 64, False, F32, 128, 1, 1),
    ('broadcast', 'strong', 40, 100, 48, True, F32, 16, 1, 1),   # dg summed over 4 slot blocks
    ('dense', 'strong', 64, 64, 64, True, BF16, 64, 1, 1),
    ('sparse', 'weak', 17, 100, 48, False, BF16, 32, 1, 1),
    ('broadcast', 'strong', 80, 5, 3, True, BF16, 64, 1, 1),
]


def run_triton(chunk):
    return lambda *a, **kw: kernels.scan_triton(*a, **kw, chunk_size=chunk)


def scan_errors(routing, decay, T, M, P, init, dtype, chunk, B, H, gate_dtype=None):
    """Relative errors of scan_triton's y, S_final and every gradient against scan_naive's."""
    x, g, beta, q, S0 = inputs(T, M, P, routing, decay, dtype, B, H)
    if gate_dtype is not None:          # the model under autocast: bf16 x, fp32 gates
        g, beta, q = (t.to(gate_dtype) for t in inputs(T, M, P, routing, decay, F32, B, H)[1:4])
    leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, P, generator=gen).to(dtype)
    dS = torch.randn(B, H, M, P, generator=gen)
    results = []
    for fn in (scan.scan_naive, run_triton(chunk)):
        y, S = fn(*leaves[:4], initial_state=leaves[4] if init else None)
        assert y.dtype == dtype and S.dtype == torch.float32
        ((y.float() * dy.float()).sum() + (S * dS).sum()).backward()
        grads = [t.grad for t in leaves[:4]] + ([leaves[4].grad] if init else [])
        results.append([y.detach(), S.detach()] + grads)
        for t in leaves:
            t.grad = None
    names = ['y', 'S_final', 'dx', 'dg', 'dbeta', 'dq', 'dS_initial']
    errs = {}
    for name, got, ref in zip(names, results[1], results[0]):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert torch.isfinite(got).all(), f"{name} has inf/NaN"
        errs[name] = rel_err(got, ref)
    return errs


@pytest.mark.parametrize('routing,decay,T,M,P,init,dtype,chunk,B,H', CASES,
                         ids=lambda v: str(v).replace('torch.', ''))
def test_scan_triton_equals_naive(routing, decay, T, M, P, init, dtype, chunk, B, H, poisoned_empty):
    errs = scan_errors(routing, decay, T, M, P, init, dtype, chunk, B, H)
    print(f"{routing} {decay} T={T} M={M} P={P} init={init} {dtype}: max rel err {max(errs.values()):.1e}")
    assert all(e <= TOL[dtype] for e in errs.values()), errs


# --- tf32 as the tensor cores compute it ------------------------------------------------------
# The interpreter computes tl.dot in fp32 whatever input_precision says, so by itself it never
# sees tf32's error. tf32_dots makes it: every dot's fp32 operands are cut to tf32 (10 mantissa
# bits) as the GPU does. input_precision='tf32' (the bf16 path): the operands are truncated (a
# tensor core reads an fp32 register as tf32 by dropping its low 13 bits; truncation is also the
# worse of the two roundings). 'tf32x3' (the fp32 path): Triton's 3-pass split, big = a rounded
# to tf32 (cvt.rna), small = a - big, and a.b = big.big + big.small + small.big, each product of
# truncated tf32 operands, summed in fp32. The error against scan_naive is then what a GPU run
# should show, and its margin to the CUDA tolerance (test_cuda.py, the same TOL) is recorded.
TF32_JSON = os.path.join(os.path.dirname(__file__), '..', 'results', 'gpu', 'tf32_emulated.json')
TF32_CASES = [  # routing, decay, T, M, P, init, x dtype, chunk, B, H, gate dtype
    ('dense', 'strong', 130, 64, 64, True, F32, 64, 1, 1, None),      # the model's M, P, fp32
    ('dense', 'strong', 64, 64, 64, True, BF16, 64, 1, 1, F32),       # bf16 autocast: bf16 x, fp32 gates
    ('sparse', 'weak', 64, 64, 64, True, BF16, 64, 1, 1, BF16),
    ('broadcast', 'strong', 80, 5, 3, True, BF16, 64, 1, 1, None),
]
_TF32 = {}


def _tf32(a, mode):
    import numpy as np
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if mode == 'rna':                                    # to nearest, ties away (magnitude + half ulp)
        u = u + np.uint32(0x1000)
    return (u & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture
def tf32_dots(monkeypatch):
    import numpy as np
    from triton.runtime import interpreter
    orig = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        mode = str(input_precision).split('.')[-1].lower()
        if a.data.dtype != np.float32 or b.data.dtype != np.float32 or mode not in ('tf32', 'tf32x3'):
            return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        mm = lambda x, y: np.matmul(_tf32(x, 'trunc'), _tf32(y, 'trunc'), dtype=np.float32)
        if mode == 'tf32':
            out = mm(a.data, b.data)
        else:
            a_big, b_big = _tf32(a.data, 'rna'), _tf32(b.data, 'rna')
            out = mm(a_big, b_big) + (mm(a_big, b.data - b_big) + mm(a.data - a_big, b_big))
        return interpreter.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, 'create_dot', create_dot)


@pytest.mark.parametrize('routing,decay,T,M,P,init,dtype,chunk,B,H,gate_dtype', TF32_CASES,
                         ids=lambda v: str(v).replace('torch.', ''))
def test_scan_triton_with_tf32_dots(routing, decay, T, M, P, init, dtype, chunk, B, H, gate_dtype, tf32_dots):
    errs = scan_errors(routing, decay, T, M, P, init, dtype, chunk, B, H, gate_dtype)
    worst = max(errs, key=errs.get)
    case = f"{routing} {decay} T={T} M={M} P={P} x {str(dtype)[6:]} gates {str(gate_dtype or dtype)[6:]}"
    print(f"tf32-emulated {case}: worst {worst} {errs[worst]:.2e} of tolerance {TOL[dtype]:.0e} "
          f"({errs[worst] / TOL[dtype]:.0%})")
    _TF32[case] = dict(errors={k: float(f"{v:.3g}") for k, v in errs.items()}, worst=worst,
                       tolerance=TOL[dtype], used=round(errs[worst] / TOL[dtype], 3))
    if len(_TF32) == len(TF32_CASES):
        os.makedirs(os.path.dirname(TF32_JSON), exist_ok=True)
        with open(TF32_JSON, 'w') as f:
            json.dump({'what': 'scan_triton vs scan_naive, relative error (max abs / max ref) with every '
                               'tl.dot computed as tensor cores do in tf32 / tf32x3 (tests/test_kernels.py, '
                               'tf32_dots); tolerance = the CUDA tests\' (tests/test_cuda.py)', 'cases': _TF32},
                      f, indent=1)
            f.write('\n')
    assert all(e <= TOL[dtype] for e in errs.values()), errs


def test_strong_decay_at_chunk_64_is_finite():
    """Every step at -20 in every slot: a chunk decays by 1280 nats, far past fp32's e^-88.
    Forward and every gradient finite and equal to scan_naive's."""
    T, M, P = 64, 16, 32
    x, g, beta, q, S0 = inputs(T, M, P, 'dense', 'weak', torch.float32, B=1)
    g = torch.full_like(g, -20.0)
    out = []
    for fn in (scan.scan_naive, kernels.scan_triton):
        leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
        y, S = fn(*leaves[:4], initial_state=leaves[4])
        (y.sum() + S.sum()).backward()
        out.append([y.detach(), S.detach()] + [t.grad for t in leaves])
    for got, ref in zip(out[1], out[0]):
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= 1e-4


B, H = 2, 3   # the decode steps are cheap


@pytest.mark.parametrize('M,P', [(64, 64), (24, 40), (100, 48), (5, 3), (1, 3)])   # masked tiles past M, P
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('broadcast', [False, True])
def test_step_dense_equals_scan_step(M, P, dtype, broadcast, poisoned_empty):
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(B, H, M, P, generator=gen)
    x = torch.randn(B, H, P, generator=gen).to(dtype)
    g = -20 * torch.rand(B, H, 1 if broadcast else M, generator=gen)
    beta, q = torch.rand(B, H, M, generator=gen), torch.randn(B, H, M, generator=gen)
    y_ref, S_ref = scan.scan_step(state.clone(), x, g, beta, q)
    S = state.clone()
    y, S_out = kernels.scan_step_triton(S, x, g, beta, q)
    assert y.dtype == dtype and S_out.data_ptr() == S.data_ptr()      # updated in place
    assert rel_err(S_out, S_ref) <= 1e-6
    assert rel_err(y.float(), y_ref.float()) <= TOL[dtype]


@pytest.mark.parametrize('M,K,P', [(16, 4, 64), (64, 7, 64), (100, 3, 48), (5, 1, 3)])   # K not a power of 2
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_step_sparse_touches_only_k_rows(M, K, P, dtype, poisoned_empty):
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(B, H, M, P, generator=gen)
    idx = torch.rand(B, M, generator=gen).topk(K, dim=-1).indices      # distinct slots, shared by heads
    x = torch.randn(B, H, P, generator=gen).to(dtype)
    g = -20 * torch.rand(B, H, K, generator=gen)
    beta, q = torch.rand(B, H, K, generator=gen), torch.randn(B, H, K, generator=gen)
    y_ref, S_ref = scan.scan_step_sparse(state.clone(), x, g, beta, q, idx)
    # the same step written densely: zero g, beta, q outside idx
    dense = lambda v: torch.zeros(B, H, M).scatter(-1, idx[:, None].expand(B, H, K), v)
    y_dense, S_dense = scan.scan_step(state.clone(), x, dense(g), dense(beta), dense(q))
    S = state.clone()
    y, S_out = kernels.scan_step_sparse_triton(S, x, g, beta, q, idx)
    assert S_out.data_ptr() == S.data_ptr()
    for y_r, S_r in ((y_ref, S_ref), (y_dense, S_dense)):
        assert rel_err(S_out, S_r) <= 1e-6
        assert rel_err(y.float(), y_r.float()) <= TOL[dtype]
    untouched = torch.ones(B, M, dtype=torch.bool).scatter(-1, idx, False)[:, None, :].expand(B, H, M)
    assert torch.equal(S_out[untouched], state[untouched])           # bit-identical: no decay, no write


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(kernels, '_chunk_state', triton.runtime.JITFunction(kernels._chunk_state.fn))
    x, g, beta, q, _ = inputs(4, 16, 32, 'dense', 'weak', torch.float32)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        kernels.scan_triton(x, g, beta, q)


@pytest.mark.parametrize('chunk', [0, 24, 8])
def test_bad_chunk_size_raises(chunk):
    x, g, beta, q, _ = inputs(4, 5, 3, 'dense', 'weak', torch.float32)
    with pytest.raises(ValueError, match='chunk_size'):
        kernels.scan_triton(x, g, beta, q, chunk_size=chunk)


def test_tiles_cover_any_M_P():
    """The launch constants: power-of-2 tiles >= 16 that cover M and P, within the state budget;
    one slot block (no partial sums) whenever it fits 2 * STATE_TILE (M <= 64 at P <= 64), 8 warps
    for a tile over STATE_TILE."""
    for M in (1, 5, 16, 64, 100, 1000):
        for P in (1, 3, 48, 64, 200):
            meta = kernels.chunk_meta(M, P, 64, torch.float32)
            BM, BP = meta['BM'], meta['BP']
            for v in (BM, BP):
                assert v >= 16 and v & (v - 1) == 0
            assert BP >= P and (BM >= M or BM * BP >= kernels.STATE_TILE)
            assert BM * BP <= max(2 * kernels.STATE_TILE, 16 * BP)
            assert meta['num_warps'] == (8 if BM * BP > kernels.STATE_TILE else 4)
            BPS = meta['BPS']                                    # the state pass's column block
            assert BPS >= 16 and BPS & (BPS - 1) == 0 and BPS <= BP
            if M <= 64 and P <= 64:
                assert BM >= M                                   # one slot block


def test_state_pass_splits_the_columns(monkeypatch):
    """Stage 2 is elementwise in the columns: both state passes (forward and REVERSE, per-head
    and factored gates) launch one program per (b*h, slot block, column block of BPS), at
    4 warps for a BM x BPS tile within STATE_TILE; the other stages keep one column block."""
    B, T, H, M, P = 2, 100, 3, 64, 40
    launches = []
    monkeypatch.setattr(kernels, '_launch', lambda kernel, grid, *a, **meta: launches.append(
        (kernel.__name__, grid, meta)))
    x, g, beta, q, S0 = inputs(T, M, P, 'dense', 'weak', torch.float32, B, H)
    gw, bw, qw = (torch.rand(B, T, M) for _ in range(3))
    A, delta = -torch.rand(H), torch.rand(B, T, H)
    y, _, S_in, Gc = kernels._scan_fwd(x, g, beta, q, S0, 64)
    kernels._scan_bwd(x, g, beta, q, S_in, Gc, torch.randn_like(x), S0, 64)
    y, _, S_in, Gc = kernels._scan_fwd(x, gw, bw, qw, S0, 64, A, delta, factored=True)
    kernels._scan_bwd(x, gw, bw, qw, S_in, Gc, torch.randn_like(x), S0, 64, A, delta, factored=True)
    passes = [(grid, meta) for name, grid, meta in launches if name == '_state_pass']
    assert [m['REVERSE'] for _, m in passes] == [False, True, False, True]
    for grid, meta in passes:
        nb = triton.cdiv(M, meta['BM'])
        assert grid == (B * H, nb, 3) and meta['BPS'] == 16                  # 40 = 16 + 16 + 8
        assert meta['num_warps'] == 4
    others = {grid for name, grid, _ in launches if name != '_state_pass'}
    assert all(len(grid) == 3 and grid[0] == triton.cdiv(T, 64) for grid in others), others


@pytest.mark.parametrize('factored', [False, True])
def test_one_reverse_sweep_equals_two(factored, monkeypatch):
    """The backward's reverse sweep launched once (dx and dbeta together: SPLIT_SWEEP = False,
    bench.py's A/B) gives the gradients of the two launches the glue makes, bit for bit; 3 slot
    blocks at M = 100, the sweep's sums over the heads (factored) included."""
    B, T, H, M, P = 1, 40, 2, 100, 48
    x, g, beta, q, S0 = inputs(T, M, P, 'sparse', 'strong', F32, B, H)
    if factored:
        gen = torch.Generator().manual_seed(2)
        g, beta, q = -torch.rand(B, T, M, generator=gen), *torch.rand(2, B, T, M, generator=gen)
        extra = (-torch.rand(H, generator=gen), torch.rand(B, T, H, generator=gen))
        run = lambda *a: kernels.scan_factored(*a[:4], *a[5:], initial_state=a[4], chunk_size=16)
    else:
        extra = ()
        run = lambda *a: kernels.scan_triton(*a[:4], initial_state=a[4], chunk_size=16)
    dy = torch.randn(B, T, H, P, generator=torch.Generator().manual_seed(1))
    grads = []
    for split in (True, False):
        monkeypatch.setattr(kernels, 'SPLIT_SWEEP', split)
        leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0, *extra)]
        y, S = run(*leaves)
        ((y * dy).sum() + S.sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bench_variants_compute_the_scan(monkeypatch):
    """bench.py scan's Triton variants (--impls=variants: factored gates shared by the heads, twice
    the chunk, one reverse sweep) compute scan_naive's y, S_final and gradients on the inputs
    bench_scan gives them ('shared': one head's gates, (B,T,M), for all heads)."""
    from experiments import bench
    monkeypatch.setattr(kernels, 'SPLIT_SWEEP', True)          # one_sweep sets it; restored after
    cfg = bench.ScanBench(B=1, T=40, H=2, M=16, P=16, chunk_size=16, naive=False)
    variants = bench.pick_impls(bench.contenders(cfg, torch.device('cuda')), 'variants')
    assert list(variants) == ['triton, factored', 'triton, chunk 32', 'triton, one reverse sweep']
    x, g, beta, q, _ = inputs(40, 16, 16, 'dense', 'strong', F32, 1, 2)
    shared_naive = lambda x, *gates: scan.scan_naive(x, *(t[:, :, None].expand(-1, -1, 2, -1)
                                                          for t in gates))
    for name, (kind, fn) in variants.items():
        args = [x, g, beta, q] if kind == 'slot' else [x] + [t[:, :, 0] for t in (g, beta, q)]
        results = []
        for run in (fn, scan.scan_naive if kind == 'slot' else shared_naive):
            leaves = [t.clone().requires_grad_() for t in args]
            y, S = run(*leaves)
            (y.square().sum() + S.sum()).backward()
            results.append([y.detach(), S.detach()] + [t.grad for t in leaves])
        for got, ref in zip(*results):
            assert rel_err(got, ref) <= TOL[F32], name


def _explain(fn, args):
    """torch._dynamo.explain of fn(*args): its graph breaks, with their reasons printed."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*[a.clone() for a in args])
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    print(fn.__name__, explained.graph_count, 'graphs,', explained.graph_break_count, 'breaks:',
          reasons)
    return explained


def scan_then_sum(x, g, beta, q, S0):
    y, S = kernels.scan_triton(x * 2, g, beta, q, initial_state=S0, chunk_size=16)
    return (y * y).sum() + S.sum()


def decode_steps(S, x, g, beta, q):
    y, S = kernels.scan_step_triton(S, x, g, beta, q)
    y2, S = kernels.scan_step_sparse_triton(S, x, g[..., :2], beta[..., :2], q[..., :2],
                                            torch.tensor([[0, 3]]))
    return y + y2 + S.sum()


def test_scan_and_steps_trace_into_one_graph():
    """The custom ops (fm::scan_fwd/bwd, fm::scan_step, fm::scan_step_sparse) are traced: dynamo
    makes one graph of a function that calls scan_triton or the decode steps, with 0 breaks, and
    the compiled function (AOTAutograd: the fake shapes, the registered backward) computes what
    the eager one does, forward and gradients."""
    x, g, beta, q, S0 = inputs(16, 5, 3, 'dense', 'strong', torch.float32, B=1, H=2)
    step_args = (S0.clone(), x[:, 0], g[:, 0], beta[:, 0], q[:, 0])
    for fn, args in [(scan_then_sum, (x, g, beta, q, S0)), (decode_steps, step_args)]:
        explained = _explain(fn, args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(scan_then_sum, backend='aot_eager', fullgraph=True)
    outs = []
    for f in (scan_then_sum, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
        loss = f(*leaves)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])
    for got, ref in zip(outs[1], outs[0]):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    S_a, S_b = S0.clone(), S0.clone()
    got = torch.compile(decode_steps, backend='aot_eager', fullgraph=True)(S_a, *step_args[1:])
    assert torch.allclose(got, decode_steps(S_b, *step_args[1:]))
    assert torch.equal(S_a, S_b)                                  # the state mutated in place
    torch._dynamo.reset()


def test_custom_ops_opcheck():
    """torch.library.opcheck of each op: its schema (what it mutates), fake tensors against the
    real outputs, the autograd registration, and AOT dispatch with dynamic shapes."""
    x, g, beta, q, S0 = inputs(17, 5, 3, 'dense', 'strong', torch.float32, B=1, H=2)
    leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
    torch.library.opcheck(torch.ops.fm.scan_fwd.default, (*leaves, 16))
    torch.library.opcheck(torch.ops.fm.scan_fwd.default, (*leaves[:4], None, 16))
    torch.library.opcheck(torch.ops.fm.scan_step.default,
                          (S0.clone(), x[:, 0], g[:, 0], beta[:, 0], q[:, 0]))
    torch.library.opcheck(torch.ops.fm.scan_step_sparse.default,
                          (S0.clone(), x[:, 0], g[:, 0, :, :2], beta[:, 0, :, :2],
                           q[:, 0, :, :2], torch.tensor([[0, 3]])))
