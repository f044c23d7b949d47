# Mamba-2 baseline: the same scan with one decay for all slots (n_slots is its state size N).
# Longer contexts: trained at block_size 256 (4x the shakespeare_char configs) and evaluated
# to 16x = 4096 characters. Parameters: 1,068,848 for fm, fm_sparse and mamba2 (4 x 128),
# 1,074,688 for attention (5 x 128, +0.5 %).
# Sized for a 2-core CPU: 600 iterations of 8 x 256 characters (1.23M characters, ~1.2 epochs).
# Only what differs from the defaults (TrainConfig in train.py, ModelConfig in model.py).
out_dir = 'out-long-mamba2'
mixer = 'mamba2'
block_size = 256
batch_size = 8
max_iters = 600
lr_decay_iters = 600
warmup_iters = 60
eval_interval = 200
eval_iters = 10
