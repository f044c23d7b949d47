# Sparse FM on tiny Shakespeare in GPT-2 BPE tokens (prepare: python data/shakespeare/prepare.py).
# 16,769,888 parameters (4 layers x 256 wide; 12.9M of them are the tied 50304-token embedding).
# The train split is only ~302k tokens, so this overfits after a few epochs: watch val loss
# (the best checkpoint is kept with always_save_checkpoint=False). Sized for a GPU; on a CPU
# the 50k-way softmax dominates the cost of an iteration.
out_dir = 'out-shakespeare-bpe-fm-sparse'
dataset = 'shakespeare'
mixer = 'fm_sparse'
n_layer = 4
n_embd = 256
n_slots = 64
top_k = 8
dropout = 0.1
block_size = 256
batch_size = 16
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
eval_interval = 200
eval_iters = 40
log_interval = 20
always_save_checkpoint = False
