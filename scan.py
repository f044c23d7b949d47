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
import math

import torch
import torch.nn.functional as F


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

    state (B,H,M,P) float32, updated in place (made contiguous first if it is not); x (B,H,P);
    g, beta, q (B,H,K), the values at slots idx (B,K), which all heads share. It equals
    scan_step with g, beta, q zero outside idx: a zero log-decay and a zero write leave a row
    as it was. A step is a few microseconds of arithmetic, so its cost is the number of ops
    (each a few microseconds of dispatch on CPU): the K rows are taken as one flat row list,
    updated by one batched matmul-add and read by one batched matmul.
    """
    B, H, M, P = state.shape
    K = idx.shape[1]
    state = state.contiguous()
    rows = (idx[:, None, :] + M * torch.arange(B * H, device=idx.device).view(B, H, 1)).view(-1)  # (B*H*K)
    S_flat = state.view(B * H * M, P)
    S_k = S_flat.index_select(0, rows).view(B * H, K, P)                # touch K rows, not M
    # S_k = exp(g) * S_k + beta x^T   (the rank-1 write, per head)
    S_k = torch.baddbmm(S_k * torch.exp(g.float()).view(B * H, K, 1),
                        beta.float().view(B * H, K, 1), x.float().view(B * H, 1, P))
    y = torch.bmm(q.float().view(B * H, 1, K), S_k).view(B, H, P)       # y = q^T S_k
    S_flat.index_copy_(0, rows, S_k.view(B * H * K, P))
    return y.to(x.dtype), state


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
# The chunked scan: the same recurrence computed chunk by chunk in parallel, in
# the three stages of kernels.py, with the same symbols.
#
# Inside a chunk of C steps that starts from state S_in, with G_t = sum_{s<=t} g_s
# (cumulative within the chunk, per slot, so G_t - G_s <= 0 for s <= t) and
# G_C = G at the chunk's last step:
#
#   1. chunk state   dS_c = sum_{s in c} (beta_s * e^{G_C - G_s})^T x_s           (M x P per chunk)
#   2. state pass    S_in[c+1] = e^{G_C} * S_in[c] + dS_c                         (n = T/C chunks)
#   3. chunk output  y_t = (q_t * e^{G_t}) S_in[c] + sum_{s<=t in c} [sum_i q_ti beta_si e^{G_ti - G_si}] x_s
#
# Every exponent above is <= 0. The intra-chunk term must not be factored as
# (q_t e^{G_t})(beta_s e^{-G_s}) from the chunk start: e^{-G_s} overflows fp32 once a
# chunk decays past ~88 nats (64 steps at -20 reach -1280).
#
# Stage 2 runs as one matmul by the (n+1) x (n+1) matrix of decays between chunk
# ends (each entry summed from its own chunks, _segsum), not as n small steps:
# on a CPU, n dependent ops on small tensors cost more than the arithmetic.
#
# Per-slot decay (FM): stage 3 cuts the chunk into sub-chunks of L = 32 steps and runs
# the recurrence across them with the state W at the boundary r before each
# sub-chunk a (r = last step of sub-chunk a-1, G_r = 0 at a = 0; r' = last step of a):
#
#   W_0 = S_in[c]
#   W_{a+1} = e^{G_r' - G_r} * W_a + (beta_a * e^{G_r' - G_a})^T x_a
#   y_a = (q_a * e^{G_a - G_r}) W_a + A_a x_a,   A_a[t,s] = sum_i q_ti beta_si e^{G_ti - G_si}  (s <= t in a)
#
# so everything but the diagonal L x L blocks A_a is a matmul. kernels.py computes
# A_a pairwise (in registers, cheap); here a pairwise L x L x M tensor would cost
# more than the rest of the scan, so A_a = (q_a e^{G_a - G_r})(beta_a e^{G_r - G_a})^T,
# one matmul, for every sub-chunk that decays by less than MAX_SPAN = 60 nats on all
# slots (e^{G_r - G_a} <= e^{60}: finite, and the product exact to fp32 rounding);
# only sub-chunks that decay faster are computed pairwise (_diagonal).
#
# Scalar decay (Mamba-2, g (B,T,H,1)): e^{G_t - G_s} has no slot axis, so the
# whole chunk is one C x C matrix and stage 3 is two matmuls, as in the SSD form:
#
#   y = ((q beta^T) * Lmask) x + (q * e^{G}) S_in[c],   Lmask[t,s] = e^{G_t - G_s} (s <= t), 0 (s > t)
# -----------------------------------------------------------------------------

SUB_CHUNK = 32   # L. kernels.SUB is 16 (tl.dot's smallest tile); here fewer, larger sub-chunks are
                 # faster (fwd+bwd B=4 T=2048 H=4 M=64 P=64, 1 thread: L=16 269 ms, L=32 183 ms)


def scan_chunked(x, g, beta, q, initial_state=None, chunk_size=64):
    """The chunked scan in PyTorch (differentiable, any T >= 1). Equals scan_naive.

    g (B,T,H,1) takes the scalar-decay path (C x C decay per chunk, autograd); per-slot g
    (B,T,H,M) the sub-chunked path, forward and backward written out (_ScanSlots)."""
    B, T, H, P = x.shape
    M = beta.shape[-1]
    S0 = _initial(initial_state, B, H, M, P, x.device)
    L = min(SUB_CHUNK, chunk_size)
    if chunk_size % L != 0:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of {L} (or smaller than it)")
    # The scan computes in float32 whatever its inputs' dtype (long cumulative decays); under
    # autocast its matmuls would drop back to bf16/fp16, so autocast is off inside it.
    with torch.autocast(x.device.type, enabled=False):
        if g.shape[-1] == 1:
            return _scan_scalar(x, g, beta, q, S0, chunk_size)
        return _ScanSlots.apply(x, g, beta, q, S0, chunk_size, L)


def _chunks(t, C):
    """(B,T,H,K) -> (B,H,n,C,K) float32, contiguous; T padded with zeros to n = ceil(T/C) chunks.
    A padded step has g = 0 (no decay), beta = 0 (no write), q = 0 (no read)."""
    B, T, H, K = t.shape
    n = -(-T // C)
    t = F.pad(t.float(), (0, 0, 0, 0, 0, n * C - T))
    return t.view(B, n, C, H, K).permute(0, 3, 1, 2, 4).contiguous()


def _unchunk(t, T):
    """(B,H,n,C,K) -> (B,T,H,K), dropping the padding."""
    B, H, n, C, K = t.shape
    return t.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, K)[:, :T]


def _segsum(a):
    """a (..., N) -> (..., N, N): [z,c] = sum_{c<l<=z} a_l for c <= z, -inf for c > z. Each entry
    is summed from its own terms (a masked cumsum), not as a difference of two long cumulative
    sums, so a decay of thousands of nats over the sequence loses nothing to cancellation."""
    N = a.shape[-1]
    tril = lambda d: torch.ones(N, N, dtype=torch.bool, device=a.device).tril(d)
    s = a[..., :, None].expand(*a.shape, N).masked_fill(~tril(-1), 0).cumsum(-2)   # [z,c]: l in (c, z]
    return s.masked_fill(~tril(0), float('-inf'))


def _state_pass(dS, G_C, S, reverse=False):
    """Stage 2, the recurrence across chunks, S_in[c+1] = e^{G_C[c]} * S_in[c] + dS_c from S_in[0] = S,
    as one matmul by the (n+1) x (n+1) matrix of decays between chunk ends (n = T/C is small):

        [S_in[0..n-1], S_final] = Dm [S, dS_0..dS_{n-1}],   Dm[z,c] = e^{sum of G_C over chunks c..z-1}

    reverse: the adjoint pass, [dS_initial, E[0..n-1]] = Dm^T [dD_0..dD_{n-1}, dS_final], where
    E[c] = dL/d(dS_c), the adjoint at the end of chunk c from later chunks.
    dS (B,H,n,M,P); G_C (B,H,n,M) or (B,H,n,1), the chunks' total log-decays; S (B,H,M,P).
    Returns (S_in, S_final), or with reverse (E, dS_initial): (B,H,n,M,P), (B,H,M,P)."""
    B, H, n, M, P = dS.shape
    K = G_C.shape[-1]                                               # M, or 1 (one decay for all slots)
    Dm = torch.exp(_segsum(F.pad(G_C.transpose(-1, -2), (1, 0))))  # (B,H,K,n+1,n+1)
    if reverse:
        v = torch.cat([dS, S[:, :, None]], 2)
        Dm = Dm.transpose(-1, -2)
    else:
        v = torch.cat([S[:, :, None], dS], 2)                       # (B,H,n+1,M,P)
    out = (Dm @ v.view(B, H, n + 1, K, -1).transpose(2, 3)).transpose(2, 3).reshape(B, H, n + 1, M, P)
    return (out[:, :, 1:], out[:, :, 0]) if reverse else (out[:, :, :-1], out[:, :, -1])


def _scan_scalar(x, g, beta, q, S0, C):
    """Scalar decay g (B,T,H,1): the chunk's decays form one C x C matrix (no slot axis),
    so stages 1 and 3 are matmuls and stage 2 one more; autograd does the backward."""
    B, T, H, P = x.shape
    xc, bc, qc = _chunks(x, C), _chunks(beta, C), _chunks(q, C)      # (B,H,n,C,.)
    G = _chunks(g, C)[..., 0].cumsum(-1)                            # (B,H,n,C)
    G_C = G[..., -1:]                                               # (B,H,n,1)
    # 1. chunk state: dS_c = (beta * e^{G_C - G})^T x
    dS = (bc * torch.exp(G_C - G)[..., None]).transpose(-1, -2) @ xc          # (B,H,n,M,P)
    # 2. state pass
    S_in, S = _state_pass(dS, G_C, S0)
    # 3. chunk output: ((q beta^T) * Lmask) x + (q * e^{G}) S_in
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    Lmask = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float('-inf')))  # (B,H,n,C,C)
    y = ((qc @ bc.transpose(-1, -2)) * Lmask) @ xc + (qc * torch.exp(G)[..., None]) @ S_in
    return _unchunk(y, T).to(x.dtype), S


def _pairwise(G):
    """G (...,L,M) -> (...,L,L,M) [t,s,i]: e^{G_ti - G_si} for s <= t, 0 for s > t
    (masked before exp: the exponent is positive there and could overflow)."""
    L = G.shape[-2]
    later = torch.ones(L, L, dtype=torch.bool, device=G.device).triu(1)[:, :, None]   # s > t
    D = G[..., :, None, :] - G[..., None, :, :]
    return D.masked_fill_(later, float('-inf')).exp_()


def _sub_boundaries(G):
    """G (B,H,n,k,L,M) -> G_end (B,H,n,k,M), G at each sub-chunk's last step r', and
    G_r, G at the step before it (the last step of sub-chunk a-1; 0 at a = 0, the chunk start)."""
    G_end = G[..., -1, :]
    G_r = F.pad(G_end, (0, 0, 1, -1))
    return G_end, G_r


MAX_SPAN = 60.0  # nats: a sub-chunk decaying by less factors its diagonal block (e^{60} ~ 1e26 < fp32 max)


def _sub_decays(G, L):
    """G (B,H,n,C,M), cumulative within each chunk -> the decays of stage 3 by sub-chunks of L:
        G_ (B,H,n,k,L,M)   G by sub-chunk (k = C/L)
        G_r, G_end (B,H,n,k,M)   G at the step before sub-chunk a (0 at a = 0) and at its last step r'
        from_r = e^{G_a - G_r},  to_end = e^{G_r' - G_a}   (B,H,n,k,L,M), both <= 1
        decay = e^{G_r' - G_r}   (B,H,n,k,M): the whole sub-chunk's decay
        wide (B,H,n,k) bool, or None: the sub-chunks that decay by more than MAX_SPAN on some slot."""
    B, H, n, C, M = G.shape
    G_ = G.view(B, H, n, C // L, L, M)
    G_end, G_r = _sub_boundaries(G_)
    from_r = torch.exp(G_ - G_r[..., None, :])
    to_end = torch.exp(G_end[..., None, :] - G_)
    return (G_, G_r, G_end, from_r, to_end, *_sub_span(G_r, G_end))


def _sub_span(G_r, G_end):
    """decay = e^{G_r' - G_r} (B,H,n,k,M), each sub-chunk's whole decay, and wide (B,H,n,k) bool
    or None: the sub-chunks that decay by more than MAX_SPAN nats on some slot."""
    wide = (G_r - G_end).amax(-1) > MAX_SPAN
    return torch.exp(G_end - G_r), (wide if wide.any() else None)


def _diagonal(q_from, b_to, G, q, beta, wide):
    """The diagonal blocks A_a[t,s] = sum_i q_ti beta_si e^{G_ti - G_si} (s <= t in sub-chunk a),
    (B,H,n,k,L,L). Through the boundary r before the sub-chunk, e^{G_ti - G_si} = e^{G_ti - G_ri} *
    e^{G_ri - G_si}, so A_a = (q * e^{G - G_r}) (beta * e^{G_r - G})^T = q_from b_to^T, one matmul:
    exact while the second factor stays finite, i.e. while the sub-chunk decays by less than
    MAX_SPAN nats (~88 would overflow fp32). The `wide` sub-chunks, which decay by more, are
    computed pairwise instead (never a positive exponent: e^{G_ti - G_si} with s <= t)."""
    A = (q_from @ b_to.transpose(-1, -2)).tril_()
    if wide is not None:
        A[wide] = (_pairwise(G[wide]).mul_(beta[wide][:, None, :, :]) @ q[wide][..., None])[..., 0]
    return A


def _to_r(b_end, decay):
    """beta * e^{G_r - G_a} = (beta * e^{G_r' - G_a}) / e^{G_r' - G_r}: exact where the sub-chunk decays
    by less than MAX_SPAN; the divisor is clamped so that wide sub-chunks (recomputed pairwise) stay finite."""
    return b_end / decay.clamp(min=math.exp(-MAX_SPAN))[..., None, :]


def _add_mm(out, a, b):
    """out += a @ b over the leading (batch) axes, accumulated by the matmul itself (no extra pass).
    out is a fresh contiguous tensor (...,I,J); a (...,I,K), b (...,K,J)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out


class _ScanSlots(torch.autograd.Function):
    """Per-slot decay (FM): the three stages, forward and backward, as kernels.py computes them.

    Forward, stage 3 by sub-chunks a of L steps (r = the step before a, r' = its last step):
        W_0 = S_in[c],   W_{a+1} = e^{G_r' - G_r} * W_a + (beta_a * e^{G_r' - G_a})^T x_a
        y_a = (q_a * e^{G_a - G_r}) W_a + A_a x_a            (A_a: _diagonal)
    Backward: the adjoint D_t = dL/dS_t runs the recurrence in reverse,
        D_t = e^{g_{t+1}} * D_{t+1} + q_t dy_t^T,   dx_t = D_t^T beta_t,   dbeta_t = D_t x_t,
    i.e. the forward stages with q and beta, x and dy swapped and time reversed:
        1. dD_c = sum_{s in c} (q_s * e^{G_s})^T dy_s                    (dL/dS_in[c] from chunk c)
        2. E[c] = D; D = e^{G_C} * D + dD_c, c = n-1..0 from D = dS_final; dS_initial = the last D
        3. per sub-chunk a, from the last, with V the adjoint at its last step r' (V = E[c] at a = k-1;
           kernels.py's reverse sweep calls it W):
             dx_a    = (beta_a * e^{G_r' - G_a}) V + A_a^T dy_a
             dbeta_a = e^{G_r' - G_a} * (x_a V^T) + [sum_{t>=s in a} Q[t,s] q_ti e^{G_ti - G_si}]_si
             V      <- e^{G_r' - G_r} * V + (q_a * e^{G_a - G_r})^T dy_a
           and dq_t = S_t dy_t reads the forward's W:
             dq_a    = e^{G_a - G_r} * (dy_a W_a^T) + [sum_{s<=t in a} Q[t,s] beta_si e^{G_ti - G_si}]_ti
        with Q[t,s] = dy_t . x_s; the bracketed diagonal terms factor through r as A_a does.
    The decay needs no sweep of its own: with G the per-step cumulative sum,
        dG_t = q_t * dq_t - beta_t * dbeta_t  (+ sum_p S_final * dS_final at the last step),
        dg_t = sum_{t' >= t} dG_t'.
    """

    @staticmethod
    def forward(ctx, x, g, beta, q, S0, C, L):
        B, T, H, P = x.shape
        xc, bc, qc = _chunks(x, C), _chunks(beta, C), _chunks(q, C)   # (B,H,n,C,.)
        G = _chunks(g, C).cumsum(3)                                   # (B,H,n,C,M)
        n, k, M = G.shape[2], C // L, G.shape[-1]
        sub = lambda t: t.view(B, H, n, k, L, t.shape[-1])            # (B,H,n,k,L,.)
        x_, b_, q_ = sub(xc), sub(bc), sub(qc)
        G_, G_r, G_end, from_r, to_end, decay, wide = _sub_decays(G, L)
        b_end = b_ * to_end                                           # beta * e^{G_r' - G}
        G_C = G[:, :, :, -1]                                          # (B,H,n,M)
        # 1. chunk state: dS_c = (beta * e^{G_C - G})^T x, with e^{G_C - G} = e^{G_C - G_r'} e^{G_r' - G}
        b_C = b_end * torch.exp(G_C[:, :, :, None] - G_end)[..., None, :]
        dS = b_C.view(B, H, n, C, M).transpose(-1, -2) @ xc           # (B,H,n,M,P)
        # 2. state pass
        S_in, S_final = _state_pass(dS, G_C, S0)
        # 3. chunk output, by sub-chunks of L
        Z = b_end.transpose(-1, -2) @ x_                              # (B,H,n,k,M,P)
        W = torch.empty_like(Z)                                       # W_a, the state entering sub-chunk a
        W[:, :, :, 0] = S_in
        for a in range(k - 1):
            torch.addcmul(Z[:, :, :, a], decay[:, :, :, a, :, None], W[:, :, :, a], out=W[:, :, :, a + 1])
        q_from = q_ * from_r                                          # q * e^{G - G_r}
        A = _diagonal(q_from, _to_r(b_end, decay), G_, q_, b_, wide)  # (B,H,n,k,L,L) [t,s]
        y = _add_mm(q_from @ W, A, x_)                                # (B,H,n,k,L,P)
        ctx.save_for_backward(xc, G, bc, qc, W, A, S_final, from_r, to_end)
        ctx.shape = (T, L, g.dtype, beta.dtype, q.dtype)
        return _unchunk(y.view(B, H, n, C, P), T).to(x.dtype), S_final

    @staticmethod
    def backward(ctx, dy, dS_final):
        with torch.autocast(dy.device.type, enabled=False):   # float32, as the forward (backward may run under autocast)
            return _ScanSlots.grads(ctx, dy, dS_final)

    @staticmethod
    def grads(ctx, dy, dS_final):
        xc, G, bc, qc, W, A, S_final, from_r, to_end = ctx.saved_tensors
        T, L, g_dtype, beta_dtype, q_dtype = ctx.shape
        B, H, n, C, P = xc.shape
        k, M = C // L, G.shape[-1]
        sub = lambda t: t.view(B, H, n, k, L, t.shape[-1])
        dyc = _chunks(dy, C)
        x_, b_, q_, dy_ = sub(xc), sub(bc), sub(qc), sub(dyc)
        G_ = sub(G)
        G_end, G_r = _sub_boundaries(G_)
        decay, wide = _sub_span(G_r, G_end)
        dS_final = dS_final.float()
        q_from, b_end = q_ * from_r, b_ * to_end
        # 1. dD_c = (q * e^{G})^T dy, with e^{G} = e^{G_r} e^{G - G_r}
        q_G = q_from * torch.exp(G_r)[..., None, :]
        dD = q_G.view(B, H, n, C, M).transpose(-1, -2) @ dyc          # (B,H,n,M,P)
        # 2. reverse state pass
        E, dS0 = _state_pass(dD, G[:, :, :, -1], dS_final, reverse=True)
        # 3. the sweeps: V_a, the adjoint at a's last step
        Zd = q_from.transpose(-1, -2) @ dy_                           # (B,H,n,k,M,P)
        V = torch.empty_like(Zd)
        V[:, :, :, k - 1] = E
        for a in range(k - 1, 0, -1):
            torch.addcmul(Zd[:, :, :, a], decay[:, :, :, a, :, None], V[:, :, :, a], out=V[:, :, :, a - 1])
        dx = _add_mm(b_end @ V, A.transpose(-1, -2), dy_)             # (B,H,n,k,L,P)
        Q = (dy_ @ x_.transpose(-1, -2)).tril_()                      # (B,H,n,k,L,L) [t,s] dy_t . x_s
        xV, dyW = x_ @ V.transpose(-1, -2), dy_ @ W.transpose(-1, -2)  # (B,H,n,k,L,M)
        inv = 1 / decay.clamp(min=math.exp(-MAX_SPAN))[..., None, :]  # e^{G_r - G_r'}
        # dbeta = e^{G_r' - G} (x V^T + Q^T (q_from e^{G_r - G_r'}));  dq = e^{G - G_r} (dy W^T + Q b_to)
        dbeta = _add_mm(xV.clone() if wide is not None else xV, Q.transpose(-1, -2), q_from * inv).mul_(to_end)
        dq = _add_mm(dyW.clone() if wide is not None else dyW, Q, b_end * inv).mul_(from_r)
        if wide is not None:                                          # pairwise where the factoring could overflow
            K = _pairwise(G_[wide]).mul_(Q[wide][..., None])          # (nw,L,L,M) [t,s,i]
            dq[wide] = from_r[wide] * dyW[wide] + (K * b_[wide][:, None, :, :]).sum(-2)
            dbeta[wide] = to_end[wide] * xV[wide] + K.mul_(q_[wide][:, :, None, :]).sum(-3)
        # the decay: dG = q dq - beta dbeta (+ S_final dS_final at step T), dg = reverse cumsum
        dG = _unchunk(torch.addcmul(qc * dq.view_as(qc), bc, dbeta.view_as(bc), value=-1), T)  # (B,T,H,M)
        dG[:, T - 1] += (S_final * dS_final).sum(-1)
        dg = dG.flip(1).cumsum(1).flip(1)
        return (_unchunk(dx.view(B, H, n, C, P), T).to(dy.dtype), dg.to(g_dtype),
                _unchunk(dbeta.view(B, H, n, C, M), T).to(beta_dtype),
                _unchunk(dq.view(B, H, n, C, M), T).to(q_dtype), dS0, None, None)
