"""
Tiny Shakespeare in GPT-2 BPE tokens (tiktoken's r50k_base). Writes train.bin /
val.bin (uint16, a 90/10 split of the text) and meta.pkl beside this script, or
into --out_dir. Offline, point TIKTOKEN_CACHE_DIR at a tiktoken cache.

    python data/shakespeare/prepare.py                    # downloads the text
    python data/shakespeare/prepare.py --input PATH       # uses a local copy
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_utils import (  # noqa: E402
    GPT2_META, gpt2_encoding, parse_args, read_text, split_text, write_splits)

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    args = parse_args(__doc__.strip().splitlines()[0], __file__)
    enc = gpt2_encoding()
    text = read_text(args.input, URL, args.out_dir)
    train, val = split_text(text, 0.9)
    write_splits(args.out_dir, enc.encode_ordinary(train), enc.encode_ordinary(val),
                 dict(GPT2_META))


if __name__ == '__main__':
    main()
