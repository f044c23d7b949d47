"""
Multi-query associative recall (MQAR, the Zoology benchmark of Arora et al., 2023): how many
key-value pairs can a model store in its state and read back?

    python -m experiments.recall                         # the full sweep (defaults), into results/recall/
    python -m experiments.recall --smoke=True --out_dir=/tmp/recall   # tiny settings, seconds
    python -m experiments.recall --models=attention,fm_sparse:n_slots=256 --pairs=8,32 --train_steps=300
    python -m experiments.recall --help                  # every key with its default

The defaults (9 models, 2400 steps, two worker processes) took 18.6 min on a 2-core CPU. Plain
attention must build an induction head across its two layers and learns slowly; with the short
conv the recurrent mixers have (attn_conv=True) one layer can match a query key against the
key just before each value, and it learns the task within a few hundred steps: the ceiling.

A sequence of seq_len tokens holds n key-value pairs, then the same n keys again in a random
order, each followed by its value, then padding:

    k1 v1 k2 v2 ... kn vn | k_p1 v_p1 k_p2 v_p2 ... k_pn v_pn | 0 0 ...

The model is scored (loss and accuracy) only where it must predict a value from a query key,
i.e. at the positions of the second k's (targets are -1 everywhere else; LM.forward ignores -1).
Keys are distinct within a sequence (drawn without replacement from num_keys), values are drawn
with replacement from num_values, so the only way to answer is to have stored the pairs.
Data are generated here from a seeded torch.Generator: no download.

Every model has the same width and depth (n_layer x n_embd); each is trained on fresh batches
whose sequences mix all the pair counts of --pairs, then scored on held-out sequences at each
count. Beside each model's accuracy we measure what one decoded token costs: the bytes of its
decoding state after a prefill of seq_len tokens (LM.cache_bytes), the bytes of that state one
token reads and writes (sparse FM touches k of its m slot rows; attention reads its whole KV
cache), and the median wall time of LM.step, timed after training, one model at a time.

Outputs in out_dir: recall.md (table), recall.png (accuracy vs pairs), curves.png (training
loss and accuracy vs step, to tell "cannot store" from "did not train"), recall.json (every
number, including the curves and the config).

Models are given as a comma-separated list of mixer[:key=value...] with ModelConfig keys, e.g.
fm_sparse:n_slots=256:top_k=16:update_rate=slot; the shared keys (n_layer, n_embd, ...) come
from this script's config.
"""
if __name__ == '__main__' and not __package__:   # run as a module, so that the core imports
    raise SystemExit('run it from the repo root as a module: python -m experiments.recall ...')
import dataclasses
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

import torch

import common
from model import LM, KVCache, ModelConfig, router_usage, slot_stats

DEFAULT_MODELS = ','.join([
    'attention',
    'attention:attn_conv=True',
    'fm_sparse:n_slots=64:top_k=16',
    'fm_sparse:n_slots=256:top_k=16',
    'fm_sparse:n_slots=1024:top_k=16',
    'fm_sparse:n_slots=256:top_k=16:update_rate=slot',
    'fm:n_slots=64',
    'mamba2:n_slots=16',
    'mamba2:n_slots=64',
])


@dataclass
class RecallConfig:
    models: str = DEFAULT_MODELS         # comma-separated mixer[:key=value...] (ModelConfig keys)
    # the task
    pairs: str = '2,4,8,16'              # key-value pair counts: trained on a mix, scored at each
    seq_len: int = 64                    # needs 4 * max(pairs) <= seq_len
    num_keys: int = 64                   # key vocabulary (>= max(pairs): keys are distinct)
    num_values: int = 64                 # value vocabulary
    # the models (shared by all)
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2                      # attention heads
    expand: int = 1
    head_dim: int = 32                   # recurrent heads = expand * n_embd / head_dim
    # training
    train_steps: int = 2400
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    log_interval: int = 50               # a point on the training curve every this many steps
    # evaluation and decode cost
    eval_seqs: int = 256                 # held-out sequences per pair count
    decode_steps: int = 50               # LM.step timings (median) after 5 warm-up steps
    # system
    jobs: int = 2                        # models trained at once, each in its own process
    threads: int = 1                     # torch CPU threads per process (0 = leave torch's default)
    seed: int = 1337
    out_dir: str = 'results/recall'
    smoke: bool = False                  # tiny settings for a test (overrides the sizes above)
    combine: str = ''                    # comma-separated out_dirs of earlier runs (e.g. models run in
                                         # parallel): merge their recall.json into out_dir, train nothing


SMOKE = dict(models='attention,fm_sparse:n_slots=16:top_k=4,fm:n_slots=8,mamba2:n_slots=8',
             pairs='2,4', seq_len=32, num_keys=16, num_values=16, n_embd=32, head_dim=16,
             train_steps=6, batch_size=4, warmup_steps=2, log_interval=2, eval_seqs=8, decode_steps=3)


# -----------------------------------------------------------------------------
# Configuration: the dataclass's defaults, then config files and --key=value


def read_args(cfg, argv):
    """--key=value (and config files) onto cfg with common.parse_config; --smoke=True first
    swaps in the tiny SMOKE settings, and keys given explicitly still win over them."""
    explicit = common.parse_config(cfg, argv, prog='recall.py')
    if cfg.smoke:
        for k, v in SMOKE.items():
            setattr(cfg, k, explicit.get(k, v))
    pairs = pair_counts(cfg)
    if not pairs or min(pairs) < 1:
        raise SystemExit(f"recall.py: --pairs={cfg.pairs!r} must be positive integers")
    if 4 * max(pairs) > cfg.seq_len:
        raise SystemExit(f"recall.py: --seq_len={cfg.seq_len} is too short for {max(pairs)} pairs; "
                         f"it needs 4 * max(pairs) = {4 * max(pairs)}")
    if cfg.num_keys < max(pairs):
        raise SystemExit(f"recall.py: --num_keys={cfg.num_keys} must be >= max(pairs) = {max(pairs)} "
                         "(keys are distinct within a sequence)")
    if cfg.jobs < 1:
        raise SystemExit(f"recall.py: --jobs={cfg.jobs} must be >= 1")
    return cfg


def pair_counts(cfg):
    return common.ints(cfg.pairs, 'pairs', 'recall.py')


def model_specs(cfg):
    """[(name, ModelConfig, seed index)] from --models; one line naming the fix if a spec is bad.
    A model's seed is --seed plus its position in --models, or plus its seed_index=N key (to
    repeat a model of another list with the same initial weights)."""
    vocab = 1 + cfg.num_keys + cfg.num_values
    shared = dict(vocab_size=vocab, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                  n_head=cfg.n_head, expand=cfg.expand, head_dim=cfg.head_dim, dropout=0.0)
    keys = {f.name: f for f in dataclasses.fields(ModelConfig)}
    hints = typing.get_type_hints(ModelConfig)
    specs = []
    for i, spec in enumerate([s for s in cfg.models.split(',') if s.strip()]):
        mixer, *kvs = spec.strip().split(':')
        args = dict(shared, mixer=mixer)
        seed_index = i
        for kv in kvs:
            k, _, v = kv.partition('=')
            if k == 'seed_index':   # seed = --seed + this, instead of + the model's position
                try:
                    seed_index = int(v)
                except ValueError:
                    raise SystemExit(f"recall.py: model {spec!r}: seed_index={v!r} must be an int")
                continue
            if k not in keys:
                raise SystemExit(f"recall.py: model {spec!r}: {k!r} is not a ModelConfig key in this model.py "
                                 f"(keys: {', '.join(keys)})")
            try:
                args[k] = common.value(v, hints[k])
            except ValueError:
                raise SystemExit(f"recall.py: model {spec!r}: {k}={v!r} must be a {hints[k].__name__}")
        try:
            mc = ModelConfig(**args)
        except ValueError as e:
            raise SystemExit(f"recall.py: model {spec!r}: {e}")
        specs.append((spec.strip(), mc, seed_index))
    if not specs:
        raise SystemExit("recall.py: --models is empty")
    return specs


def label(mc):
    """A short name: 'fm_sparse m=256 k=16', 'mamba2 N=16', 'attention'."""
    if mc.mixer == 'attention':
        return 'attention+conv' if mc.attn_conv else 'attention'
    s = f"{mc.mixer} N={mc.n_slots}" if mc.mixer == 'mamba2' else f"{mc.mixer} m={mc.n_slots}"
    if mc.mixer == 'fm_sparse':
        s += f" k={mc.top_k}"
        if mc.router_balance != ModelConfig.router_balance:          # the default goes unnamed
            s += f" {'unbalanced' if mc.router_balance == 'none' else mc.router_balance}"
    if mc.mixer in ('fm', 'fm_sparse') and mc.router_conv_bias:
        s += " old init"
    if getattr(mc, 'update_rate', 'head') != 'head':
        s += f" Δ/{mc.update_rate}"
    return s


# -----------------------------------------------------------------------------
# The data


def mqar_batch(n_pairs, seq_len, num_keys, num_values, gen):
    """n_pairs (B,) long -> x, y (B, seq_len) long.
    Token 0 is padding, keys are 1..num_keys, values num_keys+1..num_keys+num_values.
    x = pairs, then the keys again in a random order each followed by its value, then padding;
    y[t] = x[t+1] where x[t] is a query key (the value to recall), else -1."""
    B = n_pairs.shape[0]
    x = torch.zeros(B, seq_len, dtype=torch.long)
    y = torch.full((B, seq_len), -1, dtype=torch.long)
    for n in n_pairs.unique().tolist():
        rows = (n_pairs == n).nonzero()[:, 0]
        b = rows.numel()
        keys = torch.rand(b, num_keys, generator=gen).argsort(-1)[:, :n] + 1               # (b,n) distinct
        vals = torch.randint(num_keys + 1, num_keys + num_values + 1, (b, n), generator=gen)  # (b,n)
        perm = torch.rand(b, n, generator=gen).argsort(-1)                                  # query order
        qk, qv = keys.gather(1, perm), vals.gather(1, perm)
        seq = torch.stack([torch.stack([keys, vals], -1).flatten(1),
                           torch.stack([qk, qv], -1).flatten(1)], 1).flatten(1)            # (b, 4n)
        x[rows, :4 * n] = seq
        tgt = torch.full((b, 4 * n), -1, dtype=torch.long)
        tgt[:, 2 * n::2] = qv                                      # at each query key: its value
        y[rows, :4 * n] = tgt
    return x, y


def query_accuracy(logits, y):
    mask = y >= 0
    return (logits.argmax(-1)[mask] == y[mask]).float().mean().item()


# -----------------------------------------------------------------------------
# Training, scoring and decode cost of one model


def train(model, cfg, model_seed, name):
    pairs = torch.tensor(pair_counts(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)                  # the same batches for every model
    torch.manual_seed(model_seed)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.99), 'cpu')
    curve = []
    model.train()
    t0 = time.time()
    for step in range(cfg.train_steps):
        n = pairs[torch.randint(len(pairs), (cfg.batch_size,), generator=gen)]
        x, y = mqar_batch(n, cfg.seq_len, cfg.num_keys, cfg.num_values, gen)
        for group in opt.param_groups:
            group['lr'] = common.lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.train_steps, cfg.min_lr)
        logits, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_bias()                                 # router_balance='bias' only
        if step % cfg.log_interval == 0 or step == cfg.train_steps - 1:
            curve.append({'step': step, 'loss': loss.item(), 'acc': query_accuracy(logits.detach(), y)})
            print(f"  {name} step {step}: loss {curve[-1]['loss']:.3f}, query accuracy {curve[-1]['acc']:.3f}", flush=True)
    return curve, time.time() - t0


@torch.no_grad()
def evaluate(model, cfg):
    """{pairs: (accuracy, loss)} on eval_seqs held-out sequences per pair count."""
    model.eval()
    out = {}
    for n in pair_counts(cfg):
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 + n)   # disjoint from the training stream
        correct, total, loss_sum = 0, 0, 0.0
        for i in range(0, cfg.eval_seqs, cfg.batch_size):
            b = min(cfg.batch_size, cfg.eval_seqs - i)
            x, y = mqar_batch(torch.full((b,), n), cfg.seq_len, cfg.num_keys, cfg.num_values, gen)
            logits, loss = model(x, y)
            m = y >= 0
            correct += (logits.argmax(-1)[m] == y[m]).sum().item()
            total += m.sum().item()
            loss_sum += loss.item() * m.sum().item()
        out[n] = (correct / total, loss_sum / total)
    return out


@torch.no_grad()
def router_health_on_task(model, cfg):
    """model.router_health per layer over held-out sequences at the largest pair count (padding
    included: it is routed too); None for a mixer without a router. For fm_sparse each layer
    also gets 'read_write_overlap': the mean share of a query key's k slots that are among the
    k slots its pair's value was written to (the token after the key's first occurrence; the
    conv lets that token see the key), against chance k/m. Recall through the memory needs it
    high: a query reads only its k slots."""
    if model.config.mixer not in ('fm', 'fm_sparse'):
        return None
    gen = torch.Generator().manual_seed(cfg.seed + 2_000_003)
    n = max(pair_counts(cfg))
    x, y = mqar_batch(torch.full((64,), n), cfg.seq_len, cfg.num_keys, cfg.num_values, gen)
    usage = router_usage(model, x)                                 # one forward for both
    sparse = model.config.mixer == 'fm_sparse'
    stats = [slot_stats(share, sparse) for share, _ in usage]      # model.router_health's
    if not sparse:
        return stats
    b, t = (y >= 0).nonzero(as_tuple=True)                         # query key positions
    first = (x[b, :2 * n:2] == x[b, t][:, None]).float().argmax(-1) * 2   # its first occurrence
    for s, (_, w) in zip(stats, usage):
        sel = w > 0                                                # (B,T,M) the k chosen slots
        both = (sel[b, t] & sel[b, first + 1]).sum(-1).float()     # query vs its value's write
        s['read_write_overlap'] = round((both / model.config.top_k).mean().item(), 4)
        s['overlap_chance'] = round(model.config.top_k / model.config.n_slots, 4)
    return stats


def touched_bytes(model, caches):
    """Bytes of decoding state one token reads and writes: sparse FM its k active rows of S,
    dense FM and Mamba-2 all of S, attention its whole KV cache (plus the conv windows)."""
    total = 0
    for block, c in zip(model.blocks, caches):
        if c.conv is not None:
            total += c.conv.numel() * c.conv.element_size()
        if isinstance(c, KVCache):
            total += 2 * c.k[:, :, :c.len].numel() * c.k.element_size()
        else:
            B, H, M, P = c.S.shape
            rows = block.mixer.top_k if block.mixer.kind == 'fm_sparse' else M
            total += B * H * rows * P * c.S.element_size()
    return total


@torch.no_grad()
def decode_cost(model, cfg):
    """State bytes after a prefill of seq_len tokens, and the median ms of one LM.step at that position."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = max(pair_counts(cfg))
    x, _ = mqar_batch(torch.tensor([n]), cfg.seq_len, cfg.num_keys, cfg.num_values, gen)
    _, caches = model.prefill(x)
    state, touched = LM.cache_bytes(caches), touched_bytes(model, caches)
    tok = x[:, -1]
    times = []
    for i in range(5 + cfg.decode_steps):
        t = time.perf_counter()
        model.step(tok, caches)
        if i >= 5:
            times.append(time.perf_counter() - t)
    times.sort()
    return state, touched, 1e3 * times[len(times) // 2]


# -----------------------------------------------------------------------------
# Outputs


def write_table(results, cfg, path):
    pairs = pair_counts(cfg)
    lines = ['| model | params | ' + ' | '.join(f'{n} pairs' for n in pairs) +
             ' | state KiB | KiB touched / token | ms / token | train min | effective slots | dead slots |',
             '|---|---|' + '---|' * len(pairs) + '---|---|---|---|---|---|']
    span = lambda r, key: '—' if 'router' not in r else '-'.join(dict.fromkeys(
        f"{f(x[key] for x in r['router']):.0f}" for f in (min, max)))   # over the layers
    for r in results:
        accs = ' | '.join(f"{r['eval'][str(n)]['acc']:.3f}" for n in pairs)
        lines.append(f"| {r['label']} | {r['params'] / 1e3:.0f}K | {accs} | {r['state_bytes'] / 1024:.1f} | "
                     f"{r['touched_bytes'] / 1024:.1f} | {r['ms_per_token']:.3f} | {r['train_s'] / 60:.1f} | "
                     f"{span(r, 'effective')} | {span(r, 'dead')} |")
    note = (f"\nAccuracy at the query positions ({cfg.eval_seqs} held-out sequences per pair count; chance "
            f"{1 / cfg.num_values:.3f}). {cfg.n_layer} layers x {cfg.n_embd} wide, sequences of {cfg.seq_len} "
            f"tokens, {cfg.num_keys} keys, {cfg.num_values} values; {cfg.train_steps} steps of {cfg.batch_size} "
            f"sequences. State = LM.cache_bytes after a prefill of {cfg.seq_len} tokens (attention: its KV "
            f"cache at that length); touched = what one decoded token reads and writes; ms / token = median "
            f"LM.step, batch 1, {cfg.threads or torch.get_num_threads()} thread(s). Effective / dead "
            f"slots: FM router health over 64 held-out sequences at {max(pairs)} pairs, range over the "
            f"layers (effective = exp of the selection entropy; dead = never selected).\n")
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n' + note)
    return '\n'.join(lines)


def plots(results, cfg, out_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pairs = pair_counts(cfg)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(pairs, [r['eval'][str(n)]['acc'] for n in pairs], 'o-', label=r['label'])
    ax.set_xscale('log', base=2)
    ax.set_xticks(pairs, [str(n) for n in pairs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('key-value pairs in the sequence')
    ax.set_ylabel('query accuracy')
    ax.set_title(f'MQAR, {cfg.n_layer} layers x {cfg.n_embd}, seq_len {cfg.seq_len}')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'recall.png'), dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        steps = [p['step'] for p in r['curve']]
        a1.plot(steps, [p['loss'] for p in r['curve']], label=r['label'])
        a2.plot(steps, [p['acc'] for p in r['curve']], label=r['label'])
    a1.set_xlabel('step'); a1.set_ylabel('training loss at query positions')
    a2.set_xlabel('step'); a2.set_ylabel('training-batch query accuracy'); a2.set_ylim(-0.02, 1.02)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'curves.png'), dpi=120)
    plt.close(fig)


def combine(cfg, argv):
    """One table, plots and recall.json in out_dir from the recall.json of several runs of the same
    task (each run's config must match the first's, apart from models and out_dir)."""
    runs = []
    for d in [d for d in cfg.combine.split(',') if d]:
        try:
            with open(os.path.join(d, 'recall.json')) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"recall.py: --combine: cannot read {d}/recall.json ({type(e).__name__}); "
                             f"run recall.py with --out_dir={d} first")
    same = lambda c: {k: v for k, v in c.items() if k not in ('models', 'out_dir', 'combine')}
    for r in runs[1:]:
        if same(r['config']) != same(runs[0]['config']):
            raise SystemExit("recall.py: --combine: the runs differ in settings other than models and out_dir")
    run_cfg = RecallConfig(**{**runs[0]['config'], 'out_dir': cfg.out_dir, 'combine': cfg.combine})
    order = DEFAULT_MODELS.split(',')                              # the default sweep's order, others after
    results = sorted([r for run in runs for r in run['results']],
                     key=lambda r: order.index(r['spec']) if r['spec'] in order else len(order))
    os.makedirs(cfg.out_dir, exist_ok=True)
    table = write_table(results, run_cfg, os.path.join(cfg.out_dir, 'recall.md'))
    plots(results, run_cfg, cfg.out_dir)
    meta = {'command': ' '.join(['python', '-m', 'experiments.recall'] + argv), 'combined': [
        {k: v for k, v in run.items() if k != 'results'} for run in runs],
        'wall_s': max(run['wall_s'] for run in runs), 'config': dataclasses.asdict(run_cfg)}
    with open(os.path.join(cfg.out_dir, 'recall.json'), 'w') as f:
        json.dump({**meta, 'results': results}, f, indent=1)
    print(table)


def train_and_score(job):
    """(cfg, i, spec, mc) -> the i-th model's results and trained weights. Runs in a worker
    process when --jobs > 1; the seeds depend on i only (the model's seed index), so --jobs does
    not change the numbers."""
    cfg, i, spec, mc = job
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + i)
    model = LM(mc)
    curve, train_s = train(model, cfg, cfg.seed + i, label(mc))
    ev = evaluate(model, cfg)
    health = router_health_on_task(model, cfg)
    print(f"{label(mc):<28} {model.get_num_params() / 1e3:7.0f}K params  acc " +
          ' '.join(f"{n}:{a:.3f}" for n, (a, _) in ev.items()) +
          f"  final train loss {curve[-1]['loss']:.3f}  ({train_s / 60:.1f} min)", flush=True)
    r = {'spec': spec, 'label': label(mc), 'model_config': dataclasses.asdict(mc),
         'params': model.get_num_params(), 'train_s': train_s, 'curve': curve,
         'eval': {str(n): {'acc': a, 'loss': l} for n, (a, l) in ev.items()}}
    if health is not None:
        r['router'] = health
    return r, model.state_dict()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = read_args(RecallConfig(), argv)
    if cfg.combine:
        return combine(cfg, argv)
    specs = model_specs(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)
    t_start = time.time()
    jobs = [(cfg, i, spec, mc) for spec, mc, i in specs]
    if cfg.jobs == 1:
        done = [train_and_score(job) for job in jobs]
    else:   # largest state first, so the slowest model starts at once and the others share the rest
        first = sorted(range(len(jobs)), key=lambda i: -(0 if specs[i][1].mixer == 'attention' else specs[i][1].n_slots))
        with multiprocessing.get_context('spawn').Pool(cfg.jobs) as pool:
            out = pool.map(train_and_score, [jobs[i] for i in first], chunksize=1)
        done = [out[first.index(i)] for i in range(len(jobs))]
    results = []
    for (spec, mc, _), (r, weights) in zip(specs, done):   # decode cost here, one model at a time on a quiet CPU
        model = LM(mc)
        model.load_state_dict(weights)
        state, touched, ms = decode_cost(model, cfg)
        results.append({**r, 'state_bytes': state, 'touched_bytes': touched, 'ms_per_token': ms})
    table = write_table(results, cfg, os.path.join(cfg.out_dir, 'recall.md'))
    plots(results, cfg, cfg.out_dir)
    try:   # the code this run used, for the record
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                cwd=common.REPO_DIR).stdout.strip()
    except OSError:
        commit = ''
    meta = {'commit': commit, 'command': ' '.join(['python', '-m', 'experiments.recall'] + argv),
            'config': dataclasses.asdict(cfg), 'wall_s': time.time() - t_start, 'torch': torch.__version__,
            'machine': f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"}
    with open(os.path.join(cfg.out_dir, 'recall.json'), 'w') as f:
        json.dump({**meta, 'results': results}, f, indent=1)
    print(table)
    print(f"done in {meta['wall_s'] / 60:.1f} min; {cfg.out_dir}/recall.md, recall.png, curves.png, recall.json")


if __name__ == '__main__':
    main()
