"""Tables and the Fig. 5 plot of results/formulation/ from its logs and JSON (run from the repo root:
python results/formulation/summarize.py). Prints markdown; writes fig5/fig5.png."""
import glob
import json
import os
import re

H = 'results/formulation'
OLD = 'results/recall/router_balance'


def recall_rows():
    """(formulation/probe, m, seed, accs, mean, overlap per layer, chance, effective, dead, train min)."""
    rows = []
    runs = [(f, os.path.basename(os.path.dirname(f))) for f in glob.glob(f'{H}/recall/*/recall.json')]
    runs += [(f, 'derived:' + os.path.basename(os.path.dirname(f)))
             for f in glob.glob(f'{OLD}/bias_*/recall.json')]
    for f, name in runs:
        d = json.load(open(f))
        for r in d['results']:
            mc = r['model_config']
            seed = d['config']['seed']
            acc = [r['eval'][p]['acc'] for p in ('2', '4', '8', '16')]
            rt = r['router']
            rows.append((name.split('_s')[0], mc['n_slots'], seed, acc, sum(acc) / 4,
                         [x.get('read_write_overlap') for x in rt], rt[0].get('overlap_chance'),
                         [x['effective'] for x in rt], [x['dead'] for x in rt], r['train_s'] / 60))
    return sorted(rows, key=lambda r: (r[0] != 'derived:bias', r[0], r[1], r[2]))


def recall_table(keep=lambda name: True):
    lines = ['| run | m | seed | 2 pairs | 4 | 8 | 16 | mean | read/write overlap (layer 0, 1) | chance k/m '
             '| effective slots | dead | train min |', '|' + '---|' * 13]
    for name, m, seed, acc, mean, ov, ch, eff, dead, tmin in recall_rows():
        if not keep(name):
            continue
        lines.append(f"| {name} | {m} | {seed} | " + ' | '.join(f'{a:.3f}' for a in acc) +
                     f" | **{mean:.3f}** | {', '.join('n/a' if o is None else f'{o:.3f}' for o in ov)} | {m and 16 / m:.3f} | "
                     f"{', '.join(f'{e:.0f}' for e in eff)} | {', '.join(map(str, dead))} | {tmin:.1f} |")
    return '\n'.join(lines)


def fig5_points():
    """{(formulation, kind): {m: val}} from fig5/*.jsonl's last evaluation (train.py's val, 20
    batches) and, where present, fig5/eval*.json (the whole val split at 1x)."""
    full = {}
    for f in sorted(glob.glob(f'{H}/fig5/eval*.json')):
        for r in json.load(open(f))['results']:
            full[os.path.basename(os.path.normpath(r['out_dir']))] = r['lengths'][0]['loss']
    pts = {}
    for f in sorted(glob.glob(f'{H}/fig5/*.jsonl')):
        name = os.path.basename(f)[:-6]
        form, kind, m = re.match(r'(\w+?)_(dense|k\d+)_m(\d+)', name).groups()
        m = int(m)
        kind = 'dense' if kind == 'dense' else ('k=4' if kind == 'k4' and m != 16 else 'k=m/4')
        if kind == 'k=4' and m == 16:
            kind = 'k=m/4'
        vals = [json.loads(l)['val_loss'] for l in open(f) if '"val_loss"' in l]
        pts.setdefault((form, kind), {})[m] = (vals[-1], full.get(name))
    return pts


def fig5_table_and_plot():
    pts = fig5_points()
    ms = sorted({m for v in pts.values() for m in v})
    lines = ['| formulation | mixer | ' + ' | '.join(f'm={m}' for m in ms) + ' |', '|' + '---|' * (2 + len(ms))]
    for (form, kind), v in sorted(pts.items()):
        cells = []
        for m in ms:
            if m not in v:
                cells.append('—')
            else:
                tv, fv = v[m]
                cells.append(f'{fv:.4f} ({tv:.4f})' if fv is not None else f'({tv:.4f})')
        lines.append(f'| {form} | {kind} | ' + ' | '.join(cells) + ' |')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    style = {'dense': 'o-', 'k=m/4': 's-', 'k=4': '^-'}
    for (form, kind), v in sorted(pts.items()):
        xs = sorted(v)
        ys = [v[m][1] if v[m][1] is not None else v[m][0] for m in xs]
        ax.plot(xs, ys, style[kind][0], ls='-' if form == 'paper' else '--', label=f'{form} {kind}')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('slots m')
    ax.set_ylabel('val loss (nats/token, whole val split at 1x)')
    ax.set_title('Fig. 5 at our scale: dense vs sparse FM, 500 iterations')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f'{H}/fig5/fig5.png', dpi=120)
    plt.close(fig)
    return '\n'.join(lines)


if __name__ == '__main__':
    main = ('derived:bias', 'paper')
    print(recall_table(lambda n: n in main))
    print()
    print(recall_table(lambda n: n not in main))
    print()
    print(fig5_table_and_plot())
