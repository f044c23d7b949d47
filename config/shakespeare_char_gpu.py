# Sparse FM on tiny-Shakespeare characters at nanoGPT's "baby GPT" scale, for one GPU:
# 6 layers x 384 (inner width 768 = 12 heads of 64), 64 slots of which 8 are active,
# 12,770,520 parameters; context 256, batch 64 (16,384 characters per iteration), 5000
# iterations, dropout 0.2, lr 1e-3, as nanoGPT's config/train_shakespeare_char.py.
# On CUDA train.py picks bf16 autocast and the Triton scan (dtype = 'auto', scan_impl = 'auto').
# Not run by this project (it had no GPU): no loss or time is known for it.
# What differs from the defaults (TrainConfig in train.py, ModelConfig in model.py), and the
# mixer, n_slots and top_k, stated.
out_dir = 'out-shakespeare-char-gpu'
mixer = 'fm_sparse'
n_layer = 6
n_embd = 384
n_slots = 64
top_k = 8
dropout = 0.2
block_size = 256
batch_size = 64
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False
