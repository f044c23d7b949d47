"""
Evaluate checkpoints beyond their training context.

    python -m experiments.evaluate --out_dirs=out-fm,out-attention --lengths=1,2,4,8,16 \
        --plot=results/eval.png

Evaluation: for every checkpoint (out_dir/ckpt.pt, written by train.py), the validation
loss and perplexity at context lengths L = 1x, 2x, 4x, 8x and 16x the training block_size.
Every model is run over the full length L in one parallel forward, attention included (RoPE
has no maximum position, so it runs, and shows how it degrades past the length it was
trained on). Each length is scored on the same number of validation tokens (`eval_tokens`,
cut into non-overlapping windows of L tokens at evenly spaced offsets; every window is
scored at all its positions). The loss by token position (mean over the windows at each
position) is kept for every length and plotted for the longest one.

The loss so far (the paper's measure: at position t, the mean loss over positions 1..t, i.e. the
cumulative mean of the loss by position) is kept in the JSON at the powers of 2 and at L, for
every length, and plotted at the longest length with --so_far=path.png.

Outputs: a markdown table (--table), a PNG plot (--plot), the loss-so-far PNG (--so_far), and
every number in JSON (--json).
"""
if __name__ == '__main__' and not __package__:   # run as a module, so that the core imports
    raise SystemExit('run it from the repo root as a module: python -m experiments.evaluate ...')
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import (ints, load_checkpoint, log, model_from_checkpoint, parse_config, resolve_device,
                    train_tokens, val_tokens)


@dataclass
class EvalConfig:
    out_dirs: str = 'out'                # comma-separated run directories, each with a ckpt.pt
    lengths: str = '1,2,4,8,16'          # context lengths, as multiples of each model's block_size
    eval_tokens: int = 32768             # validation tokens scored at every length
    batch_size: int = 8                  # windows per forward pass
    data_dir: str = ''                   # '' = the checkpoint's own (train.py's --data_dir)
    device: str = 'cpu'                  # 'cpu' | 'cuda' | 'auto'
    threads: int = 0                     # torch CPU threads; 0 = all cores
    table: str = 'results/eval.md'
    plot: str = 'results/eval.png'
    json: str = 'results/eval.json'
    so_far: str = ''                     # PNG of the loss so far at the longest length; '' = none


def windows(data, L, n_tokens):
    """Non-overlapping windows of L+1 tokens (inputs and targets) at evenly spaced offsets,
    enough to cover n_tokens (at least one). Fewer if the split is too short."""
    n_max = (len(data) - 1) // L
    if n_max < 1:
        raise SystemExit(f"evaluate.py: the validation split ({len(data)} tokens) is shorter than "
                         f"a window of {L + 1}")
    n = max(1, min(n_max, math.ceil(n_tokens / L)))
    starts = np.linspace(0, len(data) - L - 1, n).astype(np.int64) if n > 1 else np.array([0])
    return np.stack([data[s:s + L + 1] for s in starts])


@torch.no_grad()
def loss_by_position(model, data, L, n_tokens, batch_size, device):
    """Mean cross-entropy (nats) at each of the L positions, over the windows; and their count."""
    w = torch.from_numpy(windows(data, L, n_tokens))
    total = torch.zeros(L, dtype=torch.float64)
    for i in range(0, len(w), batch_size):
        b = w[i:i + batch_size].to(device)
        logits, _ = model(b[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].reshape(-1),
                              reduction='none')
        total += nll.view(len(b), L).sum(0).double().cpu()
    return (total / len(w)).numpy(), len(w)


def loss_so_far(pos):
    """The loss so far: at position t (1-based), the mean of the loss by position over 1..t."""
    pos = np.asarray(pos, dtype=np.float64)
    return np.cumsum(pos) / np.arange(1, len(pos) + 1)


def so_far_points(pos):
    """The loss so far at positions 1, 2, 4, ... and at the last one: {position: loss}."""
    sf = loss_so_far(pos)
    ts = sorted({2 ** j for j in range(len(sf).bit_length()) if 2 ** j <= len(sf)} | {len(sf)})
    return {str(t): round(float(sf[t - 1]), 5) for t in ts}


def evaluate(cfg):
    """Evaluate every checkpoint in cfg.out_dirs at every length; write table, plot, JSON."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    mults = ints(cfg.lengths, 'lengths', 'evaluate.py')
    if not mults or any(m < 1 for m in mults):
        raise SystemExit(f"evaluate.py: --lengths={cfg.lengths} must be positive integers "
                         "(multiples of block_size)")
    for path in (cfg.table, cfg.plot, cfg.json, cfg.so_far):   # before the evaluation, which can take long
        try:
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise SystemExit(f"evaluate.py: cannot write {path} ({e.strerror}); "
                             "pick another path") from None
    out_dirs = [d for d in cfg.out_dirs.split(',') if d]
    if not out_dirs:
        raise SystemExit("evaluate.py: --out_dirs is empty; give the run directories, "
                         "e.g. --out_dirs=out-fm,out-attention")
    results = []
    for out_dir in out_dirs:
        ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
        model = model_from_checkpoint(ckpt, device, dropout=0.0).eval()
        data = val_tokens(ckpt, cfg.data_dir, 'evaluate.py')
        margs = ckpt['model_args']
        bs = margs['block_size']
        r = {'out_dir': out_dir, 'mixer': margs['mixer'], 'params': model.get_num_params(),
             'block_size': bs, 'n_slots': margs.get('n_slots'), 'top_k': margs.get('top_k'),
             'iter_num': int(ckpt['iter_num']),
             'train_tokens': train_tokens(ckpt),
             'best_val_loss': float(ckpt.get('best_val_loss', float('nan'))), 'lengths': []}
        for mult in mults:
            L = mult * bs
            t0 = time.time()
            pos, n = loss_by_position(model, data, L, cfg.eval_tokens, cfg.batch_size, device)
            loss = float(pos.mean())
            r['lengths'].append({
                'mult': mult, 'length': L, 'windows': n, 'loss': loss, 'ppl': math.exp(loss),
                'loss_first_block': float(pos[:bs].mean()),
                'loss_beyond_block': float(pos[bs:].mean()) if L > bs else None,
                'loss_so_far': so_far_points(pos),
                'loss_by_position': [round(float(v), 5) for v in pos]})
            log(f"{out_dir} ({margs['mixer']}): L={L} ({mult}x) over {n} windows: loss {loss:.4f}, "
                f"ppl {math.exp(loss):.3f} [{time.time() - t0:.1f} s]")
        results.append(r)
        del model
    table = markdown_table(results)
    print('\n' + table)
    if cfg.table:
        with open(cfg.table, 'w') as f:
            f.write(table)
    if cfg.json:
        with open(cfg.json, 'w') as f:
            json.dump({'config': asdict(cfg), 'torch': torch.__version__,
                       'threads': torch.get_num_threads(), 'results': results}, f, indent=1)
    if cfg.plot:
        plot(results, cfg.plot)
    if cfg.so_far:
        plot_so_far(results, cfg.so_far)
    return results


def markdown_table(results):
    mults = [l['mult'] for l in results[0]['lengths']] if results else []
    same = all([l['mult'] for l in r['lengths']] == mults for r in results)
    head = ['model', 'mixer', 'params', 'train tokens']
    head += [f"{m}x loss (ppl)" for m in mults] if same else ['losses']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        cells = [os.path.basename(os.path.normpath(r['out_dir'])), r['mixer'],
                 f"{r['params'] / 1e6:.3f}M", f"{r['train_tokens'] / 1e6:.2f}M"]
        cells += [f"{l['loss']:.4f} ({l['ppl']:.2f})" for l in r['lengths']] if same else \
            [', '.join(f"{l['length']}: {l['loss']:.4f}" for l in r['lengths'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if results:
        bs = sorted({r['block_size'] for r in results})
        lines.append('')
        lines.append("Validation loss in nats per token (perplexity) at context length = "
                     f"multiple x training block_size ({', '.join(map(str, bs))}); every length "
                     "scored on the same number of tokens, each window in one forward pass over "
                     "its full length.")
    return '\n'.join(lines) + '\n'


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        label = f"{r['mixer']} ({os.path.basename(os.path.normpath(r['out_dir']))})" \
            if sum(q['mixer'] == r['mixer'] for q in results) > 1 else r['mixer']
        a.plot([l['mult'] for l in r['lengths']], [l['loss'] for l in r['lengths']], 'o-',
               label=label)
        longest = r['lengths'][-1]
        pos = np.array(longest['loss_by_position'])
        # bins that grow with position (log-spaced, the first one positions 1-7), so the first
        # tokens and the far tail both show without the noise of single positions
        grown = np.geomspace(min(8, len(pos)), len(pos) + 1, 30).astype(int)
        edges = np.unique(np.concatenate([[1], grown]))
        x = [(lo + hi - 1) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
        y = [pos[lo - 1:hi - 1].mean() for lo, hi in zip(edges[:-1], edges[1:])]
        b.plot(x, y, '-', label=f"{label}, L={longest['length']}")
    a.set_xscale('log', base=2)
    a.set_xlabel('context length / training block_size')
    a.set_ylabel('validation loss (nats/token)')
    a.set_title('loss vs evaluation length')
    a.grid(alpha=0.3)
    a.legend()
    by_position_axes(b, results, 'token position (dashed: training block_size)',
                     'validation loss (nats/token)', 'loss by position at the longest length')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def by_position_axes(ax, results, xlabel, ylabel, title):
    """A log2 position axis with each model's training block_size dashed, labels, legend."""
    for bs in sorted({r['block_size'] for r in results}):
        ax.axvline(bs, color='gray', ls='--', lw=0.8)
    ax.set_xscale('log', base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_so_far(results, path):
    """The loss so far (cumulative mean of the loss by position) at each model's longest
    length, against the token position on a log axis; dashed: the training block_size."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        name = os.path.basename(os.path.normpath(r['out_dir']))
        longest = r['lengths'][-1]
        sf = loss_so_far(longest['loss_by_position'])
        ax.plot(np.arange(1, len(sf) + 1), sf, '-', label=f"{name} ({r['mixer']}), L={len(sf)}")
    by_position_axes(ax, results, 'token position t (dashed: training block_size)',
                     'loss so far: mean loss over positions 1..t (nats)', 'loss so far')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    cfg = EvalConfig()
    parse_config(cfg, sys.argv[1:] if argv is None else argv, prog='evaluate.py')
    evaluate(cfg)


if __name__ == '__main__':
    main()
