"""
OpenWebText in GPT-2 BPE tokens, for GPU training (config/openwebtext_fm_sparse_gpt2small.py).
Needs network access and the Hugging Face `datasets` package (pip install datasets),
which is not a requirement of this project. Writes train.bin (~17 GB, ~9B tokens),
val.bin and meta.pkl beside this script, or into --out_dir.

    python data/openwebtext/prepare.py [--num_proc 8]
    python data/openwebtext/prepare.py --input PATH      # a local text file instead
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_utils import (  # noqa: E402
    GPT2_META, gpt2_encoding, parse_args, read_text, split_text, write_splits)


def extra_args(p):
    p.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument('--val_fraction', type=float, default=0.0005)


def from_local_text(args, enc):
    text = read_text(args.input, None, args.out_dir)
    train, val = split_text(text, 1.0 - args.val_fraction)
    eot = enc.eot_token
    write_splits(args.out_dir, enc.encode_ordinary(train) + [eot], enc.encode_ordinary(val) + [eot],
                 dict(GPT2_META))


def from_hub(args, enc):
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("openwebtext needs the 'datasets' package (pip install datasets) and network "
                 "access; or pass --input PATH to a local text")
    try:
        ds = load_dataset('openwebtext', num_proc=args.num_proc, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - offline, hub errors, ...
        sys.exit(f"could not download openwebtext through datasets ({type(e).__name__}: {e}); "
                 "pass --input PATH to a local copy")
    split = ds['train'].train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)
    split['val'] = split.pop('test')

    def tokenize(example):
        ids = enc.encode_ordinary(example['text'])
        ids.append(enc.eot_token)  # documents are separated by <|endoftext|>
        return {'ids': ids, 'len': len(ids)}

    tokenized = split.map(tokenize, remove_columns=['text'], desc='tokenizing',
                          num_proc=args.num_proc)
    os.makedirs(args.out_dir, exist_ok=True)
    counts = {}
    for name, dset in tokenized.items():
        n = int(np.sum(dset['len'], dtype=np.uint64))
        if n == 0:
            sys.exit(f"refusing to write an empty {name} split")
        path = os.path.join(args.out_dir, f'{name}.bin')
        arr = np.memmap(path, dtype=np.uint16, mode='w+', shape=(n,))
        shards = min(1024, len(dset))
        pos = 0
        for i in range(shards):
            batch = dset.shard(num_shards=shards, index=i, contiguous=True).with_format('numpy')
            ids = np.concatenate(batch['ids'])
            arr[pos:pos + len(ids)] = ids
            pos += len(ids)
        arr.flush()
        counts[name] = n
    import pickle
    with open(os.path.join(args.out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(dict(GPT2_META), f)
    print(f"wrote {args.out_dir}: train.bin {counts['train']:,} tokens, val.bin "
          f"{counts['val']:,} tokens, meta.pkl (tokenizer gpt2, vocab_size "
          f"{GPT2_META['vocab_size']})")


def main():
    args = parse_args(__doc__.strip().splitlines()[0], __file__, extra_args)
    enc = gpt2_encoding()
    if args.input is not None:
        from_local_text(args, enc)
    else:
        from_hub(args, enc)


if __name__ == '__main__':
    main()
