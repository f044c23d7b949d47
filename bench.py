"""
Benchmarks, each printing its ratios side by side from one run.

    python bench.py scan [--device=cpu] [--B=4 --T=2048 --H=4 --M=64 --P=64 --repeats=3]
        naive vs chunked (vs Triton on CUDA, and fla's chunk_gla if installed),
        forward and forward+backward.

    python bench.py decode [--device=cpu] [--contexts=1024,8192,16384] [--json=PATH] [--table=PATH]
        per-token decode latency (median over --tokens steps after --warmup steps) and decoding
        state bytes (recurrent state, or attention's KV cache) at each context position, for
        fm, fm_sparse, mamba2 and attention at equal width; then the step cost of sparse vs
        dense FM as n_slots grows (--slots=64,...,4096, --slot_top_k=16), for the whole layer
        step and for the scan step alone (scan.scan_step vs scan.scan_step_sparse).

Options are --key=value, parsed by train.parse_config (`python bench.py decode --help` lists them).
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

import scan as fm_scan


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
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit("bench.py scan: --device=cuda but CUDA is not available here; use --device=cpu (or auto)")
    if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"bench.py scan: --dtype={cfg.dtype} must be float32, bfloat16 or float16")
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


# -----------------------------------------------------------------------------
# bench.py decode

@dataclass
class DecodeBench:
    device: str = 'cpu'
    contexts: str = '1024,8192,16384'    # positions at which one decoding step is timed
    mixers: str = 'fm,fm_sparse,mamba2,attention'
    # the model, equal width for every mixer (the tiny-Shakespeare configs' size by default)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_slots: int = 64
    top_k: int = 8
    vocab_size: int = 65
    batch_size: int = 1
    warmup: int = 5                      # steps before timing (attention's cache grows here)
    tokens: int = 40                     # timed steps; the median is reported
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
    json: str = ''                       # write the rows here (a list of objects)
    table: str = ''                      # write the markdown tables here too


def _median_ms(fn, warmup, n, device):
    return 1e3 * timed(fn, n, device, warmup)[0]


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def decode_context_rows(cfg, device, contexts, mixers):
    """Prefill each model over `context` tokens with its parallel forward (the real cache:
    recurrent state, or a KV cache of that length), then time single decoding steps."""
    from model import LM, ModelConfig
    rows = []
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

            ms = _median_ms(lambda: model.step(tok, caches), cfg.warmup, cfg.tokens, device)
            recurrent = mixer != 'attention'
            rows.append({'bench': 'context', 'mixer': mixer,
                         'n_slots': mc.n_slots if recurrent else None,
                         'top_k': mc.top_k if mixer == 'fm_sparse' else (mc.n_slots if recurrent else None),
                         'context': ctx, 'ms_per_token': ms, 'state_bytes': state_bytes,
                         'prefill_s': prefill_s, 'params': params, 'n_layer': mc.n_layer,
                         'n_embd': mc.n_embd, 'batch_size': cfg.batch_size,
                         'weights': 'trained' if cfg.out_dirs else 'random'})
            print(f"  {mixer:9s} context {ctx:6d}: {ms:7.3f} ms/token, state {state_bytes / 2**20:8.3f} MiB "
                  f"(prefill {prefill_s:.1f} s)", flush=True)
            del caches
        del model
    return rows


def decode_slot_rows(cfg, device, slots):
    """One layer's decoding step, fm (all m rows) vs fm_sparse (top_k rows), as m grows; and
    the scan step alone (scan.scan_step vs scan.scan_step_sparse). The memory is filled with
    random values (its size does not depend on the position, only on m)."""
    from model import ModelConfig, RecurrentMixer
    rows = []
    k = cfg.slot_top_k
    B = cfg.batch_size
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

            ms_layer = _median_ms(lambda: layer.step(u, cache), 3, cfg.slot_repeats, device)

            S = torch.randn(B, H, m, P, device=device)
            x = torch.randn(B, H, P, device=device)
            kk = m if mixer == 'fm' else k
            g = -torch.rand(B, H, kk, device=device) * 0.1
            beta, q = torch.rand(B, H, kk, device=device), torch.randn(B, H, kk, device=device)
            idx = torch.stack([torch.randperm(m, device=device)[:k] for _ in range(B)])
            if mixer == 'fm':
                scan_step = lambda: fm_scan.scan_step(S, x, g, beta, q)
            else:
                scan_step = lambda: fm_scan.scan_step_sparse(S, x, g, beta, q, idx)
            ms_scan = _median_ms(scan_step, 3, cfg.slot_repeats, device)
            touched = B * H * kk * P * 4     # float32 state bytes read (and written) per token
            for part, ms in (('layer', ms_layer), ('scan', ms_scan)):
                rows.append({'bench': 'slots', 'part': part, 'mixer': mixer, 'n_slots': m,
                             'top_k': k if mixer == 'fm_sparse' else m, 'context': None,
                             'ms_per_token': ms, 'state_bytes': state_bytes, 'state_bytes_touched': touched,
                             'in_proj_bytes': layer.in_proj.weight.numel() * 4,
                             'n_embd': cfg.n_embd, 'batch_size': B})
            print(f"  {mixer:9s} n_slots {m:5d}: layer step {ms_layer:7.3f} ms, scan step {ms_scan:7.3f} ms",
                  flush=True)
    return rows


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
                   f"median of {cfg.tokens} steps after {cfg.warmup} warm-up steps; each model prefilled over "
                   f"the whole context with its parallel forward (random token ids, "
                   f"{sr['weights']} weights), so the state or KV cache is the real one at that position.\n")
        head = ['context'] + [f"{m} ms/token" for m in mixers]
        if 'attention' in mixers:
            head += [f"attention / {m}" for m in mixers if m != 'attention']
        head += [f"{m} state MiB" for m in mixers]
        out.append('| ' + ' | '.join(head) + ' |')
        out.append('|' + '---|' * len(head))
        for c in contexts:
            cells = [str(c)] + [f"{at[m, c]['ms_per_token']:.3f}" for m in mixers]
            if 'attention' in mixers:
                cells += [f"{at['attention', c]['ms_per_token'] / at[m, c]['ms_per_token']:.2f}x"
                          for m in mixers if m != 'attention']
            cells += [_mib(at[m, c]['state_bytes']) for m in mixers]
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
                   f"memory filled with random values. 'layer' = in_proj, conv, routing, scan step, "
                   f"out_proj; 'scan' = scan.scan_step (all m rows) vs scan.scan_step_sparse (k rows).\n")
        head = ['n_slots', 'fm layer ms', 'fm_sparse layer ms', 'layer speedup', 'fm scan ms',
                'fm_sparse scan ms', 'scan speedup', 'state KiB touched fm / fm_sparse', 'in_proj KiB']
        out.append('| ' + ' | '.join(head) + ' |')
        out.append('|' + '---|' * len(head))
        for m in slots:
            d, s = at['layer', 'fm', m], at['layer', 'fm_sparse', m]
            ds, ss = at['scan', 'fm', m], at['scan', 'fm_sparse', m]
            out.append(f"| {m} | {d['ms_per_token']:.3f} | {s['ms_per_token']:.3f} | "
                       f"{d['ms_per_token'] / s['ms_per_token']:.1f}x | {ds['ms_per_token']:.3f} | "
                       f"{ss['ms_per_token']:.3f} | {ds['ms_per_token'] / ss['ms_per_token']:.1f}x | "
                       f"{d['state_bytes_touched'] / 1024:.0f} / {s['state_bytes_touched'] / 1024:.0f} | "
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
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit("bench.py decode: --device=cuda but CUDA is not available here; use --device=cpu (or auto)")
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    contexts = [int(c) for c in cfg.contexts.split(',') if c]
    mixers = [m for m in cfg.mixers.split(',') if m]
    if cfg.out_dirs:   # trained models instead: {mixer: LM}
        from common import load_checkpoint, model_from_checkpoint
        models = [model_from_checkpoint(load_checkpoint(os.path.join(d, 'ckpt.pt')), 'cpu', dropout=0.0)
                  for d in cfg.out_dirs.split(',') if d]
        mixers = {m.config.mixer: m for m in models}
    slots = [int(m) for m in cfg.slots.split(',') if m]
    print(f"decode benchmark on {device}, torch {torch.__version__}, {threads} threads", flush=True)
    rows = []
    with torch.no_grad():
        if contexts and mixers:
            rows += decode_context_rows(cfg, device, contexts, mixers)
        if slots:
            rows += decode_slot_rows(cfg, device, slots)
    for r in rows:
        r.update(device=str(device), threads=threads)
    table = decode_tables(rows, cfg, threads, device)
    print('\n' + table)
    for path, write in ((cfg.table, lambda f: f.write(table)), (cfg.json, lambda f: json.dump(rows, f, indent=1))):
        if path:
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'w') as f:
                write(f)
    return rows


BENCHES = {'scan': (ScanBench, bench_scan), 'decode': (DecodeBench, bench_decode)}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [--key=value ...]")
    cls, run = BENCHES[sys.argv[1]]
    from common import parse_config
    cfg = cls()
    parse_config(cfg, sys.argv[2:], prog=f'bench.py {sys.argv[1]}')
    run(cfg)
