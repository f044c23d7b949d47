"""
Train a language model (FM, sparse FM, Mamba-2 or attention mixer) on a prepared dataset.

    python train.py                                   # the default run: fm_sparse, shakespeare_char
    python train.py config/shakespeare_char_fm.py     # a config file (flat `key = value` lines)
    python train.py --n_layer=2 --max_iters=100       # --key=value overrides (type-checked)
    python train.py --out_dir=out --init_from=resume  # continue a run from out/ckpt.pt, exactly
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (DDP; NCCL on CUDA, else gloo)
    python train.py --help                            # every key with its value

The keys are TrainConfig's below and ModelConfig's (model.py); both dataclasses' defaults are
the default run. Arguments apply left to right: config files, then --key=value.

Outputs in out_dir: ckpt.pt (replaced atomically, so an interrupted run keeps the last good one)
and log.jsonl (one JSON object per logged training step and per evaluation). For the FM mixers
each evaluation also reports the router's health (model.router_health over 4 validation
batches: effective and dead slots, max share, per layer) in its log line and as 'router'.
"""
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from common import (CKPT_FORMAT, REPO_DIR, autocast_context, first_line, load_checkpoint, lr_at,
                    model_from_checkpoint, parse_config, resolve_device, resolve_dtype,
                    save_checkpoint, train_tokens, triton_runs_on)
from common import log as common_log
from model import LM, ModelConfig, health_summary, router_health


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = 'out'
    init_from: str = 'scratch'           # 'scratch' | 'resume' (from out_dir/ckpt.pt)
    eval_interval: int = 250             # evaluate (and checkpoint) every this many iterations
    eval_iters: int = 20                 # batches per split per evaluation
    log_interval: int = 25               # a log line every this many iterations
    always_save_checkpoint: bool = True  # else only when the val loss improves
    # data: token files in data_dir/dataset/{train,val}.bin (see data/<dataset>/prepare.py)
    dataset: str = 'shakespeare_char'
    data_dir: str = 'data'
    batch_size: int = 16                 # sequences per micro-step per process
    gradient_accumulation_steps: int = 1  # micro-steps per iteration, per process
    # AdamW and its schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
    learning_rate: float = 2e-3
    max_iters: int = 1500
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0               # clip the gradient norm to this; 0 disables
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 1500           # keep equal to max_iters (a separate key so that
    min_lr: float = 2e-4                 #   extending a run with resume keeps the schedule)
    # system
    device: str = 'auto'                 # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N'
                                         #   | 'mps'
    dtype: str = 'auto'                  # 'auto' (bfloat16 autocast on CUDA, else float32)
                                         #   | 'float32' | 'bfloat16' | 'float16'
    compile: Optional[bool] = None       # torch.compile the model; None: where the device is CUDA
                                         #   (as nanoGPT; on CPU the compile outweighs its gain)
    peak_flops: float = 0.0              # per device, for MFU; 0 = known GPUs' bf16 peak
    seed: int = 1337

    def validate(self):
        checks = [(self.init_from in ('scratch', 'resume'), 'init_from', "'scratch' or 'resume'"),
                  (not os.path.isfile(self.out_dir), 'out_dir',
                   "a directory, not an existing file"),
                  (self.learning_rate > 0, 'learning_rate', "> 0"),
                  (self.grad_clip >= 0, 'grad_clip', ">= 0 (0 disables clipping)"),
                  (self.peak_flops >= 0, 'peak_flops', ">= 0 (0 = from the GPU's name)")]
        checks += [(getattr(self, k) >= 1, k, ">= 1") for k in
                   ('eval_interval', 'eval_iters', 'log_interval', 'batch_size',
                    'gradient_accumulation_steps')]
        checks += [(getattr(self, k) >= 0, k, ">= 0") for k in
                   ('max_iters', 'warmup_iters', 'lr_decay_iters')]
        for ok, key, need in checks:
            if not ok:
                raise SystemExit(f"train.py: {key}={getattr(self, key)!r} must be {need}")


# Keys a resumed run takes from this run's command line rather than from the checkpoint.
RUNTIME_KEYS = ('init_from', 'out_dir', 'device', 'dtype', 'compile', 'peak_flops')
# Model keys that can change on resume (they change how, not what, the model computes).
RESUME_MODEL_OVERRIDES = ('dropout', 'scan_impl', 'chunk_size')
# Dense bf16 peak FLOP/s per GPU, for MFU when --peak_flops is not given.
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def ensure_dataset(data_dir, dataset, prepare):
    """Exit with the prepare command to run if the dataset is missing; shakespeare_char is
    prepared here instead if `prepare` (not under torchrun: a rank that fails alone leaves the
    others hanging)."""
    d = os.path.join(data_dir, dataset)
    if os.path.exists(os.path.join(d, 'train.bin')) and os.path.exists(os.path.join(d, 'val.bin')):
        return
    script = os.path.join(REPO_DIR, 'data', dataset, 'prepare.py')
    cmd = f"python {os.path.relpath(script)}" + \
        ('' if os.path.abspath(d) == os.path.dirname(script) else f" --out_dir {d}")
    if not os.path.isfile(script):
        known = sorted(n for n in os.listdir(os.path.join(REPO_DIR, 'data'))
                       if os.path.isfile(os.path.join(REPO_DIR, 'data', n, 'prepare.py')))
        raise SystemExit(f"dataset '{dataset}' not found: no {d}/train.bin and no "
                         f"data/{dataset}/prepare.py "
                         f"(datasets with a prepare script: {', '.join(known)})")
    if dataset != 'shakespeare_char' or not prepare:
        raise SystemExit(f"dataset '{dataset}' is not prepared ({d}/train.bin is missing); "
                         f"run: {cmd}")
    print(f"dataset '{dataset}' is not prepared; running: {cmd}", flush=True)
    if subprocess.call([sys.executable, script, '--out_dir', d]) != 0:
        raise SystemExit(1)


def mix_seed(*xs):
    """A well-mixed 63-bit seed from a tuple of integers (seed, iteration, rank, stream, ...)."""
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64))


def get_batch(path, block_size, batch_size, gen, device):
    """batch_size random windows of block_size+1 tokens from the uint16 file at path, drawn
    with gen."""
    data = np.memmap(path, dtype=np.uint16, mode='r')   # re-opened each call: else memmaps leak
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))   # (B, T)
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if device.type == 'cuda':
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# config: TrainConfig and ModelConfig defaults < config files < --key=value
# (< the checkpoint, on resume)

cfg = TrainConfig()
explicit = parse_config(cfg, sys.argv[1:], extra=ModelConfig, prog='train.py')
model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
model_args = {k: v for k, v in explicit.items() if k in model_keys}
cfg.validate()
# a resumed run takes its model, and every key not given on this command line, from its checkpoint
ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
ckpt = None
if cfg.init_from == 'resume':
    ckpt = load_checkpoint(ckpt_path)
    for k, v in ckpt['config'].items():
        if hasattr(cfg, k) and k not in explicit and k not in RUNTIME_KEYS:
            setattr(cfg, k, v)
    ignored = [k for k in model_args if k not in RESUME_MODEL_OVERRIDES
               and model_args[k] != ckpt['model_args'].get(k)]
    if ignored and int(os.environ.get('RANK', 0)) == 0:
        print(f"note: resuming keeps the checkpoint's model; ignoring "
              f"{', '.join(f'--{k}={model_args[k]}' for k in ignored)}")
    model_args = {**ckpt['model_args'],
                  **{k: model_args[k] for k in RESUME_MODEL_OVERRIDES if k in model_args}}
    cfg.validate()
try:   # check the model's keys before any data work, and fill in the defaults
    model_args = dataclasses.asdict(ModelConfig(**model_args))
except (TypeError, ValueError) as e:
    raise SystemExit(f"train.py: {'the checkpoint model config: ' if ckpt else ''}{first_line(e)}")

# -----------------------------------------------------------------------------
# processes and devices: one per GPU (or several on CPU) under torchrun

ddp = int(os.environ.get('RANK', -1)) != -1
rank = int(os.environ.get('RANK', 0))
local_rank = int(os.environ.get('LOCAL_RANK', 0))
world = int(os.environ.get('WORLD_SIZE', 1))
master = rank == 0
device = resolve_device(cfg.device, local_rank)
if cfg.compile is None:
    cfg.compile = device.type == 'cuda'
if ddp:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)   # one GPU per process, whatever index was given
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cpu':   # share the cores among the processes on this node
        local_world = int(os.environ.get('LOCAL_WORLD_SIZE', world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def log(msg):
    if master:   # one line per run, not per process
        common_log(msg)


def stop(msg):
    """Every rank sees the same (all-reduced) losses, so every rank stops here together."""
    if ddp:
        dist.destroy_process_group()
    last = (f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path)
            else "no checkpoint was written")
    raise SystemExit(f"train.py: {msg}; stopping ({last})" if master else 1)


# -----------------------------------------------------------------------------
# data: data_dir/dataset/{train,val}.bin, uint16 tokens, and meta.pkl

ensure_dataset(cfg.data_dir, cfg.dataset, prepare=not ddp)
data = os.path.join(cfg.data_dir, cfg.dataset)
meta = {'vocab_size': 50257, 'tokenizer': 'gpt2'}   # a dataset without meta.pkl is GPT-2 BPE
if os.path.exists(os.path.join(data, 'meta.pkl')):
    with open(os.path.join(data, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    meta.setdefault('tokenizer', 'char' if 'itos' in meta else 'gpt2')
if ckpt is None and 'vocab_size' not in explicit:
    # GPT-2 BPE: 50257 padded to a multiple of 64
    model_args['vocab_size'] = meta['vocab_size'] if meta['tokenizer'] == 'char' else 50304
if model_args['vocab_size'] < meta['vocab_size']:
    raise SystemExit(f"train.py: vocab_size={model_args['vocab_size']} is smaller than the "
                     "dataset's "
                     f"vocabulary ({meta['vocab_size']})")
block_size = model_args['block_size']
splits = {s: os.path.join(data, f'{s}.bin') for s in ('train', 'val')}
for path in splits.values():
    if os.path.getsize(path) // 2 <= block_size:
        raise SystemExit(f"train.py: {path} holds {os.path.getsize(path) // 2} tokens, fewer than "
                         f"block_size+1={block_size + 1}; use a smaller block_size or a longer "
                         "text")

# -----------------------------------------------------------------------------
# model and optimizer: new, or the checkpoint's (weights, optimizer state, iteration, token count)

torch.manual_seed(cfg.seed)   # the same initial weights on every rank
dtype = resolve_dtype(cfg.dtype, device)
ctx = autocast_context(device, dtype)
scaler = torch.amp.GradScaler(device.type, enabled=(dtype == 'float16'))
iter_num, best_val_loss, tokens_seen = 0, float('inf'), 0
if ckpt is None:
    model = LM(ModelConfig(**model_args)).to(device)
else:
    model = model_from_checkpoint(ckpt, device,
                                  **{k: model_args[k] for k in RESUME_MODEL_OVERRIDES})
optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                       device.type)
if ckpt is not None:
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise SystemExit(f"train.py: the checkpoint's optimizer state does not fit the model: "
                         f"{first_line(e)}")
    if 'scaler' in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    iter_num, best_val_loss = int(ckpt['iter_num']), float(ckpt.get('best_val_loss', float('inf')))
    # no RNG state to restore: every step reseeds from (seed, iter, rank)
    tokens_seen = train_tokens(ckpt)
    ckpt = None   # free memory
if model.config.scan_impl == 'triton' and not triton_runs_on(device):
    raise SystemExit(f"train.py: scan_impl='triton' needs CUDA (or TRITON_INTERPRET=1, Triton's "
                     f"slow CPU interpreter); on {device.type} use --scan_impl=auto or "
                     f"--scan_impl=chunked")
raw_model = model
if cfg.compile:
    log("compiling the model (the first iteration and the first evaluation wait for it)")
    model = torch.compile(model)
train_model = (DDP(model, device_ids=[device.index] if device.type == 'cuda' else None) if ddp
               else model)

tokens_per_iter = cfg.gradient_accumulation_steps * world * cfg.batch_size * block_size
flops_per_token = raw_model.flops_per_token(block_size)   # for MFU
peak = cfg.peak_flops
if not peak and device.type == 'cuda' and dtype in ('bfloat16', 'float16'):
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), 0.0)
ckpt_meta = {'dataset': cfg.dataset, 'tokenizer': meta['tokenizer']}
if meta['tokenizer'] == 'char':
    ckpt_meta['itos'] = [meta['itos'][i] for i in range(len(meta['itos']))]
log_path = os.path.join(cfg.out_dir, 'log.jsonl')
start_iter = iter_num
if master:
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"train.py: cannot create out_dir {cfg.out_dir} ({e.strerror}); "
                         "pick another --out_dir")
    # A fresh run starts a fresh log. A resumed one keeps the records up to its checkpoint: steps
    # logged after it (by a run stopped between checkpoints) are repeated now: else they would
    # appear twice.
    kept = []
    if start_iter and os.path.exists(log_path):
        with open(log_path) as f:
            # skip a cut-off last line
            records = [json.loads(line) for line in f if line.rstrip().endswith('}')]
        kept = [r for r in records
                if r['iter'] < start_iter or (r['iter'] == start_iter and 'val_loss' in r)]
    with open(log_path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
log(f"{'resuming at iter ' + str(start_iter) if start_iter else 'training from scratch'}: "
    f"{model_args['mixer']} {model_args['n_layer']}x{model_args['n_embd']}, "
    f"{raw_model.get_num_params() / 1e6:.2f}M params, {cfg.dataset} "
    f"(vocab {model_args['vocab_size']}), device {device}, {dtype}, {world} process(es), "
    f"{tokens_per_iter:,} tokens/iter, max_iters {cfg.max_iters}")


def write_log(record):
    if master:
        with open(log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')


# Router health at each evaluation (FM mixers): the same 4 validation batches every time, the first
# ones estimate_loss scores (4 x batch_size x block_size tokens; the default run: 4,096 characters).
health_tokens = torch.cat([get_batch(splits['val'], block_size, cfg.batch_size,
                                     torch.Generator().manual_seed(mix_seed(cfg.seed, 1, 1, k)),
                                     device)[0] for k in range(4)])   # (4·batch_size, block_size)


@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches per split at every evaluation, spread over
    the ranks."""
    model.eval()
    out = {}
    for s, (split, path) in enumerate(splits.items()):
        total = torch.zeros(2, device=device, dtype=torch.float64)   # (loss sum, batches)
        for k in range(rank, cfg.eval_iters, world):
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 1, s, k))
            X, Y = get_batch(path, block_size, cfg.batch_size, gen, device)
            with ctx:
                _, loss = model(X, Y)
            one = torch.ones((), device=device, dtype=torch.float64)
            total += torch.stack([loss.double(), one])
        if ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# the training loop. The host reads the device only at log iterations and before evaluations
# (nanoGPT's way): elsewhere it queues the next step while the GPU runs this one.


def note_nonfinite(first_bad, it, loss, grad_norm):
    """first_bad (iteration, loss, grad norm) of the first step whose loss, or unscaled gradient
    norm, was not finite (iteration -1 while none), updated on the device: no host sync. A
    float16 GradScaler skips non-finite gradients itself, so only its loss counts."""
    bad = ~torch.isfinite(loss)
    if not scaler.is_enabled():
        bad = bad | ~torch.isfinite(grad_norm)
    now = torch.stack([torch.tensor(float(it), device=device, dtype=torch.float64),
                       loss.double(), grad_norm.double()])
    return torch.where(bad & (first_bad[0] < 0), now, first_bad)


def read_step(loss, grad_norm, first_bad):
    """One host sync: this step's loss and grad norm; stops the run if any step since the last
    read was not finite (its weights are then lost, but no checkpoint was written after it)."""
    loss, grad_norm, *bad = torch.cat([loss.double()[None], grad_norm.double()[None],
                                       first_bad]).tolist()
    if bad[0] >= 0:
        stop(f"the loss is {bad[1]} (gradient norm {bad[2]}) at iter {int(bad[0])}, not finite")
    return loss, grad_norm


t_start = time.time()
step_time, step_count = 0.0, 0
last_val = None
first_bad = torch.tensor([-1.0, 0.0, 0.0], device=device, dtype=torch.float64)
while True:
    # evaluate and checkpoint (not again at the iteration a resumed run starts from)
    if ((iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters)
            and not (start_iter and iter_num == start_iter)):
        t_eval = time.time()
        losses = estimate_loss()
        if iter_num == start_iter and cfg.compile:
            log(f"compiling: the first evaluation took {time.time() - t_eval:.1f} s")
        last_val = losses['val']
        record = {'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                  'time_s': round(time.time() - t_start, 3)}
        line = f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if model_args['mixer'] in ('fm', 'fm_sparse') and master:
            record['router'] = router_health(raw_model, health_tokens)
            line += f"; {health_summary(record['router'])}"
        log(line)
        write_log(record)
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            stop(f"the evaluation loss is not finite at iter {iter_num}")
        if losses['val'] < best_val_loss or cfg.always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0 and master:
                ckpt = {'format': CKPT_FORMAT, 'model': raw_model.state_dict(),
                        'optimizer': optimizer.state_dict(),
                        'model_args': dataclasses.asdict(raw_model.config),
                        'config': dataclasses.asdict(cfg),
                        'iter_num': iter_num, 'best_val_loss': best_val_loss, 'world_size': world,
                        'train_tokens': tokens_seen, 'meta': ckpt_meta}
                if scaler.is_enabled():
                    ckpt['scaler'] = scaler.state_dict()
                save_checkpoint(ckpt, ckpt_path)
                ckpt = None
    if iter_num >= cfg.max_iters:
        break

    # one optimizer step; its randomness depends only on (seed, iter_num, rank)
    t0 = time.time()
    lr = lr_at(iter_num, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) \
        if cfg.decay_lr else cfg.learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr
    torch.manual_seed(mix_seed(cfg.seed, 0, iter_num, rank, 0))                     # dropout
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 0, iter_num, rank, 1))   # batches
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(cfg.gradient_accumulation_steps):
        X, Y = get_batch(splits['train'], block_size, cfg.batch_size, gen, device)
        # DDP all-reduces the gradients only at the last micro-step
        sync = micro_step == cfg.gradient_accumulation_steps - 1
        with (train_model.no_sync() if ddp and not sync else nullcontext()), ctx:
            _, loss = train_model(X, Y)
            loss = loss / cfg.gradient_accumulation_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    if ddp:
        dist.all_reduce(loss_sum)
        loss_sum /= world
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                               cfg.grad_clip or float('inf'))
    first_bad = note_nonfinite(first_bad, iter_num, loss_sum, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    raw_model.update_router_bias(dist.all_reduce if ddp else None)   # router_balance='bias' only
    logged = iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters - 1
    # before an evaluation too, so that no checkpoint holds a step after a non-finite one
    if logged or (iter_num + 1) % cfg.eval_interval == 0 or iter_num == start_iter:
        loss_val, grad_norm = read_step(loss_sum, grad_norm, first_bad)
    step_time += time.time() - t0   # the read above waited for the GPU: the time is the GPU's
    step_count += 1
    tokens_seen += tokens_per_iter
    if iter_num == start_iter and cfg.compile:
        log(f"compiling: the first step took {step_time:.1f} s")

    if logged:
        ms = 1000 * step_time / step_count
        tps = tokens_per_iter * step_count / step_time
        record = {'iter': iter_num, 'loss': loss_val, 'lr': lr, 'grad_norm': grad_norm,
                  'ms_per_iter': round(ms, 3), 'tokens_per_s': round(tps, 1)}
        line = (f"iter {iter_num}: loss {loss_val:.4f}, lr {lr:.2e}, {ms:.1f} ms/iter, "
                f"{tps:,.0f} tokens/s")
        if peak:   # model FLOPs utilization: achieved / peak, over all devices
            record['mfu'] = round(flops_per_token * tps / (peak * world), 5)
            line += f", mfu {100 * record['mfu']:.1f}%"
        log(line)
        write_log(record)
        step_time, step_count = 0.0, 0
    iter_num += 1

log(f"done: {iter_num - start_iter} iterations in {time.time() - t_start:.1f} s; final val loss "
    f"{last_val if last_val is None else f'{last_val:.4f}'}; best val loss {best_val_loss:.4f}; "
    f"checkpoint {ckpt_path}")
if ddp:
    dist.barrier()   # no rank tears gloo down while another still talks to it (an abort at exit)
    dist.destroy_process_group()
