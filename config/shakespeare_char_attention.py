# Transformer baseline: causal softmax attention with RoPE (same blocks, MLP and embeddings).
# An attention layer has fewer parameters than a recurrent one, so it gets a 5th layer:
# 1,074,688 parameters (5 layers x 128 wide, 4 heads, vocab 65), +0.5 % over fm/fm_sparse/mamba2.
mixer = 'attention'
n_layer = 5
out_dir = 'out-shakespeare-char-attention'
