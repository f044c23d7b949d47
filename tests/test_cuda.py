"""The GPU path on a GPU: skipped without CUDA (experiments/gpu_check.py runs it on one; the
checklist itself is tested without a GPU in test_gpu_check.py).

- scan_triton against scan_naive on CUDA tensors, fp32 and bf16 (and the model's mix:
  bf16 x under autocast with fp32 gates), forward and every gradient, at the model's
  shapes and at M, P that are not powers of 2;
- the decode steps (dense and sparse) against scan.py's;
- the LM's logits and gradients on CUDA (Triton scan and steps) against the same
  weights on CPU (PyTorch chunked scan);
- prefill + one-token steps equal the parallel forward, on CUDA, for every mixer.

Every buffer the kernels fill is poisoned with NaN first, so an unwritten element fails.

Tolerances are relative to the largest reference value, as in test_kernels.py:
fp32 1e-4 (Triton's fp32 dots run as 3 tf32 passes, ~fp32 accuracy), bf16 1e-2 (one
bf16 rounding of each output is 3.9e-3; the bf16 path's dots are single tf32 passes).
"""
import pytest
import torch

import scan
from model import LM, MIXERS, ModelConfig

pytestmark = pytest.mark.triton_mode('compiler')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (experiments/gpu_check.py runs these on a GPU)")

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
F32, BF16 = torch.float32, torch.bfloat16
DEV = 'cuda'


@pytest.fixture(autouse=True)
def exact_fp32_and_poison(poisoned_empty):
    """fp32 means fp32: no TF32 in cuBLAS or cuDNN (the conv) while these tests run; and every
    buffer kernels.py allocates (outputs, partial sums, states) starts as NaN.

    The switches are saved and restored by hand, not monkeypatched: torch.backends.cuda.matmul
    serves allow_tf32 from __getattr__, so it is in no __dict__, and pytest >= 9.2's monkeypatch
    undoes such a patch with delattr, which raises."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-2)).item()


def inputs(B, T, H, M, P, routing, dtype, gate_dtype, seed=0):
    """As test_kernels.inputs: beta = Δ·w, g = -(per-step magnitude up to 20)·w, sparse = top-4."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, 1, M, generator=gen).expand(B, T, H, M)
    if routing == 'sparse':
        top, idx = r.topk(min(4, M), dim=-1)
        w = torch.zeros_like(r).scatter(-1, idx, top.softmax(-1))
    else:
        w = r.softmax(-1)
    delta = torch.nn.functional.softplus(torch.randn(B, T, H, 1, generator=gen))
    shape = (B, T, H, 1) if routing == 'broadcast' else (B, T, H, M)
    mag = torch.exp(torch.empty(shape).uniform_(-4.6, 3.0, generator=gen))        # 0.01 .. 20
    g = -mag if routing == 'broadcast' else -mag * (w > 0)
    beta = delta * w
    q = torch.nn.functional.silu(torch.randn(B, T, H, M, generator=gen)) * (w > 0)
    x = torch.randn(B, T, H, P, generator=gen)
    S0 = torch.randn(B, H, M, P, generator=gen)
    return (x.to(DEV, dtype), *[t.to(DEV, gate_dtype) for t in (g, beta, q)], S0.to(DEV))


SCAN_CASES = [  # routing, B, T, H, M, P, x dtype, gate dtype, chunk
    ('dense', 2, 300, 4, 64, 64, F32, F32, 64),          # the model's M, P; T not a multiple of 64
    ('sparse', 2, 300, 4, 64, 64, F32, F32, 64),
    ('broadcast', 2, 300, 4, 64, 64, F32, F32, 128),
    ('dense', 2, 300, 4, 64, 64, BF16, BF16, 64),
    ('sparse', 2, 300, 4, 64, 64, BF16, F32, 64),        # the model under bf16 autocast
    ('dense', 1, 77, 3, 100, 48, F32, F32, 32),          # not powers of 2: masked tiles
    ('sparse', 1, 77, 3, 5, 3, BF16, BF16, 16),
    ('broadcast', 2, 33, 2, 1, 3, F32, F32, 16),
    ('dense', 1, 1, 1, 64, 64, F32, F32, 64),
    ('dense', 1, 64, 2, 256, 128, F32, F32, 64),         # several slot blocks (BM = 16)
]


@pytest.mark.parametrize('routing,B,T,H,M,P,dtype,gate_dtype,chunk', SCAN_CASES,
                         ids=lambda v: str(v).replace('torch.', ''))
@needs_cuda
def test_scan_triton_equals_naive_on_cuda(routing, B, T, H, M, P, dtype, gate_dtype, chunk):
    import kernels
    x, g, beta, q, S0 = inputs(B, T, H, M, P, routing, dtype, gate_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, g, beta, q, S0)]
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, P, generator=gen).to(DEV, dtype)
    dS = torch.randn(B, H, M, P, generator=gen).to(DEV)
    results = []
    for fn in (scan.scan_naive, lambda *a, **kw: kernels.scan_triton(*a, **kw, chunk_size=chunk)):
        y, S = fn(*leaves[:4], initial_state=leaves[4])
        assert y.dtype == dtype and S.dtype == torch.float32 and y.device.type == DEV
        ((y.float() * dy.float()).sum() + (S * dS).sum()).backward()
        results.append([y.detach(), S.detach()] + [t.grad for t in leaves])
        for t in leaves:
            t.grad = None
    errs = {}
    for name, got, ref in zip(['y', 'S_final', 'dx', 'dg', 'dbeta', 'dq', 'dS_initial'], *results[::-1]):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert torch.isfinite(got).all(), f"{name} has inf/NaN"
        errs[name] = rel_err(got, ref)
    print(f"{routing} T={T} M={M} P={P} {dtype}/{gate_dtype}: max rel err {max(errs.values()):.1e}")
    assert all(e <= TOL[dtype] for e in errs.values()), errs


@needs_cuda
@pytest.mark.parametrize('M,P', [(64, 64), (4096, 64), (100, 48), (1, 3)])
@pytest.mark.parametrize('dtype', [F32, BF16])
@pytest.mark.parametrize('broadcast', [False, True])
def test_step_dense_on_cuda(M, P, dtype, broadcast):
    import kernels
    B, H = 3, 4
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(B, H, M, P, generator=gen).to(DEV)
    x = torch.randn(B, H, P, generator=gen).to(DEV, dtype)
    g = (-20 * torch.rand(B, H, 1 if broadcast else M, generator=gen)).to(DEV)
    beta, q = torch.rand(B, H, M, generator=gen).to(DEV), torch.randn(B, H, M, generator=gen).to(DEV)
    y_ref, S_ref = scan.scan_step(state.clone(), x, g, beta, q)
    S = state.clone()
    y, S_out = kernels.scan_step_triton(S, x, g, beta, q)
    assert y.dtype == dtype and S_out.data_ptr() == S.data_ptr()
    assert rel_err(S_out, S_ref) <= 1e-6
    assert rel_err(y.float(), y_ref.float()) <= TOL[dtype]


@needs_cuda
@pytest.mark.parametrize('M,K,P', [(64, 8, 64), (16384, 16, 64), (100, 3, 48), (5, 1, 3)])
@pytest.mark.parametrize('dtype', [F32, BF16])
def test_step_sparse_on_cuda(M, K, P, dtype):
    import kernels
    B, H = 3, 4
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(B, H, M, P, generator=gen).to(DEV)
    idx = torch.rand(B, M, generator=gen).topk(K, dim=-1).indices.to(DEV)
    x = torch.randn(B, H, P, generator=gen).to(DEV, dtype)
    g = (-20 * torch.rand(B, H, K, generator=gen)).to(DEV)
    beta, q = torch.rand(B, H, K, generator=gen).to(DEV), torch.randn(B, H, K, generator=gen).to(DEV)
    y_ref, S_ref = scan.scan_step_sparse(state.clone(), x, g, beta, q, idx)
    S = state.clone()
    y, S_out = kernels.scan_step_sparse_triton(S, x, g, beta, q, idx)
    assert S_out.data_ptr() == S.data_ptr()
    assert rel_err(S_out, S_ref) <= 1e-6
    assert rel_err(y.float(), y_ref.float()) <= TOL[dtype]
    untouched = torch.ones(B, M, dtype=torch.bool, device=DEV).scatter(-1, idx, False)[:, None].expand(B, H, M)
    assert torch.equal(S_out[untouched], state[untouched])


def tiny(mixer, **kw):
    args = dict(vocab_size=64, block_size=64, n_layer=2, n_embd=64, n_head=4, mixer=mixer,
                head_dim=32, n_slots=16, top_k=4, chunk_size=16)
    args.update(kw)
    return ModelConfig(**args)


MODEL_CASES = [(m, {}) for m in MIXERS] + [('fm_sparse', dict(n_slots=20, top_k=3)),   # M not a power of 2
                                          ('fm', dict(n_slots=64, head_dim=64, chunk_size=64)),
                                          ('fm', dict(formulation='derived')),
                                          ('fm_sparse', dict(formulation='derived'))]


@pytest.mark.parametrize('mixer,kw', MODEL_CASES, ids=lambda v: v if isinstance(v, str) else
                         '-'.join(f"{k}{x}" for k, x in v.items()) or 'default')
@needs_cuda
def test_lm_on_cuda_equals_lm_on_cpu(scaled_model, mixer, kw):
    """Logits and the gradients of every parameter: the Triton path vs the PyTorch one."""
    cpu = scaled_model(tiny(mixer, scan_impl='chunked', **kw)).train()
    gpu = LM(tiny(mixer, scan_impl='auto', **kw)).to(DEV).train()
    gpu.load_state_dict(cpu.state_dict())
    idx = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model, dev in (('cpu', cpu, 'cpu'), ('cuda', gpu, DEV)):
        logits, loss = model(idx.to(dev), idx.roll(-1, 1).to(dev))
        loss.backward()
        out[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert out['cpu'][0].std() > 1.0                    # the comparison is not vacuous
    assert rel_err(out['cuda'][0], out['cpu'][0]) <= 1e-4
    # Gradients sum over all B*T positions in a different order on each device: 1e-3.
    grad_errs = {n: rel_err(out['cuda'][1][n], g) for n, g in out['cpu'][1].items()}
    assert max(grad_errs.values()) <= 1e-3, sorted(grad_errs.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize('mixer,kw', MODEL_CASES, ids=lambda v: v if isinstance(v, str) else
                         '-'.join(f"{k}{x}" for k, x in v.items()) or 'default')
@needs_cuda
@pytest.mark.parametrize('n_prompt', [1, 37])
def test_prefill_and_steps_equal_the_forward_on_cuda(scaled_model, mixer, kw, n_prompt):
    model = scaled_model(tiny(mixer, **kw)).to(DEV)
    idx = torch.randint(0, 64, (2, 90), generator=torch.Generator().manual_seed(0)).to(DEV)   # > block_size
    with torch.no_grad():
        full, _ = model(idx)
    logits, caches = model.prefill(idx[:, :n_prompt])
    steps = [model.step(idx[:, t], caches)[:, None] for t in range(n_prompt, idx.shape[1])]
    stepped = torch.cat([logits] + steps, dim=1)
    assert full.std() > 1.0
    assert rel_err(stepped, full) <= 1e-4


@needs_cuda
def test_lm_trains_under_bf16_autocast_on_cuda():
    """The training path (bf16 autocast, Triton scan): finite loss that falls on one batch."""
    torch.manual_seed(0)
    model = LM(tiny('fm_sparse', n_slots=64, head_dim=64, chunk_size=64)).to(DEV)
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cuda')
    idx = torch.randint(0, 64, (4, 129), generator=torch.Generator().manual_seed(0)).to(DEV)
    losses = []
    for _ in range(60):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v and abs(v) < 1e9, losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
