"`fit`'s speed options: `compile=` (torch.compile of the training step) and `channels_last=` give the same training."
import pytest, torch
from vqlearn.core import seed_everything
from vqlearn.data import DeviceLoader
from vqlearn.train import fit
from vqlearn.vqvae import VQVAE, vqvae_step

# 'aot_eager_decomp_partition' traces and partitions forward and backward as inductor does (the min-cut partitioner may
# recompute the codebook lookup in the backward pass, which an in-place codebook update used to break), without
# generating C++: seconds, not minutes, on CPU.
BACKEND = 'aot_eager_decomp_partition'

def train(quantizer: str, compile, channels_last: bool = False):
    seed_everything(0)
    m = VQVAE(hidden=16, res_hidden=8, num_codes=32, dim=8, quantizer=quantizer)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    dl = DeviceLoader((x,), batch_size=16, shuffle=True, seed=0, device='cpu')
    h = fit(m, dl, vqvae_step, steps=6, lr=1e-3, log_every=1, device='cpu', progress=False, compile=compile,
            channels_last=channels_last)
    if channels_last: assert m.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    return h['loss'], m.quantizer.embedding.clone()

@pytest.mark.parametrize('quantizer', ['ema', 'ema_restart'])
def test_compiled_step_matches_eager(quantizer):
    torch._dynamo.reset()
    (le, ce), (lc, cc) = train(quantizer, False), train(quantizer, BACKEND)
    assert len(lc) == 6 and lc == pytest.approx(le, rel=1e-4)       # the same losses, step by step
    if quantizer == 'ema':                                           # no random draws: the same codebook
        torch.testing.assert_close(cc, ce, atol=1e-5, rtol=1e-4)
    else:  # k-means init and restarts draw from another random stream under compile: close, not equal
        assert (cc - ce).abs().max() < 1e-2

def test_channels_last_trains_the_same():
    (le, ce), (lc, cc) = train('ema', False), train('ema', False, channels_last=True)
    assert lc == pytest.approx(le, rel=1e-4)
    torch.testing.assert_close(cc, ce, atol=1e-5, rtol=1e-4)
