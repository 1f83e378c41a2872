"""Flow-matching and token-sampling math in common.py against naive references.

    python -m pytest -q tests/test_flow.py
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sigma_schedule_matches_diffusers_static_and_dynamic_shift(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = np.linspace(1.0, 1.0 / steps, steps)  # what FluxPipeline passes as `sigmas`
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps, sigmas=base)
    torch.testing.assert_close(common.sigma_schedule(steps, shift=3.0), sched.sigmas.float(), rtol=0, atol=1e-6)

    mu = common.flux_mu(1024)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(steps, sigmas=base, mu=mu)
    torch.testing.assert_close(common.sigma_schedule(steps, mu=mu), sched.sigmas.float(), rtol=0, atol=1e-6)


def test_flux_mu_endpoints():
    assert common.flux_mu(256) == pytest.approx(0.5)
    assert common.flux_mu(4096) == pytest.approx(1.15)


def _random_step(b=3, shape=(4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g)
    v = torch.randn(b, *shape, generator=g)
    return x, v


@pytest.mark.parametrize("sigma,sigma_next", [(0.8, 0.6), (1.0, 0.9), (0.3, 0.0)])
def test_sde_logprob_equals_normal_log_prob_element_mean(sigma, sigma_next):
    x, v = _random_step()
    gen = torch.Generator().manual_seed(1)
    x_next, log_prob, mean, std_dev_t = common.sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, generator=gen)
    std = std_dev_t * math.sqrt(sigma - sigma_next)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, ref, rtol=1e-5, atol=1e-5)


def test_sde_mean_matches_flow_grpo_formula_in_float64():
    # flow_grpo writes mu = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
    x, v = _random_step()
    a, sigma, sigma_next = 0.7, 0.75, 0.5
    _, _, mean, std_dev_t = common.sde_step_with_logprob(x, v, sigma, sigma_next, a)
    xd, vd, dt = x.double(), v.double(), sigma_next - sigma
    s = a * math.sqrt(sigma / (1 - sigma))
    ref = xd * (1 + s**2 * dt / (2 * sigma)) + vd * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(mean.double(), ref, rtol=1e-5, atol=1e-5)
    assert float(std_dev_t) == pytest.approx(s, rel=1e-6)


def test_sde_first_step_std_equals_noise_level():
    # at sigma = 1 the division uses sigma_next, so the step std is exactly a (flow_grpo's sigmas[1] rule)
    sigmas = common.sigma_schedule(10, shift=3.0)
    x, v = _random_step()
    _, _, _, std_dev_t = common.sde_step_with_logprob(x, v, sigmas[0], sigmas[1], 0.7)
    assert float(std_dev_t * torch.sqrt(sigmas[0] - sigmas[1])) == pytest.approx(0.7, rel=1e-5)


def test_sde_with_zero_noise_is_euler_step():
    x, v = _random_step()
    x_next, _, mean, _ = common.sde_step_with_logprob(x, v, 0.6, 0.4, 0.0)
    torch.testing.assert_close(x_next, common.euler_step(x, v, 0.6, 0.4))
    torch.testing.assert_close(mean, x_next)


def test_sde_rescoring_a_stored_sample_gives_ratio_one_and_grad_through_mean_only():
    x, v = _random_step()
    x_next, log_prob, _, _ = common.sde_step_with_logprob(x, v, 0.5, 0.3, 0.7)
    v_train = v.clone().requires_grad_(True)
    _, log_prob_again, _, _ = common.sde_step_with_logprob(x, v_train, 0.5, 0.3, 0.7, prev_sample=x_next)
    assert torch.equal(torch.exp(log_prob_again.detach() - log_prob), torch.ones(3))
    log_prob_again.sum().backward()
    assert v_train.grad is not None and torch.isfinite(v_train.grad).all()


def test_sde_per_sample_sigmas_broadcast_over_packed_latents():
    x, v = torch.randn(2, 16, 64), torch.randn(2, 16, 64)  # FLUX packed latents (B, L, 4C)
    sig, sig_next = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4])
    out, lp, _, _ = common.sde_step_with_logprob(x, v, sig, sig_next, 0.7, prev_sample=x)
    for i in range(2):
        _, lp_i, _, _ = common.sde_step_with_logprob(x[i:i + 1], v[i:i + 1], float(sig[i]), float(sig_next[i]), 0.7,
                                                      prev_sample=x[i:i + 1])
        torch.testing.assert_close(lp[i:i + 1], lp_i)


def test_step_mean_kl_against_loop():
    mean, mean_ref = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    std_dev_t = torch.tensor(0.4)
    kl = common.step_mean_kl(mean, mean_ref, std_dev_t)
    for b in range(3):
        ref = sum(float((mean[b].flatten()[i] - mean_ref[b].flatten()[i]) ** 2) for i in range(8)) / 8 / (2 * 0.16)
        assert float(kl[b]) == pytest.approx(ref, rel=1e-5)
    assert torch.equal(common.step_mean_kl(mean, mean, std_dev_t), torch.zeros(3))


def test_x0_prediction_recovers_data():
    x0, noise = torch.randn(2, 8), torch.randn(2, 8)
    sigma = 0.37
    x_t = (1 - sigma) * x0 + sigma * noise
    torch.testing.assert_close(common.x0_from_velocity(x_t, noise - x0, sigma), x0)


def test_euler_integration_of_exact_velocity_reaches_data():
    x0, noise = torch.randn(2, 8), torch.randn(2, 8)
    sigmas = common.sigma_schedule(7, shift=3.0)
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = common.euler_step(x, noise - x0, s, s_next)  # straight path: constant velocity
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


def test_cfg_helpers():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(common.cfg_combine(u, c, 4.0), u + 4.0 * (c - u))
    torch.testing.assert_close(common.cfg_split(torch.cat([u, c]), 4.0), u + 4.0 * (c - u))
    torch.testing.assert_close(common.cfg_logits(c, u, 1.0), c)


def test_sde_window_stays_in_high_noise_half():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w = common.sde_window(10, 3, generator=g)
        assert len(w) == 3 and w.start >= 0 and w.stop <= 5
    assert common.sde_window(4, 10) == range(4)


# -- token sampling -------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, None), (1.3, 5)])
def test_token_logprobs_match_categorical(temperature, top_k):
    logits = torch.randn(4, 7, 20)
    g = torch.Generator().manual_seed(0)
    tokens, logp = common.sample_tokens(logits, temperature, top_k, generator=g)
    scaled = logits / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    ref = torch.distributions.Categorical(logits=scaled).log_prob(tokens)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(common.token_logprobs(logits, tokens, temperature, top_k), logp, rtol=0, atol=0)
    if top_k:
        assert torch.isfinite(logp).all()  # never samples outside the top k


def test_token_sampling_frequencies_follow_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4)
    tokens, _ = common.sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), rtol=0, atol=0.01)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaModel(config).eval()


def _sampled_with_decode_tokens(lm, prefixes, num_steps, seed, cuda_graph=False):
    """Left-pads the prefixes, then samples through common.decode_tokens; returns (tokens, log-probs)."""
    device = next(lm.parameters()).device
    width = max(map(len, prefixes))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prefixes], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    tokens = torch.zeros(len(prefixes), num_steps, dtype=torch.long, device=device)
    logps = torch.zeros(len(prefixes), num_steps, device=device)
    generator = torch.Generator(device).manual_seed(seed)

    def step(hidden, index):
        token, logp = common.sample_tokens(hidden @ lm.embed_tokens.weight.T, 0.8, generator=generator)
        tokens.index_copy_(1, index[None], token[:, None])
        logps.index_copy_(1, index[None], logp[:, None])
        return lm.embed_tokens(token)[:, None]

    common.decode_tokens(lm, lm.embed_tokens(ids), mask, positions, num_steps, step, generator, cuda_graph)
    return tokens, logps


def test_static_cache_decoding_matches_full_recomputation():
    lm = _tiny_llama()
    prefixes = [[5, 7, 9, 11, 2], [3, 4], [8]]  # left padding of 0, 3 and 4 slots
    tokens, logps = _sampled_with_decode_tokens(lm, prefixes, num_steps=6, seed=1)
    with torch.no_grad():
        for row, prefix in enumerate(prefixes):  # each sequence alone, no padding, no cache, re-run per token
            for t in range(tokens.shape[1]):
                ids = torch.tensor([prefix + tokens[row, :t].tolist()])
                logits = lm(input_ids=ids).last_hidden_state[0, -1] @ lm.embed_tokens.weight.T
                expected = torch.log_softmax(logits / 0.8, -1)[tokens[row, t]]
                torch.testing.assert_close(logps[row, t], expected, atol=1e-5, rtol=0)
    again, _ = _sampled_with_decode_tokens(lm, prefixes, num_steps=6, seed=1)
    assert torch.equal(again, tokens)  # the seed fixes the draw


def test_decoding_ends_at_the_first_check_after_every_row_stopped():
    lm = _tiny_llama()
    embeds, mask = lm.embed_tokens(torch.tensor([[5, 7, 9], [0, 3, 4]])), torch.tensor([[1, 1, 1], [0, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    calls, stopped = [], torch.zeros(2, dtype=torch.bool)

    def step(hidden, index):
        calls.append(int(index))
        stopped.logical_or_(index >= 2)  # every row "emits its stop token" at step 2
        return lm.embed_tokens(hidden.argmax(-1) % 50)[:, None]

    with torch.no_grad():
        common.decode_tokens(lm, embeds, mask, positions, 10, step, stopped=stopped, check_every=2)
    assert calls == [0, 1, 2, 3]  # stopped after step 2; the check after 4 steps sees it
    calls.clear()
    stopped.zero_()
    with torch.no_grad():
        common.decode_tokens(lm, embeds, mask, positions, 10, step)  # no buffer: all steps run
    assert calls == list(range(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_draws_what_the_eager_loop_draws():
    lm = _tiny_llama().cuda()
    prefixes = [[5, 7, 9, 11, 2], [3, 4]]
    eager = _sampled_with_decode_tokens(lm, prefixes, num_steps=12, seed=3, cuda_graph=False)
    graph = _sampled_with_decode_tokens(lm, prefixes, num_steps=12, seed=3, cuda_graph=True)
    assert torch.equal(graph[0], eager[0])
    torch.testing.assert_close(graph[1], eager[1])
