# Training settings shared by the four config/shakespeare_char_<mixer>.py files, which read this
# file, so that the comparison is at equal tokens and schedule. They are also train.py's defaults
# (CPU-sized: 1500 iterations took 8.8 min for fm, fm_sparse and mamba2, 3.3 for attention, on 2 cores).
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
