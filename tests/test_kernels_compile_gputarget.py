"""Ahead-of-time compile every Triton launch kernels.py makes, for real GPUs (sm_80, sm_90).

Runs without a GPU (ptxas and cuobjdump ship with the triton wheel). The interpreter test
(test_kernels.py) checks the numbers; this checks what the interpreter lets through: tl.dot
shapes and dtypes, layouts, register allocation, ptxas.

What is compiled is what launches. scan_triton and scan_factored (forward and backward; the
factored one with fp32 factors, with delta and A, and without them where x is fp32 or the
model's mix) and the decode steps run on CPU tensors with kernels._launch replaced by a recorder, so every launch the Python
glue makes is captured with its real arguments: the tensors (dtypes, 16-byte alignment of
their pointers), the ints (T, H, chunk counts), the constexprs and num_warps. Each one is
then specialized by Triton's own launcher code -- create_function_from_signature (the
binder JITFunction.run builds) and JITFunction._pack_args, with the target's backend -- so
the signature, constexprs and attrs (tt.divisibility=16 on aligned pointers and on ints
divisible by 16) are those of a real launch, and compiled as JITFunction._do_compile does.

Scenarios: the model's shapes (M = P = 64 at T = 2048, H = 8) in fp32, in the model's mixed
signature under bf16 autocast (bf16 x and dy, fp32 gates), in bf16, and with a broadcast
decay g (B,T,H,1); and shapes that are not powers of 2 (T = 77, M = 100, P = 48, K = 3; the
decode steps also at M = 1, P = 3, K = 1). Registers, stack frame and local memory of every
compiled kernel are read with cuobjdump -res-usage: a stack frame or local memory is where
ptxas spills, so any is a failure. The table goes to results/gpu/aot_resources.json (written
only when every scenario ran, so -k selections leave it alone).

Compiling needs triton imported without the interpreter (triton_mode, tests/conftest.py): a
pytest process that runs the interpreter runs these tests in a child process without it.
"""
import json
import os
import re
import subprocess
import tempfile

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels

try:     # what compile_launch drives: Triton's knobs and the launcher's binder (Triton >= 3.6 has both)
    from triton import knobs  # noqa: F401
    from triton.runtime.jit import create_function_from_signature  # noqa: F401
except ImportError as e:
    pytest.skip(f"triton {triton.__version__} lacks the launcher internals this test compiles with ({e}); "
                f"it runs on triton 3.6 to 3.9 (requirements.txt)", allow_module_level=True)

pytestmark = pytest.mark.triton_mode('compiler')

SM80, SM90 = GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)
F32, BF16 = torch.float32, torch.bfloat16
CHUNK = 64
RESOURCES_JSON = os.path.join(os.path.dirname(__file__), '..', 'results', 'gpu', 'aot_resources.json')

# name: B, T, H, M, P, K (top_k), x dtype, gate dtype, broadcast g, targets
SCENARIOS = {
    'model_fp32': (1, 2048, 8, 64, 64, 8, F32, F32, False, (SM80, SM90)),
    'model_mixed': (1, 2048, 8, 64, 64, 8, BF16, F32, False, (SM80, SM90)),   # bf16 autocast
    'model_bf16': (1, 2048, 8, 64, 64, 8, BF16, BF16, False, (SM90,)),
    'model_broadcast': (1, 2048, 8, 64, 64, 8, BF16, F32, True, (SM90,)),      # Mamba-2's g
    'odd_fp32': (1, 77, 3, 100, 48, 3, F32, F32, False, (SM90,)),             # masked tiles
    'odd_bf16': (1, 77, 3, 100, 48, 3, BF16, BF16, False, (SM80,)),
    'tiny_fp32': (1, 5, 1, 1, 3, 1, F32, F32, True, (SM80,)),
}
CASES = [(name, t) for name, spec in SCENARIOS.items() for t in spec[-1]]


def record_launches(scenario, monkeypatch, target=SM90):
    """Run the glue of scan_triton and scan_factored (forward + backward) and both decode steps on
    CPU tensors, as for a GPU of `target`'s arch; return every launch it makes, as (kernel, args, kwargs), without
    running any."""
    B, T, H, M, P, K, dtype, gate_dtype, broadcast, _ = SCENARIOS[scenario]
    launches = []
    monkeypatch.setattr(kernels, '_launch', lambda kernel, grid, *args, **meta: launches.append(
        (kernel, args, {k: v for k, v in meta.items()
                        if k in kernel.arg_names or k in ('num_warps', 'maxnreg')})))
    monkeypatch.setattr(kernels, '_require_runnable', lambda t: None)
    monkeypatch.setattr(kernels, '_arch', lambda t: target.arch)
    leaf = lambda *shape, dt=gate_dtype: torch.randn(*shape).to(dt).requires_grad_()
    x = leaf(B, T, H, P, dt=dtype)
    g, beta, q = leaf(B, T, H, 1 if broadcast else M), leaf(B, T, H, M), leaf(B, T, H, M)
    S0 = leaf(B, H, M, P, dt=F32)
    y, S = kernels.scan_triton(x, g, beta, q, initial_state=S0, chunk_size=CHUNK)
    ((y.float() * torch.randn(y.shape)).sum() + S.sum()).backward()
    if scenario == 'model_mixed':       # the reverse sweep as one launch too (bench.py's A/B)
        monkeypatch.setattr(kernels, 'SPLIT_SWEEP', False)
        y, S = kernels.scan_triton(x, g, beta, q, initial_state=S0, chunk_size=CHUNK)
        ((y.float() * torch.randn(y.shape)).sum() + S.sum()).backward()
        monkeypatch.setattr(kernels, 'SPLIT_SWEEP', True)
    # the factored entry (fp32 factors, the model's): with delta and A, and without (the paper's
    # gates) where x is fp32 or the model's mix
    f32 = lambda *shape: leaf(*shape, dt=F32)
    gw, bw, qw = f32(B, T, 1 if broadcast else M), f32(B, T, M), f32(B, T, M)
    rates = [(f32(H), f32(B, T, H))] + ([(None, None)] if gate_dtype == F32 and not broadcast else [])
    for A, delta in rates:
        y, S = kernels.scan_factored(x, gw, bw, qw, A, delta, initial_state=S0, chunk_size=CHUNK)
        ((y.float() * torch.randn(y.shape)).sum() + S.sum()).backward()
    state = torch.randn(B, H, M, P)
    kernels.scan_step_triton(state, x[:, 0].detach(), g[:, 0].detach(), beta[:, 0].detach(), q[:, 0].detach())
    idx = torch.arange(K)[None].expand(B, K)
    kernels.scan_step_sparse_triton(state, x[:, 0].detach(), *(t[:, 0, :, :K].detach() for t in (g, beta, q)),
                                    idx)
    return launches


RUN_OPTIONS = ('debug', 'instrumentation_mode', 'fpsan_homomorphic_casts')   # the union over Triton 3.6 .. 3.9


def launch_options(kernel):
    """The options JITFunction.run adds to a launch's kwargs, from the knobs, as this Triton has
    them: debug and instrumentation_mode (3.6 on), fpsan_homomorphic_casts (3.9 on). An option
    this Triton's knobs do not have is not passed (its compile options would reject it)."""
    from triton import knobs
    found = {'debug': kernel.debug or knobs.runtime.debug}
    for name in RUN_OPTIONS[1:]:
        if hasattr(knobs.compilation, name):
            found[name] = getattr(knobs.compilation, name)
    return found


def compile_launch(kernel, args, kwargs, target):
    """Compile one recorded launch for `target` exactly as JITFunction.run would on that GPU."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(target)
    kwargs = dict(kwargs, **launch_options(kernel))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    divisible = sorted(kernel.arg_names[k[0]] for k, v in attrs.items() if ['tt.divisibility', 16] in v)
    return compiled, signature, divisible


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')


def resources(cubin):
    """REG, STACK, SHARED, LOCAL of the kernel in `cubin` (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, '-res-usage', f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r'\b(REG|STACK|SHARED|LOCAL):(\d+)', out))
    assert set(found) >= {'REG', 'STACK', 'SHARED', 'LOCAL'}, out
    return {k.lower(): int(v) for k, v in found.items()}


KERNELS = [v for k, v in vars(kernels).items()   # the device helpers _tile_* are inlined, not launched
           if isinstance(v, (JITFunction, InterpretedFunction)) and not k.startswith('_tile_')]
_TABLE = {}          # scenario/target -> rows, filled by the compile tests


@pytest.fixture(scope='module', autouse=True)
def write_table():
    yield
    if len(_TABLE) == len(CASES):
        rows = [r for key in sorted(_TABLE) for r in _TABLE[key]]
        os.makedirs(os.path.dirname(RESOURCES_JSON), exist_ok=True)
        with open(RESOURCES_JSON, 'w') as f:
            json.dump({'what': 'registers per thread, stack frame, shared and local bytes of every kernel '
                               'launch of scan_triton (fwd+bwd) and the decode steps, compiled ahead of '
                               'time with the launch specialization (tests/test_kernels_compile_gputarget.py)',
                       'triton': triton.__version__, 'rows': rows}, f, indent=1)
            f.write('\n')


@pytest.mark.parametrize('scenario,target', CASES, ids=lambda v: f"sm{v.arch}" if hasattr(v, 'arch') else v)
def test_launches_compile_without_spills(scenario, target, monkeypatch):
    launches = record_launches(scenario, monkeypatch, target)
    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        compiled, signature, divisible = compile_launch(kernel, args, kwargs, target)
        key = compiled.metadata.hash
        if key in seen:          # the same specialization launched twice (e.g. both decode steps' reuse)
            continue
        seen.add(key)
        assert compiled.asm['cubin'], f"{kernel.__name__} {scenario} sm{target.arch}: no cubin"
        res = resources(compiled.asm['cubin'])
        pointers = sorted({v for v in signature.values() if v.startswith('*')})
        flags = {k: v for k, v in kwargs.items() if k in ('REVERSE', 'FACT', 'HAS_D', 'HAS_A', 'DX', 'DBETA')}
        rows.append(dict(kernel=kernel.__name__, **flags, scenario=scenario, target=f"sm{target.arch}",
                         num_warps=compiled.metadata.num_warps, maxnreg=kwargs.get('maxnreg'),
                         pointer_types=pointers,
                         divisible_by_16=divisible, **res))
        print(f"{kernel.__name__:22s} {flags or ''} {scenario:16s} sm{target.arch} warps {compiled.metadata.num_warps}"
              f" REG {res['reg']:3d} STACK {res['stack']} LOCAL {res['local']}")
    _TABLE[f"{scenario}/sm{target.arch}"] = rows
    spills = [r for r in rows if r['stack'] or r['local']]
    assert not spills, f"spills (stack frame or local memory): {spills}"
    assert all(r['reg'] <= (r['maxnreg'] or 255) for r in rows)
    if scenario in ('model_mixed', 'model_bf16'):      # the model's backward under autocast: capped
        capped = [r for r in rows if r.get('FACT') and (r['kernel'] == '_chunk_dq_dg_bwd' or
                                                         r.get('DX') is False)]    # the dbeta sweep
        assert len(capped) >= 2 and all(r['maxnreg'] == kernels.BWD_REGS for r in capped), capped


def test_every_kernel_is_launched(monkeypatch):
    """Every @triton.jit in kernels.py is among the recorded launches (so it is compiled above),
    and the launches carry the launcher's marks: aligned pointers and T = 2048 are divisible by 16."""
    names = {k.__name__ for k, _, _ in record_launches('model_fp32', monkeypatch)}
    assert names == {k.__name__ for k in KERNELS}, names
    kernel, args, kwargs = next(l for l in record_launches('model_mixed', monkeypatch)
                                if l[0].__name__ == '_chunk_output_fwd')
    _, signature, divisible = compile_launch(kernel, args, kwargs, SM90)
    assert signature['x'] == '*bf16' and signature['beta'] == '*fp32'      # the model's mixed signature
    assert {'x', 'beta', 'q'} <= set(divisible)


def test_launch_options_are_those_run_sets():
    """compile_launch passes exactly the options JITFunction.run of this Triton sets on a launch
    (read from run's source): a Triton that adds or drops one fails here, not by compiling
    something other than what launches."""
    import inspect
    set_by_run = set(re.findall(r"""kwargs\[["'](\w+)["']\]\s*=""", inspect.getsource(JITFunction.run)))
    assert set_by_run, "no kwargs[...] = ... found in JITFunction.run"
    assert set(launch_options(KERNELS[0])) == set_by_run, (triton.__version__, set_by_run)


def test_glue_moves_no_bytes():
    """bench.py's HBM count (no kernel runs): scan_triton's fwd+bwd glue moves nothing through
    PyTorch ops at the model's shapes (fp32, or bf16 x with fp32 gates; g per slot or broadcast),
    and the kernels read a broadcast g as (B,T,H,1), not expanded."""
    from experiments.bench import hbm_bytes
    B, T, H, M, P = 1, 200, 2, 64, 64
    for x_dtype, broadcast in ((F32, False), (BF16, False), (BF16, True)):
        r = hbm_bytes(kernels, B, T, H, M, P, x_dtype, F32, broadcast)
        assert r['glue_moved_bytes'] == 0, r['glue_ops']
        assert r['launches'] == 8
    full, bc = hbm_bytes(kernels, B, T, H, M, P, BF16, F32, False), r
    # 6 launches read g and the last writes dg: M - 1 fewer floats per step each when g is
    # broadcast (and the chunk totals Gc, per slot or one per chunk, differ by n * (M - 1) floats
    # per use)
    per_step = B * T * H * (M - 1) * 4
    assert 7 * per_step <= full['kernel_moved_bytes'] - bc['kernel_moved_bytes'] < 7.1 * per_step
