"""Triton runs in one of two modes per process, fixed when triton is first imported:
the interpreter (TRITON_INTERPRET=1: kernels run on CPU tensors, test_kernels.py) or
the compiler (test_kernels_compile_gputarget.py compiles for sm_80/sm_90; test_cuda.py
runs on a GPU). A test module says which it needs with

    pytestmark = pytest.mark.triton_mode('interpreter')     # or 'compiler'

Tests whose mode is not this process's run in one fresh pytest process per module, in
the mode they need, and each test here reports its own outcome from there: passed,
failed (with the child's report) or skipped (with its reason). So `python -m pytest`
runs every kernel test for real in either mode, and none is skipped for the mode.

One version skip: Triton 3.6's interpreter converts size-1 arrays to Python ints, which
numpy >= 2.4 refuses, so with that pair the interpreter tests skip, naming both versions
(interpreter_unusable). Triton 3.7 on runs them with numpy 2.4; Triton 3.6 with numpy < 2.4.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

RESULTS_ENV = 'FM_PYTEST_CHILD_RESULTS'   # set in a child: where it writes its outcomes
_RESULTS = {}                              # in a child: node id -> {'outcome', 'text', 'stdout'}
MODES = ('interpreter', 'compiler')


def pytest_configure(config):
    config.addinivalue_line('markers', "triton_mode(mode): the Triton mode the module needs, "
                                       "'interpreter' (TRITON_INTERPRET=1) or 'compiler'")
    config._fm_child_runs = {}           # module path -> {nodeid: outcome}
    config._fm_proxied = {}              # module path -> [nodeids to run in a child]


def process_mode():
    """The mode triton was imported in here (importing it now if no test module did)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return 'interpreter' if isinstance(tl.sum, InterpretedFunction) else 'compiler'


def _version(dist):
    from importlib.metadata import version
    v = version(dist)
    return v, tuple(int(n) for n in re.findall(r'\d+', v)[:2])


def interpreter_unusable():
    """Why Triton's interpreter cannot run the kernels with the installed versions, or None."""
    (triton_v, triton_n), (numpy_v, numpy_n) = _version('triton'), _version('numpy')
    if triton_n < (3, 7) and numpy_n >= (2, 4):
        return (f"triton {triton_v}'s interpreter fails under numpy {numpy_v} (int() of a size-1 array, "
                f"an error from numpy 2.4): run it with triton >= 3.7 or numpy < 2.4")
    return None


def wanted_mode(item):
    marker = item.get_closest_marker('triton_mode')
    if marker is None:
        return None
    assert marker.args and marker.args[0] in MODES, f"triton_mode takes one of {MODES}"
    return marker.args[0]


@pytest.hookimpl(trylast=True)          # after -k / -m deselection: a child runs only what was selected
def pytest_collection_modifyitems(config, items):
    modes = {id(item): wanted_mode(item) for item in items}
    if not any(modes.values()):
        return
    here = process_mode()
    unusable = interpreter_unusable()
    for item in items:
        mode = modes[id(item)]
        if mode == 'interpreter' and unusable:
            item.add_marker(pytest.mark.skip(reason=unusable))
            continue
        if mode is None or mode == here:
            continue
        if os.environ.get(RESULTS_ENV):
            raise pytest.UsageError(f"{item.nodeid} needs Triton's {mode} mode, but this child process "
                                    f"runs the {here} (was triton imported before the mode was set?)")
        item._fm_proxy_mode = mode
        config._fm_proxied.setdefault(str(item.path), []).append(item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    mode = getattr(pyfuncitem, '_fm_proxy_mode', None)
    if mode is None:
        return None
    config = pyfuncitem.config
    path = str(pyfuncitem.path)
    if path not in config._fm_child_runs:
        config._fm_child_runs[path] = run_child(config, path, mode)
    outcomes, tail = config._fm_child_runs[path]
    got = outcomes.get(pyfuncitem.nodeid)
    if got is None:
        pytest.fail(f"the {mode}-mode child process did not report this test; its output ends:\n{tail}",
                    pytrace=False)
    if got['stdout']:
        sys.stdout.write(got['stdout'])
    if got['outcome'] == 'skipped':
        pytest.skip(f"(in the {mode}-mode child) {got['text']}")
    if got['outcome'] != 'passed':
        pytest.fail(f"failed in the {mode}-mode child process:\n{got['text']}", pytrace=False)
    return True


def run_child(config, path, mode):
    """Run this module's selected tests in a fresh pytest process in `mode`; their outcomes by node id."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    if mode == 'interpreter':
        env['TRITON_INTERPRET'] = '1'
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'results.json')
        env[RESULTS_ENV] = out
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *config._fm_proxied[path]]
        r = subprocess.run(cmd, cwd=str(config.rootpath), env=env, capture_output=True, text=True)
        tail = (r.stdout[-3000:] + r.stderr[-2000:]).strip()
        try:
            with open(out) as f:
                return json.load(f), tail
        except (OSError, ValueError):
            return {}, tail


# --- in a child: record each test's outcome for the parent -------------------

def pytest_runtest_logreport(report):
    if not os.environ.get(RESULTS_ENV):
        return
    entry = _RESULTS.setdefault(report.nodeid, {'outcome': 'passed', 'text': '', 'stdout': ''})
    if report.when == 'call':
        entry['stdout'] = report.capstdout
    if report.failed:
        entry.update(outcome='failed', text=report.longreprtext[-6000:])
    elif report.skipped and entry['outcome'] == 'passed':
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry.update(outcome='skipped', text=reason)


def pytest_sessionfinish(session):
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, 'w') as f:
            json.dump(_RESULTS, f)


class _NaNEmptyTorch:
    """torch, except that torch.empty is filled with NaN: kernels.py's view of torch while a test runs."""
    def __getattr__(self, name):
        import torch
        return getattr(torch, name)

    @staticmethod
    def empty(*size, **kw):
        import torch
        t = torch.empty(*size, **kw)
        return t.fill_(float('nan')) if t.is_floating_point() else t


@pytest.fixture
def poisoned_empty():
    """Every buffer kernels.py allocates (outputs, partial sums, states) starts as NaN, so an
    element a kernel fails to write fails the test. (kernels is imported here, not at the top:
    triton's mode is fixed when it is first imported.) Restored in this fixture's own teardown,
    not through monkeypatch, so a failing undo of another patch cannot leave it poisoned for the
    tests that follow."""
    import kernels
    saved = kernels.torch
    kernels.torch = _NaNEmptyTorch()
    try:
        yield
    finally:
        kernels.torch = saved


@pytest.fixture
def scaled_model():
    """A factory: cfg -> LM(cfg) in eval mode, seeded, with weights larger than the init (std 0.3
    on every matrix), so every mixer moves the logits a lot and a decode-vs-forward check is not
    vacuous."""
    import torch
    from model import LM

    def make(cfg, seed=0):
        torch.manual_seed(seed)
        model = LM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3)
        return model
    return make
