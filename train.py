"""
Train a language model (FM, sparse FM, Mamba-2 or attention mixer) on a prepared dataset.

    python train.py                                   # the default: fm_sparse on shakespeare_char, CPU-sized
    python train.py config/shakespeare_char_fm.py     # a config file (a Python file assigning keys)
    python train.py --n_layer=2 --max_iters=100       # --key=value overrides (type-checked)
    python train.py --out_dir=out --init_from=resume  # continue a run from out/ckpt.pt
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (DDP; NCCL on CUDA, gloo on CPU)
    python train.py --help                            # every key with its default

Configuration is the TrainConfig dataclass below plus the model's keys (ModelConfig in
model.py); the script's model defaults are MODEL_DEFAULTS. Arguments are applied left to
right: config files, then --key=value. parse_config() is shared with sample.py and eval.py.

Outputs in out_dir: ckpt.pt (written atomically; see save_checkpoint) and log.jsonl
(one JSON object per logged training step and per evaluation).
"""
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from common import (CKPT_FORMAT, REPO_DIR, autocast_context, first_line as _first_line, load_checkpoint,
                    model_from_checkpoint, parse_config, resolve_device, resolve_dtype, save_checkpoint,
                    triton_runs_on)
from model import LM, ModelConfig


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
    lr_decay_iters: int = 1500           # keep equal to max_iters (it is a separate key so that
    min_lr: float = 2e-4                 #   extending a run with resume keeps the schedule)
    # system
    device: str = 'auto'                 # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    dtype: str = 'auto'                  # 'auto' (bfloat16 autocast on CUDA, else float32) | 'float32' | 'bfloat16' | 'float16'
    compile: bool = False                # torch.compile the model
    seed: int = 1337

    def validate(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {msg}")
        need(self.init_from in ('scratch', 'resume'), 'init_from', "must be 'scratch' or 'resume'")
        need(self.dtype in ('auto', 'float32', 'bfloat16', 'float16'), 'dtype',
             "must be one of auto, float32, bfloat16, float16")
        need(self.device == 'auto' or self.device.split(':')[0] in ('cpu', 'cuda', 'mps'), 'device',
             "must be auto, cpu, cuda, cuda:N or mps")
        for name in ('eval_interval', 'eval_iters', 'log_interval', 'batch_size', 'gradient_accumulation_steps'):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ('max_iters', 'warmup_iters', 'lr_decay_iters'):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.learning_rate > 0, 'learning_rate', "must be > 0")
        need(self.grad_clip >= 0, 'grad_clip', "must be >= 0 (0 disables clipping)")


# The model this script trains by default (any ModelConfig key can be overridden), sized for a
# 2-core CPU: 1500 iterations of 16x64 tokens took 14.8 min wall (777 s of CPU time, one thread,
# on a machine shared with other jobs) and reached val loss 1.58 on shakespeare_char.
MODEL_DEFAULTS = dict(mixer='fm_sparse', n_layer=4, n_embd=128, block_size=64, n_slots=64, top_k=8,
                      dropout=0.0)

# Keys a resumed run takes from this run's command line rather than from the checkpoint.
RUNTIME_KEYS = ('init_from', 'out_dir', 'device', 'dtype', 'compile')
# Model keys that can change on resume (they change how, not what, the model computes).
RESUME_MODEL_OVERRIDES = ('dropout', 'scan', 'chunk_size')


# -----------------------------------------------------------------------------
# Data


def dataset_dir(cfg):
    return os.path.join(cfg.data_dir, cfg.dataset)


def prepare_command(cfg):
    cmd = f"python {os.path.relpath(os.path.join(REPO_DIR, 'data', cfg.dataset, 'prepare.py'))}"
    default_dir = os.path.join(REPO_DIR, 'data', cfg.dataset)
    if os.path.abspath(dataset_dir(cfg)) != default_dir:
        cmd += f" --out_dir {dataset_dir(cfg)}"
    return cmd


def ensure_dataset(cfg):
    """Exit with the prepare command to run if the dataset is missing; shakespeare_char is prepared here."""
    d = dataset_dir(cfg)
    if all(os.path.exists(os.path.join(d, f)) for f in ('train.bin', 'val.bin')):
        return
    script = os.path.join(REPO_DIR, 'data', cfg.dataset, 'prepare.py')
    if not os.path.isfile(script):
        known = sorted(n for n in os.listdir(os.path.join(REPO_DIR, 'data'))
                       if os.path.isfile(os.path.join(REPO_DIR, 'data', n, 'prepare.py')))
        raise SystemExit(f"dataset '{cfg.dataset}' not found: no {d}/train.bin and no data/{cfg.dataset}/prepare.py "
                         f"(datasets with a prepare script: {', '.join(known)})")
    if cfg.dataset != 'shakespeare_char':
        raise SystemExit(f"dataset '{cfg.dataset}' is not prepared ({d}/train.bin is missing); run: {prepare_command(cfg)}")
    print(f"dataset '{cfg.dataset}' is not prepared; running: {prepare_command(cfg)}", flush=True)
    rc = subprocess.call([sys.executable, script, '--out_dir', d])
    if rc != 0:
        raise SystemExit(rc)


def load_meta(cfg):
    """The dataset's meta.pkl (vocab_size, tokenizer, itos for characters); GPT-2 BPE if there is none."""
    path = os.path.join(dataset_dir(cfg), 'meta.pkl')
    if not os.path.exists(path):
        return {'vocab_size': 50257, 'tokenizer': 'gpt2'}
    with open(path, 'rb') as f:
        meta = pickle.load(f)
    meta.setdefault('tokenizer', 'char' if 'itos' in meta else 'gpt2')
    return meta


def mix_seed(*xs):
    """A well-mixed 63-bit seed from a tuple of integers (seed, iteration, rank, stream, ...)."""
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64))


def get_batch(path, block_size, batch_size, gen, device):
    """batch_size random windows of block_size+1 tokens from the uint16 file at path, drawn with gen."""
    data = np.memmap(path, dtype=np.uint16, mode='r')   # re-opened each call: memmaps leak otherwise
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if device.type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Training


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = TrainConfig()
    explicit = parse_config(cfg, argv, extra=ModelConfig(**MODEL_DEFAULTS), prog='train.py')   # (vocab_size comes from the dataset)
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    model_args = {**MODEL_DEFAULTS, **{k: v for k, v in explicit.items() if k in model_keys}}

    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"train.py: {e}")

    # --- processes and devices ---
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    master = rank == 0
    device = resolve_device(cfg.device, local_rank)
    if ddp and device.type == 'cuda':
        device = torch.device('cuda', local_rank)   # one GPU per process, whatever index was given
    if ddp:
        import torch.distributed as dist
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        if device.type == 'cpu':   # share the cores among the processes on this node
            local_world = int(os.environ.get('LOCAL_WORLD_SIZE', world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        _train(cfg, explicit, model_args, model_keys, device, ddp, rank, world, master)
    finally:
        if ddp:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg, explicit, model_args, model_keys, device, ddp, rank, world, master):
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

    def log(msg):
        if master:
            print(msg, flush=True)

    # --- resume: the checkpoint supplies the model and every key not given on this command line ---
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    ckpt = None
    if cfg.init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path, map_location='cpu')
        for k, v in ckpt['config'].items():
            if k in {f.name for f in dataclasses.fields(TrainConfig)} and k not in explicit and k not in RUNTIME_KEYS:
                setattr(cfg, k, v)
        ignored = [k for k in explicit if k in model_keys and k not in RESUME_MODEL_OVERRIDES
                   and explicit[k] != ckpt['model_args'].get(k)]
        if ignored:
            log(f"note: resuming keeps the checkpoint's model; ignoring "
                f"{', '.join(f'--{k}={explicit[k]}' for k in ignored)}")
        model_args = {**ckpt['model_args'],
                      **{k: explicit[k] for k in RESUME_MODEL_OVERRIDES if k in explicit}}
    try:
        cfg.validate()
        # check the model's keys before any data work, and fill in any the checkpoint lacks
        model_args = dataclasses.asdict(ModelConfig(**model_args))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"train.py: {'the checkpoint model config: ' if ckpt else ''}{_first_line(e)}")

    # --- data ---
    if master:
        ensure_dataset(cfg)
    if ddp:
        dist.barrier()
    ensure_dataset(cfg)   # the other ranks only check
    meta = load_meta(cfg)
    if ckpt is None:
        vocab = meta['vocab_size'] if meta['tokenizer'] == 'char' else 50304   # GPT-2's 50257, padded to 64
        if 'vocab_size' in explicit and explicit['vocab_size'] < meta['vocab_size']:
            raise SystemExit(f"train.py: vocab_size={explicit['vocab_size']} is smaller than the dataset's "
                             f"vocabulary ({meta['vocab_size']})")
        model_args['vocab_size'] = explicit.get('vocab_size', vocab)
    train_bin = os.path.join(dataset_dir(cfg), 'train.bin')
    val_bin = os.path.join(dataset_dir(cfg), 'val.bin')
    block_size = model_args['block_size']
    for p in (train_bin, val_bin):
        n = os.path.getsize(p) // 2   # uint16 tokens
        if n <= block_size:
            raise SystemExit(f"train.py: {p} holds {n} tokens, fewer than block_size+1={block_size + 1}; "
                             f"use a smaller block_size or a longer text, and rerun {prepare_command(cfg)}")

    # --- model and optimizer ---
    torch.manual_seed(cfg.seed)   # the same initial weights on every rank
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, device, **{k: model_args[k] for k in RESUME_MODEL_OVERRIDES})
    else:
        try:
            model = LM(ModelConfig(**model_args)).to(device)
        except ValueError as e:
            raise SystemExit(f"train.py: {e}")
    if model.config.scan == 'triton' and not triton_runs_on(device):
        raise SystemExit(f"train.py: scan='triton' needs CUDA (or TRITON_INTERPRET=1, Triton's slow CPU "
                         f"interpreter); on {device.type} use --scan=auto or --scan=chunked")
    raw_model = model
    dtype = resolve_dtype(cfg.dtype, device)
    ctx = autocast_context(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == 'float16'))
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    iter_num, best_val_loss = 0, float('inf')
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(f"train.py: the checkpoint's optimizer state does not fit the model: {_first_line(e)}")
        if 'scaler' in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        iter_num, best_val_loss = int(ckpt['iter_num']), float(ckpt.get('best_val_loss', float('inf')))
        rng = ckpt.get('rng', {})
        if master and 'torch' in rng:   # every step reseeds from (seed, iter, rank) anyway; see below
            torch.set_rng_state(rng['torch'])
            if device.type == 'cuda' and rng.get('cuda'):
                torch.cuda.set_rng_state_all(rng['cuda'])
        ckpt = None   # free memory
    start_iter = iter_num
    fwd_model = torch.compile(raw_model) if cfg.compile else raw_model
    train_model = DDP(fwd_model, device_ids=[device.index] if device.type == 'cuda' else None) if ddp else fwd_model

    tokens_per_iter = cfg.gradient_accumulation_steps * world * cfg.batch_size * block_size
    ckpt_meta = {'dataset': cfg.dataset, 'tokenizer': meta['tokenizer']}
    if meta['tokenizer'] == 'char':
        ckpt_meta['itos'] = [meta['itos'][i] for i in range(len(meta['itos']))]
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if start_iter == 0:
            open(log_path, 'w').close()   # a fresh run starts a fresh log; a resumed one appends
        n_params = raw_model.get_num_params()
        log(f"{'resuming at iter ' + str(start_iter) if start_iter else 'training from scratch'}: "
            f"{model_args['mixer']} {model_args['n_layer']}x{model_args['n_embd']}, {n_params / 1e6:.2f}M params, "
            f"{cfg.dataset} (vocab {model_args['vocab_size']}), device {device}, {dtype}, "
            f"{world} process(es), {tokens_per_iter:,} tokens/iter, max_iters {cfg.max_iters}")

    def write_log(record):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over the same eval_iters batches per split at every evaluation, spread over the ranks."""
        fwd_model.eval()
        out = {}
        for s, (split, path) in enumerate((('train', train_bin), ('val', val_bin))):
            total = torch.zeros(2, device=device, dtype=torch.float64)
            for k in range(rank, cfg.eval_iters, world):
                gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 1, s, k))
                X, Y = get_batch(path, block_size, cfg.batch_size, gen, device)
                with ctx:
                    _, loss = fwd_model(X, Y)
                total += torch.stack([loss.double(), torch.ones((), device=device, dtype=torch.float64)])
            if ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        fwd_model.train()
        return out

    def stop(msg):
        last = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written"
        if master:
            raise SystemExit(f"train.py: {msg}; stopping ({last})")
        raise SystemExit(1)

    t_start = time.time()
    step_time, step_count = 0.0, 0
    last_val = None
    while True:
        # --- evaluate and checkpoint (not again at the iteration a resumed run starts from) ---
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not (start_iter and iter_num == start_iter):
            losses = estimate_loss()
            last_val = losses['val']
            log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            write_log({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                       'time_s': round(time.time() - t_start, 3)})
            if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
                stop(f"the evaluation loss is not finite at iter {iter_num}")
            if losses['val'] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses['val'])
                if iter_num > 0 and master:
                    rng = {'torch': torch.get_rng_state()}
                    if device.type == 'cuda':
                        rng['cuda'] = torch.cuda.get_rng_state_all()
                    ckpt = {'format': CKPT_FORMAT, 'model': raw_model.state_dict(),
                            'optimizer': optimizer.state_dict(), 'model_args': dataclasses.asdict(raw_model.config),
                            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': dataclasses.asdict(cfg),
                            'rng': rng, 'meta': ckpt_meta}
                    if scaler.is_enabled():
                        ckpt['scaler'] = scaler.state_dict()
                    save_checkpoint(ckpt, ckpt_path)
                    ckpt = None
        if iter_num >= cfg.max_iters:
            break

        # --- one optimizer step; its randomness depends only on (seed, iter_num, rank) ---
        t0 = time.time()
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        torch.manual_seed(mix_seed(cfg.seed, 0, iter_num, rank, 0))       # dropout
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 0, iter_num, rank, 1))   # batches
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(cfg.gradient_accumulation_steps):
            X, Y = get_batch(train_bin, block_size, cfg.batch_size, gen, device)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float('inf'))
        loss_val, grad_norm = loss_sum.item(), grad_norm.item()
        if not math.isfinite(loss_val) or (not scaler.is_enabled() and not math.isfinite(grad_norm)):
            stop(f"the loss is {loss_val} (gradient norm {grad_norm}) at iter {iter_num}, not finite")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_time += time.time() - t0
        step_count += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters - 1:
            ms = 1000 * step_time / step_count
            tps = tokens_per_iter * step_count / step_time
            log(f"iter {iter_num}: loss {loss_val:.4f}, lr {lr:.2e}, {ms:.1f} ms/iter, {tps:,.0f} tokens/s")
            write_log({'iter': iter_num, 'loss': loss_val, 'lr': lr, 'grad_norm': grad_norm,
                       'ms_per_iter': round(ms, 3), 'tokens_per_s': round(tps, 1)})
            step_time, step_count = 0.0, 0
        iter_num += 1

    if master:
        ran = iter_num - start_iter
        log(f"done: {ran} iterations in {time.time() - t_start:.1f} s; final val loss "
            f"{last_val if last_val is None else f'{last_val:.4f}'}; best val loss {best_val_loss:.4f}; "
            f"checkpoint {ckpt_path}")


if __name__ == '__main__':
    main()
