"""
Tiny Shakespeare at the character level: the vocabulary is the set of characters in
the text. Writes train.bin / val.bin (uint16, a 90/10 split) and meta.pkl
(stoi, itos, vocab_size) beside this script, or into --out_dir.

    python data/shakespeare_char/prepare.py                    # downloads the text
    python data/shakespeare_char/prepare.py --input PATH       # uses a local copy
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_utils import parse_args, read_text, split_text, write_splits  # noqa: E402

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    args = parse_args(__doc__.strip().splitlines()[0], __file__)
    text = read_text(args.input, URL, args.out_dir)
    train, val = split_text(text, 0.9)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    meta = {'vocab_size': len(chars), 'tokenizer': 'char', 'stoi': stoi, 'itos': itos}
    write_splits(args.out_dir, [stoi[c] for c in train], [stoi[c] for c in val], meta)


if __name__ == '__main__':
    main()
