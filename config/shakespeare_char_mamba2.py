# Mamba-2 baseline: the same scan with one decay for all slots (n_slots is its state size N).
# 1,068,848 parameters (4 layers x 128 wide, vocab 65) - equal to fm and fm_sparse; attention has 1,074,688 (+0.5%).
mixer = 'mamba2'
n_layer = 4
n_embd = 128
n_slots = 64
out_dir = 'out-shakespeare-char-mamba2'

# Training: the settings every shakespeare_char config shares (equal tokens, equal schedule).
exec(open(__file__.replace(f'_{mixer}.py', '_common.py')).read())
