# Mamba-2 baseline: the same scan with one decay for all slots (n_slots is its state size N).
# 1,068,848 parameters (4 layers x 128 wide, vocab 65), as fm and fm_sparse.
mixer = 'mamba2'
out_dir = 'out-shakespeare-char-mamba2'
