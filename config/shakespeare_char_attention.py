# Transformer baseline: causal softmax attention with RoPE (same blocks, MLP and embeddings).
# 1,074,688 parameters (5 layers x 128 wide, 4 heads, vocab 65): an attention layer has fewer
# parameters than a recurrent one, so it gets a 5th layer to match fm/fm_sparse/mamba2 (1,068,848; +0.5%).
mixer = 'attention'
n_layer = 5
n_embd = 128
n_head = 4
out_dir = 'out-shakespeare-char-attention'

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
