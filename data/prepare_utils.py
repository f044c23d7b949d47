"""
Shared helpers for the data/<dataset>/prepare.py scripts: argument parsing, reading
a local text or downloading the canonical one, and writing the token splits.

A prepared dataset is a directory holding
    train.bin, val.bin   token ids, uint16, one flat array each
    meta.pkl             {'vocab_size', 'tokenizer': 'char' | 'gpt2', and for 'char': 'stoi', 'itos'}
which is what train.py reads (data_dir/dataset/...).
"""
import argparse
import os
import pickle
import sys
import urllib.request

import numpy as np


def parse_args(description, script_file, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--input', metavar='PATH', default=None,
                   help='a local text file to use instead of downloading')
    p.add_argument('--out_dir', metavar='DIR', default=os.path.dirname(os.path.abspath(script_file)),
                   help='where to write train.bin, val.bin and meta.pkl (default: beside this script)')
    if extra is not None:
        extra(p)
    args = p.parse_args()
    # checked before any download or tokenizer load, so that a typo fails at once
    if args.input is not None and not os.path.isfile(args.input):
        sys.exit(f"--input {args.input} is not a file; give the path of a text file")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        sys.exit(f"--out_dir {args.out_dir} is a file; give a directory")
    return args


def read_text(input_path, url, out_dir):
    """The text of --input if given, else out_dir/input.txt if an earlier download left it, else downloads url."""
    if input_path is not None:
        try:
            with open(input_path, 'r', encoding='utf-8') as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"could not read --input {input_path}: {e}")
    cached = os.path.join(out_dir, 'input.txt')
    if os.path.exists(cached):
        with open(cached, 'r', encoding='utf-8') as f:
            return f.read()
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            text = r.read().decode('utf-8')
    except Exception as e:  # noqa: BLE001 - any network failure is reported the same way
        reason = getattr(e, 'reason', None) or e
        sys.exit(f"could not download {url} ({reason}); with a local copy of the text, run: "
                 f"python {' '.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])} --input PATH")
    os.makedirs(out_dir, exist_ok=True)
    with open(cached, 'w', encoding='utf-8') as f:
        f.write(text)
    print(f"downloaded {url} -> {cached} ({len(text):,} characters)")
    return text


def split_text(text, train_fraction=0.9):
    """Split a text at a character position into (train, val); refuses to produce an empty split."""
    if not text:
        sys.exit("the input text is empty; nothing to prepare")
    n = int(len(text) * train_fraction)
    train, val = text[:n], text[n:]
    if not train or not val:
        sys.exit(f"the input text ({len(text)} characters) is too short to split "
                 f"{train_fraction:.0%}/{1 - train_fraction:.0%} into two non-empty parts")
    return train, val


def write_splits(out_dir, train_ids, val_ids, meta):
    """Write train.bin/val.bin (uint16) and meta.pkl into out_dir and print what was written."""
    for name, ids in (('train', train_ids), ('val', val_ids)):
        if len(ids) == 0:
            sys.exit(f"refusing to write an empty {name} split; give a longer input text")
    if meta['vocab_size'] > 2 ** 16:
        sys.exit(f"vocab_size {meta['vocab_size']} does not fit the uint16 token format")
    os.makedirs(out_dir, exist_ok=True)
    # Each file goes to a temporary name first: an interrupted prepare leaves no half-written split.
    def write(name, save):
        path = os.path.join(out_dir, name)
        with open(path + '.tmp', 'wb') as f:
            save(f)
        os.replace(path + '.tmp', path)
    write('meta.pkl', lambda f: pickle.dump(meta, f))
    for name, ids in (('train', train_ids), ('val', val_ids)):
        write(f'{name}.bin', lambda f: f.write(np.asarray(ids, dtype=np.uint16).tobytes()))
    print(f"wrote {out_dir}: train.bin {len(train_ids):,} tokens, val.bin {len(val_ids):,} tokens, "
          f"meta.pkl (tokenizer {meta['tokenizer']}, vocab_size {meta['vocab_size']})")


def gpt2_encoding():
    """GPT-2's BPE (tiktoken's r50k_base). Offline it needs TIKTOKEN_CACHE_DIR pointing at a cache."""
    try:
        import tiktoken
        return tiktoken.get_encoding('r50k_base')
    except Exception as e:  # noqa: BLE001
        sys.exit(f"could not load the GPT-2 BPE (tiktoken 'r50k_base': {type(e).__name__}); "
                 "connect to the network or set TIKTOKEN_CACHE_DIR to a tiktoken cache")


GPT2_META = {'vocab_size': 50257, 'tokenizer': 'gpt2', 'eot_token': 50256}
