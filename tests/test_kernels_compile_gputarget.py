"""Ahead-of-time compile every Triton kernel in kernels.py for real GPUs (sm_80, sm_90).

Runs without a GPU (ptxas ships with the triton wheel). The interpreter test
(test_kernels.py) checks the numbers; this checks what the interpreter lets
through: tl.dot shapes and dtypes, layouts, register allocation, ptxas.

Every kernel is compiled at the model's shapes (M = P = 64) for both targets and
both input dtypes, and at shapes that are not powers of 2 (M=100, P=48, K=3; the
decode steps also at M=1, P=3, K=1), where the tiles are masked, for sm_90 in fp32
and sm_80 in bf16 (both targets and both dtypes, at half the compile time).

Compiling needs triton imported without the interpreter (triton_mode,
tests/conftest.py): a pytest process that runs the interpreter runs these tests in
a child process without it.
"""
import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels

pytestmark = pytest.mark.triton_mode('compiler')

SM80, SM90 = GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
CHUNK = 64
# name: (M, P, K): n_slots, head_dim, top_k. 'model' is the model's defaults.
SHAPES = {'model': (64, 64, 8), 'M100_P48_K3': (100, 48, 3), 'M1_P3_K1': (1, 3, 1)}
STEP_KERNELS = ('_step_dense', '_step_sparse')

# Pointer arguments, by what they point at: the caller's tensors take the input dtype.
INPUT_PTRS = {'x', 'g', 'beta', 'q', 'dy', 'u', 'k', 'y'}
FP32_PTRS = {'G', 'states', 'S0', 'S_last', 'S', 'y_part', 'dx_part', 'dbeta', 'dq'}
INT64_PTRS = {'idx'}
INTS = {'Tp', 'H', 'n', 'M', 'K'}


def constexpr_sets(fn, shape='model'):
    """Every constexpr combination the launchers use for fn at `shape`, from their own helpers."""
    M, P, K = SHAPES[shape]
    chunk = lambda dtype: kernels.chunk_meta(M, P, CHUNK, dtype)
    sets = {
        '_chunk_state': lambda d: [dict(chunk(d), REVERSE=r) for r in (False, True)],
        '_state_pass': lambda d: [dict(chunk(d), REVERSE=r) for r in (False, True)],
        '_chunk_output_fwd': lambda d: [chunk(d)],
        '_chunk_dx_dbeta_bwd': lambda d: [chunk(d)],
        '_chunk_dq_bwd': lambda d: [chunk(d)],
        '_step_dense': lambda d: [kernels.step_meta(M, P)],
        '_step_sparse': lambda d: [kernels.sparse_step_meta(K, P)],
    }
    return sets[fn.__name__]


# Every @triton.jit in kernels.py (interpreter wrappers too, so that collection works in either mode).
KERNELS = [v for v in vars(kernels).values() if isinstance(v, (JITFunction, InterpretedFunction))]


def test_every_kernel_is_covered():
    assert len(KERNELS) == 7, [k.__name__ for k in KERNELS]
    for fn in KERNELS:
        constexpr_sets(fn)                              # KeyError: a kernel without a compile spec


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = 'constexpr'
        elif name in INPUT_PTRS:
            sig[name] = '*' + dtype
        elif name in FP32_PTRS:
            sig[name] = '*fp32'
        elif name in INT64_PTRS:
            sig[name] = '*i64'
        elif name in INTS:
            sig[name] = 'i32'
        else:
            raise AssertionError(f"{fn.__name__}: argument {name!r} has no type here")
    return sig


def compile_all(fn, dtype, target, shape):
    n = 0
    for constexprs in constexpr_sets(fn, shape)(DTYPES[dtype]):
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
        # fp fusion as launches get it (Triton 3.9's default, said explicitly: unset, 3.9 warns)
        compiled = triton.compile(src, target=target, options={'num_warps': 4, 'enable_fp_fusion': True})
        assert compiled.asm['cubin'], f"{fn.__name__} {dtype} sm{target.arch} {shape}: no cubin"
        n += 1
    assert n >= 1


@pytest.mark.parametrize('target', [SM80, SM90], ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('fn', KERNELS, ids=lambda f: f.__name__)
def test_compiles_to_cubin(fn, dtype, target):
    compile_all(fn, dtype, target, 'model')


ANY_SHAPE_CASES = [(fn, shape, dtype, target)
                   for fn in KERNELS
                   for shape in (['M100_P48_K3', 'M1_P3_K1'] if fn.__name__ in STEP_KERNELS else ['M100_P48_K3'])
                   for dtype, target in (('fp32', SM90), ('bf16', SM80))]


@pytest.mark.parametrize('fn,shape,dtype,target', ANY_SHAPE_CASES,
                         ids=lambda v: getattr(v, '__name__', None) or (f"sm{v.arch}" if hasattr(v, 'arch') else v))
def test_compiles_at_any_M_P(fn, shape, dtype, target):
    compile_all(fn, dtype, target, shape)
