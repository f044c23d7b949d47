"""Static-shape decoding (LM.static_step, Decoder, sample_logits): it equals the parallel forward
and the eager step, keeps every cache tensor in place, never reads back to the host, samples the
right distribution; on CUDA its graph-captured replay equals eager decoding token for token."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import LM, Decoder, sample_logits
from test_model import MODELS, rel_err, tiny

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device (none here)")


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while active: all of them, and those that compute (not
    views). On a GPU each op that computes is at least one kernel launch."""
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


# ops that read a tensor's value back to the host (.item(), data-dependent shapes)
SYNCING = {'aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select', 'aten.item',
           'aten.unique_dim', 'aten._unique2', 'aten.is_nonzero', 'aten.equal'}


def static_decode_all(model, idx, n_prompt, max_len=None):
    """As test_model.decode_all, through the static step: logits for every position."""
    B, T = idx.shape
    logits, caches = model.prefill(idx[:, :n_prompt])
    static = model.new_static_cache(B, max_len or T, 'cpu')
    model.load_static_cache(static, caches)
    pos = torch.tensor(n_prompt)
    steps = []
    for t in range(n_prompt, T):
        steps.append(model.static_step(idx[:, t], pos, static)[:, None])
        pos += 1
    return torch.cat([logits] + steps, dim=1), static


@pytest.mark.parametrize('mixer,kw', MODELS)
@pytest.mark.parametrize('n_prompt', [1, 21])
def test_static_step_equals_the_forward(scaled_model, mixer, kw, n_prompt):
    model = scaled_model(tiny(mixer, **kw))
    idx = torch.randint(0, 32, (2, 45))
    with torch.no_grad():
        full, _ = model(idx)
    stepped, _ = static_decode_all(model, idx, n_prompt, max_len=50)   # 5 positions never written
    assert full.std() > 1.0
    assert rel_err(stepped, full) <= 1e-4


@pytest.mark.parametrize('mixer,kw', MODELS)
def test_static_step_from_empty_caches_equals_the_forward(scaled_model, mixer, kw):
    model = scaled_model(tiny(mixer, **kw))
    idx = torch.randint(0, 32, (2, 9))
    caches = model.new_static_cache(2, 9, 'cpu')
    stepped = torch.stack([model.static_step(idx[:, t], torch.tensor(t), caches)
                           for t in range(9)], dim=1)
    with torch.no_grad():
        assert rel_err(stepped, model(idx)[0]) <= 1e-4


@pytest.mark.parametrize('mixer,kw', MODELS)
def test_static_step_updates_its_buffers_in_place(scaled_model, mixer, kw):
    """What a CUDA graph needs: every cache tensor keeps its storage and shape, and changes."""
    model = scaled_model(tiny(mixer, **kw))
    caches = model.new_static_cache(2, 8, 'cpu')
    tensors = [t for c in caches for t in vars(c).values() if isinstance(t, torch.Tensor)]
    before = [(t.data_ptr(), t.shape, t.clone()) for t in tensors]
    for t in range(3):
        model.static_step(torch.randint(0, 32, (2,)), torch.tensor(t), caches)
    for t, (ptr, shape, old) in zip(tensors, before):
        assert t.data_ptr() == ptr and t.shape == shape
        assert not torch.equal(t, old)


@pytest.mark.parametrize('mixer,kw', MODELS)
def test_static_generate_equals_eager_token_for_token(scaled_model, mixer, kw):
    model = scaled_model(tiny(mixer, **kw))
    idx = torch.randint(0, 32, (3, 7))
    eager = model.generate(idx, 40, temperature=0, mode='eager')
    static = model.generate(idx, 40, temperature=0, mode='static')
    assert eager[:, 7:].unique().numel() >= 4                # not one token repeated
    assert torch.equal(static, eager)


def test_static_step_never_syncs_with_the_host():
    """No op of the static step and sampler reads a value back (it would stall a CUDA graph's
    loop, or break its capture). The same check catches the eager sampler's boolean mask."""
    torch.manual_seed(0)
    for mixer in ('fm_sparse', 'attention'):
        model = LM(tiny(mixer, attn_conv=mixer == 'attention')).eval()
        dec = Decoder(model, 2, 16, 'cpu', temperature=0.8, top_k=5)
        with OpCount() as ops:
            dec.step()
        assert ops.total > 50 and not SYNCING & set(ops.ops), mixer
    logits = torch.randn(2, 32)
    with OpCount() as ops:                                    # the check can fail
        logits[logits < logits.topk(5).values[:, [-1]]] = -float('inf')
        torch.tensor(1.0).item()
    assert SYNCING & set(ops.ops)


def test_decoder_advances_the_position_and_the_token():
    torch.manual_seed(0)
    model = LM(tiny('attention')).eval()
    idx = torch.randint(0, 32, (2, 5))
    logits, caches = model.prefill(idx)
    dec = Decoder(model, 2, 12, 'cpu', temperature=0)
    dec.load(caches, logits[:, -1].argmax(-1), 5)
    first = dec.tok.clone()
    dec.advance()
    assert dec.pos.item() == 6
    assert torch.equal(dec.tok, model.step(first, caches).argmax(-1))


def test_a_graph_needs_cuda():
    model = LM(tiny('fm')).eval()
    with pytest.raises(ValueError, match='CUDA'):
        Decoder(model, 1, 8, 'cpu', graph=True)


# --- the sampler --------------------------------------------------------------

def chi_square(counts, p):
    expected = p * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


def test_sampler_draws_the_softmax_at_its_temperature():
    """50,000 draws from 6 logits at temperature 0.7: chi-square (5 dof) under 20.5 (p = 0.001)
    against softmax(logits / 0.7); the same counts are far from softmax(logits) (temperature 1)."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = sample_logits(logits.expand(50_000, 6), temperature=0.7)
    counts = torch.bincount(draws, minlength=6).float()
    assert chi_square(counts, (logits / 0.7).softmax(-1)) < 20.5
    assert chi_square(counts, logits.softmax(-1)) > 200


def test_sampler_top_k_stays_in_the_top_k_and_renormalises():
    torch.manual_seed(0)
    logits = torch.randn(32)
    top = logits.topk(4).indices
    draws = sample_logits(logits.expand(40_000, 32), temperature=1.0, top_k=4)
    assert torch.isin(draws, top).all()
    counts = torch.bincount(draws, minlength=32).float()[top]
    assert chi_square(counts, logits[top].softmax(-1)) < 16.3        # 3 dof, p = 0.001
    assert (counts > 0).all()


def test_sampler_at_temperature_0_is_the_argmax():
    logits = torch.randn(8, 100)
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0, top_k=3), logits.argmax(-1))


# --- a fused (compiled) step ---------------------------------------------------

def compiled_kernels(model, max_len=16):
    """torch.compile the static step; the kernels (and extern calls: matmuls, topk) its
    generated code runs per token, and that code's logits after 4 steps."""
    import re
    from torch._inductor.utils import run_and_get_code
    caches = model.new_static_cache(2, max_len, 'cpu')
    fn = torch.compile(model.static_step)
    tok = torch.tensor([1, 2])
    for t in range(3):
        fn(tok, torch.tensor(t), caches)
    logits, codes = run_and_get_code(fn, tok, torch.tensor(3), caches)
    body = codes[-1][codes[-1].index('def call('):]
    calls = re.findall(r'^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|'
                       r'torch\.ops\.\w+\.\w+)[.\w]*\(', body, re.M)
    return len(calls), logits


@pytest.mark.parametrize('mixer', ['fm_sparse', 'attention'])
def test_compiled_static_step_is_fewer_kernels_and_equal(mixer):
    """The compiled step runs under 1/3 of the eager step's computing ops and gives its logits."""
    torch.manual_seed(0)
    model = LM(tiny(mixer, n_layer=1)).eval()
    eager_caches = model.new_static_cache(2, 16, 'cpu')
    tok = torch.tensor([1, 2])
    for t in range(3):
        model.static_step(tok, torch.tensor(t), eager_caches)
    with OpCount() as ops:
        expected = model.static_step(tok, torch.tensor(3), eager_caches)
    n_kernels, logits = compiled_kernels(model)
    assert 0 < n_kernels < (ops.total - ops.views) / 3
    assert rel_err(logits, expected) <= 1e-5


# --- on CUDA: the graph -----------------------------------------------------------

def cuda_model(scaled_model, mixer, kw):
    return scaled_model(tiny(mixer, **kw)).cuda()


@needs_cuda
@pytest.mark.parametrize('mixer,kw', MODELS)
def test_graph_decoding_equals_eager_decoding_token_for_token(scaled_model, mixer, kw):
    model = cuda_model(scaled_model, mixer, kw)
    idx = torch.randint(0, 32, (3, 7), device='cuda')
    eager = model.generate(idx, 40, temperature=0, mode='eager')
    graph = model.generate(idx, 40, temperature=0, mode='graph')
    assert eager[:, 7:].unique().numel() >= 4
    assert torch.equal(graph, eager)


@needs_cuda
@pytest.mark.parametrize('mixer', ['fm_sparse', 'attention'])
def test_graph_equals_static_under_bf16_autocast(scaled_model, mixer):
    """The same kernels replayed: equal bit for bit, also with autocast's casts inside the graph."""
    model = cuda_model(scaled_model, mixer, {})
    idx = torch.randint(0, 32, (2, 7), device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        static = model.generate(idx, 30, temperature=0, mode='static')
        graph = model.generate(idx, 30, temperature=0, mode='graph')
    assert torch.equal(graph, static)


@needs_cuda
def test_graph_replay_loop_never_syncs(scaled_model):
    model = cuda_model(scaled_model, 'fm_sparse', {})
    dec = Decoder(model, 2, 32, 'cuda', temperature=0.8, top_k=5, graph=True)
    out = torch.empty(2, 20, dtype=torch.long, device='cuda')
    start = dec.pos.item()                                   # the warm-up before capture moved it
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for t in range(20):
            dec.advance()
            out[:, t] = dec.tok
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert dec.pos.item() == start + 20 and out.max() < 32


@needs_cuda
@pytest.mark.parametrize('mixer', ['fm_sparse', 'attention'])
def test_compiled_graph_decoding_equals_eager(scaled_model, mixer):
    model = cuda_model(scaled_model, mixer, {})
    idx = torch.randint(0, 32, (2, 7), device='cuda')
    eager = model.generate(idx, 16, temperature=0, mode='eager')
    graph = model.generate(idx, 16, temperature=0, mode='graph', compile=True)
    assert torch.equal(graph, eager)
