# Dense Factorization Memory (every token writes to and reads from all n_slots slots).
# The shakespeare_char comparison: the four configs share train.py's default training run
# (equal tokens, equal schedule) and differ only in the mixer. 1,068,848 parameters
# (4 layers x 128 wide, vocab 65), as fm_sparse and mamba2; attention has 1,074,688 (+0.5 %).
mixer = 'fm'
out_dir = 'out-shakespeare-char-fm'
