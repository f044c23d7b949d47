# Mamba-2 baseline: the same scan with one decay for all slots (n_slots is its state size N).
# Longer contexts: trained at block_size 256 (4x the shakespeare_char configs) and evaluated
# to 16x = 4096 characters. Parameters: 1,068,848 for fm, fm_sparse and mamba2 (4 x 128),
# 1,074,688 for attention (5 x 128, +0.5 %).
# Sized for a 2-core CPU: 600 iterations of 8 x 256 characters (1.23M characters, ~1.2 epochs).
out_dir = 'out-long-mamba2'
dataset = 'shakespeare_char'
mixer = 'mamba2'
n_layer = 4
n_embd = 128
n_slots = 64
block_size = 256
batch_size = 8
max_iters = 600
lr_decay_iters = 600
warmup_iters = 60
learning_rate = 2e-3
min_lr = 2e-4
beta2 = 0.99
eval_interval = 200
eval_iters = 10
log_interval = 25
