# Sparse FM at GPT-2-small scale on OpenWebText, for one GPU (not run by this project's CI).
# prepare: pip install datasets && python data/openwebtext/prepare.py
# 139,263,072 parameters: 12 layers x 768 wide (GPT-2 small: 124M; FM's in_proj is larger
# than attention's qkv), inner width 1536 = 24 heads of 64, 64 slots of which 8 are active.
# 16 x 1024 tokens x 32 micro-steps = 524,288 tokens per iteration (~0.5M, as GPT-2 small);
# 10,000 iterations = 5.2B tokens. With torchrun on N GPUs divide gradient_accumulation_steps
# by N to keep the batch (it counts micro-steps per process).
out_dir = 'out-owt-fm-sparse-gpt2small'
dataset = 'openwebtext'
mixer = 'fm_sparse'
n_layer = 12
n_embd = 768
expand = 2
head_dim = 64
n_slots = 64
top_k = 8
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32
max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 500
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 500
eval_iters = 100
log_interval = 10
dtype = 'bfloat16'
compile = False   # the Triton scan is its own kernel; try True once it has been checked with it
