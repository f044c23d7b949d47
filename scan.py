"""
The Factorization Memory recurrence: its definition, and the chunked scan that trains on CPU.

Per head, with a memory S of m slots (rows; M in code), each a vector of width P:

    S_t[i,:] = exp(g[t,i]) * S_{t-1}[i,:] + beta[t,i] * x_t      # write
    y_t      = sum_i q[t,i] * S_t[i,:]                            # read

The file has two parts:
  1. The definition: scan_step (one token: the decode step, and the loop body of scan_naive),
     scan_step_sparse (one token of a sparse layer, touching K of the M rows) and scan_naive;
     expand_gates, which turns a layer's factored gates into the per-head g, beta, q below.
  2. THE CPU FAST PATH (marked below): scan_chunked, the same recurrence chunk by chunk, in the
     three stages that kernels.py runs in Triton. The stages' equations are stated there, once.

Shapes (the contract every scan here and in kernels.py follows):
    x             (B, T, H, P)   values
    g             (B, T, H, M)   log-decay per slot, <= 0; or (B, T, H, 1), one decay for all
                                 slots (Mamba-2's case), broadcast
    beta          (B, T, H, M)   write strength per slot
    q             (B, T, H, M)   read weights per slot
    initial_state (B, H, M, P)   optional, float32
returns y (B, T, H, P) in x's dtype and the final state (B, H, M, P) in float32.

Where scan.py and kernels.py differ
    Both run the three stages below with the same names (G, G_C, S_in, W, E, A_a, L; stage 1
    kernels._chunk_state, 2 _state_pass, 3 _chunk_output_fwd, and the backward sweeps
    _chunk_dx_dbeta_bwd and _chunk_dq_dg_bwd), and both equal scan_naive to fp32 rounding. They
    differ where a CPU and a GPU find different things cheap. On a CPU every PyTorch op costs
    microseconds of dispatch and every intermediate tensor goes through memory: few, large
    matmuls win. A Triton program keeps its tiles in registers, where an elementwise pass is
    almost free, and tl.dot's smallest tile side is 16.
    - The sub-chunk L: 32 here (SUB), 16 in kernels.py (kernels.SUB, tl.dot's minimum). Fewer,
      larger sub-chunks are faster on CPU: fwd+bwd at B=4 T=2048 H=4 M=64 P=64, 1 thread, runs
      about 1.2x faster at L=32 than at L=16.
    - The diagonal blocks A_a of stage 3: here one matmul factored through the sub-chunk's
      start r, A_a = (q_a e^{G_a - G_r})(beta_a e^{G_r - G_a})^T, for every sub-chunk that
      decays by less than MAX_SPAN = 60 nats on all slots (so e^{G_r - G_a} <= e^60 is finite
      in fp32, and e^{G_t - G_r} e^{G_r - G_s} is e^{G_t - G_s} to rounding); only a sub-chunk
      that decays faster is computed pairwise, as an L x L x M tensor, which on a CPU costs
      more than the rest of the scan. kernels.py computes every diagonal block pairwise, one
      column at a time in registers: no L x L x M tensor in memory, and no span to check.
    - Stage 2: here one matmul by the (n+1) x (n+1) matrix of decays between chunk ends
      (_segsum), not n small dependent ops; kernels.py loops over the n chunks, the state in
      registers.
    - Scalar decay g (B,T,H,1): here a path of its own (_scan_scalar, the SSD form: a chunk's
      decays are one C x C matrix; autograd does the backward); kernels.py reads g as
      (B,T,H,1) in the per-slot kernels, each slot's decay broadcast in registers.
    - The backward: here the forward saves the states W at every sub-chunk and the blocks A_a,
      and one pass gives dbeta and dq (they share Q[t,s] = dy_t . x_s); kernels.py saves only
      S_in, recomputes W in _chunk_dq_dg_bwd's forward sweep and A_a in registers.
    - The decay gradient dg: here dG = q*dq - beta*dbeta, then a reverse cumsum over T in
      PyTorch (step 4 of _ScanSlots.backward); kernels.py computes it in _chunk_dq_dg_bwd, a
      chunk-local sum that starts from the total the reverse state pass carries in (its header
      gives the identity), so no T-long tensor is made.
"""
import math

import torch
import torch.nn.functional as F


# =============================================================================
# 1. The definition
# =============================================================================

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
    heads = M * torch.arange(B * H, device=idx.device).view(B, H, 1)
    rows = (idx[:, None, :] + heads).view(-1)                           # (B*H*K)
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


def expand_gates(gw, bw, q, H, A=None, delta=None):
    """A layer's factored gates -> the per-head g, beta, q that the scans above take.

    The gates of every mixer in model.py are products of per-token factors over the slots, which
    all heads share, and per-head ones:

        g[h,i] = A[h] * delta[h] * gw[i]      beta[h,i] = delta[h] * bw[i]      q[h,i] = q[i]

    gw (..., M), or (..., 1) for one decay for all slots (Mamba-2); bw, q (..., M); delta (..., H)
    or None (1); A (H) or None (1). Returns g (..., H, M) or (..., H, 1), beta and q (..., H, M),
    float32. kernels.scan_factored takes the factors and forms these in registers instead."""
    gw, bw, q = gw.float()[..., None, :], bw.float()[..., None, :], q.float()[..., None, :]
    d = 1.0 if delta is None else delta.float()[..., None]
    a = 1.0 if A is None else A.float()[:, None]
    g = (a * d * gw).expand(*bw.shape[:-2], H, gw.shape[-1])
    beta = (d * bw).expand(*bw.shape[:-2], H, bw.shape[-1])
    return g, beta, q.expand_as(beta)


def _initial(initial_state, B, H, M, P, device):
    if initial_state is None:
        return torch.zeros(B, H, M, P, device=device, dtype=torch.float32)
    return initial_state.float()


# =============================================================================
# 2. THE CPU FAST PATH: the chunked scan, the same recurrence chunk by chunk
#
# In a chunk c of C steps that starts from state S_in[c], with G_t = sum_{s<=t} g_s (cumulative
# within the chunk, per slot, so G_t - G_s <= 0 for s <= t) and G_C = G at the chunk's last step:
#
#   1. chunk state   dS_c = sum_{s in c} (beta_s * e^{G_C - G_s})^T x_s            (M x P)
#   2. state pass    S_in[c+1] = e^{G_C} * S_in[c] + dS_c     (n = T/C chunks; S_in[0] = S0)
#   3. chunk output  y_t = (q_t * e^{G_t}) S_in[c] + sum_{s<=t in c} A[t,s] x_s,
#                    A[t,s] = sum_i q_ti beta_si e^{G_ti - G_si}
#
# Stage 3 cuts the chunk into sub-chunks a of L steps and carries the state W across them
# (r = the step before a, G_r = 0 at a = 0; r' = the last step of a):
#
#   W_0 = S_in[c],   W_{a+1} = e^{G_r' - G_r} * W_a + (beta_a * e^{G_r' - G_a})^T x_a
#   y_a = (q_a * e^{G_a - G_r}) W_a + A_a x_a,      A_a = the L x L diagonal block of A
#
# so everything but the diagonal blocks is a matmul with exponents <= 0. The intra-chunk term
# must not be factored as (q_t e^{G_t})(beta_s e^{-G_s}) from the chunk start: e^{-G_s}
# overflows fp32 past ~88 nats (64 steps at -20 reach -1280). Factored through the sub-chunk's
# start r instead, A_a = (q_a e^{G_a - G_r})(beta_a e^{G_r - G_a})^T is one matmul, exact while
# e^{G_r - G_a} stays finite: here for every sub-chunk that decays by less than MAX_SPAN nats on
# all slots; a sub-chunk that decays faster is computed pairwise (_pairwise: exponents <= 0).
#
# Scalar decay (Mamba-2, g (B,T,H,1)): e^{G_t - G_s} has no slot axis, so a chunk's A is one
# C x C matrix and stage 3 is two matmuls, as in the SSD form:
#
#   y = ((q beta^T) * Lmask) x + (q * e^{G}) S_in[c],   Lmask[t,s] = e^{G_t - G_s} (s <= t), else 0
# =============================================================================

SUB = 32          # L, the sub-chunk (kernels.SUB is 16; the header says why they differ)
MAX_SPAN = 60.0   # nats: a sub-chunk decaying by less factors A_a (e^{60} ~ 1e26 < fp32 max)


def scan_chunked(x, g, beta, q, initial_state=None, chunk_size=64):
    """The chunked scan in PyTorch (differentiable, any T >= 1). Equals scan_naive.

    g (B,T,H,1) takes the scalar-decay path (_scan_scalar, autograd); per-slot g (B,T,H,M) the
    sub-chunked one, forward and backward written out (_ScanSlots)."""
    B, T, H, P = x.shape
    M = beta.shape[-1]
    S0 = _initial(initial_state, B, H, M, P, x.device)
    L = min(SUB, chunk_size)
    if chunk_size % L != 0:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of {L} (or smaller than it)")
    # The scan computes in float32 whatever its inputs' dtype (long cumulative decays); under
    # autocast its matmuls would drop back to bf16/fp16, so autocast is off inside it.
    with torch.autocast(x.device.type, enabled=False):
        if g.shape[-1] == 1:
            return _scan_scalar(x, g, beta, q, S0, chunk_size)
        return _ScanSlots.apply(x, g, beta, q, S0, chunk_size, L)


def scan_factored(x, gw, bw, q, A=None, delta=None, initial_state=None, chunk_size=64):
    """scan_chunked on factored gates (expand_gates): the CPU twin of kernels.scan_factored."""
    g, beta, q = expand_gates(gw, bw, q, x.shape[-2], A, delta)
    return scan_chunked(x, g, beta, q, initial_state, chunk_size)


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
    s = a[..., :, None].expand(*a.shape, N).masked_fill(~tril(-1), 0).cumsum(-2)  # l in (c, z]
    return s.masked_fill(~tril(0), float('-inf'))


def _state_pass(dS, G_C, S, reverse=False):
    """Stage 2 (with reverse, the backward's) as one matmul by the (n+1) x (n+1) matrix Dm of
    decays between chunk ends, Dm[z,c] = e^{sum of G_C over chunks c..z-1}:
        forward:  [S_in[0..n-1], S_final] = Dm [S, dS_0 .. dS_{n-1}]             (S = S0)
        reverse:  [dS_initial, E[0..n-1]] = Dm^T [dD_0 .. dD_{n-1}, dS_final]    (S = dS_final)
    dS (B,H,n,M,P), the dS_c or dD_c; G_C (B,H,n,M) or (B,H,n,1), the chunks' total log-decays;
    S (B,H,M,P). Returns (S_in, S_final), or with reverse (E, dS_initial)."""
    B, H, n, M, P = dS.shape
    K = G_C.shape[-1]                                               # M, or 1 (scalar decay)
    Dm = torch.exp(_segsum(F.pad(G_C.transpose(-1, -2), (1, 0))))  # (B,H,K,n+1,n+1)
    if reverse:
        v = torch.cat([dS, S[:, :, None]], 2)
        Dm = Dm.transpose(-1, -2)
    else:
        v = torch.cat([S[:, :, None], dS], 2)                       # (B,H,n+1,M,P)
    out = (Dm @ v.view(B, H, n + 1, K, -1).transpose(2, 3)).transpose(2, 3)
    out = out.reshape(B, H, n + 1, M, P)
    return (out[:, :, 1:], out[:, :, 0]) if reverse else (out[:, :, :-1], out[:, :, -1])


def _scan_scalar(x, g, beta, q, S0, C):
    """Scalar decay g (B,T,H,1): the three stages as matmuls (a chunk's decays are one C x C
    matrix, no slot axis); autograd does the backward."""
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
    G_ts = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float('-inf'))
    Lmask = torch.exp(G_ts)                                                   # (B,H,n,C,C)
    y = ((qc @ bc.transpose(-1, -2)) * Lmask) @ xc + (qc * torch.exp(G)[..., None]) @ S_in
    return _unchunk(y, T).to(x.dtype), S


def _pairwise(G):
    """G (...,L,M) -> (...,L,L,M) [t,s,i]: e^{G_ti - G_si} for s <= t, 0 for s > t
    (masked before exp: the exponent is positive there and could overflow)."""
    L = G.shape[-2]
    later = torch.ones(L, L, dtype=torch.bool, device=G.device).triu(1)[:, :, None]   # s > t
    D = G[..., :, None, :] - G[..., None, :, :]
    return D.masked_fill_(later, float('-inf')).exp_()


def _sub_decays(G, L):
    """G (B,H,n,C,M), cumulative within each chunk -> stage 3's decays by sub-chunks of L steps:
        G_ (B,H,n,k,L,M)             G by sub-chunk (k = C/L)
        G_r, G_end (B,H,n,k,M)       G at the step r before sub-chunk a (0 at a = 0), at its last r'
        from_r, to_end (B,H,n,k,L,M) e^{G_a - G_r} and e^{G_r' - G_a}, both <= 1
        decay (B,H,n,k,M)            e^{G_r' - G_r}, the whole sub-chunk's decay
        wide (B,H,n,k) bool, or None: the sub-chunks that decay by more than MAX_SPAN on a slot."""
    B, H, n, C, M = G.shape
    G_ = G.view(B, H, n, C // L, L, M)
    G_end = G_[..., -1, :]
    G_r = F.pad(G_end, (0, 0, 1, -1))
    wide = (G_r - G_end).amax(-1) > MAX_SPAN
    return (G_, G_r, G_end, torch.exp(G_ - G_r[..., None, :]), torch.exp(G_end[..., None, :] - G_),
            torch.exp(G_end - G_r), wide if wide.any() else None)


def _add_mm(out, a, b):
    """out += a @ b over the leading (batch) axes, accumulated by the matmul itself (no extra
    pass). out is a fresh contiguous tensor (...,I,J); a (...,I,K), b (...,K,J)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.flatten(0, -3), b.flatten(0, -3))
    return out


class _ScanSlots(torch.autograd.Function):
    """Per-slot decay (FM): the three stages above, forward and backward written out, each step
    numbered and named as the kernel of kernels.py that computes it.

    Backward: the adjoint D_t = dL/dS_t runs the recurrence in reverse,
        D_t = e^{g_{t+1}} * D_{t+1} + q_t dy_t^T,   dx_t = D_t^T beta_t,   dbeta_t = D_t x_t,
        dq_t = S_t dy_t,   dS_initial = e^{g_1} * D_1,
    i.e. the forward stages with q and beta, x and dy swapped and time reversed:
        1.  dD_c = sum_{s in c} (q_s * e^{G_s})^T dy_s                 (dL/dS_in[c] from chunk c)
        2.  E[c] = D;  D = e^{G_C} * D + dD_c  for c = n-1..0 from D = dS_final; dS_initial = last D
        3a. over the sub-chunks from the last, with V the adjoint at a's last step r' (V = E[c]
            at a = k-1; kernels.py's reverse sweep calls it W) and Q[t,s] = dy_t . x_s:
              dx_a    = (beta_a * e^{G_r' - G_a}) V + A_a^T dy_a
              dbeta_a = e^{G_r' - G_a} * (x_a V^T) + [sum_{t>=s} Q[t,s] q_ti e^{G_ti - G_si}]_si
              V      <- e^{G_r' - G_r} * V + (q_a * e^{G_a - G_r})^T dy_a
        3b. dq reads the states W of the forward:
              dq_a = e^{G_a - G_r} * (dy_a W_a^T) + [sum_{s<=t} Q[t,s] beta_si e^{G_ti - G_si}]_ti
            The bracketed diagonal terms factor through r as A_a does (pairwise where wide).
        4.  The decay needs no sweep of its own:
              dG_t = q_t * dq_t - beta_t * dbeta_t  (+ sum_p S_final * dS_final at the last step)
              dg_t = sum_{t' >= t} dG_t'
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
        # 1. chunk state (_chunk_state), with e^{G_C - G} = e^{G_C - G_r'} e^{G_r' - G}
        b_C = b_end * torch.exp(G_C[:, :, :, None] - G_end)[..., None, :]
        dS = b_C.view(B, H, n, C, M).transpose(-1, -2) @ xc           # (B,H,n,M,P)
        # 2. state pass (_state_pass)
        S_in, S_final = _state_pass(dS, G_C, S0)
        # 3. chunk output (_chunk_output_fwd): W_a, the state entering sub-chunk a, ...
        Z = b_end.transpose(-1, -2) @ x_                              # (B,H,n,k,M,P)
        W = torch.empty_like(Z)
        W[:, :, :, 0] = S_in
        for a in range(k - 1):
            torch.addcmul(Z[:, :, :, a], decay[:, :, :, a, :, None], W[:, :, :, a],
                          out=W[:, :, :, a + 1])
        # ... the diagonal blocks A_a [t,s], factored through r (the divisor is clamped so that
        # wide sub-chunks stay finite before they are recomputed pairwise) ...
        q_from = q_ * from_r                                          # q * e^{G - G_r}
        b_to = b_end / decay.clamp(min=math.exp(-MAX_SPAN))[..., None, :]    # beta * e^{G_r - G}
        A = (q_from @ b_to.transpose(-1, -2)).tril_()                 # (B,H,n,k,L,L)
        if wide is not None:
            A[wide] = (_pairwise(G_[wide]).mul_(b_[wide][:, None]) @ q_[wide][..., None])[..., 0]
        # ... and y_a = (q_a * e^{G_a - G_r}) W_a + A_a x_a
        y = _add_mm(q_from @ W, A, x_)                                # (B,H,n,k,L,P)
        ctx.save_for_backward(xc, G, bc, qc, W, A, S_final, from_r, to_end, G_r, decay)
        ctx.info = (T, L, wide, g.dtype, beta.dtype, q.dtype)
        return _unchunk(y.view(B, H, n, C, P), T).to(x.dtype), S_final

    @staticmethod
    def backward(ctx, dy, dS_final):
        # float32, as the forward (the backward may run under autocast)
        with torch.autocast(dy.device.type, enabled=False):
            return _ScanSlots.grads(ctx, dy, dS_final)

    @staticmethod
    def grads(ctx, dy, dS_final):
        xc, G, bc, qc, W, A, S_final, from_r, to_end, G_r, decay = ctx.saved_tensors
        T, L, wide, g_dtype, beta_dtype, q_dtype = ctx.info
        B, H, n, C, P = xc.shape
        k, M = C // L, G.shape[-1]
        sub = lambda t: t.view(B, H, n, k, L, t.shape[-1])
        dyc = _chunks(dy, C)
        x_, b_, q_, dy_, G_ = sub(xc), sub(bc), sub(qc), sub(dyc), sub(G)
        dS_final = dS_final.float()
        q_from, b_end = q_ * from_r, b_ * to_end
        # 1. dD_c (_chunk_state, REVERSE), with e^{G} = e^{G_r} e^{G - G_r}
        q_G = q_from * torch.exp(G_r)[..., None, :]
        dD = q_G.view(B, H, n, C, M).transpose(-1, -2) @ dyc          # (B,H,n,M,P)
        # 2. E and dS_initial (_state_pass, REVERSE)
        E, dS0 = _state_pass(dD, G[:, :, :, -1], dS_final, reverse=True)
        # 3a. dx, dbeta (_chunk_dx_dbeta_bwd): V_a, the adjoint at a's last step, from the last a
        Zd = q_from.transpose(-1, -2) @ dy_                           # (B,H,n,k,M,P)
        V = torch.empty_like(Zd)
        V[:, :, :, k - 1] = E
        for a in range(k - 1, 0, -1):
            torch.addcmul(Zd[:, :, :, a], decay[:, :, :, a, :, None], V[:, :, :, a],
                          out=V[:, :, :, a - 1])
        dx = _add_mm(b_end @ V, A.transpose(-1, -2), dy_)             # (B,H,n,k,L,P)
        Q = (dy_ @ x_.transpose(-1, -2)).tril_()                      # (B,H,n,k,L,L) [t,s]
        xV = x_ @ V.transpose(-1, -2)                                 # (B,H,n,k,L,M)
        inv = 1 / decay.clamp(min=math.exp(-MAX_SPAN))[..., None, :]  # e^{G_r - G_r'}, as b_to's
        # dbeta = e^{G_r' - G} * (x V^T + Q^T (q_from * inv)),   q_from * inv = q e^{G - G_r'}
        dbeta = _add_mm(xV.clone() if wide is not None else xV, Q.transpose(-1, -2), q_from * inv)
        dbeta.mul_(to_end)
        # 3b. dq (_chunk_dq_dg_bwd), from the saved W:
        # dq = e^{G - G_r} * (dy W^T + Q (b_end * inv)),   b_end * inv = b_to = beta e^{G_r - G}
        dyW = dy_ @ W.transpose(-1, -2)                               # (B,H,n,k,L,M)
        dq = _add_mm(dyW.clone() if wide is not None else dyW, Q, b_end * inv).mul_(from_r)
        if wide is not None:                          # pairwise where the factoring could overflow
            K = _pairwise(G_[wide]).mul_(Q[wide][..., None])          # (nw,L,L,M) [t,s,i]
            dq[wide] = from_r[wide] * dyW[wide] + (K * b_[wide][:, None, :, :]).sum(-2)
            dbeta[wide] = to_end[wide] * xV[wide] + K.mul_(q_[wide][:, :, None, :]).sum(-3)
        # 4. the decay (in kernels.py, inside _chunk_dq_dg_bwd): dG, then its reverse cumsum
        dG = _unchunk(torch.addcmul(qc * dq.view_as(qc), bc, dbeta.view_as(bc), value=-1), T)
        dG[:, T - 1] += (S_final * dS_final).sum(-1)                  # (B,T,H,M)
        dg = dG.flip(1).cumsum(1).flip(1)
        return (_unchunk(dx.view(B, H, n, C, P), T).to(dy.dtype), dg.to(g_dtype),
                _unchunk(dbeta.view(B, H, n, C, M), T).to(beta_dtype),
                _unchunk(dq.view(B, H, n, C, M), T).to(q_dtype), dS0, None, None)
