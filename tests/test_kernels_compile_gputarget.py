"""Ahead-of-time compile every Triton kernel in kernels.py for real GPUs (sm_80, sm_90).

Runs without a GPU (ptxas ships with the triton wheel). The interpreter test
(test_kernels.py) checks the numbers; this checks what the interpreter lets
through: tl.dot shapes and dtypes, layouts, register allocation, ptxas.
"""
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels

# Under TRITON_INTERPRET=1 at triton's import (test_kernels.py sets it, and may run
# first in this process) triton's own functions (tl.sum, ...) are interpreter wrappers
# and cannot be compiled: then run this file in a fresh process without it.
FRESH_PROCESS = isinstance(tl.sum, InterpretedFunction)

if FRESH_PROCESS:
    def test_in_fresh_process():
        env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.fixture(autouse=True)
def _compiler_in_this_process(request):
    if FRESH_PROCESS and request.node.name != 'test_in_fresh_process':
        pytest.skip('triton was imported under the interpreter; test_in_fresh_process runs this')


TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
M, P, K, CHUNK = 64, 64, 8, 64          # the model's defaults (n_slots, head_dim, chunk_size)

# Pointer arguments, by what they point at: the caller's tensors take the input dtype.
INPUT_PTRS = {'x', 'g', 'beta', 'q', 'dy', 'u', 'k', 'y'}
FP32_PTRS = {'G', 'states', 'S0', 'S_last', 'S', 'y_part', 'dx_part', 'dbeta', 'dq'}
INT64_PTRS = {'idx'}
INTS = {'Tp', 'H', 'n', 'M', 'K'}


def constexpr_sets(fn):
    """Every constexpr combination the launchers use for fn, from their own helpers."""
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


@pytest.mark.parametrize('target', TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('fn', KERNELS, ids=lambda f: f.__name__)
def test_compiles_to_cubin(fn, dtype, target):
    for constexprs in constexpr_sets(fn)(DTYPES[dtype]):
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options={'num_warps': 4})
        assert compiled.asm['cubin'], f"{fn.__name__} {dtype} sm{target.arch}: no cubin"
