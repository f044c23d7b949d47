# Transformer baseline: causal softmax attention with RoPE (same blocks, MLP and embeddings).
# 1,074,688 parameters (5 layers x 128 wide, 4 heads, vocab 65): an attention layer has fewer
# parameters than a recurrent one, so it gets a 5th layer to match fm/fm_sparse/mamba2 (1,068,848; +0.5%).
mixer = 'attention'
n_layer = 5
n_embd = 128
n_head = 4
out_dir = 'out-shakespeare-char-attention'

# Training: the settings every shakespeare_char config shares (equal tokens, equal schedule).
exec(open(__file__.replace(f'_{mixer}.py', '_common.py')).read())
