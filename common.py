"""
What the scripts (train.py, sample.py and experiments/: bench, evaluate, recall, reproduce)
share: configuration from a dataclass, config files and --key=value; the learning-rate schedule
and the log line; checkpoints; the device and its autocast.

A config file is flat assignments of literals, one key each (`n_layer = 4`, `mixer = 'fm'`);
comments are fine, code is not. `--key=value` takes a Python literal (`--top_k=None`,
`--lr=3e-4`); a str key takes the text as it is (`--out_dir=out-fm`).
"""
import ast
import dataclasses
import math
import os
import sys
import typing
from contextlib import nullcontext

import numpy as np
import torch

from model import LM, ModelConfig

CKPT_FORMAT = 'fm-ckpt-1'
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration


def _check(value, typ):
    """value as the dataclass field type typ (int -> float allowed; Optional); ValueError if it is
    not one."""
    if typing.get_origin(typ) is typing.Union:
        for t in typing.get_args(typ):
            try:
                return _check(value, t)
            except ValueError:
                pass
    elif typ is type(None) and value is None:
        return None
    elif typ is float and type(value) in (int, float):
        return float(value)
    elif type(value) is typ:
        return value
    raise ValueError


def _type_name(typ):
    args = typing.get_args(typ)
    if args:
        return ' or '.join(map(_type_name, args))
    return 'None' if typ is type(None) else typ.__name__


def _literal(raw, typ):
    """A command-line value: the text itself for str keys, else a Python literal (true/false
    too)."""
    if str in (typ, *typing.get_args(typ)) and raw != 'None':
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {'true': True, 'false': False}.get(raw.lower(), raw)


def value(raw, typ):
    """A command-line string as the field type typ (a Python literal; the text itself for str);
    ValueError if it is not one."""
    return _check(_literal(raw, typ), typ)


def ints(csv, key, prog):
    """'1,2,4' -> [1, 2, 4]; anything else exits with one line naming the key."""
    try:
        return [int(v) for v in str(csv).split(',') if v.strip()]
    except ValueError:
        raise SystemExit(f"{prog}: --{key}={csv} must be comma-separated integers, "
                         "e.g. 1,2,4") from None


def read_config_file(path):
    """{key: value} of a config file of flat `key = literal` assignments."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise SystemExit(f"could not read config file {path}: {type(e).__name__}: {e}")
    values = {}
    for node in tree.body:
        try:
            assert isinstance(node, ast.Assign) and len(node.targets) == 1
            assert isinstance(node.targets[0], ast.Name)
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except (AssertionError, ValueError, TypeError, SyntaxError):
            raise SystemExit(f"{path}:{node.lineno}: a config file holds only `key = literal` "
                             f"lines (got: {ast.unparse(node)[:60]})") from None
    return values


def parse_config(config, argv, extra=None, prog=None):
    """Apply config files and --key=value in argv, left to right, to the dataclass `config`.

    Keys of `extra` (a dataclass, e.g. ModelConfig) are accepted too: type-checked and returned,
    not set. Returns {key: value} for every key that argv set. An unknown key or a bad value exits
    with one line listing the valid keys; `--help` prints every key with its value so far.
    """
    prog = prog or os.path.basename(sys.argv[0])
    hints = typing.get_type_hints(type(config))
    own = set(hints)
    defaults = {f.name: f.default for f in dataclasses.fields(extra)} if extra is not None else {}
    if extra is not None:
        hints.update({k: t for k, t in typing.get_type_hints(extra).items() if k not in hints})
    explicit = {}

    def fail(msg):
        raise SystemExit(f"{prog}: {msg}; valid keys: {', '.join(hints)}")

    def apply(key, value, shown, where=''):
        if key not in hints:
            fail(f"unknown key '{key}'{where}")
        try:
            explicit[key] = _check(value, hints[key])
        except ValueError:
            fail(f"{shown}{where} is not a valid {_type_name(hints[key])}")
        if key in own:
            setattr(config, key, explicit[key])

    for arg in argv:
        if arg in ('-h', '--help'):
            values = {k: getattr(config, k) if k in own else explicit.get(k, defaults.get(k))
                      for k in hints}
            print(f"usage: {prog} [config_file.py ...] [--key=value ...]\n"
                  + '\n'.join(f"  --{k}={values[k]!r}  ({_type_name(t)})"
                              for k, t in hints.items()))
            raise SystemExit(0)
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                fail(f"expected --key=value, got '{arg}'")
            apply(key, _literal(raw, hints.get(key, str)), arg)
            continue
        path = arg if os.path.exists(arg) else os.path.join(REPO_DIR, arg)
        if not arg.endswith('.py') or not os.path.isfile(path):
            fail(f"'{arg}' is neither --key=value nor an existing config file (.py)")
        for key, value in read_config_file(path).items():
            apply(key, value, f"{key} = {value!r}", f" in config file {arg}")
    return explicit


# -----------------------------------------------------------------------------
# The learning-rate schedule and the log line


def lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at decay_iters (min_lr after)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def log(msg):
    """A progress line, flushed at once (the scripts' output is often piped into a log file)."""
    print(msg, flush=True)


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(ckpt, path):
    """torch.save to a temporary file in the same directory, then os.replace it over `path`:
    an interrupted or failed save leaves the previous checkpoint intact."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def first_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def load_checkpoint(path, map_location='cpu'):
    """A checkpoint written by train.py (torch.load with weights_only=True). A missing, corrupt or
    foreign file exits with one line."""
    if os.path.isfile(os.path.dirname(path)):
        raise SystemExit(f"{os.path.dirname(path)} is a file, not a run directory; give the "
                         "out_dir that train.py wrote")
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}; train one first "
                         f"(python train.py --out_dir={os.path.dirname(path) or '.'})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, random bytes, pickled objects...
        # (torch's own message suggests weights_only=False: bad advice for a file of unknown origin)
        raise SystemExit(f"{path} is not a readable checkpoint: corrupt, truncated or not written "
                         f"by train.py ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        raise SystemExit(f"{path} is not a checkpoint of this project (no 'format': "
                         f"'{CKPT_FORMAT}'); it was written by another program or an incompatible "
                         "version")
    missing = [k for k in ('model', 'model_args', 'iter_num', 'config') if k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is an incomplete checkpoint (missing {', '.join(missing)})")
    return ckpt


def train_tokens(ckpt):
    """Training tokens the checkpoint has seen (all processes); older checkpoints lack the count."""
    if 'train_tokens' in ckpt:
        return int(ckpt['train_tokens'])
    c = ckpt['config']
    per_iter = c.get('batch_size', 0) * c.get('gradient_accumulation_steps', 1) \
        * ckpt['model_args']['block_size'] * ckpt.get('world_size', 1)
    return int(ckpt['iter_num']) * per_iter


def val_tokens(ckpt, data_dir='', prog='error'):
    """The validation split of the checkpoint's dataset, as an int64 numpy array: from data_dir,
    else the data_dir it was trained with (relative paths also from the repo root)."""
    tc = ckpt['config']
    data_dir = data_dir or tc.get('data_dir', 'data')
    candidates = [data_dir] if os.path.isabs(data_dir) else \
        [data_dir, os.path.join(REPO_DIR, data_dir)]
    for d in candidates:
        path = os.path.join(d, tc.get('dataset', 'shakespeare_char'), 'val.bin')
        if os.path.exists(path):
            return np.array(np.memmap(path, dtype=np.uint16, mode='r'), dtype=np.int64)
    raise SystemExit(f"{prog}: no val.bin for dataset '{tc.get('dataset')}' under "
                     f"{' or '.join(candidates)}; prepare it (data/{tc.get('dataset')}/prepare.py) "
                     "or pass --data_dir")


def triton_runs_on(device):
    """Triton runs on CUDA, and on CPU only under its interpreter (TRITON_INTERPRET=1)."""
    return torch.device(device).type == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'


def model_from_checkpoint(ckpt, device='cpu', **overrides):
    """The LM described by ckpt['model_args'] (with overrides, e.g. dropout=0.0 or
    scan_impl='naive'), with the checkpoint's weights, on device. Mismatches exit with one line."""
    args = {**ckpt['model_args'], **overrides}
    if args.get('scan_impl') == 'triton' and not triton_runs_on(device):
        args['scan_impl'] = 'auto'   # trained with Triton: the chunked scan computes the same
    try:
        model = LM(ModelConfig(**args))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"the checkpoint's model config does not fit model.py: {first_line(e)}")
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v
             for k, v in ckpt['model'].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"the checkpoint's weights do not fit model.py: {first_line(e)}")
    return model.to(device)


# -----------------------------------------------------------------------------
# Device and precision


def resolve_device(name, local_rank=0):
    """'auto' (cuda > mps > cpu), 'cpu', 'cuda' (GPU local_rank), 'cuda:N' or 'mps'; one line if
    unavailable."""
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu'
    try:
        device = torch.device('cuda', local_rank) if name == 'cuda' else torch.device(name)
    except RuntimeError:
        raise SystemExit(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or "
                         "mps") from None
    if (device.type == 'cuda' and not torch.cuda.is_available()) \
            or (device.type == 'mps' and not mps):
        raise SystemExit(f"device={name!r} but {device.type.upper()} is not available here; "
                         "use --device=cpu (or auto)")
    return device


DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def resolve_dtype(name, device):
    """'auto' is bfloat16 autocast on a GPU that supports it, else float32."""
    if name not in DTYPES:
        raise SystemExit(f"dtype={name!r} must be one of {', '.join(DTYPES)}")
    if name == 'auto':
        return 'bfloat16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    return name


def autocast_context(device, dtype):
    """Mixed precision for the forward pass (the weights stay float32)."""
    if dtype == 'float32' or device.type not in ('cuda', 'cpu'):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
