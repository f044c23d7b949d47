"""
Triton kernels for the Factorization Memory scan: the chunked scan (forward and
backward, as a torch.autograd.Function) and the one-token decode steps. They
compute what scan.py defines (scan_naive); the README derives the math.

Per (batch, head), a memory S of M slots (rows) of width P:

    S_t = e^{g_t} * S_{t-1} + beta_t x_t^T          y_t = S_t^T q_t

Forward: three stages over chunks of C steps, G_t = sum_{s<=t} g_s inside a chunk.
  1. chunk state   dS_c = sum_{s in c} (beta_s * e^{G_C - G_s})^T x_s              (M x P per chunk)
  2. state pass    S_in[c+1] = e^{G_C} * S_in[c] + dS_c                            (sequential, n = T/C steps)
  3. chunk output  y_t = (q_t * e^{G_t}) S_in[c] + sum_{s<=t in c} [sum_i q_ti beta_si e^{G_ti - G_si}] x_s
Stage 3 cuts the chunk into sub-chunks of L = 16 steps and runs the recurrence
across them with a state W held at the boundary r before each sub-chunk a
(r = last step of sub-chunk a-1; the chunk start, G_r = 0, for a = 0):

    y_a = (q_a * e^{G_a - G_r}) W  +  A_a x_a,    A_a[t,s] = sum_i q_ti beta_si e^{G_ti - G_si}  (s <= t, both in a)
    W  <- e^{G_r' - G_r} * W  +  (beta_a * e^{G_r' - G_a})^T x_a                 (r' = last step of a)

starting from W = S_in[c]. So the off-diagonal sub-block pairs and the state
reads and writes are tl.dot matmuls (L x BM x P), and only the diagonal L x L
blocks are computed pairwise (a loop over the L columns s, nothing L x L x M).

Why reference points: the intra-chunk term factors as (q_t e^{G_t})(beta_s e^{-G_s}),
one matmul, but e^{-G_s} grows with the chunk's decay and overflows fp32 past
~88 nats (64 steps at -20 reach -1280). Here every exponent is G_t - G_s with s
at or before t (a reference point r with s <= r <= t), so it is <= 0: strong
decays underflow harmlessly to 0 and nothing overflows.

Backward: the adjoint D_t = dL/dS_t runs the same recurrence in reverse,

    D_t = e^{g_{t+1}} * D_{t+1} + q_t dy_t^T,     dx_t = D_t^T beta_t,    dbeta_t = D_t x_t,

i.e. the forward stages with q and beta swapped, x and dy swapped, and time
reversed: stage 1 gives dD_c = sum_s (q_s * e^{G_s})^T dy_s; stage 2 run backwards
gives E[c], the adjoint at the end of chunk c from later chunks, and
dS_initial = e^{G_C} * E[0] + dD_0 (= a_1 * D_1); a reverse sweep over sub-chunks
gives dx and dbeta. dq_t = S_t dy_t is a forward sweep like stage 3 that reads
the states with dy. The decay gradient is PyTorch glue:
dG = q*dq - beta*dbeta (+ sum_p S_final*dS_final at the last step),
dg = reverse cumulative sum of dG over time.

Slots never mix in the recurrence, so each program takes a block of BM slots
(grid axis 2): the state W (BM x P, fp32) stays in registers, and y and dx,
which sum over slots, are partial sums added up in PyTorch.

Any M and P >= 1: tl.dot wants tiles whose sides are powers of 2 >= 16, so a
program's tile is BM slots by BP = max(16, next_pow2(P)) columns, and loads past
M or P are masked to 0. That is exact: a slot past M has g = 0 (no decay),
beta = 0 (nothing written) and q = 0 (nothing read), so its row of W stays 0; a
column past P has x = dy = 0. Stores past M or P are masked off, so tensors keep
their real shapes (no padded copies).

On CPU tensors the kernels run only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is first imported).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SUB = 16          # L, the sub-chunk: tl.dot needs every dimension >= 16
STATE_TILE = 2048  # fp32 elements of the state W per program (BM x BP): 16 registers a thread at 4 warps;
                   # 4096 made the backward sweeps spill on sm_80 (checked with cuobjdump -res-usage)


# -----------------------------------------------------------------------------
# Chunked scan: stages 1, 2 (shared by forward and backward), 3, and 3's two backward sweeps.
# Layouts: x, dy (B,Tp,H,P); G, beta, q (B,Tp,H,M) (Tp = T padded to whole chunks);
# per-chunk states (B,H,n,M,P) fp32. Rows of (B,Tp,H) are indexed row0 + t*H.
# -----------------------------------------------------------------------------

@triton.jit
def _chunk_state(u, G, k, states, Tp, H, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                 BP: tl.constexpr, C: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
                 REVERSE: tl.constexpr):
    """Stage 1, each chunk's own contribution to the state passed between chunks:
        forward  (k=beta, u=x):  dS_c = sum_{s in c} (beta_s * e^{G_C - G_s})^T x_s    (seen at the chunk's end)
        reverse  (k=q,  u=dy):   dD_c = sum_{s in c} (q_s * e^{G_s})^T dy_s            (seen at the chunk's start)
    u (B,Tp,H,P); G, k (B,Tp,H,M); states (B,H,n,M,P) fp32 <- dS_c or dD_c. Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h = (bh // H).to(tl.int64), bh % H
    l, m, p = tl.arange(0, L), mb * BM + tl.arange(0, BM), tl.arange(0, BP)
    m_ok, p_ok = m < M, p < P
    row0 = b * Tp * H + h
    G_C = tl.load(G + (row0 + (c * C + C - 1) * H) * M + m, mask=m_ok, other=0.0)
    acc = tl.zeros([BM, BP], tl.float32)
    for a in range(C // L):
        row = row0 + (c * C + a * L + l) * H
        G_a = tl.load(G + row[:, None] * M + m[None, :], mask=m_ok[None, :], other=0.0)
        k_a = tl.load(k + row[:, None] * M + m[None, :], mask=m_ok[None, :], other=0.0).to(tl.float32)
        u_a = tl.load(u + row[:, None] * P + p[None, :], mask=p_ok[None, :], other=0.0).to(tl.float32)
        if REVERSE:
            k_a = k_a * tl.exp(G_a)
        else:
            k_a = k_a * tl.exp(G_C[None, :] - G_a)
        acc += tl.dot(tl.trans(k_a), u_a, input_precision=PREC)
    tl.store(states + (((b * H + h) * n + c) * M + m[:, None]) * P + p[None, :], acc,
             mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _state_pass(states, G, S0, S_last, Tp, H, n, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                BP: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr):
    """Stage 2, the recurrence across chunks, in place over `states`:
        forward:  S_in[c] = S;  S = e^{G_C[c]} * S + dS_c    for c = 0..n-1, from S = S0 (initial state)
        reverse:  E[c]    = D;  D = e^{G_C[c]} * D + dD_c    for c = n-1..0, from D = S0 (dS_final)
    states (B,H,n,M,P) fp32: dS_c (dD_c) in, S_in[c] (E[c]) out; G (B,Tp,H,M);
    S0 in, S_last out (B,H,M,P) fp32: S_final, or dS_initial when REVERSE. Grid (B*H, cdiv(M,BM))."""
    bh, mb = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    m, p = mb * BM + tl.arange(0, BM), tl.arange(0, BP)
    m_ok = m < M
    ok = m_ok[:, None] & (p < P)[None, :]
    row0 = b * Tp * H + h
    tile = m[:, None] * P + p[None, :]
    chunk0 = states + (b * H + h) * n * M * P + tile
    S = tl.load(S0 + (b * H + h) * M * P + tile, mask=ok, other=0.0)
    for i in range(n):
        if REVERSE:
            c = n - 1 - i
        else:
            c = i
        dS = tl.load(chunk0 + c * M * P, mask=ok, other=0.0)
        tl.store(chunk0 + c * M * P, S, mask=ok)
        G_C = tl.load(G + (row0 + (c * C + C - 1) * H) * M + m, mask=m_ok, other=0.0)
        S = tl.exp(G_C)[:, None] * S + dS
    tl.store(S_last + (b * H + h) * M * P + tile, S, mask=ok)


@triton.jit
def _chunk_output_fwd(x, G, beta, q, states, y_part, Tp, H, M: tl.constexpr, P: tl.constexpr,
                      BM: tl.constexpr, BP: tl.constexpr, C: tl.constexpr, L: tl.constexpr,
                      PREC: tl.constexpr):
    """Stage 3, y for one chunk and one block of slots, sub-chunk by sub-chunk (a):
        y_a = (q_a * e^{G_a - G_r}) W + A_a x_a,   A_a[t,s] = sum_i q_ti beta_si e^{G_ti - G_si}, s <= t
        W  <- e^{G_r' - G_r} * W + (beta_a * e^{G_r' - G_a})^T x_a,   W = S_in[c] and G_r = 0 at a = 0
    x (B,Tp,H,P); G, beta, q (B,Tp,H,M); states (B,H,n,M,P) fp32 = S_in;
    y_part (cdiv(M,BM),B,Tp,H,P) fp32 <- this slot block's share of y. Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h = (bh // H).to(tl.int64), bh % H
    l, m, p = tl.arange(0, L), mb * BM + tl.arange(0, BM), tl.arange(0, BP)
    m_ok, p_ok = m < M, p < P
    mk, pk = m_ok[None, :], p_ok[None, :]                            # masks of (L, BM) and (L, BP) tiles
    row0 = b * Tp * H + h
    y_part += mb.to(tl.int64) * tl.num_programs(1) * Tp * P
    W = tl.load(states + (((b * H + h) * n + c) * M + m[:, None]) * P + p[None, :],
                mask=m_ok[:, None] & pk, other=0.0)
    G_r = tl.zeros([BM], tl.float32)
    for a in range(C // L):
        t0 = c * C + a * L
        row = row0 + (t0 + l) * H
        G_a = tl.load(G + row[:, None] * M + m[None, :], mask=mk, other=0.0)
        beta_a = tl.load(beta + row[:, None] * M + m[None, :], mask=mk, other=0.0).to(tl.float32)
        q_a = tl.load(q + row[:, None] * M + m[None, :], mask=mk, other=0.0).to(tl.float32)
        x_a = tl.load(x + row[:, None] * P + p[None, :], mask=pk, other=0.0).to(tl.float32)
        G_end = tl.load(G + (row0 + (t0 + L - 1) * H) * M + m, mask=m_ok, other=0.0)
        y_a = tl.dot(q_a * tl.exp(G_a - G_r[None, :]), W, input_precision=PREC)
        # diagonal block, pairwise, one column s = t0 + j of A_a at a time (no L x L x BM tile)
        for j in range(L):
            row_s = row0 + (t0 + j) * H
            beta_s = tl.load(beta + row_s * M + m, mask=m_ok, other=0.0).to(tl.float32)
            G_s = tl.load(G + row_s * M + m, mask=m_ok, other=0.0)
            x_s = tl.load(x + row_s * P + p, mask=p_ok, other=0.0).to(tl.float32)
            # mask before exp: for t < s the exponent is positive and could overflow
            decay = tl.exp(tl.where(l[:, None] >= j, G_a - G_s[None, :], float('-inf')))
            A_s = tl.sum(q_a * beta_s[None, :] * decay, 1)               # A_a[:, s]
            y_a += A_s[:, None] * x_s[None, :]
        tl.store(y_part + row[:, None] * P + p[None, :], y_a, mask=pk)
        W = tl.exp(G_end - G_r)[:, None] * W + tl.dot(tl.trans(beta_a * tl.exp(G_end[None, :] - G_a)), x_a,
                                                       input_precision=PREC)
        G_r = G_end


@triton.jit
def _chunk_dx_dbeta_bwd(x, G, beta, q, dy, states, dx_part, dbeta, Tp, H, M: tl.constexpr,
                        P: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, C: tl.constexpr,
                        L: tl.constexpr, PREC: tl.constexpr):
    """Backward, reverse sweep: dx_s = D_s^T beta_s and dbeta_s = D_s x_s, sub-chunk by sub-chunk
    from the last, with the adjoint W held at r = the last step of sub-chunk a:
        D_s = e^{G_r - G_s} * W + sum_{t>=s in a} e^{G_t - G_s} * q_t dy_t^T
        W  <- e^{G_r - G_r'} * W + (q_a * e^{G_a - G_r'})^T dy_a,   r' = last step before a (G_r' = 0 at a = 0)
    starting from W = E[c]. x, dy (B,Tp,H,P); G, beta, q (B,Tp,H,M); states (B,H,n,M,P) fp32 = E;
    dx_part (cdiv(M,BM),B,Tp,H,P) fp32 (this slot block's share); dbeta (B,Tp,H,M) fp32. Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h = (bh // H).to(tl.int64), bh % H
    l, m, p = tl.arange(0, L), mb * BM + tl.arange(0, BM), tl.arange(0, BP)
    m_ok, p_ok = m < M, p < P
    mk, pk = m_ok[None, :], p_ok[None, :]                            # masks of (L, BM) and (L, BP) tiles
    row0 = b * Tp * H + h
    dx_part += mb.to(tl.int64) * tl.num_programs(1) * Tp * P
    W = tl.load(states + (((b * H + h) * n + c) * M + m[:, None]) * P + p[None, :],
                mask=m_ok[:, None] & pk, other=0.0)
    for i in range(C // L):
        a = C // L - 1 - i
        t0 = c * C + a * L
        row = row0 + (t0 + l) * H
        G_a = tl.load(G + row[:, None] * M + m[None, :], mask=mk, other=0.0)
        beta_a = tl.load(beta + row[:, None] * M + m[None, :], mask=mk, other=0.0).to(tl.float32)
        q_a = tl.load(q + row[:, None] * M + m[None, :], mask=mk, other=0.0).to(tl.float32)
        x_a = tl.load(x + row[:, None] * P + p[None, :], mask=pk, other=0.0).to(tl.float32)
        dy_a = tl.load(dy + row[:, None] * P + p[None, :], mask=pk, other=0.0).to(tl.float32)
        G_r = tl.load(G + (row0 + (t0 + L - 1) * H) * M + m, mask=m_ok, other=0.0)
        # the step before sub-chunk a is in this chunk only if a > 0 (G restarts at each chunk)
        G_prev = tl.load(G + (row0 + tl.maximum(t0 - 1, c * C) * H) * M + m, mask=m_ok, other=0.0)
        G_prev = tl.where(a > 0, G_prev, 0.0)
        decay_r = tl.exp(G_r[None, :] - G_a)
        dx_a = tl.dot(beta_a * decay_r, W, input_precision=PREC)
        dbeta_a = decay_r * tl.dot(x_a, tl.trans(W), input_precision=PREC)
        # diagonal block, pairwise, one later step t = t0 + j at a time:
        #   dx_s += A_a[t, s] dy_t,   dbeta_si += (dy_t . x_s) q_ti e^{G_ti - G_si}   (s <= t)
        for j in range(L):
            row_t = row0 + (t0 + j) * H
            q_t = tl.load(q + row_t * M + m, mask=m_ok, other=0.0).to(tl.float32)
            G_t = tl.load(G + row_t * M + m, mask=m_ok, other=0.0)
            dy_t = tl.load(dy + row_t * P + p, mask=p_ok, other=0.0).to(tl.float32)
            decay = tl.exp(tl.where(l[:, None] <= j, G_t[None, :] - G_a, float('-inf')))
            A_t = tl.sum(beta_a * q_t[None, :] * decay, 1)               # A_a[t, :]
            dx_a += A_t[:, None] * dy_t[None, :]
            x_dy = tl.sum(x_a * dy_t[None, :], 1)                         # x_s . dy_t
            dbeta_a += x_dy[:, None] * q_t[None, :] * decay
        tl.store(dx_part + row[:, None] * P + p[None, :], dx_a, mask=pk)
        tl.store(dbeta + row[:, None] * M + m[None, :], dbeta_a, mask=mk)
        W = tl.exp(G_r - G_prev)[:, None] * W + tl.dot(tl.trans(q_a * tl.exp(G_a - G_prev[None, :])), dy_a,
                                                        input_precision=PREC)


@triton.jit
def _chunk_dq_bwd(x, G, beta, dy, states, dq, Tp, H, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                  BP: tl.constexpr, C: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr):
    """Backward, forward sweep: dq_t = S_t dy_t, reading the states as stage 3 does:
        dq_a = e^{G_a - G_r} * (dy_a W^T) + sum_{s<=t in a} e^{G_t - G_s} * beta_s (dy_t . x_s)
        W   <- e^{G_r' - G_r} * W + (beta_a * e^{G_r' - G_a})^T x_a,   W = S_in[c] and G_r = 0 at a = 0
    x, dy (B,Tp,H,P); G, beta (B,Tp,H,M); states (B,H,n,M,P) fp32 = S_in; dq (B,Tp,H,M) fp32.
    Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h = (bh // H).to(tl.int64), bh % H
    l, m, p = tl.arange(0, L), mb * BM + tl.arange(0, BM), tl.arange(0, BP)
    m_ok, p_ok = m < M, p < P
    mk, pk = m_ok[None, :], p_ok[None, :]                            # masks of (L, BM) and (L, BP) tiles
    row0 = b * Tp * H + h
    W = tl.load(states + (((b * H + h) * n + c) * M + m[:, None]) * P + p[None, :],
                mask=m_ok[:, None] & pk, other=0.0)
    G_r = tl.zeros([BM], tl.float32)
    for a in range(C // L):
        t0 = c * C + a * L
        row = row0 + (t0 + l) * H
        G_a = tl.load(G + row[:, None] * M + m[None, :], mask=mk, other=0.0)
        beta_a = tl.load(beta + row[:, None] * M + m[None, :], mask=mk, other=0.0).to(tl.float32)
        x_a = tl.load(x + row[:, None] * P + p[None, :], mask=pk, other=0.0).to(tl.float32)
        dy_a = tl.load(dy + row[:, None] * P + p[None, :], mask=pk, other=0.0).to(tl.float32)
        G_end = tl.load(G + (row0 + (t0 + L - 1) * H) * M + m, mask=m_ok, other=0.0)
        dq_a = tl.exp(G_a - G_r[None, :]) * tl.dot(dy_a, tl.trans(W), input_precision=PREC)
        # diagonal block, pairwise, one earlier step s = t0 + j at a time:
        #   dq_ti += (dy_t . x_s) beta_si e^{G_ti - G_si}   (s <= t)
        for j in range(L):
            row_s = row0 + (t0 + j) * H
            beta_s = tl.load(beta + row_s * M + m, mask=m_ok, other=0.0).to(tl.float32)
            G_s = tl.load(G + row_s * M + m, mask=m_ok, other=0.0)
            x_s = tl.load(x + row_s * P + p, mask=p_ok, other=0.0).to(tl.float32)
            decay = tl.exp(tl.where(l[:, None] >= j, G_a - G_s[None, :], float('-inf')))
            dy_x = tl.sum(dy_a * x_s[None, :], 1)                         # dy_t . x_s
            dq_a += dy_x[:, None] * beta_s[None, :] * decay
        tl.store(dq + row[:, None] * M + m[None, :], dq_a, mask=mk)
        W = tl.exp(G_end - G_r)[:, None] * W + tl.dot(tl.trans(beta_a * tl.exp(G_end[None, :] - G_a)), x_a,
                                                       input_precision=PREC)
        G_r = G_end


def chunk_meta(M, P, chunk_size, dtype):
    """The compile-time constants the chunk kernels are launched with (the compile test uses them too).

    Any M, P >= 1: tiles are powers of 2 >= 16 (tl.arange and tl.dot need them), BM slots by BP
    columns, and the kernels mask what lies past M or P. A masked slot loads g = beta = q = 0 (no
    decay, no write, no read) and a masked column x = dy = 0, so the padding adds nothing to any
    result and nothing past M or P is stored."""
    if not (isinstance(chunk_size, int) and chunk_size >= SUB and chunk_size % SUB == 0):
        raise ValueError(f"chunk_size={chunk_size} must be a positive multiple of {SUB}")
    if M < 1 or P < 1:
        raise ValueError(f"scan_triton needs M (n_slots) >= 1 and P (head_dim) >= 1, got M={M}, P={P}")
    # fp32 inputs: 3 tf32 passes give fp32 accuracy on tensor cores; bf16 inputs need no more than tf32
    prec = 'tf32x3' if dtype == torch.float32 else 'tf32'
    BP = max(16, triton.next_power_of_2(P))
    BM = min(max(16, triton.next_power_of_2(M)), max(16, STATE_TILE // BP))
    return dict(M=M, P=P, BM=BM, BP=BP, C=chunk_size, L=SUB, PREC=prec)


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch goes through here (the compile test records them to compile exactly
    these launches ahead of time). meta: the kernel's constexprs, filtered by its parameter
    names (_ARG_NAMES, read once), and the launch option num_warps (default 4)."""
    kernel[grid](*args, **{k: v for k, v in meta.items() if k in _ARG_NAMES[kernel] or k == 'num_warps'})


def _require_runnable(t):
    if not t.is_cuda and isinstance(_chunk_state, triton.runtime.JITFunction):
        raise RuntimeError("kernels.py got CPU tensors: Triton runs on CPU only under its interpreter. "
                           "Set TRITON_INTERPRET=1 before triton is first imported, or use scan_impl='chunked'.")


class _ScanTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, g, beta, q, initial_state, chunk_size):
        B, T, H, P = x.shape
        M = beta.shape[-1]
        meta = chunk_meta(M, P, chunk_size, x.dtype)
        C, BM = chunk_size, meta['BM']
        n = -(-T // C)
        Tp = n * C
        # A padded step has g=0 (no decay), beta=0 (no write), q=0 (no read), so S_final is the state after T.
        pad = lambda t: F.pad(t, (0, 0, 0, 0, 0, Tp - T)).contiguous()
        x_, beta_, q_ = pad(x), pad(beta), pad(q)
        G = pad(g.float()).view(B, n, C, H, -1).cumsum(2).view(B, Tp, H, -1).expand(B, Tp, H, M).contiguous()
        f32 = dict(device=x.device, dtype=torch.float32)
        S0 = torch.zeros(B, H, M, P, **f32) if initial_state is None else initial_state.float().contiguous()
        states, S_final = torch.empty(B, H, n, M, P, **f32), torch.empty(B, H, M, P, **f32)
        nb = triton.cdiv(M, BM)                                    # slot blocks, the last maybe partial
        y_part = torch.empty(nb, B, Tp, H, P, **f32)
        grid = (n, B * H, nb)
        _launch(_chunk_state, grid, x_, G, beta_, states, Tp, H, REVERSE=False, **meta)
        _launch(_state_pass, (B * H, nb), states, G, S0, S_final, Tp, H, n, REVERSE=False, **meta)
        _launch(_chunk_output_fwd, grid, x_, G, beta_, q_, states, y_part, Tp, H, **meta)
        ctx.save_for_backward(x_, G, beta_, q_, states, S_final)
        ctx.info = (T, meta, g.shape[-1], g.dtype, beta.dtype, q.dtype, initial_state is not None)
        return y_part.sum(0)[:, :T].to(x.dtype), S_final

    @staticmethod
    def backward(ctx, dy, dS_final):
        x_, G, beta_, q_, S_in, S_final = ctx.saved_tensors
        T, meta, g_slots, g_dtype, beta_dtype, q_dtype, has_initial = ctx.info
        B, Tp, H, P = x_.shape
        M, BM, C = meta['M'], meta['BM'], meta['C']
        n = Tp // C
        dy_ = F.pad(dy, (0, 0, 0, 0, 0, Tp - T)).contiguous()
        dS_final = dS_final.float().contiguous()
        f32 = dict(device=x_.device, dtype=torch.float32)
        E, dS0 = torch.empty(B, H, n, M, P, **f32), torch.empty(B, H, M, P, **f32)
        nb = triton.cdiv(M, BM)
        dx_part = torch.empty(nb, B, Tp, H, P, **f32)
        dbeta, dq = torch.empty(B, Tp, H, M, **f32), torch.empty(B, Tp, H, M, **f32)
        grid = (n, B * H, nb)
        _launch(_chunk_state, grid, dy_, G, q_, E, Tp, H, REVERSE=True, **meta)
        _launch(_state_pass, (B * H, nb), E, G, dS_final, dS0, Tp, H, n, REVERSE=True, **meta)
        _launch(_chunk_dx_dbeta_bwd, grid, x_, G, beta_, q_, dy_, E, dx_part, dbeta, Tp, H, **meta)
        _launch(_chunk_dq_bwd, grid, x_, G, beta_, dy_, S_in, dq, Tp, H, **meta)
        # dL/dG_t per slot: q*dq - beta*dbeta (README, 'The backward'); S_final depends on the last step's G as well
        dG = q_.float() * dq - beta_.float() * dbeta
        dG[:, T - 1] += (S_final * dS_final).sum(-1)
        dg = dG.flip(1).cumsum(1).flip(1)[:, :T]
        if g_slots == 1:
            dg = dg.sum(-1, keepdim=True)
        return (dx_part.sum(0)[:, :T].to(x_.dtype), dg.to(g_dtype), dbeta[:, :T].to(beta_dtype),
                dq[:, :T].to(q_dtype), dS0 if has_initial else None, None)


@torch.compiler.disable(reason='Triton scan: launches and autograd.Function run eagerly')
def scan_triton(x, g, beta, q, initial_state=None, chunk_size=64):
    """The chunked scan in Triton, forward and backward. Equals scan.scan_naive.

    A torch.compile boundary (torch.compiler.disable, as fla does for chunk_gla): dynamo does
    not trace the launches or the autograd.Function; a compiled model breaks its graph here
    and runs this eagerly, forward and backward.

    x (B,T,H,P); g (B,T,H,M) or (B,T,H,1); beta, q (B,T,H,M); initial_state (B,H,M,P) or None.
    Returns y (B,T,H,P) in x's dtype and the final state (B,H,M,P) float32. Any T >= 1.
    """
    _require_runnable(x)
    return _ScanTriton.apply(x, g, beta, q, initial_state, chunk_size)


# -----------------------------------------------------------------------------
# Decoding: one token, dense (all slots) or sparse (the k routed slots), in place.
# -----------------------------------------------------------------------------

@triton.jit
def _step_dense(S, x, g, beta, q, y, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr):
    """One token over all M slots, S updated in place:
        S = e^{g} * S + beta x^T,   y = S^T q
    S (B,H,M,P) fp32; x, y (B,H,P); g, beta, q (B,H,M). Grid (B*H,)."""
    bh = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BP)
    p_ok = p < P
    x_ = tl.load(x + bh * P + p, mask=p_ok, other=0.0).to(tl.float32)
    y_ = tl.zeros([BP], tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < M
        g_ = tl.load(g + bh * M + m, mask=m_ok, other=0.0).to(tl.float32)
        beta_ = tl.load(beta + bh * M + m, mask=m_ok, other=0.0).to(tl.float32)
        q_ = tl.load(q + bh * M + m, mask=m_ok, other=0.0).to(tl.float32)
        rows = S + (bh * M + m[:, None]) * P + p[None, :]
        ok = m_ok[:, None] & p_ok[None, :]
        S_ = tl.exp(g_)[:, None] * tl.load(rows, mask=ok, other=0.0) + beta_[:, None] * x_[None, :]
        tl.store(rows, S_, mask=ok)
        y_ += tl.sum(q_[:, None] * S_, 0)
    tl.store(y + bh * P + p, y_.to(y.dtype.element_ty), mask=p_ok)


@triton.jit
def _step_sparse(S, x, g, beta, q, idx, y, H, M, K, P: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    """One token over the K slots idx shared by all heads, those rows of S updated in place:
        S[idx_k] = e^{g_k} * S[idx_k] + beta_k x,   y = sum_k q_k S[idx_k]
    S (B,H,M,P) fp32; x, y (B,H,P); g, beta, q (B,H,K); idx (B,K) int64. Grid (B*H,).
    Rows not in idx are neither read nor written: per-token cost O(K P), not O(M P)."""
    bh = tl.program_id(0).to(tl.int64)
    k, p = tl.arange(0, BK), tl.arange(0, BP)
    k_ok, p_ok = k < K, p < P
    slot = tl.load(idx + (bh // H) * K + k, mask=k_ok, other=0)
    x_ = tl.load(x + bh * P + p, mask=p_ok, other=0.0).to(tl.float32)
    g_ = tl.load(g + bh * K + k, mask=k_ok, other=0.0).to(tl.float32)
    beta_ = tl.load(beta + bh * K + k, mask=k_ok, other=0.0).to(tl.float32)
    q_ = tl.load(q + bh * K + k, mask=k_ok, other=0.0).to(tl.float32)
    rows = S + (bh * M + slot[:, None]) * P + p[None, :]
    ok = k_ok[:, None] & p_ok[None, :]
    S_ = tl.exp(g_)[:, None] * tl.load(rows, mask=ok, other=0.0) + beta_[:, None] * x_[None, :]
    tl.store(rows, S_, mask=ok)
    tl.store(y + bh * P + p, tl.sum(q_[:, None] * S_, 0).to(y.dtype.element_ty), mask=p_ok)


def step_meta(M, P):
    """Block sizes of _step_dense (the compile test uses them too)."""
    BP = triton.next_power_of_2(P)
    return dict(M=M, P=P, BM=min(triton.next_power_of_2(M), max(1, STATE_TILE // BP)), BP=BP)


def sparse_step_meta(K, P):
    """Block sizes of _step_sparse (the compile test uses them too)."""
    return dict(P=P, BK=triton.next_power_of_2(K), BP=triton.next_power_of_2(P))


@torch.compiler.disable(reason='Triton decode step: runs eagerly')
def scan_step_triton(state, x, g, beta, q):
    """One token, as scan.scan_step: state (B,H,M,P) fp32, updated in place and returned;
    x (B,H,P); g (B,H,M) or (B,H,1); beta, q (B,H,M). Returns (y (B,H,P) in x's dtype, state)."""
    _require_runnable(state)
    B, H, M, P = state.shape
    S = state.contiguous()
    y = torch.empty(B, H, P, device=x.device, dtype=x.dtype)
    _launch(_step_dense, (B * H,), S, x.contiguous(), g.expand(B, H, M).contiguous(), beta.contiguous(),
            q.contiguous(), y, **step_meta(M, P))
    if S is not state:
        state.copy_(S)
    return y, state


@torch.compiler.disable(reason='Triton sparse decode step: runs eagerly')
def scan_step_sparse_triton(state, x, g, beta, q, idx):
    """One token of a sparse layer, as scan.scan_step_sparse: only rows idx (B,K) of each head's
    state (B,H,M,P) fp32 are read and written, in place; x (B,H,P); g, beta, q (B,H,K).
    Returns (y (B,H,P) in x's dtype, state)."""
    _require_runnable(state)
    B, H, M, P = state.shape
    K = idx.shape[-1]
    S = state.contiguous()
    y = torch.empty(B, H, P, device=x.device, dtype=x.dtype)
    _launch(_step_sparse, (B * H,), S, x.contiguous(), g.expand(B, H, K).contiguous(), beta.contiguous(),
            q.contiguous(), idx.contiguous(), y, H, M, K, **sparse_step_meta(K, P))
    if S is not state:
        state.copy_(S)
    return y, state


# each kernel's parameter names, read here once rather than at every launch (kernel.arg_names)
_ARG_NAMES = {k: frozenset(k.arg_names) for k in (_chunk_state, _state_pass, _chunk_output_fwd,
                                                   _chunk_dx_dbeta_bwd, _chunk_dq_bwd, _step_dense, _step_sparse)}
