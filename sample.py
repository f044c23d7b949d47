"""
Sample text from a checkpoint written by train.py.

    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=500
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0.8 --top_k=50

Generation runs through model.generate: a parallel prefill over the prompt, then one
token at a time with constant cost per token for the recurrent mixers. On CUDA each token
replays one CUDA graph of the decoding step (--decode=graph; --compile=True fuses the step
first); on CPU the step runs eagerly (--decode=eager). The samples are printed to stdout,
each followed by a line of dashes; then one line on stderr gives the generation speed.
"""
import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from common import (DTYPES, autocast_context, load_checkpoint, model_from_checkpoint, parse_config,
                    resolve_device, resolve_dtype)


DECODE_MODES = ('auto', 'eager', 'static', 'graph')


@dataclass
class SampleConfig:
    out_dir: str = 'out'                 # the checkpoint is out_dir/ckpt.pt
    start: str = '\n'                    # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8             # < 1 sharper, > 1 more random
    top_k: Optional[int] = 200           # sample among the top_k most likely tokens; None: all
    seed: int = 1337
    device: str = 'auto'                 # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'mps'
    dtype: str = 'auto'                  # common.DTYPES; auto: bfloat16 on CUDA, else float32
    data_dir: str = 'data'               # only for checkpoints without a vocabulary of their own
    decode: str = 'auto'                 # model.generate's mode: auto (graph on CUDA, else eager)
                                         #   | eager | static | graph
    compile: bool = False                # torch.compile the static step (decode static or graph)


def tokenizer(ckpt, cfg):
    """(encode, decode) for the checkpoint's dataset: its own character table, or GPT-2 BPE."""
    meta = ckpt.get('meta') or {}
    itos = meta.get('itos')
    if itos is None and meta.get('tokenizer') != 'gpt2':   # fall back to the dataset's meta.pkl
        path = os.path.join(cfg.data_dir, ckpt['config'].get('dataset', ''), 'meta.pkl')
        if os.path.exists(path):
            with open(path, 'rb') as f:
                m = pickle.load(f)
            if 'itos' in m:
                itos = [m['itos'][i] for i in range(len(m['itos']))]
    if itos is not None:
        stoi = {ch: i for i, ch in enumerate(itos)}

        def encode(s):
            bad = sorted({c for c in s if c not in stoi})
            if bad:
                raise SystemExit(f"sample.py: the prompt has characters outside the vocabulary of "
                                 f"'{meta.get('dataset', ckpt['config'].get('dataset'))}': "
                                 f"{', '.join(repr(c) for c in bad)}")
            return [stoi[c] for c in s]
        return encode, lambda ids: ''.join(itos[i] for i in ids)
    try:
        import tiktoken
        enc = tiktoken.get_encoding('r50k_base')
    except Exception as e:  # noqa: BLE001
        raise SystemExit("sample.py: could not load the GPT-2 BPE (tiktoken 'r50k_base': "
                         f"{type(e).__name__}); connect to the network or set TIKTOKEN_CACHE_DIR "
                         "to a tiktoken cache")
    # ids past GPT-2's 50257 exist only as padding of the embedding (vocab_size 50304): skip them
    return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})), \
        (lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))


def main(argv=None):
    cfg = SampleConfig()
    parse_config(cfg, sys.argv[1:] if argv is None else argv, prog='sample.py')
    checks = [(cfg.num_samples >= 1, 'num_samples', ">= 1"),
              (cfg.max_new_tokens >= 0, 'max_new_tokens', ">= 0"),
              (cfg.temperature >= 0, 'temperature', ">= 0 (0 is greedy)"),
              (cfg.top_k is None or cfg.top_k >= 1, 'top_k', ">= 1 (or None)"),
              (cfg.dtype in DTYPES, 'dtype', f"one of {', '.join(DTYPES)}"),
              (cfg.decode in DECODE_MODES, 'decode', f"one of {', '.join(DECODE_MODES)}")]
    for ok, name, need in checks:
        if not ok:
            raise SystemExit(f"sample.py: {name}={getattr(cfg, name)!r} must be {need}")
    start = cfg.start
    if start.startswith('FILE:'):
        try:
            with open(start[5:], 'r', encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"sample.py: could not read the prompt file {start[5:]}: {e}")

    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'), map_location='cpu')
    encode, decode = tokenizer(ckpt, cfg)
    ids = encode(start)
    if not ids:
        raise SystemExit("sample.py: the prompt is empty; give --start with at least one character")
    model = model_from_checkpoint(ckpt, device, dropout=0.0)
    model.eval()
    ctx = autocast_context(device, resolve_dtype(cfg.dtype, device))
    torch.manual_seed(cfg.seed)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    top_k = None if cfg.top_k is None else min(cfg.top_k, model.config.vocab_size)
    mode = cfg.decode if cfg.decode != 'auto' else ('graph' if device.type == 'cuda' else 'eager')
    if mode == 'graph' and device.type != 'cuda':
        raise SystemExit(f"sample.py: --decode=graph needs a CUDA device, not {device.type}")
    if cfg.compile and mode == 'eager':
        raise SystemExit("sample.py: --compile=True compiles the static step: use it with "
                         "--decode=static or graph")
    elapsed = 0.0                        # in generate, to the last token on the host
    with torch.no_grad(), ctx:
        for _ in range(cfg.num_samples):
            t0 = time.perf_counter()
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k,
                               mode=mode, compile=cfg.compile)
            tokens = y[0].tolist()       # waits for the device
            elapsed += time.perf_counter() - t0
            print(decode(tokens))
            print('---------------', flush=True)
    n = cfg.num_samples * cfg.max_new_tokens
    print(f"sample.py: {n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s "
          f"(prefill{' and graph capture' if mode == 'graph' else ''} included; decode={mode}"
          f"{', compiled' if cfg.compile else ''}, {device.type})", file=sys.stderr)


if __name__ == '__main__':
    main()
