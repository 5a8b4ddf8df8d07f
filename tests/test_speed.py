"vqlearn.speed: honest timers and the operator count of a training step."
import time
import pytest, torch
from vqlearn.speed import hardware, profile_step, time_per_call, training_step
from vqlearn.vqvae import VQVAE, vqvae_step

def test_time_per_call_warms_up_and_takes_the_median():
    calls, delays = [], iter([0.0, 0.0, 0.05, 0.0, 0.0])      # one slow call among three timed ones
    t = time_per_call(lambda: calls.append(time.sleep(next(delays))), repeats=3, warmup=2)
    assert len(calls) == 5 and t < 0.04                        # the median ignores the slow call
    with pytest.raises(ValueError, match='repeats'): time_per_call(lambda: None, repeats=0)

def test_training_step_trains_and_profile_counts_calls():
    torch.manual_seed(0)
    m = VQVAE(hidden=16, res_hidden=8, num_codes=32, dim=8)
    step = training_step(m, vqvae_step, (torch.rand(4, 3, 32, 32),), opt=torch.optim.Adam(m.parameters(), 3e-3))
    losses = [step().item() for _ in range(15)]
    assert losses[-1] < losses[0]
    ops, n_calls = profile_step(step, steps=2)
    names = {e.key for e in ops}
    assert n_calls > 100 and any('convolution' in k for k in names)
    assert torch.__version__ in hardware('cpu') and 'CPU' in hardware('cpu')
