"""
The Factorization Memory recurrence: its definition, a one-token step, and the
PyTorch chunked scan that trains on CPU.

Per head, with a memory S of m slots (rows), each a vector of width P:

    S_t[i,:] = exp(g[t,i]) * S_{t-1}[i,:] + beta[t,i] * x_t      # write
    y_t      = sum_i q[t,i] * S_t[i,:]                            # read

Shapes (the contract every scan here and in kernels.py follows):
    x            (B, T, H, P)   values
    g            (B, T, H, M)   log-decay per slot, <= 0; or (B, T, H, 1), one
                                decay for all slots (Mamba-2's case), broadcast
    beta         (B, T, H, M)   write strength per slot
    q            (B, T, H, M)   read weights per slot
    initial_state (B, H, M, P)  optional, float32
returns y (B, T, H, P) in x's dtype and the final state (B, H, M, P) in float32.
"""
import torch


def scan_step(state, x, g, beta, q):
    """One token of the recurrence: the decoding step, and the body of scan_naive.

    state (B,H,M,P) float32; x (B,H,P); g (B,H,M) or (B,H,1); beta, q (B,H,M).
    Returns y (B,H,P) in x's dtype and the new state (B,H,M,P) float32.
    """
    x32, g, beta, q = x.float(), g.float(), beta.float(), q.float()
    # S_t = exp(g_t) * S_{t-1} + beta_t x_t^T   (a rank-1 write, decaying per row)
    state = torch.exp(g)[..., None] * state + beta[..., None] * x32[..., None, :]
    # y_t = q_t^T S_t
    y = torch.einsum('bhm,bhmp->bhp', q, state)
    return y.to(x.dtype), state


def scan_step_sparse(state, x, g, beta, q, idx):
    """One token of a sparse layer: only the K selected rows of S are read and written.

    state (B,H,M,P) float32, updated in place; x (B,H,P); g, beta, q (B,H,K), the
    values at slots idx (B,K), which all heads share. It equals scan_step with g,
    beta, q zero outside idx: a zero log-decay and a zero write leave a row as it was.
    """
    B, H, M, P = state.shape
    rows = idx[:, None, :, None].expand(B, H, idx.shape[1], P)   # (B,H,K,P)
    y, S_k = scan_step(state.gather(2, rows), x, g, beta, q)     # touch K rows, not M
    state.scatter_(2, rows, S_k)
    return y, state


def scan_naive(x, g, beta, q, initial_state=None):
    """The definition of FM: the recurrence, one token at a time. Slow, obviously right."""
    B, T, H, P = x.shape
    M = beta.shape[-1]
    state = _initial(initial_state, B, H, M, P, x.device)
    ys = []
    for t in range(T):
        y, state = scan_step(state, x[:, t], g[:, t], beta[:, t], q[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _initial(initial_state, B, H, M, P, device):
    if initial_state is None:
        return torch.zeros(B, H, M, P, device=device, dtype=torch.float32)
    return initial_state.float()


# -----------------------------------------------------------------------------
# The chunked scan: the same recurrence computed chunk by chunk in parallel.
#
# Inside a chunk of C steps that starts from state S0, with G_t = sum_{s<=t} g_s
# (cumulative within the chunk, per slot, so G_t - G_s <= 0 for s <= t):
#
#   y_t   = (q_t * e^{G_t}) S0  +  sum_{s<=t} [sum_i q_{t,i} beta_{s,i} e^{G_{t,i}-G_{s,i}}] x_s
#   S_end = e^{G_C} * S0        +  sum_s (beta_s * e^{G_C - G_s})^T x_s
#
# Every exponent above is <= 0. The intra-chunk term must not be factored as
# (q e^{G_t})(beta e^{-G_s}): e^{-G_s} overflows fp32 once a chunk decays past
# ~88 nats. So the chunk is cut into sub-chunks of L steps: s and t in the same
# sub-chunk are computed pairwise (L x L x M); an earlier sub-chunk b reaches t
# through the state at its last step r_b (s <= r_b < t), so the decay splits into
# factors e^{G_t - G_r} e^{G_r - G_s} that are each <= 1.
# -----------------------------------------------------------------------------

SUB_CHUNK = 8


def scan_chunked(x, g, beta, q, initial_state=None, chunk_size=64):
    """The chunked scan in PyTorch (differentiable, any T >= 1). Equals scan_naive."""
    B, T, H, P = x.shape
    M = beta.shape[-1]
    C = chunk_size
    L = min(SUB_CHUNK, C)
    if C % L != 0:
        raise ValueError(f"chunk_size={C} must be a multiple of {L} (or smaller than it)")
    S0 = _initial(initial_state, B, H, M, P, x.device)

    # Pad T up to a whole number of chunks. A padded step has g=0 (no decay) and
    # beta=0 (no write), so the final state is the state after step T.
    n = -(-T // C)
    pad = n * C - T
    def chunks(t):  # (B,T,H,K) -> (B,H,n,C,K) float32
        t = torch.nn.functional.pad(t.float(), (0, 0, 0, 0, 0, pad))
        return t.view(B, n, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)
    g = g.expand_as(beta)                                        # Mamba-2's (B,T,H,1): same decay in every slot
    xc, gc, bc, qc = chunks(x), chunks(g), chunks(beta), chunks(q)

    G = gc.cumsum(dim=3)                                         # (B,H,n,C,M)
    y = _intra_chunk(xc, G, bc, qc, L)                           # (B,H,n,C,P)

    # Each chunk's own contribution to the state at its end, from a zero start.
    G_end = G[:, :, :, -1:, :]                                   # (B,H,n,1,M)
    dS = torch.einsum('bhncm,bhncp->bhnmp', bc * torch.exp(G_end - G), xc)  # (B,H,n,M,P)

    # Pass the state across chunks: a short sequential loop (n = T/C steps), so
    # no decay is ever formed as a difference of long cumulative sums.
    decay = torch.exp(G_end[:, :, :, 0, :])[..., None]           # (B,H,n,M,1)
    S, S_in = S0, []
    for decay_c, dS_c in zip(decay.unbind(2), dS.unbind(2)):  # unbind: one cheap backward, not n
        S_in.append(S)
        S = decay_c * S + dS_c
    S_in = torch.stack(S_in, dim=2)                              # (B,H,n,M,P) state entering chunk c

    # Read the entering state: (q_t * e^{G_t}) S0.
    y = y + torch.einsum('bhncm,bhnmp->bhncp', qc * torch.exp(G), S_in)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, P)[:, :T]
    return y.to(x.dtype), S


def _intra_chunk(x, G, beta, q, L):
    """sum_{s<=t, same chunk} [sum_i q_{t,i} beta_{s,i} e^{G_{t,i}-G_{s,i}}] x_s, by sub-chunks of L.

    x (B,H,n,C,P); G (B,H,n,C,M); beta, q (B,H,n,C,M). Returns (B,H,n,C,P).
    """
    B, H, n, C, P = x.shape
    k = C // L                                                   # sub-chunks per chunk
    sub = lambda t: t.reshape(B, H, n, k, L, t.shape[-1])        # (B,H,n,k,L,.)
    x, G, beta, q = sub(x), sub(G), sub(beta), sub(q)

    # Diagonal blocks, pairwise: scores[t,s] = sum_i q_ti beta_si e^{G_ti - G_si}, s <= t.
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    dG = G[..., :, None, :] - G[..., None, :, :]                 # (B,H,n,k,L,L,M)  [t,s]
    dG = dG.masked_fill(~causal[:, :, None], float('-inf'))      # mask before exp: s > t would overflow
    scores = (q[..., :, None, :] * beta[..., None, :, :] * torch.exp(dG)).sum(-1)  # (B,H,n,k,L,L)
    y = scores @ x                                                   # (B,H,n,k,L,P)
    if k == 1:
        return y.reshape(B, H, n, C, P)

    # Off-diagonal blocks b < a go through the state between sub-chunks, with
    # reference points r_b = last step of sub-chunk b (every exponent <= 0):
    #   Z_b   = sum_{s in b} (beta_s e^{G_{r_b} - G_s})^T x_s      sub-chunk b's write, seen at r_b
    #   W_a   = sum_{b<a} e^{G_{r_{a-1}} - G_{r_b}} Z_b            state entering sub-chunk a
    #   y_t  += (q_t e^{G_t - G_{r_{a-1}}}) W_a                     t in sub-chunk a
    G_r = G[..., -1, :]                                          # (B,H,n,k,M)
    Z = torch.einsum('bhnksm,bhnksp->bhnkmp', beta * torch.exp(G_r[..., None, :] - G), x)  # (B,H,n,k,M,P)
    earlier = torch.ones(k, k, dtype=torch.bool, device=x.device).tril(-1)  # [a,b]: b < a
    G_prev = torch.nn.functional.pad(G_r, (0, 0, 1, -1))         # G_{r_{a-1}}, 0 (chunk start) for a = 0
    dGr = (G_prev[..., :, None, :] - G_r[..., None, :, :])       # (B,H,n,k,k,M)  [a,b]
    dGr = dGr.masked_fill(~earlier[:, :, None], float('-inf'))
    W = torch.einsum('...ijm,...jmp->...imp', torch.exp(dGr), Z)  # (B,H,n,k,M,P)
    y = y + (q * torch.exp(G - G_prev[..., None, :])) @ W        # (B,H,n,k,L,P)
    return y.reshape(B, H, n, C, P)
