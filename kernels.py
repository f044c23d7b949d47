"""
Triton kernels for the Factorization Memory scan: the chunked scan (forward and backward, as
custom ops with autograd), on per-head gates (scan_triton) or on a layer's factored gates
(scan_factored), and the one-token decode steps. They compute what scan.py defines (scan_naive,
expand_gates); docs/scan.md derives the math.

Per (batch, head), a memory S of M slots (rows) of width P:

    S_t = e^{g_t} * S_{t-1} + beta_t x_t^T          y_t = S_t^T q_t

The stages are scan.py's scan_chunked stages, with its symbols: chunks of C steps, G_t = sum of
g_s over s <= t inside a chunk, G_C its total, S_in[c] the state entering chunk c.

  kernel                 scan.py stage      computes
  _chunk_state           1. chunk state     dS_c = sum_{s in c} (beta_s * e^{G_C - G_s})^T x_s,
                                             and G_C
  _state_pass            2. state pass      S_in[c+1] = e^{G_C} * S_in[c] + dS_c
                                             (sequential over c)
  _chunk_output_fwd      3. chunk output    y_t = (q_t * e^{G_t}) S_in[c]
                                                  + sum_{s<=t in c} A[t,s] x_s
                                             A[t,s] = sum_i q_ti beta_si e^{G_ti - G_si}
  backward (the adjoint D_t = dL/dS_t runs the same recurrence in reverse,
            D_t = e^{g_{t+1}} * D_{t+1} + q_t dy_t^T, dx_t = D_t^T beta_t, dbeta_t = D_t x_t):
  _chunk_state REVERSE   1, q for beta      dD_c = sum_s (q_s * e^{G_s})^T dy_s
  _state_pass REVERSE    2, backwards       E[c] = adjoint at chunk c's end from later chunks;
                                             dS_initial
  _chunk_dx_dbeta_bwd    3, reversed        dx, then dbeta (a reverse sweep over sub-chunks from
                                             E[c]; launched twice, one for each)
  _chunk_dq_dg_bwd       3, reading states  dq_t = S_t dy_t;
                                             dg_t = sum_{t' >= t} (q*dq - beta*dbeta)_t'

Stage 3 and its backward sweeps cut the chunk into sub-chunks of L = 16 steps and carry a state
W across them, held at the step r before each sub-chunk a (W = S_in[c] at a = 0), as scan.py's
stage 3 does with its W:

    y_a = (q_a * e^{G_a - G_r}) W + A_a x_a
    W  <- e^{G_r' - G_r} * W + (beta_a * e^{G_r' - G_a})^T x_a

(r' = a's last step), so the off-diagonal sub-block pairs and the state reads and writes are tl.dot
matmuls (L x BM x P). Every exponent is a difference G_t - G_s with s at or before t, <= 0: a
strong decay underflows harmlessly to 0 and nothing overflows (e^{-G_s} from a chunk start would
pass fp32's e^88 once a chunk decays by 88 nats; 64 steps at -20 reach -1280).

Where this file differs from scan.py's scan_chunked, and why:
- Sub-chunks of L = 16 (tl.dot's smallest tile) vs scan.py's 32; the diagonal L x L blocks A_a
  are pairwise here, one column at a time in registers (nothing L x L x BM), with the decays
  e^{G_t - G_s} as running products of e^{g} <= 1 that only shrink. scan.py factors A_a through
  the sub-chunk start, (q e^{G_a - G_r})(beta e^{G_r - G_a})^T, when the sub-chunk decays by
  less than MAX_SPAN = 60 nats, and goes pairwise only past that (a pairwise L x L x M tensor
  costs more than the rest of its scan on a CPU).
- G is never materialized: each kernel takes g as given, (B,T,H,M) or a broadcast (B,T,H,1)
  (Mamba-2's case, read once per step, never expanded), and forms Gl = G - G_r, the decay since
  the sub-chunk's start, with tl.cumsum over the sub-chunk; sums are referred to the sub-chunk
  (stage 1 as acc <- e^{Gl_end} acc + ..., so its exponents are local too), and the chunk total
  G_C is written once by stage 1 (Gc, (B,H,n,GM)) for the state passes. scan.py takes the
  chunk's cumsum of g, and runs a broadcast g as one C x C matrix per chunk (the SSD form).
- Stage 2 is a sequential loop over chunks here (in programs of BM x 16 columns, below); scan.py
  does it as one matmul by the (n+1) x (n+1) matrix of decays between chunk ends (on a CPU n
  small ops cost more).
- The decay gradient is in the last backward kernel, not PyTorch glue (scan.py: dG, then a
  T-long reverse cumsum). dg at a chunk's first step t0 is exact from two states the passes
  already hold, K[c] = sum_p S_in[c] * E[c-1] (dg_t = sum_p (e^{g_t} S_{t-1}) * D_t, and the
  reverse pass's running D after chunk c is e^{g_t0} D_t0, stored as E[c-1]; dS_initial for
  c = 0); inside the chunk dg_t = K[c] - sum_{t0 <= t' < t} dG_t' with dG = q*dq - beta*dbeta in
  registers. The final state's term sum_p S_final * dS_final is inside K of every chunk.
- Nothing is padded: loads past T are masked to 0 (g = 0: no decay, beta = q = 0: no write or
  read, x = dy = 0), so the last chunk's tail is exact, and stores past T are masked off.

The factored entry, scan_factored (scan.py: scan_factored = expand_gates, then scan_chunked):
- The gates come as their factors, g = A[h] delta[b,t,h] gw[b,t,i], beta = delta bw, q_read = q
  (scan.expand_gates), and every stage forms head h's g, beta, q per tile in registers (FACT,
  HAS_D, HAS_A): the (B,T,M) factor rows are shared by the H programs of a token (cache hits),
  and no (B,T,H,M) gate tensor is made. scan.py expands them (expand_gates) and runs the
  per-head scan: on a CPU the expanded views cost nothing until autograd sums them; on a GPU
  the three (B,T,H,M) fp32 tensors and their gradients were most of a layer's HBM bytes.
- The factors' gradients are summed over the heads in the two backward sweeps, by atomic adds
  into (B,T,M) fp32 buffers (dbw = sum_h delta dbeta_h, dq = sum_h dq_h, dgw = sum_h A delta
  dg_h) and (B,T,H) ones (gsum = sum_i gw dg_h, bsum = sum_i bw dbeta_h; the glue turns them into
  ddelta = A gsum + bsum and dA = sum delta gsum). scan.py has autograd sum expand_gates' views.
- Per head, dbeta_h then never leaves _chunk_dx_dbeta_bwd, so dg_h is split between the sweeps:
  dg_t = K[c] - sum_{t0c <= t' < t} (q dq - beta dbeta)_t' = (K[c] + TotB[c] - sum_{t'<t} (q dq))
  - Suf_t, with Suf_t = sum_{t' >= t in c} (beta dbeta)_t' (the reverse sweep's running sum) and
  TotB[c] its chunk total ((B,H,n,M), 1/C of a gate tensor): the reverse sweep adds the heads'
  shares of -Suf, the forward sweep (which has dq) those of the rest.

Each stage is one @triton.jit kernel; the index, mask and load code they share (program to slots
and columns, sub-chunk rows and masks, tile and row loads) is in small device helpers that Triton
inlines, named _tile_* (every other @triton.jit in this file is a launched kernel).

Slots never mix in the recurrence, so each program takes a block of BM slots (grid axis 2): the
state W (BM x P, fp32) stays in registers. On sm_90 the model's M = 64 (at P <= 64) is one block
at 8 warps, and y, dx, dq, dg are written once, in their dtypes. Larger M, and sm_80 (where that
8-warp block spills), take blocks of STATE_TILE / BP slots, and y, dx (and a broadcast dg), which
sum over slots, are fp32 shares added up in PyTorch. An SM's 64K registers hold two such
8-warp programs at <= 128 registers a thread, one above. So the backward's reverse sweep runs as
two launches (dx, then dbeta; 204 registers as one), and the dbeta and dq/dg sweeps run under a
cap of BWD_REGS = 128 where ptxas meets it without spilling (bf16 x, g per slot: the model under
autocast; the ahead-of-time report).

Stage 2 (the state pass, both directions) is elementwise in the columns as well, and it is a
loop of n dependent steps, so its programs are many and small: BM slots by BPS = PASS_COLS = 16
columns, grid (B*H, cdiv(M,BM), cdiv(P,BPS)), 4 warps. Each state element is still read and
written once; only G_C's BM floats per chunk are read once per column block (from L2). At the
scan bench's shape (B=8, H=8, M=P=64) that is 256 programs, not 64 of 64 x 64 on 64 of an H200's
132 SMs, and the busiest SM moves half the bytes per chunk step; at the training shape (B=16,
H=12) 768, not 192, and the busiest SM moves 3/4 of them (6 programs of 64 x 16, not 2 of 64 x 64).

Any M and P >= 1: tl.dot wants tiles whose sides are powers of 2 >= 16, so a program's tile is
BM slots by BP = max(16, next_pow2(P)) columns, and loads past M or P are masked to 0. That is
exact: a slot past M has g = 0, beta = 0 and q = 0, so its row of W stays 0; a column past P has
x = dy = 0. Stores past M or P are masked off, so tensors keep their real shapes.

The scan (forward, backward) and the decode steps are registered custom ops (fm::scan_fwd,
fm::scan_bwd, fm::scan_step, fm::scan_step_sparse; torch.library.custom_op with a fake
implementation and, for the scan, the autograd formula), so torch.compile traces a model that
calls them into one graph: an op is opaque to the compiler, but not a graph break. On CPU tensors
the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is first
imported).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

SUB = 16           # L, the sub-chunk: tl.dot needs every dimension >= 16
STATE_TILE = 2048  # fp32 elements of the state W per 4 warps (BM x BP): 16 registers a thread; a
                   # larger tile takes 8 warps (one slot block of 64 x 64), a smaller per-thread
                   # share spilled nothing either (tests/test_kernels_compile_gputarget.py,
                   # results/gpu/aot_resources.json)
BWD_REGS = 128     # the dbeta and dq/dg sweeps' register cap (ptxas maxnreg): at 146-164 registers
                   # one 8-warp program fills an SM's 64K (8 of its 64 warps resident); at 128 two
                   # fit. ptxas (Triton 3.6 and 3.9) meets it without spilling where the dots are
                   # single-pass tf32 (bf16/fp16 x, as in training) and g is per slot; fp32 x
                   # (tf32x3) and a broadcast g spill under it and run uncapped
                   # (tests/test_kernels_compile_gputarget.py)
SPLIT_SWEEP = True # the reverse sweep as two launches, dx then dbeta (_chunk_dx_dbeta_bwd); False:
                   # one launch for both (the A/B: bench.py scan's 'triton, one reverse sweep')
PASS_COLS = 16     # BPS, the columns of a state-pass program (stage 2 is elementwise in them): its
                   # grid is cdiv(P, BPS) times stages 1 and 3's slot blocks, so B*H*cdiv(M,BM)
                   # sequential loops over the chunks become 4x as many at P = 64 (2x at 32)


# -----------------------------------------------------------------------------
# Chunked scan: stage 1 (chunk state, forward and reverse), stage 2 (state pass, both
# directions), stage 3 (chunk output) and its two backward sweeps (dx/dbeta, dq/dg).
# Layouts: x, dy, y, dx (B,T,H,P); per-head gates g (B,T,H,GM), GM = M or 1 (broadcast), beta,
# q, dbeta, dq (B,T,H,M); factored gates (FACT) gw (B,T,GM), bw, q (B,T,M), delta (B,T,H),
# A (H); per-chunk states (B,H,n,M,P) fp32; chunk totals Gc (B,H,n,GM) fp32. Row t of (B,T,H)
# is row0 + t*H (x, dy, y, dx, delta); a gate's row is grow0 + t*gstep: the same row for
# per-head gates, b*T + t for factored ones. Steps t >= T (the last chunk's tail) are masked
# loads (0) and masked stores: nothing is padded. Inside sub-chunk a (steps t0..t0+L-1), Gl_t =
# sum of g from t0 to t is the decay since the sub-chunk's start r (G_t - G_r) and Gl_end its
# total.
# -----------------------------------------------------------------------------

# Shared tile loaders, not stages: the index, mask and load code the kernels have in common, as
# small @triton.jit device helpers named _tile_* (Triton inlines them where they are called).


@triton.jit
def _tile_block(bh, mb, pb, H, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                BP: tl.constexpr, GM: tl.constexpr):
    """Program (bh, mb, pb)'s b (int64), h, slots m (block mb of BM), columns p (block pb of BP;
    pb = 0 but in the state pass), their masks, g's column gm per slot."""
    b, h = (bh // H).to(tl.int64), bh % H
    m, p = mb * BM + tl.arange(0, BM), pb * BP + tl.arange(0, BP)
    if GM == 1:
        gm = m * 0                                                   # broadcast g: its one column
    else:
        gm = m
    return b, h, m, p, m < M, p < P, gm


@triton.jit
def _tile_gate_rows(b, h, T, H, A, FACT: tl.constexpr, HAS_A: tl.constexpr):
    """Head h of batch b: row0, its first row of (B,T,H); grow0 and gstep, its gates' first row
    and the step between rows; a_h = A[h] (1 without A)."""
    row0 = b * T * H + h
    if FACT:
        grow0, gstep = b * T, 1                                      # shared by the heads
    else:
        grow0, gstep = row0, H
    if HAS_A:
        a_h = tl.load(A + h).to(tl.float32)
    else:
        a_h = 1.0
    return row0, grow0, gstep, a_h


@triton.jit
def _tile_matrix(ptr, i, m, p, mask, M: tl.constexpr, P: tl.constexpr):
    """Rows m, columns p of the i-th (M, P) fp32 matrix of the stack at ptr, 0 where not mask."""
    return tl.load(ptr + (i * M + m[:, None]) * P + p[None, :], mask=mask, other=0.0)


@triton.jit
def _tile_rows(ptr, row, col, N: tl.constexpr, mask):
    """Columns col of rows row of ptr's (..., N) rows, an (L, len(col)) tile in fp32, 0 off mask."""
    return tl.load(ptr + row[:, None] * N + col[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_store_rows(ptr, row, col, N: tl.constexpr, val, mask):
    """Stores val at columns col of rows row of ptr's (..., N) rows, in ptr's dtype, where mask."""
    tl.store(ptr + row[:, None] * N + col[None, :], val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_add_rows(ptr, row, col, N: tl.constexpr, val, mask):
    """ptr[row, col] += val where mask, atomically: ptr's (..., N) fp32 rows gather the heads'
    shares of a factor's gradient (programs of other heads add to the same rows)."""
    tl.atomic_add(ptr + row[:, None] * N + col[None, :], val, mask=mask, sem='relaxed')


@triton.jit
def _tile_sub_chunk(g, delta, row0, grow0, gstep, a_h, t0, m_ok, p_ok, gm, T, H,
                    GM: tl.constexpr, L: tl.constexpr, HAS_D: tl.constexpr):
    """Sub-chunk steps t = t0..t0+L-1: their rows, gate rows, t < T, the (L,BM) and (L,BP) masks,
    g_a = a_h * d_a * g (the log-decays of head h) and d_a = delta there ((L,), 1 without)."""
    l = tl.arange(0, L)
    t_ok = t0 + l < T
    row, grow = row0 + (t0 + l) * H, grow0 + (t0 + l) * gstep
    mk, pk = t_ok[:, None] & m_ok[None, :], t_ok[:, None] & p_ok[None, :]
    g_a = _tile_rows(g, grow, gm, GM, mk)
    if HAS_D:
        d_a = tl.load(delta + row, mask=t_ok, other=0.0).to(tl.float32)
        g_a = g_a * (a_h * d_a)[:, None]
    else:
        d_a = tl.full([L], 1.0, tl.float32)
        g_a = g_a * a_h
    return row, grow, t_ok, mk, pk, g_a, d_a


@triton.jit
def _tile_scaled_rows(ptr, grow, m, M: tl.constexpr, mk, d_a, HAS_D: tl.constexpr):
    """A write-strength tile: beta's rows, or delta * bw for factored gates."""
    k_a = _tile_rows(ptr, grow, m, M, mk)
    if HAS_D:
        k_a = k_a * d_a[:, None]
    return k_a


@triton.jit
def _tile_decays(g_a, L: tl.constexpr):
    """Gl = G - G_r (g_a's cumsum over the sub-chunk: the decay since its start) and Gl_end."""
    Gl = tl.cumsum(g_a, 0)
    return Gl, tl.sum(tl.where(tl.arange(0, L)[:, None] == L - 1, Gl, 0.0), 0)


@triton.jit
def _tile_step(k, u, g, delta, row0, grow0, gstep, a_h, t, T, H, m, p, gm, M: tl.constexpr,
               P: tl.constexpr, GM: tl.constexpr, KD: tl.constexpr, HAS_D: tl.constexpr):
    """Step t's k (slots m; times delta_t when KD: k is a write strength), u (columns p) and
    e^{g_t} (g_t = a_h * delta_t * g), in fp32: 0, 0 and 1 at t >= T."""
    row, grow = row0 + t * H, grow0 + t * gstep
    m_t, p_t = tl.where(t < T, M, 0), tl.where(t < T, P, 0)         # nothing at t >= T
    k_t = tl.load(k + grow * M + m, mask=m < m_t, other=0.0).to(tl.float32)
    u_t = tl.load(u + row * P + p, mask=p < p_t, other=0.0).to(tl.float32)
    g_t = tl.load(g + grow * GM + gm, mask=m < m_t, other=0.0).to(tl.float32)
    if HAS_D:
        d_t = tl.load(delta + row, mask=t < T, other=0.0).to(tl.float32)
        g_t = g_t * (a_h * d_t)
        if KD:
            k_t = k_t * d_t
    else:
        g_t = g_t * a_h
    return k_t, u_t, tl.exp(g_t)


@triton.jit
def _tile_decay_shares(dgw, gsum, g, grow, row, gm, a_h, d_a, dg_a, t_ok, mk, GM: tl.constexpr):
    """Head h's share of the factored decay's gradients, from dg_a (L,BM), a part of dL/dg_h:
        dgw[t,i] += a_h d_t dg_ti  (summed over the slots i when GM = 1)
        gsum[t,h] += sum_i gw_ti dg_ti    (ddelta = A gsum + bsum, dA = sum_{b,t} delta gsum)"""
    gw_a = _tile_rows(g, grow, gm, GM, mk)
    tl.atomic_add(gsum + row, tl.sum(gw_a * dg_a, 1), mask=t_ok, sem='relaxed')
    share = (a_h * d_a)[:, None] * dg_a
    if GM == 1:
        tl.atomic_add(dgw + grow, tl.sum(share, 1), mask=t_ok, sem='relaxed')
    else:
        _tile_add_rows(dgw, grow, gm, GM, share, mk)


@triton.jit
def _tile_gates(g, beta, q, i, mask):
    """The decode steps' g, beta and q at offsets i, as fp32, 0 where not mask."""
    return (tl.load(g + i, mask=mask, other=0.0).to(tl.float32),
            tl.load(beta + i, mask=mask, other=0.0).to(tl.float32),
            tl.load(q + i, mask=mask, other=0.0).to(tl.float32))


# The stages. Each takes the gates per head (FACT off: g, beta, q (B,T,H,.)) or factored (FACT:
# g = gw, beta = bw, q (B,T,.), with delta (HAS_D) and A (HAS_A)) and forms head h's
# g = A[h] delta gw, beta = delta bw, q in registers; delta and A are unused (any pointer) where
# their flags are off.

@triton.jit
def _chunk_state(u, g, k, delta, A, states, Gc, T, H, M: tl.constexpr, P: tl.constexpr,
                 BM: tl.constexpr, BP: tl.constexpr, GM: tl.constexpr, C: tl.constexpr,
                 L: tl.constexpr, PREC: tl.constexpr, REVERSE: tl.constexpr, FACT: tl.constexpr,
                 HAS_D: tl.constexpr, HAS_A: tl.constexpr):
    """Stage 1, each chunk's own contribution to the state passed between chunks:
        forward  (k=beta, u=x):  dS_c = sum_{s in c} (beta_s * e^{G_C - G_s})^T x_s
                                 (seen at the chunk's end)
        reverse  (k=q,  u=dy):   dD_c = sum_{s in c} (q_s * e^{G_s})^T dy_s
                                 (seen at its start)
    accumulated sub-chunk by sub-chunk with the reference at the sub-chunk's end (forward) or
    start (reverse), acc <- e^{Gl_end} * acc + ..., so every exponent is local and <= 0.
    u (B,T,H,P); g (B,T,H,GM) or gw (B,T,GM); k (B,T,H,M) or (B,T,M); states (B,H,n,M,P) fp32
    <- dS_c or dD_c; forward only: Gc (B,H,n,GM) fp32 <- G_C, the chunk's total decay.
    Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h, m, p, m_ok, p_ok, gm = _tile_block(bh, mb, 0, H, M, P, BM, BP, GM)
    row0, grow0, gstep, a_h = _tile_gate_rows(b, h, T, H, A, FACT, HAS_A)
    acc = tl.zeros([BM, BP], tl.float32)
    G_C = tl.zeros([BM], tl.float32)
    for i in range(C // L):
        if REVERSE:
            t0 = c * C + (C // L - 1 - i) * L
        else:
            t0 = c * C + i * L
        row, grow, t_ok, mk, pk, g_a, d_a = _tile_sub_chunk(g, delta, row0, grow0, gstep, a_h, t0,
                                                            m_ok, p_ok, gm, T, H, GM, L, HAS_D)
        u_a = _tile_rows(u, row, p, P, pk)
        Gl, Gl_end = _tile_decays(g_a, L)
        if REVERSE:
            k_a = _tile_rows(k, grow, m, M, mk) * tl.exp(Gl)
        else:
            k_a = _tile_scaled_rows(k, grow, m, M, mk, d_a, HAS_D) * tl.exp(Gl_end[None, :] - Gl)
        acc = tl.exp(Gl_end)[:, None] * acc + tl.dot(tl.trans(k_a), u_a, input_precision=PREC)
        G_C += Gl_end
    tl.store(states + (((b * H + h) * n + c) * M + m[:, None]) * P + p[None, :], acc,
             mask=m_ok[:, None] & p_ok[None, :])
    if not REVERSE:
        if GM == 1:
            first = m == tl.where(mb == 0, 0, -1)                    # one value per (b, h, c)
        else:
            first = m_ok
        tl.store(Gc + ((b * H + h) * n + c) * GM + gm, G_C, mask=first)


@triton.jit
def _state_pass(states, Gc, S0, S_last, H, n, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                BPS: tl.constexpr, GM: tl.constexpr, REVERSE: tl.constexpr):
    """Stage 2, the recurrence across chunks, in place over `states`:
        forward:  S_in[c] = S;  S = e^{G_C[c]} * S + dS_c    for c = 0..n-1, from S = S0
        reverse:  E[c]    = D;  D = e^{G_C[c]} * D + dD_c    for c = n-1..0, from D = S0
    (S0: the initial state forward, dS_final in reverse). After chunk c the reverse D is
    e^{g_t0} D_t0 (t0 = c's first step), what flows into the state before c: it is stored as
    E[c-1], and as S_last = dS_initial after chunk 0.
    states (B,H,n,M,P) fp32: dS_c (dD_c) in, S_in[c] (E[c]) out; Gc (B,H,n,GM) fp32;
    S0 in, S_last out (B,H,M,P) fp32: S_final, or dS_initial when REVERSE.
    Elementwise in the columns: a program takes BM slots by BPS columns (column block pb), so the
    n-long sequential loop runs in B*H*cdiv(M,BM)*cdiv(P,BPS) programs, each reading and writing
    its elements once (G_C's BM rows are read by each column block).
    Grid (B*H, cdiv(M,BM), cdiv(P,BPS))."""
    bh, mb, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h, m, p, m_ok, p_ok, gm = _tile_block(bh, mb, pb, H, M, P, BM, BPS, GM)
    ok = m_ok[:, None] & p_ok[None, :]
    mp = m[:, None] * P + p[None, :]
    chunk0 = states + (b * H + h) * n * M * P + mp
    S = tl.load(S0 + (b * H + h) * M * P + mp, mask=ok, other=0.0)
    for i in range(n):
        if REVERSE:
            c = n - 1 - i
        else:
            c = i
        dS = tl.load(chunk0 + c * M * P, mask=ok, other=0.0)
        tl.store(chunk0 + c * M * P, S, mask=ok)
        G_C = tl.load(Gc + ((b * H + h) * n + c) * GM + gm, mask=m_ok, other=0.0)
        S = tl.exp(G_C)[:, None] * S + dS
    tl.store(S_last + (b * H + h) * M * P + mp, S, mask=ok)


@triton.jit
def _chunk_output_fwd(x, g, beta, q, delta, A, states, y, T, H, M: tl.constexpr,
                      P: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, GM: tl.constexpr,
                      C: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr, FACT: tl.constexpr,
                      HAS_D: tl.constexpr, HAS_A: tl.constexpr):
    """Stage 3, y for one chunk and one block of slots, sub-chunk by sub-chunk (a), W held at the
    step r before a (W = S_in[c] at a = 0):
        y_a = (q_a * e^{Gl_a}) W + A_a x_a,  A_a[t,s] = sum_i q_ti beta_si e^{Gl_ti - Gl_si}, s <= t
        W  <- e^{Gl_end} * W + (beta_a * e^{Gl_end - Gl_a})^T x_a
    x (B,T,H,P); g (B,T,H,GM) or gw (B,T,GM); beta, q (B,T,H,M) or bw, q (B,T,M); states
    (B,H,n,M,P) fp32 = S_in; y <- y_a: (B,T,H,P) in x's dtype with one slot block (M <= 64),
    else (cdiv(M,BM),B,T,H,P) fp32, each block's share. Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h, m, p, m_ok, p_ok, gm = _tile_block(bh, mb, 0, H, M, P, BM, BP, GM)
    row0, grow0, gstep, a_h = _tile_gate_rows(b, h, T, H, A, FACT, HAS_A)
    l = tl.arange(0, L)
    y += mb.to(tl.int64) * tl.num_programs(1) * T * P
    W = _tile_matrix(states, (b * H + h) * n + c, m, p, m_ok[:, None] & p_ok[None, :], M, P)
    for a in range(C // L):
        t0 = c * C + a * L
        row, grow, t_ok, mk, pk, g_a, d_a = _tile_sub_chunk(g, delta, row0, grow0, gstep, a_h, t0,
                                                            m_ok, p_ok, gm, T, H, GM, L, HAS_D)
        Gl, Gl_end = _tile_decays(g_a, L)
        beta_a = _tile_scaled_rows(beta, grow, m, M, mk, d_a, HAS_D)
        q_a = _tile_rows(q, grow, m, M, mk)
        x_a = _tile_rows(x, row, p, P, pk)
        y_a = tl.dot(q_a * tl.exp(Gl), W, input_precision=PREC)
        # diagonal block, pairwise, one column s = t0 + j of A_a at a time, from the last (no
        # L x L x BM tile): decay[t] = e^{Gl_t - Gl_s} (t >= s, else 0) is the next column's times
        # a_next = e^{g_{s+1}} <= 1, and 1 at t = s, so it only shrinks (underflow to 0 is harmless)
        decay, a_next = tl.zeros([L, BM], tl.float32), tl.zeros([BM], tl.float32)
        for jj in range(L):
            j = L - 1 - jj
            beta_s, x_s, a_s = _tile_step(beta, x, g, delta, row0, grow0, gstep, a_h, t0 + j, T,
                                          H, m, p, gm, M, P, GM, True, HAS_D)
            decay, a_next = tl.where(l[:, None] == j, 1.0, decay * a_next[None, :]), a_s
            A_s = tl.sum(q_a * beta_s[None, :] * decay, 1)               # A_a[:, s]
            y_a += A_s[:, None] * x_s[None, :]
        _tile_store_rows(y, row, p, P, y_a, pk)
        W = tl.exp(Gl_end)[:, None] * W + tl.dot(tl.trans(beta_a * tl.exp(Gl_end[None, :] - Gl)),
                                                  x_a, input_precision=PREC)


@triton.jit
def _chunk_dx_dbeta_bwd(x, g, beta, q, delta, A, dy, states, dx, dbeta, TotB, dgw, gsum, bsum,
                        T, H, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                        BP: tl.constexpr, GM: tl.constexpr, C: tl.constexpr, L: tl.constexpr,
                        PREC: tl.constexpr, FACT: tl.constexpr, HAS_D: tl.constexpr,
                        HAS_A: tl.constexpr, DX: tl.constexpr, DBETA: tl.constexpr):
    """Backward, reverse sweep: dx_s = D_s^T beta_s (DX) and dbeta_s = D_s x_s (DBETA),
    sub-chunk by sub-chunk from the last, with the adjoint W held at the last step of sub-chunk a
    (W = E[c] at first):
        D_s = e^{Gl_end - Gl_s} * W + sum_{t>=s in a} e^{Gl_t - Gl_s} * q_t dy_t^T
        W  <- e^{Gl_end} * W + (q_a * e^{Gl_a})^T dy_a                 (now at the step before a)
    The glue launches it twice, dx then dbeta (SPLIT_SWEEP), each carrying W (a tensor-core
    product a sub-chunk): both in one sweep hold two accumulators and take two reductions a step,
    204 registers on sm_90 (one program per SM); each half fits in 128 (two per SM).
    x, dy (B,T,H,P); g, beta, q per head or factored (FACT); states (B,H,n,M,P) fp32 = E;
    dx <- (B,T,H,P) in x's dtype with one slot block, else (cdiv(M,BM),B,T,H,P) fp32 shares.
    Per-head gates: dbeta <- (B,T,H,M) fp32 (TotB, dgw, gsum, bsum unused).
    Factored gates: head h's dbeta_h stays in registers; added over the heads (atomically):
        dbeta (B,T,M) fp32 += delta dbeta_h  (= dbw),    bsum (B,T,H) fp32 += sum_i bw dbeta_h,
    and this kernel's part of dg_h, the sum of beta*dbeta from t to the chunk's end (the other
    part, in _chunk_dq_dg_bwd, needs only q*dq: dg_t = K[c] + TotB[c] - Suf_t - sum_{t' < t}
    (q dq)_t' with Suf_t = sum_{t <= t' in c} (beta dbeta)_t' and TotB[c] its chunk total):
        dgw (B,T,GM), gsum (B,T,H) fp32 += _tile_decay_shares(-Suf),
        TotB (B,H,n,M) fp32 <- TotB[c].
    Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h, m, p, m_ok, p_ok, gm = _tile_block(bh, mb, 0, H, M, P, BM, BP, GM)
    row0, grow0, gstep, a_h = _tile_gate_rows(b, h, T, H, A, FACT, HAS_A)
    l = tl.arange(0, L)
    W = _tile_matrix(states, (b * H + h) * n + c, m, p, m_ok[:, None] & p_ok[None, :], M, P)
    dx += mb.to(tl.int64) * tl.num_programs(1) * T * P
    suf = tl.zeros([BM], tl.float32)                  # FACT: beta*dbeta summed over later steps
    for i in range(C // L):
        t0 = c * C + (C // L - 1 - i) * L
        row, grow, t_ok, mk, pk, g_a, d_a = _tile_sub_chunk(g, delta, row0, grow0, gstep, a_h, t0,
                                                            m_ok, p_ok, gm, T, H, GM, L, HAS_D)
        Gl, Gl_end = _tile_decays(g_a, L)
        decay_r = tl.exp(Gl_end[None, :] - Gl)
        if DX:
            beta_a = _tile_scaled_rows(beta, grow, m, M, mk, d_a, HAS_D)
            dx_a = tl.dot(beta_a * decay_r, W, input_precision=PREC)
        if DBETA:
            x_a = _tile_rows(x, row, p, P, pk)
            dbeta_a = decay_r * tl.dot(x_a, tl.trans(W), input_precision=PREC)
        # diagonal block, pairwise, one later step t = t0 + j at a time:
        #   dx_s += A_a[t, s] dy_t,   dbeta_si += (dy_t . x_s) q_ti e^{Gl_ti - Gl_si}   (s <= t)
        # decay[s] = e^{Gl_t - Gl_s} (s <= t, else 0): the last step's times e^{g_t} <= 1,
        # 1 at s = t
        decay = tl.zeros([L, BM], tl.float32)
        for j in range(L):
            q_t, dy_t, a_t = _tile_step(q, dy, g, delta, row0, grow0, gstep, a_h, t0 + j, T, H,
                                        m, p, gm, M, P, GM, False, HAS_D)
            decay = tl.where(l[:, None] == j, 1.0, decay * a_t[None, :])
            if DX:
                A_t = tl.sum(beta_a * q_t[None, :] * decay, 1)            # A_a[t, :]
                dx_a += A_t[:, None] * dy_t[None, :]
            if DBETA:
                x_dy = tl.sum(x_a * dy_t[None, :], 1)                     # x_s . dy_t
                dbeta_a += x_dy[:, None] * q_t[None, :] * decay
        if DX:
            _tile_store_rows(dx, row, p, P, dx_a, pk)
        # q_a and dy_a are loaded only now (cache hits: the loop read their rows), not held
        # through it; W moves before the factored sums below, which then hold no Gl
        q_a = _tile_rows(q, grow, m, M, mk)
        dy_a = _tile_rows(dy, row, p, P, pk)
        W = tl.exp(Gl_end)[:, None] * W + tl.dot(tl.trans(q_a * tl.exp(Gl)), dy_a,
                                                  input_precision=PREC)
        if DBETA and FACT:
            bw_a = _tile_rows(beta, grow, m, M, mk)                       # a cache hit
            _tile_add_rows(dbeta, grow, m, M, d_a[:, None] * dbeta_a, mk)
            bdb = bw_a * dbeta_a
            tl.atomic_add(bsum + row, tl.sum(bdb, 1), mask=t_ok, sem='relaxed')
            bdb = d_a[:, None] * bdb                                      # beta_h * dbeta_h
            Suf = tl.cumsum(bdb, 0, reverse=True) + suf[None, :]           # from t to c's end
            suf += tl.sum(bdb, 0)
            _tile_decay_shares(dgw, gsum, g, grow, row, gm, a_h, d_a, -Suf, t_ok, mk, GM)
        elif DBETA:
            _tile_store_rows(dbeta, row, m, M, dbeta_a, mk)
    if DBETA and FACT:
        tl.store(TotB + ((b * H + h) * n + c) * M + m, suf, mask=m_ok)


@triton.jit
def _chunk_dq_dg_bwd(x, g, beta, q, delta, A, dy, states, E, dS0, dbeta, TotB, dq, dg, gsum,
                     T, H, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr,
                     GM: tl.constexpr, C: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
                     FACT: tl.constexpr, HAS_D: tl.constexpr, HAS_A: tl.constexpr):
    """Backward, forward sweep: dq_t = S_t dy_t, reading the states as stage 3 does, and the
    decay gradient dg_t = sum_{t' >= t} dG_t', dG = q*dq - beta*dbeta:
        dq_a = e^{Gl_a} * (dy_a W^T) + sum_{s<=t in a} e^{Gl_t - Gl_s} * beta_s (dy_t . x_s)
        W   <- e^{Gl_end} * W + (beta_a * e^{Gl_end - Gl_a})^T x_a,        W = S_in[c] at a = 0
        dg_t = K[c] - sum_{t0c <= t' < t} dG_t',   K[c] = sum_p S_in[c] * E[c-1]
                                                   (dS_initial at c = 0)
    K[c] is dg at the chunk's first step t0c, exactly: dg_t = sum_p (e^{g_t} S_{t-1}) * D_t and
    E[c-1] = e^{g_t0c} D_t0c (the reverse state pass). So every later step's gradient, the final
    state's included, is carried into the chunk by the state pass: no reverse cumsum over T.
    x, dy (B,T,H,P); states = S_in, E (B,H,n,M,P) fp32; dS0 (B,H,M,P) fp32.
    Per-head gates g (B,T,H,GM), beta, q, dbeta (fp32) (B,T,H,M): dq <- (B,T,H,M) in q's dtype;
    dg <- (B,T,H,M) in g's dtype, or for GM = 1 summed over slots: (B,T,H,1) with one slot
    block, else (cdiv(M,BM),B,T,H,1) fp32 shares (TotB, gsum unused).
    Factored gates (FACT; dbeta unused): dG = q*dq only, from K[c] + TotB[c] (_chunk_dx_dbeta_bwd
    has the beta*dbeta part); added over the heads (atomically): dq (B,T,M) fp32 += dq_h, and
    dg = dgw (B,T,GM), gsum (B,T,H) fp32 += _tile_decay_shares(dg part).
    Grid (n, B*H, cdiv(M,BM))."""
    c, bh, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.num_programs(0)
    b, h, m, p, m_ok, p_ok, gm = _tile_block(bh, mb, 0, H, M, P, BM, BP, GM)
    row0, grow0, gstep, a_h = _tile_gate_rows(b, h, T, H, A, FACT, HAS_A)
    l = tl.arange(0, L)
    W = _tile_matrix(states, (b * H + h) * n + c, m, p, m_ok[:, None] & p_ok[None, :], M, P)
    later = (m[:, None] < tl.where(c > 0, M, 0)) & p_ok[None, :]     # E[c-1] (dS_initial at c = 0)
    first = (m[:, None] < tl.where(c == 0, M, 0)) & p_ok[None, :]
    E_prev = (_tile_matrix(E, (b * H + h) * n + c - 1, m, p, later, M, P)
              + _tile_matrix(dS0, b * H + h, m, p, first, M, P))
    K = tl.sum(W * E_prev, 1)                                        # dg at the chunk's first step
    if FACT:
        K += tl.load(TotB + ((b * H + h) * n + c) * M + m, mask=m_ok, other=0.0)
    elif GM == 1:
        dg += mb.to(tl.int64) * tl.num_programs(1) * T
    for a in range(C // L):
        t0 = c * C + a * L
        row, grow, t_ok, mk, pk, g_a, d_a = _tile_sub_chunk(g, delta, row0, grow0, gstep, a_h, t0,
                                                            m_ok, p_ok, gm, T, H, GM, L, HAS_D)
        Gl, Gl_end = _tile_decays(g_a, L)
        beta_a = _tile_scaled_rows(beta, grow, m, M, mk, d_a, HAS_D)
        x_a, dy_a = _tile_rows(x, row, p, P, pk), _tile_rows(dy, row, p, P, pk)
        dq_a = tl.exp(Gl) * tl.dot(dy_a, tl.trans(W), input_precision=PREC)
        # diagonal block, pairwise, one earlier step s = t0 + j at a time:
        #   dq_ti += (dy_t . x_s) beta_si e^{Gl_ti - Gl_si}   (s <= t);
        # from the last s, decay[t] = e^{Gl_t - Gl_s} (t >= s) shrinking as in stage 3
        decay, a_next = tl.zeros([L, BM], tl.float32), tl.zeros([BM], tl.float32)
        for jj in range(L):
            j = L - 1 - jj
            beta_s, x_s, a_s = _tile_step(beta, x, g, delta, row0, grow0, gstep, a_h, t0 + j, T,
                                          H, m, p, gm, M, P, GM, True, HAS_D)
            decay, a_next = tl.where(l[:, None] == j, 1.0, decay * a_next[None, :]), a_s
            dy_x = tl.sum(dy_a * x_s[None, :], 1)                         # dy_t . x_s
            dq_a += dy_x[:, None] * beta_s[None, :] * decay
        # W moves first: the decay gradient below then holds no Gl, x_a (nor beta_a, factored)
        W = tl.exp(Gl_end)[:, None] * W + tl.dot(tl.trans(beta_a * tl.exp(Gl_end[None, :] - Gl)),
                                                  x_a, input_precision=PREC)
        # the decay gradient: dG in registers, its chunk-local exclusive prefix sum taken from K
        q_a = _tile_rows(q, grow, m, M, mk)
        if FACT:
            _tile_add_rows(dq, grow, m, M, dq_a, mk)
            dG = q_a * dq_a
        else:
            _tile_store_rows(dq, row, m, M, dq_a, mk)
            dG = q_a * dq_a - beta_a * _tile_rows(dbeta, row, m, M, mk)
        dg_a = K[None, :] - (tl.cumsum(dG, 0) - dG)
        K -= tl.sum(dG, 0)
        if FACT:
            _tile_decay_shares(dg, gsum, g, grow, row, gm, a_h, d_a, dg_a, t_ok, mk, GM)
        elif GM == 1:
            tl.store(dg + row, tl.sum(dg_a, 1).to(dg.dtype.element_ty), mask=t_ok)
        else:
            _tile_store_rows(dg, row, m, M, dg_a, mk)


def chunk_meta(M, P, chunk_size, dtype, arch=90):
    """The compile-time constants and warps the chunk kernels are launched with.

    Any M, P >= 1: tiles are powers of 2 >= 16 (tl.arange and tl.dot need them), BM slots by BP
    columns, and the kernels mask what lies past M or P. A masked slot loads g = beta = q = 0 (no
    decay, no write, no read) and a masked column x = dy = 0, so the padding adds nothing to any
    result and nothing past M or P is stored. On sm_90 (arch >= 90) the state is one slot block up
    to 2 * STATE_TILE elements (M <= 64 at P <= 64), at 8 warps when over STATE_TILE, so y, dx and
    a broadcast dg are written once, in their dtypes. Otherwise, and on sm_80 (where that 8-warp
    block spills: ptxas, sm_80's mma layouts), blocks of STATE_TILE // BP slots write fp32
    shares. BPS: the state pass's columns per program (PASS_COLS; _launch_state_pass)."""
    _check_chunk(chunk_size)
    if M < 1 or P < 1:
        raise ValueError(f"scan_triton needs M (n_slots) >= 1 and P (head_dim) >= 1, "
                         f"got M={M}, P={P}")
    # fp32 inputs: 3 tf32 passes give fp32 accuracy on tensor cores; bf16 inputs need no more
    # than tf32
    prec = 'tf32x3' if dtype == torch.float32 else 'tf32'
    BP = max(16, triton.next_power_of_2(P))
    BM = max(16, triton.next_power_of_2(M))
    if BM * BP > (2 if arch >= 90 else 1) * STATE_TILE:
        BM = max(16, STATE_TILE // BP)
    warps = 8 if BM * BP > STATE_TILE else 4
    return dict(M=M, P=P, BM=BM, BP=BP, BPS=min(BP, PASS_COLS), C=chunk_size, L=SUB, PREC=prec,
                num_warps=warps)


def _launch_state_pass(states, Gc, S0, S_last, B, H, n, nb, reverse, meta):
    """Stage 2's launch: grid (B*H, nb, cdiv(P, BPS)), programs of BM x BPS at 4 warps (8 over
    STATE_TILE elements), whatever warps the other stages' BM x BP tiles take."""
    warps = 8 if meta['BM'] * meta['BPS'] > STATE_TILE else 4
    _launch(_state_pass, (B * H, nb, triton.cdiv(meta['P'], meta['BPS'])), states, Gc, S0, S_last,
            H, n, REVERSE=reverse, **dict(meta, num_warps=warps))


def _arch(t):
    """The compute capability the launch is for, as 80 or 90 (the interpreter: 90's tiles)."""
    if not t.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch goes through here (the compile test records them to compile exactly
    these launches ahead of time). meta: the kernel's constexprs, filtered by its parameter
    names (_ARG_NAMES, read once), and the launch options num_warps (default 4) and maxnreg (a
    register cap; none by default)."""
    kernel[grid](*args, **{k: v for k, v in meta.items()
                           if k in _ARG_NAMES[kernel] or k in ('num_warps', 'maxnreg')})


def _require_runnable(t):
    if not t.is_cuda and isinstance(_chunk_state, triton.runtime.JITFunction):
        raise RuntimeError("kernels.py got CPU tensors: Triton runs on CPU only under its "
                           "interpreter. Set TRITON_INTERPRET=1 before triton is first imported, "
                           "or use scan_impl='chunked'.")


def _check_chunk(chunk_size):
    if not (isinstance(chunk_size, int) and chunk_size >= SUB and chunk_size % SUB == 0):
        raise ValueError(f"chunk_size={chunk_size} must be a positive multiple of {SUB}")


# -----------------------------------------------------------------------------
# The scan as custom ops: fm::scan_fwd and fm::scan_bwd, with fake (shape-only) implementations
# and the autograd formula registered, so torch.compile traces a model through them into one
# graph (dynamo sees an opaque op with known output shapes, not launches to trace). The real
# implementations below are the glue: allocations and launches only. Inputs are read where they
# are (contiguous() copies only what is not), g is read as given ((B,T,H,M) or (B,T,H,1)), the
# last chunk's tail is masked in the kernels, the decay gradient comes out of the last kernel, and
# the slot blocks' partial sums (y, dx, a broadcast dg; M > 64 or sm_80) are added up in the op.
# -----------------------------------------------------------------------------

def _scan_meta(x, g, beta, chunk_size, A, delta, factored):
    """chunk_meta and the gate flags; the shapes B, T, H, P, M; n chunks, nb slot blocks."""
    B, T, H, P = x.shape
    M, GM = beta.shape[-1], g.shape[-1]
    meta = dict(chunk_meta(M, P, chunk_size, x.dtype, _arch(x)), GM=GM, FACT=factored,
                HAS_D=delta is not None, HAS_A=A is not None)
    if factored and x.dtype == torch.float32 and meta['BM'] * meta['BP'] > STATE_TILE // 2:
        # fp32's 3-pass dots and the reverse sweep's sums over the heads pass 255 registers at
        # STATE_TILE elements of state per 4 warps (sm_90 spills 24-56 bytes): half that, at 8
        # warps (tests/test_kernels_compile_gputarget.py)
        meta['BM'] = min(meta['BM'], STATE_TILE // meta['BP'])
        meta['num_warps'] = 8
    return meta, (B, T, H, P, M), triton.cdiv(T, chunk_size), triton.cdiv(M, meta['BM'])


def _scan_fwd(x, g, beta, q, initial_state, chunk_size, A=None, delta=None, factored=False):
    """Stages 1-3 forward. Returns y, S_final and what the backward reads: S_in (the states
    entering each chunk, (B,H,n,M,P)) and Gc (the chunks' total decays, (B,H,n,GM)). Per-head
    gates g, beta, q (B,T,H,.), or factored ones gw, bw, q (B,T,.) with A, delta (factored)."""
    _require_runnable(x)
    meta, (B, T, H, P, M), n, nb = _scan_meta(x, g, beta, chunk_size, A, delta, factored)
    x, g, beta, q = (t.contiguous() for t in (x, g, beta, q))
    A, delta = (x if t is None else t.contiguous() for t in (A, delta))   # x: an unread pointer
    f32 = dict(device=x.device, dtype=torch.float32)
    S0 = (torch.zeros(B, H, M, P, **f32) if initial_state is None else
          initial_state.float().contiguous())
    states, S_final = torch.empty(B, H, n, M, P, **f32), torch.empty(B, H, M, P, **f32)
    Gc = torch.empty(B, H, n, meta['GM'], **f32)
    y = (torch.empty(B, T, H, P, device=x.device, dtype=x.dtype) if nb == 1 else
         torch.empty(nb, B, T, H, P, **f32))
    grid = (n, B * H, nb)
    _launch(_chunk_state, grid, x, g, beta, delta, A, states, Gc, T, H, REVERSE=False, **meta)
    _launch_state_pass(states, Gc, S0, S_final, B, H, n, nb, False, meta)
    _launch(_chunk_output_fwd, grid, x, g, beta, q, delta, A, states, y, T, H, **meta)
    return (y if nb == 1 else y.sum(0).to(x.dtype)), S_final, states, Gc


def _scan_bwd(x, g, beta, q, S_in, Gc, dy, dS_final, chunk_size, A=None, delta=None,
              factored=False):
    """The backward of _scan_fwd. Per-head gates: dx, dg, dbeta, dq, dS_initial (always).
    Factored: dx, dgw, dbw, dq, dA (H), ddelta (B,T,H), dS_initial, whether or not A and delta
    were given; the kernels add the heads' shares of dgw, dbw, dq (B,T,.) and of gsum, bsum
    (B,T,H), from which ddelta and dA are a few (B,T,H) ops here."""
    _require_runnable(x)
    meta, (B, T, H, P, M), n, nb = _scan_meta(x, g, beta, chunk_size, A, delta, factored)
    GM = meta['GM']
    x, g, beta, q, dy = (t.contiguous() for t in (x, g, beta, q, dy))
    A_, delta_ = (x if t is None else t.contiguous() for t in (A, delta))
    dS_final = dS_final.float().contiguous()
    f32 = dict(device=x.device, dtype=torch.float32)
    E, dS0 = torch.empty(B, H, n, M, P, **f32), torch.empty(B, H, M, P, **f32)
    dx = (torch.empty(B, T, H, P, device=x.device, dtype=x.dtype) if nb == 1 else
          torch.empty(nb, B, T, H, P, **f32))
    if factored:           # the heads' shares are added atomically: the buffers start at 0
        dbeta, dq, dg = (torch.zeros(B, T, k, **f32) for k in (M, M, GM))
        gsum, bsum = torch.zeros(B, T, H, **f32), torch.zeros(B, T, H, **f32)
        TotB = torch.empty(B, H, n, M, **f32)
    else:
        dbeta = torch.empty(B, T, H, M, **f32)
        dq = torch.empty(B, T, H, M, device=x.device, dtype=q.dtype)
        if GM > 1 or nb == 1:
            dg = torch.empty(B, T, H, GM, device=x.device, dtype=g.dtype)
        else:
            dg = torch.empty(nb, B, T, H, 1, **f32)
        gsum = bsum = TotB = x                                       # unread pointers
    grid = (n, B * H, nb)
    _launch(_chunk_state, grid, dy, g, q, delta_, A_, E, Gc, T, H, REVERSE=True, **meta)
    _launch_state_pass(E, Gc, dS_final, dS0, B, H, n, nb, True, meta)
    cap = dict(maxnreg=BWD_REGS) if meta['PREC'] == 'tf32' and GM > 1 else {}
    sweeps = [dict(DX=True, DBETA=False), dict(DX=False, DBETA=True, **cap)] if SPLIT_SWEEP else [
        dict(DX=True, DBETA=True)]
    for sweep in sweeps:           # dx, then dbeta (and TotB, which _chunk_dq_dg_bwd reads)
        _launch(_chunk_dx_dbeta_bwd, grid, x, g, beta, q, delta_, A_, dy, E, dx, dbeta, TotB, dg,
                gsum, bsum, T, H, **meta, **sweep)
    _launch(_chunk_dq_dg_bwd, grid, x, g, beta, q, delta_, A_, dy, S_in, E, dS0, dbeta, TotB, dq,
            dg, gsum, T, H, **meta, **cap)
    if nb > 1:
        dx = dx.sum(0).to(x.dtype)
    if not factored:
        if nb > 1 and GM == 1:
            dg = dg.sum(0).to(g.dtype)
        return dx, dg, dbeta.to(beta.dtype), dq, dS0
    # ddelta[t,h] = A[h] gsum + bsum (g = A delta gw, beta = delta bw); dA[h] = sum delta gsum
    ddelta = (gsum if A is None else gsum * A.float()) + bsum
    dA = (gsum if delta is None else gsum * delta.float()).sum((0, 1))
    return (dx, dg.to(g.dtype), dbeta.to(beta.dtype), dq.to(q.dtype), dA, ddelta, dS0)


Tensor = torch.Tensor


@torch.library.custom_op('fm::scan_fwd', mutates_args=())
def _scan_fwd_op(x: Tensor, g: Tensor, beta: Tensor, q: Tensor, initial_state: Optional[Tensor],
                 chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _scan_fwd(x, g, beta, q, initial_state, chunk_size)


@torch.library.custom_op('fm::scan_bwd', mutates_args=())
def _scan_bwd_op(x: Tensor, g: Tensor, beta: Tensor, q: Tensor, S_in: Tensor, Gc: Tensor,
                 dy: Tensor, dS_final: Tensor,
                 chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_bwd(x, g, beta, q, S_in, Gc, dy, dS_final, chunk_size)


def _fwd_outputs_like(x, M, GM, chunk_size):
    """The forward ops' outputs, empty (their fake implementation): y (B,T,H,P), S_final
    (B,H,M,P), the chunk states S_in (B,H,n,M,P) and G_C (B,H,n,GM), float32 but y."""
    _check_chunk(chunk_size)
    B, T, H, P = x.shape
    n, f32 = (T + chunk_size - 1) // chunk_size, torch.float32
    return (x.new_empty(B, T, H, P), x.new_empty(B, H, M, P, dtype=f32),
            x.new_empty(B, H, n, M, P, dtype=f32), x.new_empty(B, H, n, GM, dtype=f32))


@_scan_fwd_op.register_fake
def _(x, g, beta, q, initial_state, chunk_size):
    return _fwd_outputs_like(x, beta.shape[-1], g.shape[-1], chunk_size)


@_scan_bwd_op.register_fake
def _(x, g, beta, q, S_in, Gc, dy, dS_final, chunk_size):
    return (torch.empty_like(x), torch.empty_like(g), torch.empty_like(beta), torch.empty_like(q),
            torch.empty_like(dS_final, dtype=torch.float32))


def _scan_setup_context(ctx, inputs, output):
    x, g, beta, q, initial_state, chunk_size = inputs
    _, _, S_in, Gc = output
    ctx.save_for_backward(x, g, beta, q, S_in, Gc)
    ctx.chunk_size, ctx.has_initial = chunk_size, initial_state is not None


def _scan_backward(ctx, dy, dS_final, _dS_in, _dGc):
    x, g, beta, q, S_in, Gc = ctx.saved_tensors
    dy, dS_final = _grad_or_zeros(dy, x), _grad_or_zeros(dS_final, S_in[:, :, 0])
    dx, dg, dbeta, dq, dS0 = _scan_bwd_op(x, g, beta, q, S_in, Gc, dy, dS_final, ctx.chunk_size)
    return dx, dg, dbeta, dq, (dS0 if ctx.has_initial else None), None


def _grad_or_zeros(grad, like):
    """An output's gradient, or zeros for an output the loss did not use."""
    return torch.zeros_like(like) if grad is None else grad


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def scan_triton(x, g, beta, q, initial_state=None, chunk_size=64):
    """The chunked scan in Triton, forward and backward. Equals scan.scan_naive.

    The custom ops fm::scan_fwd and fm::scan_bwd: torch.compile traces through them (no graph
    break), and runs the kernels where the ops stand in its graph.

    x (B,T,H,P); g (B,T,H,M) or (B,T,H,1); beta, q (B,T,H,M); initial_state (B,H,M,P) or None.
    Returns y (B,T,H,P) in x's dtype and the final state (B,H,M,P) float32. Any T >= 1.
    """
    y, S_final, _, _ = _scan_fwd_op(x, g, beta, q, initial_state, chunk_size)
    return y, S_final


@torch.library.custom_op('fm::scan_factored_fwd', mutates_args=())
def _scan_factored_fwd_op(x: Tensor, gw: Tensor, bw: Tensor, q: Tensor, A: Optional[Tensor],
                          delta: Optional[Tensor], initial_state: Optional[Tensor],
                          chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _scan_fwd(x, gw, bw, q, initial_state, chunk_size, A, delta, factored=True)


@torch.library.custom_op('fm::scan_factored_bwd', mutates_args=())
def _scan_factored_bwd_op(x: Tensor, gw: Tensor, bw: Tensor, q: Tensor, A: Optional[Tensor],
                          delta: Optional[Tensor], S_in: Tensor, Gc: Tensor, dy: Tensor,
                          dS_final: Tensor, chunk_size: int
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_bwd(x, gw, bw, q, S_in, Gc, dy, dS_final, chunk_size, A, delta, factored=True)


@_scan_factored_fwd_op.register_fake
def _(x, gw, bw, q, A, delta, initial_state, chunk_size):
    return _fwd_outputs_like(x, bw.shape[-1], gw.shape[-1], chunk_size)


@_scan_factored_bwd_op.register_fake
def _(x, gw, bw, q, A, delta, S_in, Gc, dy, dS_final, chunk_size):
    B, T, H, _ = x.shape
    f32 = torch.float32
    return (torch.empty_like(x), torch.empty_like(gw), torch.empty_like(bw), torch.empty_like(q),
            x.new_empty(H, dtype=f32), x.new_empty(B, T, H, dtype=f32),
            torch.empty_like(dS_final, dtype=f32))


def _scan_factored_setup_context(ctx, inputs, output):
    x, gw, bw, q, A, delta, initial_state, chunk_size = inputs
    _, _, S_in, Gc = output
    ctx.save_for_backward(x, gw, bw, q, A, delta, S_in, Gc)
    ctx.chunk_size, ctx.has_initial = chunk_size, initial_state is not None


def _scan_factored_backward(ctx, dy, dS_final, _dS_in, _dGc):
    x, gw, bw, q, A, delta, S_in, Gc = ctx.saved_tensors
    dy, dS_final = _grad_or_zeros(dy, x), _grad_or_zeros(dS_final, S_in[:, :, 0])
    dx, dgw, dbw, dq, dA, ddelta, dS0 = _scan_factored_bwd_op(x, gw, bw, q, A, delta, S_in, Gc,
                                                              dy, dS_final, ctx.chunk_size)
    return (dx, dgw, dbw, dq, None if A is None else dA.to(A.dtype),
            None if delta is None else ddelta.to(delta.dtype),
            dS0 if ctx.has_initial else None, None)


_scan_factored_fwd_op.register_autograd(_scan_factored_backward,
                                        setup_context=_scan_factored_setup_context)


def scan_factored(x, gw, bw, q, A=None, delta=None, initial_state=None, chunk_size=64):
    """The chunked scan on factored gates (scan.expand_gates): equals scan.scan_factored, i.e.
    scan_triton on the per-head gates

        g[b,t,h,i] = A[h] delta[b,t,h] gw[b,t,i]    beta[b,t,h,i] = delta[b,t,h] bw[b,t,i]
        q_read[b,t,h,i] = q[b,t,i]

    formed per head in registers: no (B,T,H,M) gate tensor is made, forward or backward, and the
    factors' gradients are summed over the heads in the kernels.

    x (B,T,H,P); gw (B,T,M) or (B,T,1) (one decay for all slots); bw, q (B,T,M); A (H) or None
    (1); delta (B,T,H) or None (1); initial_state (B,H,M,P) or None. Returns y (B,T,H,P) in x's
    dtype and the final state (B,H,M,P) float32. The custom ops fm::scan_factored_fwd/bwd.
    """
    y, S_final, _, _ = _scan_factored_fwd_op(x, gw, bw, q, A, delta, initial_state, chunk_size)
    return y, S_final


# -----------------------------------------------------------------------------
# Decoding: one token, dense (all slots) or sparse (the k routed slots), in place.
# -----------------------------------------------------------------------------

@triton.jit
def _step_dense(S, x, g, beta, q, y, M: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                BP: tl.constexpr):
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
        g_, beta_, q_ = _tile_gates(g, beta, q, bh * M + m, m_ok)
        rows = S + (bh * M + m[:, None]) * P + p[None, :]
        ok = m_ok[:, None] & p_ok[None, :]
        S_ = tl.exp(g_)[:, None] * tl.load(rows, mask=ok, other=0.0) + beta_[:, None] * x_[None, :]
        tl.store(rows, S_, mask=ok)
        y_ += tl.sum(q_[:, None] * S_, 0)
    tl.store(y + bh * P + p, y_.to(y.dtype.element_ty), mask=p_ok)


@triton.jit
def _step_sparse(S, x, g, beta, q, idx, y, H, M, K, P: tl.constexpr, BK: tl.constexpr,
                 BP: tl.constexpr):
    """One token over the K slots idx shared by all heads, those rows of S updated in place:
        S[idx_k] = e^{g_k} * S[idx_k] + beta_k x,   y = sum_k q_k S[idx_k]
    S (B,H,M,P) fp32; x, y (B,H,P); g, beta, q (B,H,K); idx (B,K) int64. Grid (B*H,).
    Rows not in idx are neither read nor written: per-token cost O(K P), not O(M P)."""
    bh = tl.program_id(0).to(tl.int64)
    k, p = tl.arange(0, BK), tl.arange(0, BP)
    k_ok, p_ok = k < K, p < P
    slot = tl.load(idx + (bh // H) * K + k, mask=k_ok, other=0)
    x_ = tl.load(x + bh * P + p, mask=p_ok, other=0.0).to(tl.float32)
    g_, beta_, q_ = _tile_gates(g, beta, q, bh * K + k, k_ok)
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


@torch.library.custom_op('fm::scan_step', mutates_args=('state',))
def _scan_step_op(state: Tensor, x: Tensor, g: Tensor, beta: Tensor, q: Tensor) -> Tensor:
    _require_runnable(state)
    B, H, M, P = state.shape
    S = state.contiguous()
    y = torch.empty(B, H, P, device=x.device, dtype=x.dtype)
    _launch(_step_dense, (B * H,), S, x.contiguous(), g.expand(B, H, M).contiguous(),
            beta.contiguous(), q.contiguous(), y, **step_meta(M, P))
    if S is not state:
        state.copy_(S)
    return y


@_scan_step_op.register_fake
def _(state, x, g, beta, q):
    return x.new_empty(x.shape)


@torch.library.custom_op('fm::scan_step_sparse', mutates_args=('state',))
def _scan_step_sparse_op(state: Tensor, x: Tensor, g: Tensor, beta: Tensor, q: Tensor,
                         idx: Tensor) -> Tensor:
    _require_runnable(state)
    B, H, M, P = state.shape
    K = idx.shape[-1]
    S = state.contiguous()
    y = torch.empty(B, H, P, device=x.device, dtype=x.dtype)
    _launch(_step_sparse, (B * H,), S, x.contiguous(), g.expand(B, H, K).contiguous(),
            beta.contiguous(), q.contiguous(), idx.contiguous(), y, H, M, K,
            **sparse_step_meta(K, P))
    if S is not state:
        state.copy_(S)
    return y


@_scan_step_sparse_op.register_fake
def _(state, x, g, beta, q, idx):
    return x.new_empty(x.shape)


def scan_step_triton(state, x, g, beta, q):
    """One token, as scan.scan_step: state (B,H,M,P) fp32, updated in place and returned;
    x (B,H,P); g (B,H,M) or (B,H,1); beta, q (B,H,M). Returns (y (B,H,P) in x's dtype, state).
    The custom op fm::scan_step (state mutated in place)."""
    return _scan_step_op(state, x, g, beta, q), state


def scan_step_sparse_triton(state, x, g, beta, q, idx):
    """One token of a sparse layer, as scan.scan_step_sparse: only rows idx (B,K) of each head's
    state (B,H,M,P) fp32 are read and written, in place; x (B,H,P); g, beta, q (B,H,K).
    Returns (y (B,H,P) in x's dtype, state). The custom op fm::scan_step_sparse."""
    return _scan_step_sparse_op(state, x, g, beta, q, idx), state


# each kernel's parameter names, read here once rather than at every launch (kernel.arg_names)
_ARG_NAMES = {k: frozenset(k.arg_names) for k in (_chunk_state, _state_pass, _chunk_output_fwd,
                                                   _chunk_dx_dbeta_bwd, _chunk_dq_dg_bwd,
                                                   _step_dense, _step_sparse)}
