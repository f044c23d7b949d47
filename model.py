"""
A language model whose blocks mix tokens with Factorization Memory (dense `fm` or
sparse `fm_sparse`), Mamba-2 (`mamba2`) or causal attention (`attention`).

Every model is a stack of pre-norm blocks, x += mixer(norm(x)); x += mlp(norm(x)),
so only the mixer differs. The three recurrent mixers share one scan (scan.py):

    S_t[i,:] = exp(g[t,i]) * S_{t-1}[i,:] + beta[t,i] * x_t        S: (m, P) per head
    y_t      = sum_i q[t,i] * S_t[i,:] + D_skip * x_t

FM, formulation='derived' (this repo's, from the abstract):
         g = Δ·A·w_t,  beta = Δ·w_t,  q = q_t,  w_t = softmax(r_t), or over the top-k (sparse)
FM, formulation='paper' (reconstructed from the paper group's patents and its reviews):
         g = log(1 - θ_t),  beta = θ_t,  q = φ_t,   θ_t = σ(η_t)·α_t,  φ_t = σ(μ_t)·α_t,
         α_t = softmax(r_t / τ), or over the top-k (sparse): one affinity writes and reads
Mamba-2: g = Δ·A,      beta = Δ·B_t,  q = C_t

Every gate is a product of per-token factors over the slots, shared by the heads, and per-head
ones (scan.expand_gates): the mixers hand the scan those factors (Gates), never (B,T,H,M) tensors.

Training runs the parallel forward (chunked scan); decoding runs one token at a
time through a cache holding a constant-size state (a KV cache for attention).
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import scan

MIXERS = ('fm', 'fm_sparse', 'mamba2', 'attention')
SCAN_IMPLS = ('auto', 'naive', 'chunked', 'triton')
BALANCES = ('none', 'aux', 'bias')
FORMULATIONS = ('derived', 'paper')


@dataclass
class ModelConfig:
    """The model. Its defaults are train.py's default run: sparse FM, 4 layers x 128, on
    characters."""
    vocab_size: int = 50304     # train.py sets it from the dataset (65 for shakespeare_char)
    block_size: int = 64        # training context; recurrent mixers run past it
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4             # attention heads (recurrent: expand*n_embd/head_dim heads)
    dropout: float = 0.0
    bias: bool = False
    mixer: str = 'fm_sparse'    # fm | fm_sparse | mamba2 | attention
    expand: int = 2             # E: inner width E·n_embd
    head_dim: int = 64          # P
    n_slots: int = 64           # m: memory slots (Mamba-2: state size N)
    top_k: int = 8              # k: slots written and read per token (fm_sparse)
    formulation: str = 'paper'    # fm, fm_sparse: 'derived' (Δ-gated write, its own query q) or
                                  #   'paper' (convex update θ, read by the same affinity)
    router_temp: float = 1.0    # τ: α = softmax(r / τ) (fm, fm_sparse)
    router_conv: bool = False   # paper: the router logits r pass through the short conv too (as
                                #   derived's do), so a token can route by the token before it
    update_rate: str = 'head'   # derived: Δ per head (Mamba-2's), or 'slot': per slot, shared by
                                #   the heads
    d_conv: int = 4             # width of the short causal conv before the recurrent scan
    attn_conv: bool = False     # attention: the same short conv on q, k, v (off: plain attention)
    chunk_size: int = 64
    scan_impl: str = 'auto'     # auto: Triton on CUDA, chunked PyTorch elsewhere
    # fm_sparse load balancing, so that top-k keeps using all n_slots slots while training:
    # 'aux' adds router_aux_coef * (Switch loss m·Σ f_i·P_i) per layer to the training loss;
    # 'bias' (DeepSeek-V3, loss-free) adds a per-slot bias to r for the top-k choice only, moved
    # by router_bias_rate·sign(mean load - load_i) after each optimizer step (update_router_bias).
    router_balance: str = 'bias'   # none | aux | bias
    router_conv_bias: bool = False  # True: PyTorch's default conv bias on r at init (the old init,
                                    #   which leaves most slots dead; kept to reproduce it)
    router_aux_coef: float = 0.01
    router_bias_rate: float = 0.01

    def __post_init__(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {msg}")
        need(self.mixer in MIXERS, 'mixer', f"must be one of {', '.join(MIXERS)}")
        need(self.scan_impl in SCAN_IMPLS, 'scan_impl', f"must be one of {', '.join(SCAN_IMPLS)}")
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_embd', 'n_head', 'expand',
                     'head_dim', 'n_slots', 'd_conv'):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "must be a positive integer")
        need(0.0 <= self.dropout < 1.0, 'dropout', "must be in [0, 1)")
        c = self.chunk_size
        need(isinstance(c, int) and c >= 16 and c & (c - 1) == 0, 'chunk_size',
             "must be a power of two >= 16")
        need(self.update_rate in ('head', 'slot'), 'update_rate', "must be 'head' or 'slot'")
        need(self.update_rate == 'head' or self.mixer in ('fm', 'fm_sparse'), 'update_rate',
             f"'slot' is for the FM mixers (fm, fm_sparse), not {self.mixer}")
        need(self.formulation in FORMULATIONS, 'formulation',
             f"must be one of {', '.join(FORMULATIONS)}")
        need(self.update_rate == 'head' or self.formulation == 'derived', 'update_rate',
             "'slot' is for formulation='derived' (the paper's update rate is per slot already)")
        need(self.router_temp > 0, 'router_temp', "must be > 0")
        need(not self.router_conv or self.formulation == 'paper', 'router_conv',
             "is for formulation='paper' (the derived router always passes through the conv)")
        need(self.router_balance in BALANCES, 'router_balance',
             f"must be one of {', '.join(BALANCES)}")
        need(self.router_aux_coef >= 0, 'router_aux_coef', "must be >= 0")
        need(self.router_bias_rate >= 0, 'router_bias_rate', "must be >= 0")
        need(not self.attn_conv or self.mixer == 'attention', 'attn_conv',
             f"is for mixer='attention' ({self.mixer} always has its short conv)")
        if self.mixer == 'attention':
            need(self.n_embd % self.n_head == 0, 'n_head', f"must divide n_embd={self.n_embd}")
            need((self.n_embd // self.n_head) % 2 == 0, 'n_head',
                 f"n_embd/n_head must be even for RoPE (got {self.n_embd // self.n_head})")
        else:
            need(self.expand * self.n_embd % self.head_dim == 0, 'head_dim',
                 f"must divide the inner width expand*n_embd={self.expand * self.n_embd}")
        if self.mixer == 'fm_sparse':
            need(1 <= self.top_k <= self.n_slots - 1, 'top_k',
                 f"must be in 1..n_slots-1 = 1..{self.n_slots - 1} for fm_sparse "
                 "(top_k = n_slots is the dense mixer 'fm')")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * rms).type_as(x) * self.weight


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    def __init__(self, config):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.w1 = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.w3 = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.w2 = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class ShortConv(nn.Conv1d):
    """A causal depthwise conv of width d_conv: each channel mixes its own last d_conv inputs.
    It lets a token see its neighbours before the mixer, e.g. a value the key just before it.
    Computed as d_conv shifted multiply-adds (not conv1d), which torch.compile fuses into the
    ops around it; the step sums the same terms in the same order, so it equals the forward."""
    def __init__(self, channels, d_conv):
        super().__init__(channels, channels, d_conv, groups=channels, padding=d_conv - 1)

    def mix(self, taps):
        """taps: d_conv tensors (..., ch), oldest first -> bias + sum_j weight[:, j] * taps[j]."""
        y = self.bias if self.bias is not None else 0.0
        for j, tap in enumerate(taps):
            y = y + tap * self.weight[:, 0, j]
        return y

    def forward(self, x):
        """x (B,T,ch) -> (B,T,ch), and the step's window: the last d_conv-1 inputs (B,ch,d_conv-1),
        zeros before the start as the conv's padding."""
        T, K = x.shape[1], self.kernel_size[0]
        xp = F.pad(x, (0, 0, K - 1, 0))                            # (B, K-1+T, ch)
        y = self.mix([xp[:, j:j + T] for j in range(K)])
        return y.to(x.dtype), xp[:, T:].transpose(1, 2)   # in x's dtype, as conv1d under autocast

    def step(self, x, window):
        """x (B,ch), window (B,ch,d_conv-1) -> y (B,ch) and the next window."""
        full = torch.cat([window, x[..., None].to(window.dtype)], dim=-1)   # (B, ch, d_conv)
        y = self.mix(full.unbind(-1))
        return y.to(x.dtype), full[..., 1:]

    def new_window(self, B, device):
        """The window before any input: zeros, as the conv's padding."""
        return torch.zeros(B, self.in_channels, self.kernel_size[0] - 1, device=device)


# -----------------------------------------------------------------------------
# The recurrent mixers: FM (dense and sparse) and Mamba-2


def slot_counts(idx, M):
    """idx (..., k) slot indices -> (M,) float32 selections per slot. A scatter-add, not
    torch.bincount, so the shape is static and torch.compile keeps one graph."""
    ones = torch.ones(idx.numel(), device=idx.device)
    return torch.zeros(M, device=idx.device).scatter_add_(0, idx.flatten(), ones)


def switch_aux_loss(r, idx, M):
    """The Switch Transformer's load-balancing loss M·Σ_i f_i·P_i for router logits r (..., M)
    and their top-k idx (..., k): f_i the fraction of selections that went to slot i (no gradient),
    P_i the mean softmax probability of slot i over all M, so every slot's logit gets a gradient,
    selected or not. 1 when the load is uniform, up to M when every token picks the same slots."""
    f = slot_counts(idx, M) / idx.numel()                                  # (M,) sums to 1
    P = r.float().softmax(-1).flatten(0, -2).mean(0)                       # (M,) sums to 1
    return M * (f * P).sum()


@dataclass
class RecurrentCache:
    conv: torch.Tensor   # (B, channels, d_conv-1): the last inputs of the causal conv
    S: torch.Tensor      # (B, H, M, P) float32: the memory


class Gates(NamedTuple):
    """A layer's gates as factors (scan.expand_gates): g[h,i] = A[h]·delta[h]·gw[i],
    beta[h,i] = delta[h]·bw[i], q[h,i] = q[i]. Leading dims (B,T) in the forward, (B,) in a step."""
    gw: torch.Tensor                  # (..., M), or (..., 1): one decay for all slots (Mamba-2)
    bw: torch.Tensor                  # (..., M)
    q: torch.Tensor                   # (..., M)
    A: Optional[torch.Tensor]         # (H,) or None (1)
    delta: Optional[torch.Tensor]     # (..., H) or None (1)


def _naive_factored(x, gw, bw, q, A=None, delta=None, initial_state=None):
    return scan.scan_naive(x, *scan.expand_gates(gw, bw, q, x.shape[-2], A, delta), initial_state)


def scan_impls(config, device):
    """The scan for the parallel forward (on factored gates), and the one-token steps (dense,
    sparse, on per-head gates), for a device: the Triton kernels with scan_impl='triton' (which
    'auto' means on CUDA), else scan.py."""
    mode = config.scan_impl
    if mode == 'auto':
        mode = 'triton' if torch.device(device).type == 'cuda' else 'chunked'
    if mode == 'triton':
        import kernels
        return (partial(kernels.scan_factored, chunk_size=config.chunk_size),
                kernels.scan_step_triton, kernels.scan_step_sparse_triton)
    parallel = (_naive_factored if mode == 'naive'
                else partial(scan.scan_factored, chunk_size=config.chunk_size))
    return parallel, scan.scan_step, scan.scan_step_sparse


class RecurrentMixer(nn.Module):
    """FM (mixer='fm' or 'fm_sparse') or Mamba-2 (mixer='mamba2'): one in_proj, a
    short causal conv, the shared scan, a gated RMSNorm and out_proj."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.kind = config.mixer
        self.paper = config.formulation == 'paper' and self.kind != 'mamba2'
        self.d_inner = config.expand * config.n_embd
        self.P = config.head_dim
        self.H = self.d_inner // self.P
        self.M = config.n_slots
        self.top_k = config.top_k
        if self.paper:
            # u -> z, x (E·D each), then r, η, μ (m each) straight from u: the affinity reads the
            # block's RMS-normed input (the patents' claim), not the conv's output; router_conv
            # moves r into the conv, after x
            n_conv_r = self.M if config.router_conv else 0
            self.conv_dim, self.n_raw = self.d_inner + n_conv_r, 3 * self.M - n_conv_r
        else:
            # u -> z, x (E·D each), r, q (m each; Mamba-2's B, C), dt (H, or m per slot)
            n_dt = self.M if config.update_rate == 'slot' else self.H
            self.conv_dim, self.n_raw = self.d_inner + 2 * self.M, n_dt   # conv over [x, r, q]
        self.in_proj = nn.Linear(config.n_embd, self.d_inner + self.conv_dim + self.n_raw,
                                 bias=config.bias)
        self.conv = ShortConv(self.conv_dim, config.d_conv)
        routed_by_conv = not self.paper or config.router_conv
        if self.kind != 'mamba2' and routed_by_conv and not config.router_conv_bias:
            # PyTorch's default conv bias (uniform ±1/sqrt(d_conv) = ±0.5) outweighs the projected
            # logits (~0.1-0.2) at init, so every token would pick the same slots: start it at 0.
            with torch.no_grad():
                self.conv.bias[self.d_inner:self.d_inner + self.M].zero_()
        self.balance = config.router_balance if self.kind == 'fm_sparse' else 'none'
        if self.kind == 'fm_sparse':
            # (M,) added to r for the top-k choice only; in state_dict, so resume and decode keep it
            self.register_buffer('route_bias', torch.zeros(self.M))
        # (M,) selections since the last update_router_bias (training): a fixed-shape buffer added
        # to in place, so a compiled forward has no Python state to guard on
        self.register_buffer('slot_load', torch.zeros(self.M), persistent=False)
        self.aux_loss = None     # () this forward's Switch loss, with router_balance='aux'
        if not self.paper:
            # Mamba-2's init: Δ = softplus(dt_bias) log-uniform in [1e-3, 1e-1], A in [-16, -1].
            dt = torch.exp(torch.rand(n_dt) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
            self.A_log = nn.Parameter(torch.log(torch.empty(self.H).uniform_(1, 16)))
        self.D_skip = nn.Parameter(torch.ones(self.H))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    # --- the gates, in the README's symbols ----------------------------------
    def route(self, r):
        """r (..., M) router logits -> the slot weights (..., M): softmax(r / τ) over all slots
        (fm), or over the top-k logits and 0 elsewhere (fm_sparse, which also returns the active
        slots idx (..., k); None otherwise). The derived formulation's w, the paper's α."""
        r = r.float() / self.config.router_temp
        if self.kind != 'fm_sparse':
            return r.softmax(-1), None
        _, idx = (r + self.route_bias).topk(self.top_k, dim=-1)   # the bias picks, it never weighs
        return torch.zeros_like(r).scatter(-1, idx, r.gather(-1, idx).softmax(-1)), idx

    def gates(self, r, q, dt):
        """Derived FM and Mamba-2. r, q (..., M) after the conv; dt (..., H), or (..., M) with
        update_rate='slot'. Returns the Gates and the active slots idx (..., k) or None."""
        Δ = F.softplus(dt.float() + self.dt_bias)                  # (..., H) > 0, or (..., M)
        A = -torch.exp(self.A_log.float())                         # (H)      < 0
        if self.kind == 'mamba2':                                  # g = Δ·A, beta = Δ·B_t, q = C_t
            return Gates(torch.ones_like(r[..., :1], dtype=torch.float32), r.float(), q.float(),
                         A, Δ), None
        w, idx = self.route(r)                                     # (..., M)
        if idx is not None:                                        # sparse: read only the k active
            q = q.float() * torch.zeros_like(w).scatter(-1, idx, 1.0)
        if self.config.update_rate == 'slot':                      # Δ[t,i], shared by the heads
            return Gates(Δ * w, Δ * w, q.float(), A, None), idx    # g = A·Δ_i·w_i, beta = Δ_i·w_i
        return Gates(w, w, q.float(), A, Δ), idx                   # g = A·Δ_h·w_i, beta = Δ_h·w_i

    def paper_gates(self, r, eta, mu):
        """The paper's FM. r, eta, mu (..., M) from u. Slot i moves towards the value by θ_i,
        S_i <- (1 - θ_i) S_i + θ_i x, and is read with φ_i: both follow the one affinity α.
        Returns the Gates (per token, shared by the heads) and idx (..., k) or None."""
        alpha, idx = self.route(r)                                 # (..., M), 0 off the top-k
        theta = torch.sigmoid(eta.float()) * alpha                 # update weight, in [0, 1)
        phi = torch.sigmoid(mu.float()) * alpha                    # merge (read) weight
        # log(1 - θ) by log1p (exact near 0); θ -> 1 is a full overwrite, kept 1e-6 short of it
        # so that the log and its gradient stay finite
        gw = torch.log1p(-theta.clamp(max=1 - 1e-6))
        return Gates(gw, theta, phi, None, None), idx

    def inputs(self, conv_out, raw):
        """The conv's output (..., conv_dim) and in_proj's other gate channels raw (..., n_raw) ->
        the scan's inputs x (..., H, P) and Gates, the active slots idx and the router logits r.
        Shared by the parallel forward and the step."""
        if self.paper:
            x, r_conv = torch.split(conv_out, [self.d_inner, self.conv_dim - self.d_inner], -1)
            *r, eta, mu = torch.split(raw, [self.M] * (self.n_raw // self.M), dim=-1)
            r = r_conv if self.config.router_conv else r[0]
            x = F.silu(x)
            gates, idx = self.paper_gates(r, eta, mu)
        else:
            x, r, q = torch.split(conv_out, [self.d_inner, self.M, self.M], dim=-1)
            x, q = F.silu(x), F.silu(q)
            if self.kind == 'mamba2':
                r = F.silu(r)                                      # Mamba-2's B; FM's r stays raw
            gates, idx = self.gates(r, q, raw)
        return x.unflatten(-1, (self.H, self.P)), gates, idx, r

    def split(self, proj):
        """in_proj's output -> z, the conv's input, the other gate channels."""
        return torch.split(proj, [self.d_inner, self.conv_dim, self.n_raw], dim=-1)

    def router_logits(self, u):
        """u (..., n_embd) -> the router logits r (..., M) the forward routes by (analysis)."""
        z, conv_in, raw = self.split(self.in_proj(u))
        return self.inputs(self.conv(conv_in)[0], raw)[3]

    def output(self, y, x, z):
        """y, x (..., H, P); z (..., E·D) -> (..., n_embd)."""
        y = y + self.D_skip[:, None].to(y.dtype) * x
        y = y.flatten(-2)
        return self.dropout(self.out_proj(self.norm(y * F.silu(z))))

    # --- parallel form -------------------------------------------------------
    def forward(self, u, return_cache=False):
        """u (B,T,n_embd) -> (B,T,n_embd), and with return_cache the cache to decode on from."""
        z, conv_in, raw = self.split(self.in_proj(u))
        conv_out, window = self.conv(conv_in)
        x, gates, idx, r = self.inputs(conv_out, raw)              # (B,T,H,P), factors (B,T,M)
        if self.training and self.balance != 'none':
            self.track_load(r, idx)
        parallel_scan, _, _ = scan_impls(self.config, u.device)
        y, S = parallel_scan(x, *gates)
        out = self.output(y, x, z)
        if not return_cache:
            return out
        return out, RecurrentCache(conv=window, S=S)

    # --- load balancing (fm_sparse) -------------------------------------------
    def track_load(self, r, idx):
        """r (B,T,M) router logits, idx (B,T,k) their top-k: the Switch loss of this forward
        ('aux'), or the selections counted towards the next bias update ('bias')."""
        if self.balance == 'aux':
            self.aux_loss = switch_aux_loss(r, idx, self.M)
            return
        with torch.no_grad():
            self.slot_load += slot_counts(idx, self.M)

    @torch.no_grad()
    def update_router_bias(self, load):
        """load (M,): selections per slot since the last update (summed over processes). Moves the
        bias of an overloaded slot down and of an underloaded one up by router_bias_rate."""
        self.route_bias += self.config.router_bias_rate * torch.sign(load.mean() - load)

    # --- one token -----------------------------------------------------------
    def step(self, u, cache):
        """u (B,n_embd) -> (B,n_embd); updates cache in place. Cost does not grow with position."""
        z, conv_in, raw = self.split(self.in_proj(u))
        conv_out, cache.conv = self.conv.step(conv_in, cache.conv)
        x, gates, idx, _ = self.inputs(conv_out, raw)              # (B,H,P), factors (B,M)
        g, beta, q_read = scan.expand_gates(gates.gw, gates.bw, gates.q, self.H, gates.A,
                                            gates.delta)           # (B,H,M), g (B,H,1) Mamba-2
        _, step, step_sparse = scan_impls(self.config, u.device)
        if idx is None:
            y, cache.S = step(cache.S, x, g, beta, q_read)
        else:                                                      # touch only the k active rows
            # (B,H,M) -> (B,H,k): the k active slots' entries
            pick = lambda t: t.gather(-1, idx[:, None, :].expand(*t.shape[:-1], self.top_k))
            y, cache.S = step_sparse(cache.S, x, pick(g), pick(beta), pick(q_read), idx)
        return self.output(y, x, z)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the selection bias have none: it was 0 (state_dict is a copy)
        if self.kind == 'fm_sparse' and prefix + 'route_bias' not in state_dict:
            state_dict[prefix + 'route_bias'] = torch.zeros(self.M)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def new_cache(self, B, device):
        return RecurrentCache(conv=self.conv.new_window(B, device),
                              S=torch.zeros(B, self.H, self.M, self.P, device=device))


# -----------------------------------------------------------------------------
# Router health: how many of its m slots an FM layer actually uses


@torch.no_grad()
def router_usage(model, idx):
    """The routing of every FM layer of the LM model over tokens idx (B,T), in eval mode:
    [(share (M,), w (B,T,M))] per layer, w the slot weights and share each slot's part of the
    top-k selections (fm_sparse) or of w's mass (fm); shares sum to 1.
    ValueError for a model without FM layers."""
    mixers = [b.mixer for b in model.blocks]
    if not all(isinstance(m, RecurrentMixer) and m.kind in ('fm', 'fm_sparse') for m in mixers):
        raise ValueError(f"router health is for the FM mixers (fm, fm_sparse), "
                         f"not {model.config.mixer}")
    logits = {}   # each mixer's router logits r (B,T,M), from the input its forward got
    hooks = [m.register_forward_hook(
                 lambda mod, args, out: logits.__setitem__(mod, mod.router_logits(args[0])))
             for m in mixers]
    was_training = model.training
    model.eval()
    try:
        x = model.wte(idx)                                         # the blocks only: no logits
        for block in model.blocks:
            x, _ = block(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = []
    for m in mixers:
        w, sel = m.route(logits[m])                                # (B,T,M), (B,T,k) or None
        if sel is None:
            share = w.flatten(0, -2).mean(0)
        else:
            share = slot_counts(sel, m.M) / sel.numel()
        out.append((share, w))
    return out


def slot_stats(share, sparse):
    """share (M,), summing to 1 -> effective slots exp(entropy), dead slots (never selected, or
    for dense fm under 1 % of the uniform mass), the share of the most used slot and of the 10 %
    most used slots."""
    M = share.numel()
    p = share[share > 0]
    dead = (share == 0) if sparse else (share < 0.01 / M)
    return {'effective': round(math.exp(-(p * p.log()).sum().item()), 2),
            'dead': int(dead.sum()), 'm': M, 'max_share': round(share.max().item(), 4),
            'top10_share': round(share.sort(descending=True).values[:math.ceil(M / 10)]
                                 .sum().item(), 4)}


def router_health(model, idx):
    """[slot_stats] per FM layer of model over tokens idx (B,T); ValueError if it has none."""
    sparse = model.config.mixer == 'fm_sparse'
    return [slot_stats(share, sparse) for share, _ in router_usage(model, idx)]


def health_summary(stats):
    """One compact phrase for a log line: ranges over the layers."""
    def span(key, fmt='{:.0f}'):
        lo, hi = min(s[key] for s in stats), max(s[key] for s in stats)
        lo, hi = fmt.format(lo), fmt.format(hi)
        return lo if lo == hi else f"{lo}-{hi}"
    return (f"slots eff {span('effective')}/{stats[0]['m']}, dead {span('dead')}, "
            f"max share {span('max_share', '{:.1%}')}")


# -----------------------------------------------------------------------------
# The attention baseline: causal softmax attention with RoPE and a KV cache


@dataclass
class KVCache:
    k: torch.Tensor      # (B, n_head, capacity, hd)
    v: torch.Tensor
    len: int = 0
    conv: torch.Tensor = None   # (B, 3·n_embd, d_conv-1) with attn_conv: the conv's last inputs


@dataclass
class StaticKVCache:
    k: torch.Tensor      # (B, n_head, max_len, hd): position t at index t; the length is the
    v: torch.Tensor      #   decoder's position tensor, not a field (a Python int would be baked in)
    conv: torch.Tensor = None   # (B, 3·n_embd, d_conv-1) with attn_conv


def rope(x, pos):
    """Rotate pairs of channels of x (B, nh, T, hd) by angles pos * 10000^(-2i/hd)."""
    hd = x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.float()[:, None] * freq[None, :]                     # (T, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nh = config.n_head
        self.hd = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # attn_conv: a key can carry the token before it, so one layer can look up "the token after
        # this key" without a second layer's previous-token head (as the recurrent mixers' conv)
        self.conv = ShortConv(3 * config.n_embd, config.d_conv) if config.attn_conv else None
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, qkv, pos):
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)  # (B,nh,T,hd) each
        return rope(q, pos), rope(k, pos), v

    def forward(self, u, return_cache=False):
        B, T, C = u.shape
        qkv, window = self.qkv(u), None                            # (B,T,3C)
        if self.conv is not None:
            qkv, window = self.conv(qkv)
        q, k, v = self.heads(qkv, torch.arange(T, device=u.device))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        out = self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(B, T, C)))
        if not return_cache:
            return out
        return out, KVCache(k=k, v=v, len=T, conv=window)

    def step(self, u, cache):
        B, C = u.shape
        pos = torch.tensor([cache.len], device=u.device)
        qkv = self.qkv(u)                                          # (B,3C)
        if self.conv is not None:
            qkv, cache.conv = self.conv.step(qkv, cache.conv)
        q, k, v = self.heads(qkv[:, None], pos)
        if cache.len == cache.k.shape[2]:                          # double: amortised O(1) appends
            cache.k = torch.cat([cache.k, torch.zeros_like(cache.k)], dim=2)
            cache.v = torch.cat([cache.v, torch.zeros_like(cache.v)], dim=2)
        cache.k[:, :, cache.len] = k[:, :, 0]
        cache.v[:, :, cache.len] = v[:, :, 0]
        cache.len += 1
        y = F.scaled_dot_product_attention(q, cache.k[:, :, :cache.len], cache.v[:, :, :cache.len])
        return self.out_proj(y.reshape(B, C))

    def new_cache(self, B, device):
        z = torch.zeros(B, self.nh, 16, self.hd, device=device)
        conv = None if self.conv is None else self.conv.new_window(B, device)
        return KVCache(k=z, v=z.clone(), len=0, conv=conv)

    def static_step(self, u, pos, cache):
        """u (B,C) at position pos (() int64, on the device) -> (B,C). Writes k, v at index pos of
        the static cache and attends over its first pos+1 entries through a mask, so that every
        shape is fixed and nothing is read back to the host (capturable in a CUDA graph)."""
        B, C = u.shape
        qkv = self.qkv(u)                                          # (B,3C)
        if self.conv is not None:
            qkv, window = self.conv.step(qkv, cache.conv)
            cache.conv.copy_(window)
        q, k, v = self.heads(qkv[:, None], pos[None])              # (B,nh,1,hd) each
        cache.k.index_copy_(2, pos[None], k.to(cache.k.dtype))
        cache.v.index_copy_(2, pos[None], v.to(cache.v.dtype))
        seen = torch.arange(cache.k.shape[2], device=u.device) <= pos   # (max_len,) written so far
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=seen[None])  # (B,nh,1,hd)
        return self.out_proj(y.reshape(B, C))

    def new_static_cache(self, B, max_len, device, dtype=torch.float32):
        """A KV cache of max_len positions, allocated once: position t lives at index t."""
        z = torch.zeros(B, self.nh, max_len, self.hd, device=device, dtype=dtype)
        conv = None if self.conv is None else self.conv.new_window(B, device)
        return StaticKVCache(k=z, v=z.clone(), conv=conv)


# -----------------------------------------------------------------------------
# The language model


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd)
        self.mixer = Attention(config) if config.mixer == 'attention' else RecurrentMixer(config)
        self.norm2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, return_cache=False):
        h = self.mixer(self.norm1(x), return_cache)
        h, cache = h if return_cache else (h, None)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, cache

    def step(self, x, cache):
        x = x + self.mixer.step(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))

    def static_step(self, x, pos, cache):
        """step on a static cache: every cache tensor is updated in place, none replaced."""
        u = self.norm1(x)
        if isinstance(cache, StaticKVCache):
            h = self.mixer.static_step(u, pos, cache)
        else:                                    # a recurrent cache is fixed-size already
            new = RecurrentCache(conv=cache.conv, S=cache.S)
            h = self.mixer.step(u, new)
            cache.conv.copy_(new.conv)
            if new.S is not cache.S:             # scan.scan_step returns a new state; the sparse
                cache.S.copy_(new.S)             #   and Triton steps write into the old one
        x = x + h
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                      # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():                    # GPT-2's scaled residual outputs
            if name.endswith('out_proj.weight') or name.endswith('w2.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs (forward + backward = 3x forward) per token at context T, as in PaLM's
        MFU: 6 per parameter, plus the mixing. Attention, causal: q·k and a·v, 2·T/2·n_embd each.
        The chunked scan per head (chunk C): the state write and read, 2·M·P each, and the
        intra-chunk scores and their product with x, 2·C/2·M and 2·C/2·P (every slot is computed,
        sparse or not). An estimate: the convolution, norms and gates are left out."""
        c = self.config
        if c.mixer == 'attention':
            mix = 2 * T * c.n_embd
        else:
            H, M, P = c.expand * c.n_embd // c.head_dim, c.n_slots, c.head_dim
            C = min(c.chunk_size, T)
            mix = H * (4 * M * P + C * (M + P))
        return 6 * self.get_num_params() + 3 * c.n_layer * mix

    def forward(self, idx, targets=None):
        """idx (B,T) -> logits (B,T,V), and the mean cross-entropy if targets (B,T) are given."""
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x, _ = block(x)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                   ignore_index=-1)
            c = self.config
            if self.training and c.router_balance == 'aux' and c.mixer == 'fm_sparse':
                # training only: evaluation losses stay the plain cross-entropy
                aux = sum(b.mixer.aux_loss for b in self.blocks)      # each layer's router its own
                loss = loss + c.router_aux_coef * aux
        return logits, loss

    def update_router_bias(self, all_reduce=None):
        """After each optimizer step with router_balance='bias': every layer's slot loads since the
        last call (summed over processes by all_reduce, e.g. torch.distributed.all_reduce, so that
        every rank moves its bias the same way) move its selection bias; then the counts restart."""
        mixers = [b.mixer for b in self.blocks
                  if isinstance(b.mixer, RecurrentMixer) and b.mixer.balance == 'bias']
        if not mixers:
            return
        loads = torch.stack([m.slot_load for m in mixers])        # (layers, M), on the device
        if all_reduce is not None:
            all_reduce(loads)
        for m, load in zip(mixers, loads):
            m.update_router_bias(load)                             # no load counted: no change
            m.slot_load.zero_()

    # --- recurrent decoding --------------------------------------------------
    @torch.no_grad()
    def prefill(self, idx):
        """Parallel forward over the prompt idx (B,T) that also returns each layer's cache."""
        x = self.wte(idx)
        caches = []
        for block in self.blocks:
            x, cache = block(x, return_cache=True)
            caches.append(cache)
        return self.lm_head(self.norm_f(x)), caches

    @torch.no_grad()
    def step(self, idx, caches):
        """One token idx (B,) -> logits (B,V); advances every layer's cache in place."""
        x = self.wte(idx)
        for block, cache in zip(self.blocks, caches):
            x = block.step(x, cache)
        return self.lm_head(self.norm_f(x))

    def new_cache(self, batch_size, device):
        """Empty caches, for decoding from no prompt at all."""
        return [block.mixer.new_cache(batch_size, device) for block in self.blocks]

    @staticmethod
    def cache_bytes(caches):
        """Bytes of decoding state: constant for the recurrent mixers, growing for attention."""
        total = 0
        for c in caches:
            if isinstance(c, KVCache):
                total += 2 * c.k[:, :, :c.len].numel() * c.k.element_size()
            else:
                total += c.S.numel() * c.S.element_size()
            if c.conv is not None:
                total += c.conv.numel() * c.conv.element_size()
        return total

    # --- static-shape decoding: fixed buffers, the position on the device --------
    def new_static_cache(self, batch_size, max_len, device, dtype=torch.float32):
        """Caches whose tensors never change shape or storage: the recurrent state and conv window
        as in new_cache, attention's KV cache preallocated for max_len positions (in dtype, the
        dtype k and v are computed in)."""
        return [b.mixer.new_static_cache(batch_size, max_len, device, dtype)
                if isinstance(b.mixer, Attention) else b.mixer.new_cache(batch_size, device)
                for b in self.blocks]

    @staticmethod
    def load_static_cache(static, caches):
        """Copy the caches prefill returned (the state after the prompt) into static ones."""
        for s, c in zip(static, caches):
            if isinstance(s, StaticKVCache):
                s.k.zero_()
                s.v.zero_()
                s.k[:, :, :c.len].copy_(c.k[:, :, :c.len])
                s.v[:, :, :c.len].copy_(c.v[:, :, :c.len])
            else:
                s.S.copy_(c.S)
            if s.conv is not None:
                s.conv.copy_(c.conv)

    @torch.no_grad()
    def static_step(self, idx, pos, caches):
        """One token idx (B,) at position pos (() int64 tensor, on the device) -> logits (B,V);
        caches from new_static_cache, updated in place. Static shapes and no host sync: a CUDA
        graph can capture it. Equals step (up to rounding: attention sums over a masked cache)."""
        x = self.wte(idx)
        for block, cache in zip(self.blocks, caches):
            x = block.static_step(x, pos, cache)
        return self.lm_head(self.norm_f(x))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, mode='auto',
                 compile=False):
        """Prefill on idx (B,T) in parallel, then sample one token at a time through the caches.
        mode 'eager': step and torch.multinomial from a Python loop (for reading, and CPU);
        'static': static_step and sample_logits, on the device; 'graph': that step captured in
        a CUDA graph and replayed per token (CUDA only); 'auto': graph on CUDA, else eager.
        compile: torch.compile the static step (static, graph), so the graph replays fused code."""
        if mode == 'auto':
            mode = 'graph' if idx.is_cuda else 'eager'
        if mode == 'eager':
            return self.generate_eager(idx, max_new_tokens, temperature, top_k)
        B, T = idx.shape
        out = idx.new_empty(B, T + max_new_tokens)
        out[:, :T] = idx
        if max_new_tokens == 0:
            return out
        logits, caches = self.prefill(idx)
        out[:, T] = sample_logits(logits[:, -1], temperature, top_k)
        dec = Decoder(self, B, T + max_new_tokens, idx.device, temperature, top_k,
                      graph=mode == 'graph', compile=compile)
        dec.load(caches, out[:, T], T)
        for t in range(T + 1, T + max_new_tokens):
            dec.advance()                                          # no host sync in this loop
            out[:, t] = dec.tok
        return out

    @torch.no_grad()
    def generate_eager(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """generate, one step at a time from Python: the growing KV cache, torch.multinomial."""
        logits, caches = self.prefill(idx)
        logits = logits[:, -1]
        for _ in range(max_new_tokens):
            logits = logits.float()
            if temperature == 0:                                   # greedy
                idx_next = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            logits = self.step(idx_next[:, 0], caches)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on tensors of 2+ dims (matrices, embeddings, conv kernels), not
        on gains, biases, A_log, dt_bias, D_skip (route_bias is a buffer: not optimized)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')


# -----------------------------------------------------------------------------
# Decoding on the device: a sampler without host sync, a static step, its CUDA graph


def sample_logits(logits, temperature=1.0, top_k=None):
    """logits (B,V) -> token ids (B,) drawn from softmax(logits / temperature) over the top_k
    most likely (all if None); the argmax at temperature 0. No host sync (torch.multinomial
    has none either, but masking by boolean indexing does): argmax_i p_i / E_i with E_i ~ Exp(1)
    is i with probability p_i, as E_i / p_i ~ Exp(p_i) and the smallest of independent
    exponentials is the i-th with probability p_i / sum p (gpt-fast's sampler)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]             # (B,1) the k-th largest
        logits = logits.masked_fill(logits < kth, -float('inf'))
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def autocast_without_cache(device_type):
    """The autocast in force, minus its cache of cast weights: a CUDA graph must cast inside
    itself, not read casts cached outside it, which autocast frees when its context exits."""
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)


class Decoder:
    """Static decoding state for one batch: the token tok (B,), its position pos (() int64) and
    static caches, all on the device. advance() feeds tok at pos, samples the next token into
    tok and adds 1 to pos, in place; with graph=True by replaying a CUDA graph of that step, so
    a token costs one launch from the host instead of a few hundred."""

    def __init__(self, model, batch_size, max_len, device, temperature=1.0, top_k=None,
                 graph=False, compile=False):
        device = torch.device(device)
        self.model, self.temperature, self.top_k = model, temperature, top_k
        kv_dtype = (torch.get_autocast_dtype(device.type)
                    if torch.is_autocast_enabled(device.type) else torch.float32)
        self.caches = model.new_static_cache(batch_size, max_len, device, kv_dtype)
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.step_fn = torch.compile(model.static_step) if compile else model.static_step
        self.graph = None
        if graph:
            self.graph = self.capture(device)

    def step(self):
        """The step itself (what the graph holds)."""
        logits = self.step_fn(self.tok, self.pos, self.caches)
        self.tok.copy_(sample_logits(logits, self.temperature, self.top_k))
        self.pos += 1

    def capture(self, device):
        """Warm up on a side stream (compiles, autotunes, allocates), then capture one step
        (the PyTorch docs' recipe). Both run the step on the zero caches: load() comes after."""
        if device.type != 'cuda':
            raise ValueError(f"a CUDA graph needs a CUDA device, not {device}")
        with autocast_without_cache(device.type):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
        return graph

    def load(self, caches, tok, pos):
        """Start from prefill's caches, token tok (B,) at position pos (an int)."""
        self.model.load_static_cache(self.caches, caches)
        self.tok.copy_(tok)
        self.pos.fill_(pos)

    def advance(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
