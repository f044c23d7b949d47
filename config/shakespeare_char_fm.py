# Dense Factorization Memory (every token writes to and reads from all n_slots slots).
# 1,068,848 parameters (4 layers x 128 wide, vocab 65) - equal to fm_sparse and mamba2; attention has 1,074,688 (+0.5%).
mixer = 'fm'
n_layer = 4
n_embd = 128
n_slots = 64
out_dir = 'out-shakespeare-char-fm'

# Training: the settings every shakespeare_char config shares (equal tokens, equal schedule).
exec(open(__file__.replace(f'_{mixer}.py', '_common.py')).read())
