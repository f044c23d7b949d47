"""
Benchmarks, each printing its ratios side by side from one run.

    python -m experiments.bench scan [--device=auto] [--B=4 --T=2048 --H=4 --M=64 --P=64] [--dtype=float32|bfloat16]
                         [--ssd_minimal=PATH] [--naive=False] [--json=PATH]
        the scans, forward and forward+backward: naive (the recurrence) vs chunked with per-slot
        decay (FM) vs chunked with scalar decay (Mamba-2); with --ssd_minimal=PATH also Mamba-2's
        minimal SSD listing (state-spaces/mamba's mamba_ssm/modules/ssd_minimal.py, needs einops);
        on CUDA also Triton, and fla's chunk_gla and mamba_ssm's mamba_chunk_scan_combined if installed,
        and (--impls=variants) ours on factored gates, at twice the chunk, with one reverse sweep.
        --bytes=True [--layer=True] [--bytes_before=REV]: no timing, the HBM bytes a Triton fwd+bwd
        moves (of one fm_sparse training layer with --layer), counted without a GPU.

    python -m experiments.bench train [--shapes=256x16,2048x2,4096x1] [--compile=True] [--json=PATH]
        ms per training step (forward, backward, AdamW step; float32) of the shakespeare_char models
        (fm, fm_sparse, mamba2 at 4 x 128; attention at 5 x 128: equal parameters), side by side,
        and each one's ratio to attention, at each T x batch.

    python -m experiments.bench decode [--device=cpu] [--contexts=1024,8192,16384] [--json=PATH] [--table=PATH]
                         [--mode=auto|eager|static|graph] [--compile=False] [--batch_size=1]
        per-token decode latency (median over --tokens steps after --warmup steps) and decoding
        state bytes (recurrent state, or attention's KV cache) at each context position, for
        fm, fm_sparse, mamba2 and attention at equal width; then the step cost of sparse vs
        dense FM as n_slots grows (--slots=64,...,4096, --slot_top_k=16), for the whole layer
        step and for the scan step alone (the model's steps: scan.scan_step vs
        scan.scan_step_sparse on CPU, the Triton steps on CUDA), with the GB/s each achieves on
        the state rows it must read and write (batch_size x dense m, sparse k rows of P per head).
        --mode: eager times LM.step (growing KV cache); static LM.static_step + greedy sampling on
        static buffers (model.Decoder); graph replays that step as a CUDA graph (and the slot
        steps too); auto = graph on CUDA, else eager. --compile: torch.compile the static step.

Options are --key=value (`python -m experiments.bench train --help` lists them). The model sizes default to
model.ModelConfig's. Timings on a shared CPU are noisy: compare numbers from one run.
"""
if __name__ == '__main__' and not __package__:   # run as a module, so that the core imports
    raise SystemExit('run it from the repo root as a module: python -m experiments.bench ...')
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

import scan
from common import REPO_DIR, ints, load_checkpoint, model_from_checkpoint, parse_config, read_config_file
from model import ModelConfig


def timed(fn, repeats, device, warmup=1):
    """Median wall time (s) of fn() over `repeats` runs after `warmup` runs, and peak CUDA memory."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else None
    return sorted(times)[len(times) // 2], peak


# -----------------------------------------------------------------------------
# bench.py scan

@dataclass
class ScanBench:
    device: str = 'auto'
    B: int = 4
    T: int = 2048
    H: int = 4
    M: int = ModelConfig.n_slots
    P: int = ModelConfig.head_dim
    chunk_size: int = ModelConfig.chunk_size
    dtype: str = 'float32'               # x, beta, q (and y); the log-decays g stay float32
    repeats: int = 3
    naive: bool = True                   # time the step-by-step recurrence too (slow at large T)
    ssd_minimal: str = ''                # path to state-spaces/mamba's mamba_ssm/modules/ssd_minimal.py:
                                         # its ssd_minimal_discrete is timed beside the scalar-decay path
    threads: int = 0                     # torch CPU threads; 0 = torch's default
    impls: str = ''                      # only these: comma-separated names, or the groups 'ours', 'peers',
                                         # 'triton' (both Triton rows), 'variants' (ours: factored, at twice
                                         # the chunk, the reverse sweep as one launch); all if empty
    bytes: bool = False                  # instead of timing: count the HBM bytes one Triton fwd+bwd allocates and
                                         # moves (hbm_bytes; no GPU needed, no kernel runs)
    bytes_before: str = ''               # with --bytes: also kernels.py as of this git revision, side by side
    layer: bool = False                  # with --bytes: one whole fm_sparse training layer instead (layer_bytes),
                                         # per-head gates vs factored, at the GPU config, T = 1024 and 8192
    json: str = ''                       # write the rows here (a list of objects), rewritten after each row


OURS = ['naive', 'chunked', 'chunked, scalar decay', 'triton', 'triton, scalar decay']
PEERS = ['fla chunk_gla', 'mamba_chunk_scan_combined', 'ssd_minimal (Mamba-2 listing)']
VARIANTS = ('triton, factored', 'triton, chunk ', 'triton, one reverse sweep')   # name prefixes


def load_ssd_minimal(path):
    """ssd_minimal_discrete from Mamba-2's minimal listing (a file of state-spaces/mamba, not part of
    this repo). Its top-level import of mamba_ssm's Triton kernel is skipped when mamba_ssm is missing."""
    try:
        src = open(path).read()
    except OSError as e:
        sys.exit(f"bench.py scan: --ssd_minimal={path}: {e.strerror}; give the path of mamba_ssm/modules/ssd_minimal.py")
    ns = {}
    try:
        exec(compile(src, path, 'exec'), ns)
    except ImportError as e:
        if 'einops' in str(e):
            sys.exit("bench.py scan: ssd_minimal.py needs einops: pip install einops")
        ns = {}
        exec(compile('\n'.join('' if l.startswith('from mamba_ssm') else l for l in src.splitlines()), path, 'exec'), ns)
    if 'ssd_minimal_discrete' not in ns:
        sys.exit(f"bench.py scan: {path} has no ssd_minimal_discrete")
    return ns['ssd_minimal_discrete']


def one_sweep(x, g, beta, q, chunk_size):
    """scan_triton with the backward's reverse sweep as one launch (dx and dbeta together): the
    flag is read when the backward launches, right after this returns in bench_scan, which sets
    it back before every other contender."""
    import kernels
    kernels.SPLIT_SWEEP = False
    return kernels.scan_triton(x, g, beta, q, chunk_size=chunk_size)


def contenders(cfg, device):
    """The scans to time (not a dispatcher: model.scan_impls picks the one a model runs):
    {name: (decay kind, fn(x, g, beta, q) -> (y, state))}; 'slot' takes per-slot g (B,T,H,M) (FM),
    'scalar' one decay per head, g (B,T,H,1) (Mamba-2), 'shared' the gates of one head, (B,T,M)
    fp32, for all (the paper formulation's factored scan)."""
    C = cfg.chunk_size
    chunked = lambda x, g, beta, q: scan.scan_chunked(x, g, beta, q, chunk_size=C)
    impls = {}
    if cfg.naive:
        impls['naive'] = ('slot', scan.scan_naive)
    impls['chunked'] = ('slot', chunked)
    impls['chunked, scalar decay'] = ('scalar', chunked)
    if cfg.ssd_minimal and cfg.T % C:
        print(f"ssd_minimal skipped: it needs T a multiple of chunk_size={C}")
    elif cfg.ssd_minimal:
        ssd = load_ssd_minimal(cfg.ssd_minimal)
        impls['ssd_minimal (Mamba-2 listing)'] = ('scalar', lambda x, g, beta, q: ssd(
            x, g[..., 0].to(x.dtype), beta.to(x.dtype), q.to(x.dtype), C))
    if device.type == 'cuda':
        import kernels
        impls['triton'] = ('slot', lambda x, g, beta, q: kernels.scan_triton(x, g, beta, q, chunk_size=C))
        impls['triton, scalar decay'] = ('scalar', impls['triton'][1])
        # variants, timed after the peers: the model's factored entry (here the paper's gates,
        # one (B,T,M) set shared by the heads, no Delta or A), and twice the chunk (the state
        # bytes halve: bench.py scan --bytes --layer --chunk_size=128)
        impls['triton, factored'] = ('shared', lambda x, gw, bw, q: kernels.scan_factored(
            x, gw, bw, q, None, None, chunk_size=C))
        impls[f'triton, chunk {2 * C}'] = ('slot', lambda x, g, beta, q: kernels.scan_triton(
            x, g, beta, q, chunk_size=2 * C))
        impls['triton, one reverse sweep'] = ('slot', lambda x, g, beta, q: one_sweep(x, g, beta, q, C))
        try:  # fla's GLA kernel computes the same recurrence (q = q, k = beta, v = x, gk = g, scale 1)
            from fla.ops.gla import chunk_gla
            impls['fla chunk_gla'] = ('slot', lambda x, g, beta, q: chunk_gla(
                q.to(x.dtype), beta.to(x.dtype), x, g, scale=1.0, output_final_state=True))
        except ImportError:
            pass
        try:  # Mamba-2's fused kernel, scalar decay: g = dt * A with A = -1, one group (B, C shared by heads)
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
            A = -torch.ones(cfg.H, device=device)
            impls['mamba_chunk_scan_combined'] = ('scalar', lambda x, g, beta, q: mamba_chunk_scan_combined(
                x, -g[..., 0], A, beta[:, :, :1].to(x.dtype), q[:, :, :1].to(x.dtype), C,
                return_final_states=True))
        except ImportError:
            pass
    return impls


def pick_device(name, bench):
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit(f"bench.py {bench}: --device=cuda but CUDA is not available here; use --device=cpu (or auto)")
    return device


def set_threads(n):
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def write_json(path, rows):
    """rows as a JSON list at path, replaced atomically (a reader or a kill never sees half a file)."""
    if path:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.part', 'w') as f:
            json.dump(rows, f, indent=1)
        os.replace(path + '.part', path)


class Rows(list):
    """The rows of one benchmark: each append rewrites the JSON file (--json), so a run stopped
    by a timeout keeps every row it finished. extra: fields added to every row."""
    def __init__(self, path, **extra):
        super().__init__()
        self.path, self.extra = path, extra

    def append(self, row):
        super().append({**row, **self.extra})
        write_json(self.path, self)


def load_kernels_at(rev):
    """kernels.py as of git revision rev, imported as its own module (for --bytes_before)."""
    import importlib.util
    import subprocess
    import tempfile
    src = subprocess.run(['git', '-C', REPO_DIR, 'show', f'{rev}:kernels.py'], capture_output=True, text=True)
    if src.returncode:
        sys.exit(f"bench.py scan: --bytes_before={rev}: {src.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(), f'kernels_{rev}.py')
    with open(path, 'w') as f:
        f.write(src.stdout)
    spec = importlib.util.spec_from_file_location(f'kernels_{rev}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unread_args(kernel, meta):
    """The pointer arguments a launch of kernels.py's `kernel` with constexprs `meta` does not
    touch (their flags off: any tensor is passed there), so not counted as moved."""
    unread = set()
    if not meta.get('HAS_D', True):
        unread.add('delta')
    if not meta.get('HAS_A', True):
        unread.add('A')
    if not meta.get('FACT', True):
        unread |= {'TotB', 'dgw', 'gsum', 'bsum'}
    elif kernel == '_chunk_dq_dg_bwd':
        unread.add('dbeta')
    if meta.get('DBETA') is False:      # the reverse sweep's dx launch
        unread |= {'x', 'dbeta', 'TotB', 'dgw', 'gsum', 'bsum'}
    if meta.get('DX') is False:         # its dbeta launch (beta only for the factored sums)
        unread |= {'dx'} | (set() if meta.get('FACT') else {'beta'})
    return unread


def hbm_bytes(kmod, B, T, H, M, P, x_dtype, gate_dtype, broadcast, chunk_size=64, arch=90,
              factored=False):
    """The HBM bytes one fwd+bwd of kmod's scan_triton moves and allocates, counted without a GPU:
    the autograd.Function's forward and backward run on CPU tensors with the launches recorded,
    not run. Glue: every PyTorch op they call (TorchDispatchMode), bytes read (inputs, a broadcast
    view counted at its storage's size) + written (outputs), views free; allocated = new outputs.
    Kernels: each launch reads or writes each tensor argument once (the in-place states of the
    state pass twice), and a tensor without a slot axis (x, dy, y, dx) once per slot block; the
    diagonal blocks' re-reads of rows just loaded are taken as cache hits. A model, not a
    measurement: what a profiler would count on a GPU differs by caching and by partial lines.
    factored: kmod.scan_factored's glue instead (gates as (B,T,M) factors, delta (B,T,H), A (H));
    a factor row, read by the H programs of its token, is counted once (they run close together
    and the factors of a whole batch, 3 x (B,T,M) fp32, fit in L2)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    launches = []
    old_launch, old_req, old_arch = kmod._launch, kmod._require_runnable, getattr(kmod, '_arch', None)
    kmod._launch = lambda kernel, grid, *args, **meta: launches.append((kernel, grid, args, meta))
    kmod._require_runnable = lambda t: None
    if old_arch is not None:
        kmod._arch = lambda t: arch
    nbytes = lambda t: t.numel() * t.element_size()

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rw, self.alloc, self.ops = 0, 0, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._opname in ('empty', 'empty_like', 'empty_strided', 'detach', 'alias') or func.is_view:
                new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                if func._opname.startswith('empty'):
                    self.alloc += sum(nbytes(t) for t in new)
                return out
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            ptrs = {t.untyped_storage().data_ptr() for t in ins}
            read = sum(min(nbytes(t), t.untyped_storage().nbytes()) for t in ins)
            written = sum(nbytes(t) for t in outs)
            self.alloc += sum(nbytes(t) for t in outs if t.untyped_storage().data_ptr() not in ptrs)
            self.rw += read + written
            self.ops[func._opname] = self.ops.get(func._opname, 0) + read + written
            return out

    class Ctx:
        def save_for_backward(self, *t):
            self.saved_tensors = t

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, P, generator=gen).to(x_dtype)
    g = -torch.rand(B, T, H, 1 if broadcast else M, generator=gen).to(gate_dtype)
    beta, q = (torch.rand(B, T, H, M, generator=gen).to(gate_dtype) for _ in range(2))
    S0 = torch.randn(B, H, M, P, generator=gen)
    dy, dS = torch.randn(B, T, H, P, generator=gen).to(x_dtype), torch.randn(B, H, M, P, generator=gen)
    if factored:
        gw = -torch.rand(B, T, 1 if broadcast else M, generator=gen)
        bw, qw, delta = torch.rand(B, T, M), torch.rand(B, T, M), torch.rand(B, T, H)
        A = -torch.rand(H)
        g = beta = q = None
    count, ctx = Count(), Ctx()
    try:
        with count:
            if hasattr(kmod, '_ScanTriton'):        # kernels.py before the custom ops
                kmod._ScanTriton.forward(ctx, x, g, beta, q, S0, chunk_size)
                n_fwd = len(launches)
                kmod._ScanTriton.backward(ctx, dy, dS)
            elif factored:
                f = dict(A=A, delta=delta, factored=True)
                _, _, S_in, Gc = kmod._scan_fwd(x, gw, bw, qw, S0, chunk_size, **f)
                n_fwd = len(launches)
                kmod._scan_bwd(x, gw, bw, qw, S_in, Gc, dy, dS, chunk_size, **f)
            else:                                   # the ops' real implementations
                _, _, S_in, Gc = kmod._scan_fwd(x, g, beta, q, S0, chunk_size)
                n_fwd = len(launches)
                kmod._scan_bwd(x, g, beta, q, S_in, Gc, dy, dS, chunk_size)
    finally:
        kmod._launch, kmod._require_runnable = old_launch, old_req
        if old_arch is not None:
            kmod._arch = old_arch
    per_kernel = {}
    for i, (kernel, grid, args, meta) in enumerate(launches):
        names = kernel.arg_names
        nb = grid[2] if len(grid) == 3 else 1
        moved = 0
        for name, a in zip(names, args):
            if isinstance(a, torch.Tensor) and name not in unread_args(kernel.__name__, meta):
                times = 2 if (kernel.__name__ == '_state_pass' and name == 'states') else 1
                if kernel.__name__ == '_state_pass' and name == 'G':     # (before) reads chunk ends only
                    times = 1 / meta['C']
                moved += int(times * nbytes(a)) * (nb if name in ('x', 'u', 'dy', 'y', 'dx') else 1)
        part = {(True, False): ' (dx)', (False, True): ' (dbeta)'}.get((meta.get('DX'), meta.get('DBETA')), '')
        key = f"{'fwd' if i < n_fwd else 'bwd'} {kernel.__name__}{' reverse' if meta.get('REVERSE') else ''}{part}"
        per_kernel[key] = per_kernel.get(key, 0) + moved
    kernel_bytes = sum(per_kernel.values())
    return dict(glue_moved_bytes=count.rw, glue_allocated_bytes=count.alloc, kernel_moved_bytes=kernel_bytes,
                total_moved_bytes=count.rw + kernel_bytes, launches=len(launches),
                glue_ops={k: v for k, v in sorted(count.ops.items(), key=lambda kv: -kv[1])}, kernels=per_kernel)


def bench_bytes(cfg):
    """bench.py scan --bytes: hbm_bytes for kernels.py (and kernels.py at --bytes_before) at the shape."""
    import kernels
    mods = {'now': kernels}
    if cfg.bytes_before:
        mods = {f'before ({cfg.bytes_before})': load_kernels_at(cfg.bytes_before), **mods}
    dtype = getattr(torch, cfg.dtype)
    cases = [('slot decay, all ' + cfg.dtype, dtype, dtype, False),
             ('slot decay, bf16 x, fp32 gates (autocast)', torch.bfloat16, torch.float32, False),
             ('broadcast g (B,T,H,1), bf16 x, fp32 gates', torch.bfloat16, torch.float32, True)]
    rows = Rows(cfg.json)
    B, T, H, M, P = cfg.B, cfg.T, cfg.H, cfg.M, cfg.P
    print(f"HBM bytes of one scan_triton fwd+bwd, B={B} T={T} H={H} M={M} P={P} chunk {cfg.chunk_size} "
          f"(sm_90 tiles; a model: see hbm_bytes)\n")
    print("| case | kernels.py | glue moved MB | glue allocated MB | kernels moved MB | total moved MB | launches |")
    print("|---|---|---|---|---|---|---|")
    for case, xd, gd, bc in cases:
        for name, mod in mods.items():
            r = hbm_bytes(mod, B, T, H, M, P, xd, gd, bc, cfg.chunk_size)
            rows.append({'bench': 'hbm_bytes', 'case': case, 'kernels': name, 'B': B, 'T': T, 'H': H, 'M': M,
                         'P': P, 'chunk_size': cfg.chunk_size, **r})
            print(f"| {case} | {name} | {r['glue_moved_bytes'] / 1e6:.0f} | {r['glue_allocated_bytes'] / 1e6:.0f} | "
                  f"{r['kernel_moved_bytes'] / 1e6:.0f} | {r['total_moved_bytes'] / 1e6:.0f} | {r['launches']} |",
                  flush=True)
    return rows


def layer_bytes(T, factored, tokens=16384, D=384, H=12, M=64, P=64, k=8, chunk_size=64,
                kmod=None):
    """HBM bytes of one fm_sparse training layer, in_proj to out_proj, forward and backward, at
    the GPU config (6 x 384: d_inner E = H*P = 768, Δ per head, bf16 activations, fp32 gates),
    B = tokens / T sequences. Per-head gates: the layer builds g, beta, q_read (B,T,H,M) fp32 and
    scan_triton returns their gradients, which autograd sums over the heads; factored: it builds
    w, q (B,T,M) and Δ (B,T,H), and scan_factored does the rest. A model, not a measurement:
    each op below is one kernel (the elementwise chains fused, as torch.compile does) that reads
    its inputs and writes its outputs once; the scan is hbm_bytes (its kernels and glue) of
    kmod (kernels.py, or a module of it at another revision: load_kernels_at).
    Returns {op: bytes} and the total."""
    import kernels
    N, E, bf, f4 = tokens, H * P, 2, 4
    C = 2 * E + 2 * M + H                      # in_proj's outputs z, x, r, q, dt
    X = E + 2 * M                              # the conv's channels x, r, q
    HM = H * M if not factored else M          # the gates' width per token
    gate_out = (3 * HM if not factored else 2 * M + H) * f4    # g, beta, q_read | w, q, Δ
    gate_grad = (3 * HM if not factored else 2 * M + H) * f4   # their gradients, read back
    ops = {
        'fwd in_proj': N * (D + C) * bf + D * C * bf,
        'fwd conv': N * 2 * X * bf,
        'fwd gates (silu x; router top-k, softplus Δ, gates)': N * (2 * E + 2 * M + H) * bf
                                                               + N * gate_out,
        'fwd out (y + D x, * silu z, RMSNorm)': N * 4 * E * bf,
        'fwd out_proj': N * (E + D) * bf + E * D * bf,
        'bwd out_proj': N * (D + E + E) * bf + E * D * (bf + f4),
        'bwd out (RMSNorm, gate, skip)': N * 7 * E * bf,
        'bwd gates (-> dr, dq, ddt; silu x)': N * gate_grad + N * (2 * M * (f4 + bf) + H * (f4 + bf))
                                            + N * 3 * E * bf + N * (2 * M + H) * bf,
        'bwd conv': N * 3 * X * bf,
        'bwd in_proj': N * (C + D + D) * bf + D * C * (bf + f4),
    }
    r = hbm_bytes(kmod or kernels, N // T, T, H, M, P, torch.bfloat16, torch.float32, False, chunk_size,
                  factored=factored)
    ops['scan fwd+bwd (kernels + glue)'] = r['total_moved_bytes']
    return ops, sum(ops.values())


def bench_layer(cfg):
    """bench.py scan --bytes --layer: layer_bytes with per-head gates (kernels.py at --bytes_before,
    the code before the gates were factored, or now) and with factored gates (now)."""
    rows = Rows(cfg.json)
    before = load_kernels_at(cfg.bytes_before) if cfg.bytes_before else None
    name_before = f"per-head (B,T,H,M) fp32, kernels.py at {cfg.bytes_before or 'HEAD'}"
    print("HBM bytes of one fm_sparse training layer (in_proj to out_proj, fwd+bwd), GPU config "
          "6x384: d_inner 768, H=12, M=64, P=64, bf16 activations, 16,384 tokens, chunk "
          f"{cfg.chunk_size} (a model: see layer_bytes)\n")
    print("| T | gates | scan MB | rest of the layer MB | layer MB | before / after |")
    print("|---|---|---|---|---|---|")
    for T in (1024, 8192):
        totals = {}
        for factored in (False, True):
            ops, total = layer_bytes(T, factored, chunk_size=cfg.chunk_size,
                                     kmod=None if factored else before)
            name = 'factored' if factored else name_before
            totals[factored] = total
            scan_b = ops['scan fwd+bwd (kernels + glue)']
            ratio = f"{totals[False] / total:.2f}x" if factored else ''
            print(f"| {T} | {name} | {scan_b / 1e6:.0f} | {(total - scan_b) / 1e6:.0f} | "
                  f"{total / 1e6:.0f} | {ratio} |", flush=True)
            rows.append({'bench': 'layer_bytes', 'T': T, 'B': 16384 // T, 'gates': name,
                         'tokens': 16384, 'n_embd': 384, 'd_inner': 768, 'H': 12, 'M': 64,
                         'P': 64, 'chunk_size': cfg.chunk_size, 'ops': ops,
                         'total_bytes': total})
    return rows


def bench_scan(cfg):
    if cfg.bytes and cfg.layer:
        return bench_layer(cfg)
    if cfg.bytes:
        return bench_bytes(cfg)
    device = pick_device(cfg.device, 'scan')
    if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"bench.py scan: --dtype={cfg.dtype} must be float32, bfloat16 or float16")
    dtype = getattr(torch, cfg.dtype)
    threads = set_threads(cfg.threads)
    gen = torch.Generator().manual_seed(0)
    B, T, H, M, P = cfg.B, cfg.T, cfg.H, cfg.M, cfg.P
    # gates as model.py builds them: w = softmax(r), g = Δ·A·w (per slot) or Δ·A (scalar), beta = Δ·w
    w = torch.randn(B, T, H, M, generator=gen).softmax(-1)
    dA = -torch.rand(B, T, H, 1, generator=gen)
    x = torch.randn(B, T, H, P, generator=gen)
    q = torch.randn(B, T, H, M, generator=gen)
    leaf = lambda t, dt: t.to(device, dt).requires_grad_()
    inputs = {'slot': [leaf(x, dtype), leaf(dA * w, torch.float32), leaf(w, dtype), leaf(q, dtype)],
              'scalar': [leaf(x, dtype), leaf(dA, torch.float32), leaf(w, dtype), leaf(q, dtype)],
              'shared': [leaf(x, dtype)] + [leaf(t[:, :, 0], torch.float32) for t in (dA * w, w, q)]}
    dy = torch.randn(B, T, H, P, generator=gen).to(device)
    print(f"scan benchmark on {device}, torch {torch.__version__}, {threads} threads", flush=True)

    rows = Rows(cfg.json)
    for name, (decay, fn) in pick_impls(contenders(cfg, device), cfg.impls).items():
        if 'kernels' in sys.modules:
            sys.modules['kernels'].SPLIT_SWEEP = True          # one_sweep's flag, reset
        args = inputs[decay]
        def fwd():
            with torch.no_grad():
                fn(*args)
        def fwd_bwd():   # a dense upstream gradient, as in training (the gradient of y.sum() is a
            y, S = fn(*args)   # stride-0 tensor, which sends some CPU matmuls down a per-matrix loop)
            ((y.float() * dy).sum() + S.float().sum()).backward()
        try:
            t_f, _ = timed(fwd, cfg.repeats, device)
            t_fb, mem = timed(fwd_bwd, cfg.repeats, device)
        except torch.OutOfMemoryError:   # the naive recurrence keeps T states for its backward
            print(f"  {name}: out of memory at these shapes, skipped (--naive=False leaves the naive scan out)")
            for t in args:
                t.grad = None
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            continue
        rows.append({'bench': 'scan', 'impl': name, 'decay': decay, 'fwd_ms': 1e3 * t_f, 'fwd_bwd_ms': 1e3 * t_fb,
                     'peak_mib': mem / 2**20 if mem is not None else None, 'B': B, 'T': T, 'H': H, 'M': M, 'P': P,
                     'chunk_size': cfg.chunk_size, 'dtype': cfg.dtype, 'device': str(device), 'threads': threads,
                     'torch': torch.__version__})
        print(f"  {name}: fwd {1e3 * t_f:.1f} ms, fwd+bwd {1e3 * t_fb:.1f} ms", flush=True)

    print(f"\nscan, B={B} T={T} H={H} M={M} P={P} chunk {cfg.chunk_size}, {cfg.dtype} on {device}, {threads} threads, "
          f"median of {cfg.repeats}; decay 'slot' = g (B,T,H,M) (FM), 'scalar' = g (B,T,H,1) (Mamba-2)\n")
    print("| scan | decay | fwd ms | fwd+bwd ms | fwd+bwd vs chunked, scalar decay | tokens/s fwd+bwd | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    ref = next((r['fwd_bwd_ms'] for r in rows if r['impl'] == 'chunked, scalar decay'), float('nan'))
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r['peak_mib'] is not None else "-"
        print(f"| {r['impl']} | {r['decay']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_ms'] / ref:.2f}x "
              f"| {B * T / r['fwd_bwd_ms'] * 1e3:,.0f} | {peak} |")
    return rows


def pick_impls(impls, spec):
    """The impls named in spec (comma-separated names, or the groups 'ours' and 'peers'); all if empty."""
    if not spec:
        return impls
    groups = {'ours': [n for n in impls if n in OURS], 'peers': [n for n in impls if n in PEERS],
              'triton': ['triton', 'triton, scalar decay'],
              'variants': [n for n in impls if n.startswith(VARIANTS)]}
    names = [n for part in spec.split(',') if part for n in groups.get(part, [part])]
    unknown = [n for n in names if n not in impls and n not in OURS + PEERS and not n.startswith(VARIANTS)]
    if unknown:
        sys.exit(f"bench.py scan: --impls: unknown {unknown}; known here: {list(impls)}, or 'ours', 'peers'")
    return {n: impls[n] for n in names if n in impls}


# -----------------------------------------------------------------------------
# bench.py train

@dataclass
class TrainBench:
    device: str = 'cpu'
    mixers: str = 'fm,fm_sparse,mamba2,attention'   # sizes from config/shakespeare_char_<mixer>.py
    shapes: str = '256x16,2048x2,4096x1'           # T x batch
    vocab_size: int = 65
    warmup: int = 2                      # steps before timing (the first compiles with --compile)
    repeats: int = 5                     # timed steps; the median is reported
    compile: bool = False                # torch.compile each model (compile time is reported)
    threads: int = 0                     # torch CPU threads; 0 = torch's default
    seed: int = 0
    json: str = ''


def train_models(cfg):
    """{mixer: ModelConfig kwargs}, the model of config/shakespeare_char_<mixer>.py (ModelConfig's
    defaults, 4 x 128, and 5 layers for attention: equal parameter counts)."""
    keys = ('n_layer', 'n_embd', 'n_head', 'n_slots', 'top_k', 'expand', 'head_dim', 'update_rate', 'chunk_size')
    out = {}
    for mixer in [m for m in cfg.mixers.split(',') if m]:
        path = os.path.join(REPO_DIR, 'config', f'shakespeare_char_{mixer}.py')
        if not os.path.exists(path):
            sys.exit(f"bench.py train: no config/shakespeare_char_{mixer}.py for --mixers={mixer}")
        values = read_config_file(path)
        out[mixer] = dict(mixer=mixer, **{k: values[k] for k in keys if k in values})
    return out


def bench_train(cfg):
    """ms per training step (forward, backward, AdamW step; float32) for each mixer at each (T, batch)."""
    from model import LM
    device = pick_device(cfg.device, 'train')
    threads = set_threads(cfg.threads)
    try:
        shapes = [tuple(int(v) for v in s.split('x')) for s in cfg.shapes.split(',') if s]
        assert shapes and all(len(s) == 2 and min(s) >= 1 for s in shapes)
    except (ValueError, AssertionError):
        sys.exit(f"bench.py train: --shapes={cfg.shapes!r} must be TxBATCH pairs, e.g. 256x16,4096x1")
    models = train_models(cfg)
    print(f"train-step benchmark on {device}, torch {torch.__version__}, {threads} threads, "
          f"compile={cfg.compile}", flush=True)
    rows = Rows(cfg.json)
    gen = torch.Generator().manual_seed(cfg.seed)
    for T, batch in shapes:
        idx = torch.randint(cfg.vocab_size, (batch, T + 1), generator=gen).to(device)
        x, y = idx[:, :-1], idx[:, 1:]
        steps, info = {}, {}
        for mixer, kw in models.items():
            torch.manual_seed(cfg.seed)
            model = LM(ModelConfig(vocab_size=cfg.vocab_size, block_size=T, dropout=0.0, **kw)).to(device)
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.type)
            run = torch.compile(model) if cfg.compile else model
            def step(run=run, opt=opt):
                _, loss = run(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(max(cfg.warmup, 1)):
                step()
            _sync(device)
            steps[mixer] = step
            info[mixer] = dict(warmup_s=time.perf_counter() - t0, params=model.get_num_params(),
                               n_layer=model.config.n_layer, n_embd=model.config.n_embd)
        # round-robin, one step of each model in turn: a burst of load on a shared machine
        # then slows all of them, not one, and the ratios hold
        times = {m: [] for m in steps}
        for _ in range(cfg.repeats):
            for mixer, step in steps.items():
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[mixer].append(time.perf_counter() - t0)
        for mixer in steps:
            ms = 1e3 * sorted(times[mixer])[len(times[mixer]) // 2]
            rows.append({'bench': 'train', 'mixer': mixer, 'T': T, 'batch_size': batch, 'ms_per_step': ms,
                         'tokens_per_s': batch * T / ms * 1e3, **info[mixer], 'compile': cfg.compile,
                         'device': str(device), 'threads': threads, 'torch': torch.__version__})
            print(f"  T={T:5d} batch {batch:2d} {mixer:9s}: {ms:8.1f} ms/step (warm-up {info[mixer]['warmup_s']:.1f} s)",
                  flush=True)
        del steps

    mixers = list(models)
    first = {m: next(r for r in rows if r['mixer'] == m) for m in mixers}
    print(f"\ntraining step (forward, backward, AdamW step), float32 on {device}, {threads} threads, "
          f"compile={cfg.compile}; median of {cfg.repeats} steps per model, taken in turn, after {cfg.warmup} warm-up "
          f"steps; models (" +
          ', '.join(f"{m} {first[m]['n_layer']}x{first[m]['n_embd']}, {first[m]['params'] / 1e6:.2f}M params"
                    for m in mixers) + ")\n")
    head = ['T', 'batch'] + [f"{m} ms" for m in mixers]
    if 'attention' in mixers:
        head += [f"{m} / attention" for m in mixers if m != 'attention']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    at = {(r['mixer'], r['T']): r for r in rows}
    for T, batch in shapes:
        cells = [str(T), str(batch)] + [f"{at[m, T]['ms_per_step']:.1f}" for m in mixers]
        if 'attention' in mixers:
            cells += [f"{at[m, T]['ms_per_step'] / at['attention', T]['ms_per_step']:.2f}x"
                      for m in mixers if m != 'attention']
        print('| ' + ' | '.join(cells) + ' |')
    if cfg.compile:
        print("\nwarm-up steps (the first compiles), s: " +
              ', '.join(f"{r['mixer']} T={r['T']} {r['warmup_s']:.1f}" for r in rows))
    return rows


# -----------------------------------------------------------------------------
# bench.py decode

@dataclass
class DecodeBench:
    device: str = 'cpu'
    contexts: str = '1024,8192,16384'    # positions at which one decoding step is timed
    mixers: str = 'fm,fm_sparse,mamba2,attention'
    # the model, equal width for every mixer (the tiny-Shakespeare configs' size by default)
    n_layer: int = ModelConfig.n_layer
    n_embd: int = ModelConfig.n_embd
    n_head: int = ModelConfig.n_head
    n_slots: int = ModelConfig.n_slots
    top_k: int = ModelConfig.top_k
    vocab_size: int = 65
    batch_size: int = 1
    warmup: int = 5                      # steps before timing (attention's cache grows here)
    tokens: int = 40                     # timed steps; the median is reported
    mode: str = 'auto'                   # eager | static | graph | auto (graph on CUDA, else eager)
    compile: bool = False                # torch.compile the static step (static, graph)
    # sparse vs dense step cost as n_slots grows
    slots: str = '64,128,256,512,1024,2048,4096'
    slot_top_k: int = 16
    slot_repeats: int = 50               # timed steps per point; the median is reported
    threads: int = 1                     # torch CPU threads; 0 = all cores. One by default: a decoding
                                         # step is many small ops, and on a busy machine a second thread
                                         # that is descheduled stalls every op it shares (~10 ms)
    seed: int = 0
    out_dirs: str = ''                   # instead of the size above: the models of these train.py
                                         # checkpoints (out_dir/ckpt.pt, comma-separated), trained weights
    json: str = ''                       # write the rows here (a list of objects), rewritten after each row
    table: str = ''                      # write the markdown tables here too


def _median_ms(fn, warmup, n, device):
    return 1e3 * timed(fn, n, device, warmup)[0]


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def decode_mode(cfg, device):
    mode = cfg.mode if cfg.mode != 'auto' else ('graph' if device.type == 'cuda' else 'eager')
    if mode not in ('eager', 'static', 'graph'):
        raise SystemExit(f"bench.py decode: --mode={cfg.mode!r} must be auto, eager, static or graph")
    if mode == 'graph' and device.type != 'cuda':
        raise SystemExit(f"bench.py decode: --mode=graph needs a CUDA device, not {device}")
    if cfg.compile and mode == 'eager':
        raise SystemExit("bench.py decode: --compile=True compiles the static step: --mode=static or graph")
    return mode


def graphed(fn, device):
    """fn captured in a CUDA graph (warmed up on a side stream first): its replay, one launch.
    For timing steps that update their buffers in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernels_per_step(fn, device):
    """What one call of fn costs in launches: CUDA kernels (and memcpys/memsets) on CUDA (torch.profiler);
    on CPU the aten ops that compute (views left out) it dispatches; None for compiled code on CPU,
    which a dispatch mode does not see into."""
    if device.type == 'cuda':
        from torch.profiler import ProfilerActivity, profile
        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def decode_context_rows(cfg, device, contexts, mixers, rows):
    """Prefill each model over `context` tokens with its parallel forward (the real cache:
    recurrent state, or a KV cache of that length), then time single decoding steps: LM.step
    (--mode=eager), or model.Decoder's static step with greedy sampling, run or replayed."""
    from model import LM, Decoder, ModelConfig
    mode = decode_mode(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    for mixer in mixers:
        torch.manual_seed(cfg.seed)
        if cfg.out_dirs:
            model = mixers[mixer].to(device).eval()
        else:
            mc = ModelConfig(vocab_size=cfg.vocab_size, block_size=max(contexts), n_layer=cfg.n_layer,
                             n_embd=cfg.n_embd, n_head=cfg.n_head, mixer=mixer, n_slots=cfg.n_slots,
                             top_k=cfg.top_k, dropout=0.0)
            model = LM(mc).to(device).eval()
        mc = model.config
        params = model.get_num_params()
        for ctx in contexts:
            idx = torch.randint(mc.vocab_size, (cfg.batch_size, ctx), generator=gen).to(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                _, caches = model.prefill(idx)
            _sync(device)
            prefill_s = time.perf_counter() - t0
            state_bytes = model.cache_bytes(caches)     # at position `ctx`, before decoding
            tok = torch.randint(mc.vocab_size, (cfg.batch_size,), generator=gen).to(device)

            if mode == 'eager':
                step = lambda: model.step(tok, caches)
                kernels = kernels_per_step(step, device)
            else:   # static buffers long enough for every step timed, warm-up and counted here
                dec = Decoder(model, cfg.batch_size, ctx + cfg.warmup + cfg.tokens + 5, device,
                              temperature=0, graph=mode == 'graph', compile=cfg.compile)
                dec.load(caches, tok, ctx)
                step = dec.advance
                compiled_cpu = cfg.compile and device.type != 'cuda'
                kernels = None if compiled_cpu else kernels_per_step(dec.step, device)
            ms = _median_ms(step, cfg.warmup, cfg.tokens, device)
            recurrent = mixer != 'attention'
            rows.append({'bench': 'context', 'mixer': mixer,
                         'n_slots': mc.n_slots if recurrent else None,
                         'top_k': mc.top_k if mixer == 'fm_sparse' else (mc.n_slots if recurrent else None),
                         'context': ctx, 'ms_per_token': ms, 'state_bytes': state_bytes,
                         'prefill_s': prefill_s, 'params': params, 'n_layer': mc.n_layer,
                         'n_embd': mc.n_embd, 'batch_size': cfg.batch_size,
                         'weights': 'trained' if cfg.out_dirs else 'random', 'mode': mode,
                         'compiled': cfg.compile, 'kernels_per_token': kernels})
            print(f"  {mixer:9s} context {ctx:6d}: {ms:7.3f} ms/token, state {state_bytes / 2**20:8.3f} MiB "
                  f"(prefill {prefill_s:.1f} s; {mode}, {kernels} kernels or ops per step)", flush=True)
            del caches, step
        del model
    return rows


def decode_slot_rows(cfg, device, slots, rows):
    """One layer's decoding step, fm (all m rows) vs fm_sparse (top_k rows), as m grows; and
    the scan step alone (the model's: scan.scan_step vs scan.scan_step_sparse on CPU, the Triton
    steps on CUDA), with --mode=graph each replayed as a CUDA graph. The memory is filled with
    random values (its size does not depend on the position, only on m). GB/s: the state rows a
    step must read and write, B·H·rows·P float32 each way, over its time."""
    from model import ModelConfig, RecurrentMixer, scan_impls
    k = cfg.slot_top_k
    B = cfg.batch_size
    mode = decode_mode(cfg, device)
    run = (lambda fn: graphed(fn, device)) if mode == 'graph' else (lambda fn: fn)
    mode = 'graph' if mode == 'graph' else 'eager'     # the slot steps have no static form
    for m in slots:
        for mixer in ('fm', 'fm_sparse'):
            torch.manual_seed(cfg.seed)
            mc = ModelConfig(vocab_size=cfg.vocab_size, n_layer=1, n_embd=cfg.n_embd, n_head=cfg.n_head,
                             mixer=mixer, n_slots=m, top_k=k if mixer == 'fm_sparse' else min(k, m - 1),
                             dropout=0.0)
            layer = RecurrentMixer(mc).to(device).eval()
            cache = layer.new_cache(B, device)
            cache.S.normal_()
            cache.conv.normal_()
            H, P = layer.H, layer.P
            u = torch.randn(B, cfg.n_embd, device=device)
            state_bytes = cache.S.numel() * cache.S.element_size() + cache.conv.numel() * cache.conv.element_size()

            ms_layer = _median_ms(run(lambda: layer.step(u, cache)), 3, cfg.slot_repeats, device)

            S = torch.randn(B, H, m, P, device=device)
            x = torch.randn(B, H, P, device=device)
            kk = m if mixer == 'fm' else k
            g = -torch.rand(B, H, kk, device=device) * 0.1
            beta, q = torch.rand(B, H, kk, device=device), torch.randn(B, H, kk, device=device)
            idx = torch.stack([torch.randperm(m, device=device)[:k] for _ in range(B)])
            _, dense_step, sparse_step = scan_impls(mc, device)
            if mixer == 'fm':
                scan_step = lambda: dense_step(S, x, g, beta, q)
            else:
                scan_step = lambda: sparse_step(S, x, g, beta, q, idx)
            ms_scan = _median_ms(run(scan_step), 3, cfg.slot_repeats, device)
            touched = B * H * kk * P * 4     # float32 state bytes read (and written) per token
            for part, ms in (('layer', ms_layer), ('scan', ms_scan)):
                rows.append({'bench': 'slots', 'part': part, 'mixer': mixer, 'n_slots': m,
                             'top_k': k if mixer == 'fm_sparse' else m, 'context': None,
                             'ms_per_token': ms, 'state_bytes': state_bytes, 'state_bytes_touched': touched,
                             'gb_per_s': 2 * touched / (ms * 1e-3) / 1e9, 'mode': mode,
                             'in_proj_bytes': layer.in_proj.weight.numel() * 4,
                             'n_embd': cfg.n_embd, 'batch_size': B})
            print(f"  {mixer:9s} n_slots {m:5d}: layer step {ms_layer:7.3f} ms, scan step {ms_scan:7.3f} ms "
                  f"({2 * touched / (ms_scan * 1e-3) / 1e9:.2f} GB/s of state rows)", flush=True)
            del S, cache
    return rows


def _mode_phrase(row):
    mode = row.get('mode', 'eager')
    return {'eager': "LM.step (eager, growing KV cache)",
            'static': "LM.static_step + greedy sampling on static buffers, eager",
            'graph': "LM.static_step + greedy sampling replayed as one CUDA graph"}[mode] + \
        (", compiled" if row.get('compiled') else "")


def _mib(b):
    return f"{b / 2**20:.3f}" if b < 2**20 else f"{b / 2**20:.1f}"


def decode_tables(rows, cfg, threads, device):
    ctx_rows = [r for r in rows if r['bench'] == 'context']
    slot_rows = [r for r in rows if r['bench'] == 'slots']
    out = []
    targets = []
    if ctx_rows:
        mixers = list(dict.fromkeys(r['mixer'] for r in ctx_rows))
        contexts = sorted({r['context'] for r in ctx_rows})
        at = {(r['mixer'], r['context']): r for r in ctx_rows}
        first = {m: next(r for r in ctx_rows if r['mixer'] == m) for m in mixers}
        sr = first.get('fm_sparse') or next(iter(first.values()))
        out.append(f"decode, one token at a time, batch {cfg.batch_size}, models (" +
                   ', '.join(f"{m} {r['n_layer']}x{r['n_embd']}, {r['params'] / 1e6:.2f}M params"
                             for m, r in first.items()) +
                   f"), n_slots {sr['n_slots']}, top_k {sr['top_k']}, float32 on {device}, {threads} threads; "
                   f"{_mode_phrase(sr)}; "
                   f"median of {cfg.tokens} steps after {cfg.warmup} warm-up steps; each model prefilled over "
                   f"the whole context with its parallel forward (random token ids, "
                   f"{sr['weights']} weights), so the state or KV cache is the real one at that position.\n")
        head = ['context'] + [f"{m} ms/token" for m in mixers]
        if 'attention' in mixers:
            head += [f"attention / {m}" for m in mixers if m != 'attention']
        head += [f"{m} state MiB" for m in mixers]
        head += [f"{m} kernels/token" for m in mixers]
        out.append('| ' + ' | '.join(head) + ' |')
        out.append('|' + '---|' * len(head))
        for c in contexts:
            cells = [str(c)] + [f"{at[m, c]['ms_per_token']:.3f}" for m in mixers]
            if 'attention' in mixers:
                cells += [f"{at['attention', c]['ms_per_token'] / at[m, c]['ms_per_token']:.2f}x"
                          for m in mixers if m != 'attention']
            cells += [_mib(at[m, c]['state_bytes']) for m in mixers]
            cells += [str(at[m, c].get('kernels_per_token')) for m in mixers]
            out.append('| ' + ' | '.join(cells) + ' |')
        lo, hi = contexts[0], contexts[-1]
        if 'fm_sparse' in mixers and hi > lo:
            r = at['fm_sparse', hi]['ms_per_token'] / at['fm_sparse', lo]['ms_per_token']
            targets.append((f"fm_sparse per-token time at {hi} within 1.2x of {lo}", f"{r:.2f}x", r <= 1.2))
        if 'fm_sparse' in mixers and 'attention' in mixers:
            r = at['attention', hi]['ms_per_token'] / at['fm_sparse', hi]['ms_per_token']
            targets.append((f"attention per-token time at {hi} >= 4x fm_sparse", f"{r:.2f}x", r >= 4))
        if 'attention' in mixers:
            for m in mixers:
                if m in ('fm', 'fm_sparse'):
                    r = at[m, hi]['state_bytes'] / at['attention', hi]['state_bytes']
                    targets.append((f"{m} state <= 1/10 of attention's KV cache at {hi}", f"1/{1 / r:.0f}", r <= 0.1))
    if slot_rows:
        at = {(r['part'], r['mixer'], r['n_slots']): r for r in slot_rows}
        slots = sorted({r['n_slots'] for r in slot_rows})
        k = cfg.slot_top_k
        out.append(f"\nsparse vs dense FM, one layer's decoding step (n_embd {cfg.n_embd}, expand 2, head_dim 64, "
                   f"batch {cfg.batch_size}) as n_slots grows, top_k {k}; median of {cfg.slot_repeats} steps, "
                   f"memory filled with random values, {slot_rows[0].get('mode', 'eager')} steps. "
                   f"'layer' = in_proj, conv, routing, scan step, out_proj; 'scan' = the dense step (all m rows) "
                   f"vs the sparse one (k rows); GB/s = the state rows read and written (2 x the KiB touched) "
                   f"over the scan step's time.\n")
        head = ['n_slots', 'fm layer ms', 'fm_sparse layer ms', 'layer speedup', 'fm scan ms',
                'fm_sparse scan ms', 'scan speedup', 'state KiB touched fm / fm_sparse',
                'scan GB/s fm / fm_sparse', 'in_proj KiB']
        out.append('| ' + ' | '.join(head) + ' |')
        out.append('|' + '---|' * len(head))
        for m in slots:
            d, s = at['layer', 'fm', m], at['layer', 'fm_sparse', m]
            ds, ss = at['scan', 'fm', m], at['scan', 'fm_sparse', m]
            out.append(f"| {m} | {d['ms_per_token']:.3f} | {s['ms_per_token']:.3f} | "
                       f"{d['ms_per_token'] / s['ms_per_token']:.1f}x | {ds['ms_per_token']:.3f} | "
                       f"{ss['ms_per_token']:.3f} | {ds['ms_per_token'] / ss['ms_per_token']:.1f}x | "
                       f"{d['state_bytes_touched'] / 1024:.0f} / {s['state_bytes_touched'] / 1024:.0f} | "
                       f"{ds['gb_per_s']:.2f} / {ss['gb_per_s']:.2f} | "
                       f"{d['in_proj_bytes'] / 1024:.0f} |")
        m = 1024 if 1024 in slots else slots[-1]
        for part in ('layer', 'scan'):
            r = at[part, 'fm', m]['ms_per_token'] / at[part, 'fm_sparse', m]['ms_per_token']
            targets.append((f"fm_sparse {part} step at m={m}, k={k} >= 8x faster than fm", f"{r:.1f}x", r >= 8))
    if targets:
        out.append("\n| target | measured | met |\n|---|---|---|")
        for name, val, ok in targets:
            out.append(f"| {name} | {val} | {'yes' if ok else 'NO'} |")
    return '\n'.join(out) + '\n'


def bench_decode(cfg):
    device = pick_device(cfg.device, 'decode')
    threads = set_threads(cfg.threads)
    contexts = ints(cfg.contexts, 'contexts', 'bench.py decode')
    mixers = [m for m in cfg.mixers.split(',') if m]
    if cfg.out_dirs:   # trained models instead: {mixer: LM}
        models = [model_from_checkpoint(load_checkpoint(os.path.join(d, 'ckpt.pt')), 'cpu', dropout=0.0)
                  for d in cfg.out_dirs.split(',') if d]
        mixers = {m.config.mixer: m for m in models}
    slots = ints(cfg.slots, 'slots', 'bench.py decode')
    print(f"decode benchmark on {device}, torch {torch.__version__}, {threads} threads", flush=True)
    rows = Rows(cfg.json, device=str(device), threads=threads)     # rewritten after each row
    with torch.no_grad():
        if contexts and mixers:
            decode_context_rows(cfg, device, contexts, mixers, rows)
        if slots:
            decode_slot_rows(cfg, device, slots, rows)
    table = decode_tables(rows, cfg, threads, device)
    print('\n' + table)
    for path, write in ((cfg.table, lambda f: f.write(table)),):
        if path:
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'w') as f:
                write(f)
    return rows


BENCHES = {'scan': (ScanBench, bench_scan), 'decode': (DecodeBench, bench_decode), 'train': (TrainBench, bench_train)}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(f"usage: python -m experiments.bench {{{'|'.join(BENCHES)}}} [--key=value ...]")
    cls, run = BENCHES[sys.argv[1]]
    cfg = cls()
    parse_config(cfg, sys.argv[2:], prog=f'bench.py {sys.argv[1]}')
    run(cfg)
