"""Looking inside Fig. 5's dense models: how much of a layer's read falls in the slots a sparse
model would keep (python results/formulation/read_share.py out-form/fig5/paper_dense_m128 ...,
from the repo root; prints one line per checkpoint).

Per FM layer, over 64 windows of the validation split: the slots a sparse twin keeps at a token
are the top m/4 of the routing weights w = softmax(r/τ); the read share is the part of the read
weights' mass (|q| for derived: its own query; φ = σ(μ)·α for the paper form) on those slots,
averaged over tokens, and the write share the same for the write weights (w; θ = σ(η)·α).
Chance, for a read unrelated to w, is 1/4."""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import model as M  # noqa: E402
from common import load_checkpoint, model_from_checkpoint, val_tokens  # noqa: E402

seen = []                                       # (layer, Gates, r) of each FM layer's forward
_inputs = M.RecurrentMixer.inputs


def recording_inputs(self, conv_out, raw):
    out = _inputs(self, conv_out, raw)
    seen.append((self, out[1], out[3]))
    return out


def shares(out_dir, windows=64):
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    model = model_from_checkpoint(ckpt, 'cpu', dropout=0.0).eval()
    T = model.config.block_size
    idx = torch.from_numpy(val_tokens(ckpt, prog='read_share.py')[:windows * T]).view(windows, T)
    seen.clear()
    M.RecurrentMixer.inputs = recording_inputs
    try:
        with torch.no_grad():
            model(idx)
    finally:
        M.RecurrentMixer.inputs = _inputs
    out = []
    for layer, gates, r in seen:
        w = torch.softmax(r.float() / layer.config.router_temp, -1)
        keep = torch.zeros_like(w).scatter(-1, w.topk(layer.M // 4, -1).indices, 1.0)
        share = lambda a: ((a * keep).sum(-1) / a.sum(-1)).mean().item()
        out.append((share(gates.q.float().abs()), share(gates.bw.float().abs())))
    return out


if __name__ == '__main__':
    for d in sys.argv[1:]:
        s = shares(d)
        print(f"{d}: read share " + ' '.join(f"{r:.3f}" for r, _ in s)
              + " | write share " + ' '.join(f"{wr:.3f}" for _, wr in s) + " (layers 0..)")
