# Transformer baseline: causal softmax attention with RoPE. An attention layer has fewer parameters
# than a recurrent one, so it gets a 5th layer to match the recurrent configs (within 0.6 %).
# Longer contexts: trained at block_size 256 (4x the shakespeare_char configs) and evaluated
# to 16x = 4096 characters. Parameters: 1,068,848 for fm, fm_sparse and mamba2 (4 x 128),
# 1,074,688 for attention (5 x 128, +0.5 %).
# Sized for a 2-core CPU: 600 iterations of 8 x 256 characters (1.23M characters, ~1.2 epochs).
out_dir = 'out-long-attention'
dataset = 'shakespeare_char'
mixer = 'attention'
n_layer = 5
n_embd = 128
n_head = 4
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
