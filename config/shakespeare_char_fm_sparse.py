# Sparse Factorization Memory: each token writes to and reads from its top_k of n_slots slots.
# This is the model `python train.py` trains by default.
# 1,068,848 parameters (4 layers x 128 wide, vocab 65) - equal to fm and mamba2; attention has 1,074,688 (+0.5%).
mixer = 'fm_sparse'
n_layer = 4
n_embd = 128
n_slots = 64
top_k = 8
out_dir = 'out-shakespeare-char-fm-sparse'

# Training: the same for the four shakespeare_char configs and `python train.py` (CPU-sized: about
# 13 min of one CPU core for fm_sparse and fm, 15 for mamba2, 4 for attention; scale up on a GPU).
dataset = 'shakespeare_char'
batch_size = 16
block_size = 64
max_iters = 1500
lr_decay_iters = 1500
warmup_iters = 100
learning_rate = 2e-3
min_lr = 2e-4
beta2 = 0.99
eval_interval = 250
eval_iters = 20
log_interval = 25
