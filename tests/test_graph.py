"""torch.compile sees each model as one graph: the training forward of every mixer, with the
Triton scan (custom ops, run here under Triton's interpreter), has no graph break. A break
splits the compiled step and runs the code between the pieces eagerly, one launch at a time."""
import pytest
import torch

from model import LM, ModelConfig

pytestmark = pytest.mark.triton_mode('interpreter')


def tiny(mixer, **kw):
    args = dict(vocab_size=32, block_size=32, n_layer=2, n_embd=64, n_head=4, mixer=mixer,
                head_dim=32, n_slots=16, top_k=4, chunk_size=16, scan_impl='triton')
    args.update(kw)
    return ModelConfig(**args)


CONFIGS = [('attention', {}), ('mamba2', {}), ('fm', {}), ('fm_sparse', {}),     # FM: 'paper'
           ('fm_sparse', dict(router_balance='aux')),
           ('fm', dict(formulation='derived')), ('fm_sparse', dict(formulation='derived'))]


@pytest.mark.parametrize('mixer,kw', CONFIGS)
def test_training_forward_is_one_graph(mixer, kw):
    torch.manual_seed(0)
    model = LM(tiny(mixer, **kw)).train()
    x, y = torch.randint(0, 32, (2, 32)), torch.randint(0, 32, (2, 32))

    def loss_of(x, y):
        return model(x, y)[1]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_of)(x, y)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
