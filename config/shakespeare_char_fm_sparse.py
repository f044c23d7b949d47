# Sparse Factorization Memory: each token writes to and reads from its top_k of n_slots slots.
# This is the model `python train.py` trains by default.
# 1,068,848 parameters (4 layers x 128 wide, vocab 65) - equal to fm and mamba2; attention has 1,074,688 (+0.5%).
mixer = 'fm_sparse'
n_layer = 4
n_embd = 128
n_slots = 64
top_k = 8
out_dir = 'out-shakespeare-char-fm-sparse'

# Training: the settings every shakespeare_char config shares (equal tokens, equal schedule).
exec(open(__file__.replace(f'_{mixer}.py', '_common.py')).read())
