"""
Router health of trained FM checkpoints: how many of its m slots each layer uses.

    python -m experiments.router --out_dir=out                     # one run: a table per layer
    python -m experiments.router --out_dirs=out-a,out-b --labels=old,new --plot_dir=results/router

Per layer, over `tokens` validation tokens (windows of the checkpoint's block_size, the context it
was trained at), from model.router_health: effective slots = exp(entropy of the selection
distribution) (m when every slot is chosen equally often), dead slots (never selected by top-k;
for dense fm: under 1 % of the uniform share of w's mass), the share of the most used slot and
of the 10 % most used. Two pictures in plot_dir:

    usage.png    each layer's slot shares sorted from the most used, against uniform (1/m)
    routing.png  the slot weights w over a text sample (tokens x slots), one panel per layer

and every number in plot_dir/router.json. A missing checkpoint or a mixer without a router
(mamba2, attention) exits with one line.
"""
if __name__ == '__main__' and not __package__:   # run as a module, so that the core imports
    raise SystemExit('run it from the repo root as a module: python -m experiments.router ...')
import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common import load_checkpoint, model_from_checkpoint, parse_config, val_tokens
from model import router_usage, slot_stats


@dataclass
class RouterConfig:
    out_dir: str = 'out'                 # a run directory with ckpt.pt (train.py's out_dir)
    out_dirs: str = ''                   # several, comma-separated (overrides out_dir)
    labels: str = ''                     # their names in the table and plots (default: the dirs)
    tokens: int = 4096                   # validation tokens the statistics are counted over
    sample_chars: int = 64               # tokens in the routing picture
    data_dir: str = ''                   # '' = the checkpoint's own (train.py's --data_dir)
    plot_dir: str = ''                   # '' = no pictures and no JSON


def health(out_dir, cfg):
    """(per-layer stats, per-layer sorted shares (M,), w over the sample (layers, T, M), the
    sample's characters, the checkpoint) for the checkpoint in out_dir."""
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    mixer = ckpt['model_args'].get('mixer')
    if mixer not in ('fm', 'fm_sparse'):
        raise SystemExit(f"router.py: {out_dir} is a {mixer} model; router health is for the FM "
                         "mixers (fm, fm_sparse)")
    model = model_from_checkpoint(ckpt, 'cpu', dropout=0.0).eval()
    data = torch.from_numpy(val_tokens(ckpt, cfg.data_dir, 'router.py'))
    T = model.config.block_size
    if len(data) <= T:
        raise SystemExit(f"router.py: the validation split ({len(data)} tokens) is shorter than "
                         f"a window of block_size+1 = {T + 1}")
    n = max(1, cfg.tokens // T)
    starts = np.linspace(0, len(data) - T - 1, n).astype(np.int64)
    idx = torch.stack([data[s:s + T] for s in starts])               # (n, T) evenly spaced windows
    usage = router_usage(model, idx)
    stats = [slot_stats(share, mixer == 'fm_sparse') for share, _ in usage]
    sample = data[:cfg.sample_chars][None]                           # (1, sample_chars)
    w = torch.stack([w[0] for _, w in router_usage(model, sample)])   # (layers, T, M)
    itos = ckpt.get('meta', {}).get('itos')
    chars = [itos[i] for i in sample[0].tolist()] if itos else [str(i) for i in sample[0].tolist()]
    return stats, [share.sort(descending=True).values for share, _ in usage], w, chars, ckpt


def table(label, stats):
    lines = [f"{label}", '| layer | effective slots | dead slots | used | max share | top-10 % share |',
             '|---|---|---|---|---|---|']
    for i, s in enumerate(stats):
        lines.append(f"| {i} | {s['effective']:.1f} / {s['m']} | {s['dead']} | "
                     f"{1 - s['dead'] / s['m']:.0%} | {s['max_share']:.1%} | {s['top10_share']:.1%} |")
    return '\n'.join(lines)


def plots(runs, cfg):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, (label, _, shares, _, _) in zip(axes[0], runs):
        M = shares[0].numel()
        for i, sh in enumerate(shares):
            ax.plot(np.arange(1, M + 1), sh.numpy(), label=f'layer {i}')
        ax.axhline(1 / M, color='k', ls='--', lw=1, label='uniform 1/m')
        ax.set_yscale('log')
        ax.set_ylim(1e-4, 1)
        ax.set_xlabel('slot, from the most used')
        ax.set_ylabel('share of selections')
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.plot_dir, 'usage.png'), dpi=100)
    plt.close(fig)

    L = runs[0][3].shape[0]
    fig, axes = plt.subplots(len(runs), L, figsize=(3.2 * L, 3.2 * len(runs)), squeeze=False)
    for r, (label, _, _, w, chars) in enumerate(runs):
        for layer in range(w.shape[0]):
            ax = axes[r][layer]
            ax.imshow(w[layer].T.numpy(), aspect='auto', cmap='viridis', interpolation='nearest')
            ax.set_title(f'{label}, layer {layer}', fontsize=8)
            ax.set_xlabel('token')
            ax.set_ylabel('slot')
            step = max(1, len(chars) // 16)
            ax.set_xticks(range(0, len(chars), step),
                          [repr(c)[1:-1] for c in chars[::step]], fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.plot_dir, 'routing.png'), dpi=100)
    plt.close(fig)


def main(argv=None):
    cfg = RouterConfig()
    parse_config(cfg, sys.argv[1:] if argv is None else argv, prog='router.py')
    dirs = [d for d in (cfg.out_dirs or cfg.out_dir).split(',') if d]
    labels = [s for s in cfg.labels.split(',') if s] or dirs
    if len(labels) != len(dirs):
        raise SystemExit(f"router.py: --labels has {len(labels)} names for {len(dirs)} out_dirs")
    runs, out = [], []
    for d, label in zip(dirs, labels):
        stats, shares, w, chars, ckpt = health(d, cfg)
        runs.append((label, stats, shares, w, chars))
        out.append({'out_dir': d, 'label': label, 'iter_num': ckpt['iter_num'],
                    'model_args': ckpt['model_args'], 'router': stats})
        print(table(f"{label} ({ckpt['model_args']['mixer']}, iter {ckpt['iter_num']})", stats))
    if cfg.plot_dir:
        os.makedirs(cfg.plot_dir, exist_ok=True)
        plots(runs, cfg)
        with open(os.path.join(cfg.plot_dir, 'router.json'), 'w') as f:
            json.dump({'config': asdict(cfg), 'runs': out}, f, indent=1)
        print(f"{cfg.plot_dir}/usage.png, routing.png, router.json")


if __name__ == '__main__':
    main()
