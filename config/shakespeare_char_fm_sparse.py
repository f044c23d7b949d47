# Sparse Factorization Memory: each token writes to and reads from its top_k of n_slots slots.
# This is exactly `python train.py` (the defaults), in its own out_dir. 1,068,848 parameters
# (4 layers x 128 wide, 64 slots, top_k 8, vocab 65), as fm and mamba2.
mixer = 'fm_sparse'
out_dir = 'out-shakespeare-char-fm-sparse'
