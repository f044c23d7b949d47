"""
Benchmarks, each printing its ratios side by side from one run.

    python bench.py scan [--device=cpu] [--B=4 --T=2048 --H=4 --M=64 --P=64 --repeats=3]
        naive vs chunked (vs Triton on CUDA, and fla's chunk_gla if installed),
        forward and forward+backward.
"""
import sys
import time
from dataclasses import dataclass

import torch

import scan as fm_scan


def timed(fn, repeats, device):
    """Median wall time of fn() over `repeats` runs after one warm-up, and peak CUDA memory."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
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
    M: int = 64
    P: int = 64
    chunk_size: int = 64
    dtype: str = 'float32'
    repeats: int = 3


def scan_impls(device):
    impls = {'naive': fm_scan.scan_naive, 'chunked': fm_scan.scan_chunked}
    if device.type == 'cuda':
        import kernels
        impls['triton'] = kernels.scan_triton
        try:  # fla's GLA kernel computes the same recurrence; never a requirement
            from fla.ops.gla import chunk_gla
            impls['fla chunk_gla'] = lambda x, g, beta, q: chunk_gla(
                q, beta, x, g, scale=1.0, output_final_state=True)
        except ImportError:
            pass
    return impls


def bench_scan(cfg):
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device)
    dtype = getattr(torch, cfg.dtype)
    if device.type != 'cuda':
        print(f"no GPU here: timing naive vs chunked on {device} ({torch.get_num_threads()} threads)")
    gen = torch.Generator().manual_seed(0)
    B, T, H, M, P = cfg.B, cfg.T, cfg.H, cfg.M, cfg.P
    w = torch.randn(B, T, H, M, generator=gen).softmax(-1)
    dA = -torch.rand(B, T, H, 1, generator=gen)
    tensors = [torch.randn(B, T, H, P, generator=gen), dA * w, w, torch.randn(B, T, H, M, generator=gen)]
    x, g, beta, q = [t.to(device, dtype if i == 0 else torch.float32).requires_grad_() for i, t in enumerate(tensors)]

    rows = []
    for name, fn in scan_impls(device).items():
        def fwd():
            with torch.no_grad():
                fn(x, g, beta, q)
        def fwd_bwd():
            y, S = fn(x, g, beta, q)
            (y.float().sum() + S.sum()).backward()
        t_f, mem_f = timed(fwd, cfg.repeats, device)
        t_fb, mem_fb = timed(fwd_bwd, cfg.repeats, device)
        rows.append((name, t_f, t_fb, mem_fb))

    print(f"\nscan, B={B} T={T} H={H} M={M} P={P} {cfg.dtype} on {device}\n")
    print("| scan | fwd ms | fwd+bwd ms | fwd speedup vs naive | fwd+bwd speedup vs naive | tokens/s fwd+bwd | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    base = {r[0]: r for r in rows}['naive']
    for name, t_f, t_fb, mem in rows:
        peak = f"{mem / 2**20:.0f}" if mem is not None else "-"
        print(f"| {name} | {1e3 * t_f:.1f} | {1e3 * t_fb:.1f} | {base[1] / t_f:.1f}x | {base[2] / t_fb:.1f}x "
              f"| {B * T / t_fb:,.0f} | {peak} |")
    return rows


def parse(cfg, argv):
    for arg in argv:
        key, _, val = arg.removeprefix('--').partition('=')
        if not hasattr(cfg, key):
            sys.exit(f"unknown option --{key}; valid: {', '.join('--' + k for k in vars(cfg))}")
        setattr(cfg, key, type(getattr(cfg, key))(val))
    return cfg


BENCHES = {'scan': (ScanBench, bench_scan)}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [--key=value ...]")
    cls, run = BENCHES[sys.argv[1]]
    run(parse(cls(), sys.argv[2:]))
