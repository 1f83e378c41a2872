"""
bench.py: speed and memory, never quality (quality lives in the README's results table).

    python bench.py                          # every section that exists, on the default device
    python bench.py --section matching --device cuda

Sections:
    matching    batched linear assignment (common.linear_assignment) on B x N x M random costs: a Python loop over
                scipy (with the device->host->device transfers when the costs live on a GPU), our C++ CPU path and
                our CUDA kernel. Median ms per batch after warm-up; every total is checked against scipy's optimum.
    umo         the FLUX transformer through umo.velocity (the training code path) with random weights: a rollout
                denoising step (no grad), a LoRA update step (forward + backward, gradient checkpointing) for a
                group, and a whole ReReFL step (sampling, one step with gradient, VAE decode, face nets, MIMR):
                seconds, peak memory and model FLOP utilisation. --size flux-12b is the real architecture
                (needs a large GPU); --size tiny is the embedded default's model (any device).
    unirl       Janus-Pro through unirl.sample_image_tokens (the rollout: static-KV-cache CFG decoding of 576 image
                tokens for a group of 8, i.e. 16 rows, eager and with a replayed CUDA graph per step) and the GRPO
                update's re-scoring forward + backward: seconds, ms per token step, images/s, MFU, peak memory.
                --size janus-1b / janus-7b (random weights, GPU) or tiny.
    unicharacter  BAGEL's MoT through unicharacter.py: prompt prefill, one text-CFG flow step of a group of 8 at
                1024 px (4096 latent tokens, 2 x 8 rows), the GRPO update of one sample's CFG pair (full generation
                expert, gradient checkpointing), text decoding (weight-read bandwidth). --size bagel-7b or tiny.
    uae         UAE through uae.py: a group of 8 captions of one image from Qwen2.5-VL-3B (static-KV-cache token steps,
                eager and with a replayed CUDA graph per step: ms per step against the HBM bound, weights + KV cache
                read / 3.0 TB/s), one SD3.5-Large denoising step of the group with CFG (batch 16) at 512 px, the
                stage-3 update (forward + backward; the whole decoder_grpo_step per trained step). --size full
                (random weights, GPU) or tiny.
    psr         FLUX.1 Kontext through psr.py: one denoising step of a group of 6 at 512 px with 2 references (3072
                image + 512 text tokens per row), the whole 28-step SDE rollout with VAE decode (images/s), one
                trained timestep of the GRPO update (LoRA r64, gradient checkpointing): seconds, MFU, peak
                memory. --size kontext-12b (random weights, GPU) or tiny.

Prints the environment, a table, then one JSON line (the last line of stdout) that scripts can parse.
Requires common.py next to it.
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import common

MATCHING_SIZES = [(b, k, k) for b in (1024, 16384) for k in (4, 8, 16, 32)] + \
                 [(b, n, m) for b in (1024, 16384) for n, m in ((8, 3), (3, 8))]

# -----------------------------------------------------------------------------
# timing


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock ms of fn() with the device synchronised at both edges of every call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        common.synchronize(device)
        t0 = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_weights(build, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """build() on the meta device, then materialised on `device` in `dtype` with N(0, 0.02) weights: the real
    architecture's shapes and speed without initialising billions of parameters on the CPU first."""
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device=device).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def flux_12b(device: torch.device, dtype: torch.dtype):
    """FLUX.1-dev's transformer configuration (with the guidance embedding, as Kontext) in `dtype` and FLUX's VAE
    (fp32, on the CPU: callers place it as their method file does), both with random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = random_weights(lambda: FluxTransformer2DModel(guidance_embeds=True), device, dtype)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611)
    return transformer, vae


# -----------------------------------------------------------------------------
# matching


def scipy_loop(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline everyone writes: copy to host, one scipy call per problem, copy back."""
    from scipy.optimize import linear_sum_assignment

    host = cost.double().cpu().numpy()
    rows, cols = zip(*(linear_sum_assignment(c) for c in host))
    return torch.from_numpy(np.stack(rows)).to(cost.device), torch.from_numpy(np.stack(cols)).to(cost.device)


def total_cost(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    batch = torch.arange(cost.shape[0], device=cost.device)[:, None]
    return cost.double()[batch, rows, cols].sum(-1)


def bench_matching(device: torch.device, sizes=MATCHING_SIZES, repeats: int = 20) -> list[dict]:
    rows = []
    for b, n, m in sizes:
        cost = torch.rand(b, n, m, generator=torch.Generator().manual_seed(b + n * 100 + m)).to(device)
        reference = total_cost(cost, *scipy_loop(cost))
        candidates = {"scipy loop": lambda c=cost: scipy_loop(c),
                      f"ours ({common.assignment_backend(torch.device('cpu'))})":
                          lambda c=cost.cpu(): common.linear_assignment(c)}
        if device.type == "cuda":
            candidates[f"ours ({common.assignment_backend(device)})"] = lambda c=cost: common.linear_assignment(c)
        for name, fn in candidates.items():
            got = total_cost(cost, *(t.to(device) for t in fn()))
            if not torch.allclose(got, reference, rtol=0, atol=1e-4):
                raise AssertionError(f"{name} is not optimal on {b}x{n}x{m}")
            reps = max(3, repeats // 4) if name == "scipy loop" else repeats
            rows.append({"section": "matching", "B": b, "N": n, "M": m, "method": name,
                         "ms": round(median_ms(fn, device, reps), 4)})
    return rows


# -----------------------------------------------------------------------------
# umo: the FLUX transformer (shared by psr.py)

PEAK_BF16_FLOPS = 790e12  # one H100, bf16 dense (reference/performance.md); MFU is reported against it


def flux_flops(tf, batch: int, image_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs: 2 x per-token weights x tokens, plus attention 4 T^2 d per layer (reference/performance.md).

    Double blocks: image tokens meet the image-stream weights, text tokens the context-stream weights; single
    blocks: every token meets every weight. The AdaLayerNorm modulation linears act once per sample: left out."""
    def weights(module, skip=("norm",)):
        return sum(m.weight.numel() for n, m in module.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.startswith(skip))
    context = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context")
    image = sum(weights(b, skip=("norm",) + context) for b in tf.transformer_blocks)
    text = sum(weights(b) - weights(b, skip=("norm",) + context) for b in tf.transformer_blocks)
    single = sum(weights(b) for b in tf.single_transformer_blocks)
    t = image_tokens + text_tokens
    dense = 2 * (image * image_tokens + text * text_tokens + single * t)
    attention = 4 * t * t * tf.inner_dim * (len(tf.transformer_blocks) + len(tf.single_transformer_blocks))
    return batch * (dense + attention)


def bench_umo(device: torch.device, repeats: int = 5, size: str = "tiny", group: int = 8,
              resolution: int = 512, text_tokens: int = 512) -> list[dict]:
    import umo

    dtype = common.pick_dtype(device)[0]
    if size == "flux-12b":
        tf, vae = flux_12b(device, dtype)
        half = resolution / 2  # two face boxes side by side: ArcFace and the warp run as with real faces
        detector = umo.SlotDetector({(resolution, resolution): [(0, half / 2, half, 1.5 * half),
                                                                 (half, half / 2, 2 * half, 1.5 * half)]})
        models = umo.Models(tf, vae.to(device, dtype).eval(), None, None, None, None, detector,
                            umo.IResNet().to(device, dtype).eval(), max_text_len=text_tokens)
        cfg = umo.Config(resolution=resolution)
        latent = resolution // 8
    else:
        cfg = umo.Config(**umo.TOY_SETTINGS)
        models = umo.load_models(cfg, device, dtype)
        models.max_text_len = 16
        tf = models.transformer
        resolution, text_tokens, latent = cfg.resolution, 16, cfg.resolution // 2
    tf.requires_grad_(False)
    grid = (latent, latent)
    tokens = (latent // 2) ** 2
    text = torch.randn(group, text_tokens, tf.config.joint_attention_dim, device=device, dtype=dtype)
    cond = umo.Condition(text=text,
                         pooled=torch.randn(group, tf.config.pooled_projection_dim, device=device, dtype=dtype),
                         refs=torch.zeros(group, 0, tf.config.in_channels, device=device, dtype=dtype),
                         ids=umo.position_ids((latent // 2, latent // 2), []), grid=grid)
    x = torch.randn(group, tokens, tf.config.in_channels, device=device)
    sigma = torch.full((group,), 0.7, device=device)
    flops = flux_flops(tf, group, tokens, text_tokens)
    rows = []

    def step():
        with torch.no_grad():
            umo.velocity(models, x, sigma, cond, 4.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(step, device, repeats) / 1e3
    rows.append({"section": "umo", "size": size, "what": f"rollout step, group {group}, {resolution}px",
                 "s": round(s, 4), "mfu": round(flops / s / PEAK_BF16_FLOPS, 3),
                 "peak_gb": round(common.peak_memory_gb(device), 1)})

    common.inject_lora(tf, umo.LORA_TARGETS, rank=64, init="gaussian", dtype=dtype)
    tf.enable_gradient_checkpointing()
    params = common.lora_parameters(tf)

    def update():
        v = umo.velocity(models, x, sigma, cond, 4.0)
        v.float().square().mean().backward()
        for p in params:
            p.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(update, device, repeats) / 1e3
    rows.append({"section": "umo", "size": size, "what": f"LoRA update step (r64, grad ckpt), group {group}",
                 "s": round(s, 4), "mfu": round(3 * flops / s / PEAK_BF16_FLOPS, 3),
                 "peak_gb": round(common.peak_memory_gb(device), 1)})

    # ReReFL (Algorithm 1): no-grad sampling to step k, one step with gradient, VAE decode, MIMR, + lambda L_diff
    ref_embs = [torch.nn.functional.normalize(torch.randn(2, models.arcface.fc.out_features, device=device), dim=-1)
                for _ in range(group)]
    targets = torch.rand(group, 3, resolution, resolution, device=device) * 2 - 1
    grad_step = []

    def rerefl():
        loss, m = umo.rerefl_step(models, cfg, cond, ref_embs, targets, torch.Generator().manual_seed(0))
        loss.backward()
        grad_step.append(m["grad_step"])
        for p in params:
            p.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(rerefl, device, repeats) / 1e3
    rows.append({"section": "umo", "size": size, "what": f"ReReFL step (grad at step {grad_step[0] + 1} of "
                 f"{cfg.num_steps}), batch {group}", "s": round(s, 4), "mfu": None,
                 "peak_gb": round(common.peak_memory_gb(device), 1)})
    return rows


# -----------------------------------------------------------------------------
# unirl: Janus-Pro image-token decoding and the GRPO re-scoring update

JANUS_SIZES = {  # the language models of the released Janus-Pro checkpoints (Llama architecture, 102,400 text tokens)
    "janus-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
    "janus-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32)}


def janus_flops(lm_config, batch: int, context: int, new_tokens: int) -> float:
    """Forward FLOPs of `new_tokens` tokens per row after `context` cached ones: 2 x weights per token (the
    language model's linear layers and the 16,384-way generation head) + 4 x d per attended pair per layer."""
    d, f, n = lm_config.hidden_size, lm_config.intermediate_size, lm_config.num_hidden_layers
    per_token = n * (4 * d * d + 3 * d * f) + d * d + d * 16384  # attention + MLP, gen head (d -> d -> codebook)
    pairs = new_tokens * context + new_tokens * (new_tokens + 1) / 2
    return batch * (2 * per_token * new_tokens + 4 * d * n * pairs)


def _janus_of_size(size: str, device: torch.device, dtype: torch.dtype):
    import unirl
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig

    model, processor = unirl.toy_model()  # the toy's processor: prompts only need a tokenizer and the chat template
    if size == "tiny":
        return unirl.toy_models(model.to(device, dtype).eval().requires_grad_(False), processor)
    text = LlamaConfig(vocab_size=102400, max_position_embeddings=16384, **JANUS_SIZES[size])
    config = JanusConfig(text_config=text, vq_config={"projection_dim": text.hidden_size,
                                                      "image_token_embed_dim": text.hidden_size})
    model = random_weights(lambda: JanusForConditionalGeneration(config), device, dtype)
    models = unirl.toy_models(model.eval().requires_grad_(False), processor)
    models.num_image_tokens = 576  # 24 x 24 tokens at 384 px
    return models


def bench_unirl(device: torch.device, repeats: int = 3, size: str = "tiny", group: int = 8) -> list[dict]:
    """A group of `group` images with CFG (2 x group rows) through unirl.sample_image_tokens (the rollout) and the
    GRPO update's re-scoring forward + backward (LoRA on the attention and MLP projections, gradient checkpointing)."""
    import unirl

    dtype = common.pick_dtype(device)[0]
    models = _janus_of_size(size, device, dtype)
    lm = models.model.model.language_model
    prompts = ["a photo of a red cup and a blue dog"] * group
    t = models.num_image_tokens
    context = unirl.generation_inputs(models, prompts)[0].shape[1]
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    flops = janus_flops(lm.config, 2 * group, context, t)
    for graphs in (False, True):  # the eager loop is launch-bound; a replayed CUDA graph per step removes that
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        s = median_ms(lambda: unirl.sample_image_tokens(models, prompts, 5.0, 1.0, generator, graphs),
                      device, repeats, 1) / 1e3
        how = "CUDA graph per step" if graphs else "eager steps"
        rows.append({"section": "unirl", "size": size, "what": f"rollout: {t} image tokens, group {group} + CFG, {how}",
                     "s": round(s, 4), "ms_per_token": round(1e3 * s / t, 2), "images_per_s": round(group / s, 3),
                     "mfu": round(flops / s / PEAK_BF16_FLOPS, 4), "peak_gb": round(common.peak_memory_gb(device), 1)})

    common.inject_lora(models.model, ["*language_model*_proj"], rank=32, alpha=64.0, dtype=dtype)
    models.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = common.lora_parameters(models.model)
    tokens = torch.randint(0, 16384 if size != "tiny" else unirl.TOY_CODES, (group, t), device=device)

    def prefill():  # a teacher-forced forward without gradient: the KL reference pass (adapters off) of the update
        with torch.no_grad(), common.lora_disabled(models.model):
            unirl.score_image_tokens(models, prompts, tokens, 5.0, 1.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(prefill, device, repeats, 1) / 1e3
    flops = janus_flops(lm.config, 2 * group, 0, context + t)
    what = f"prefill: {context} + {t} tokens x {2 * group} rows, no grad"
    rows.append({"section": "unirl", "size": size, "what": what,
                 "s": round(s, 4), "ms_per_token": None, "images_per_s": None,
                 "mfu": round(flops / s / PEAK_BF16_FLOPS, 4), "peak_gb": round(common.peak_memory_gb(device), 1)})

    def update():
        logp = unirl.score_image_tokens(models, prompts, tokens, 5.0, 1.0)
        logp.mean().backward()
        for p in params:
            p.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(update, device, repeats, 1) / 1e3
    flops = janus_flops(lm.config, 2 * group, 0, context + t)
    rows.append({"section": "unirl", "size": size, "what": f"GRPO update: re-score {t} tokens, LoRA r32, grad ckpt",
                 "s": round(s, 4), "ms_per_token": None, "images_per_s": None,
                 "mfu": round(3 * flops / s / PEAK_BF16_FLOPS, 4), "peak_gb": round(common.peak_memory_gb(device), 1)})
    return rows


# -----------------------------------------------------------------------------
# unicharacter: BAGEL's MoT - prompt prefill, a CFG flow step, the Character-GRPO update, text decoding


def bagel_linear_weights(model, expert: str) -> int:
    """Per-token weights of one expert ("und" or "gen") in the decoder layers (q/k/v/o and MLP)."""
    return sum(m.weight.numel() for n, m in model.language_model.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear) and (("moe_gen" in n) == (expert == "gen")))


def bench_unicharacter(device: torch.device, repeats: int = 3, size: str = "tiny", group: int = 8,
                       prompt_tokens: int = 64, resolution: int = 1024, text_steps: int = 32) -> list[dict]:
    """unicharacter.py's code paths: prefill of a group's prompts (understanding expert), one text-CFG flow step of
    the group ([cond; uncond] = 2 x group rows of 2 + 4096 latent tokens at 1024 px, generation expert), the GRPO
    re-scoring forward + backward of one sample's CFG pair (full generation expert, gradient checkpointing), and
    token-by-token text decoding (achieved weight-read bandwidth). FLOPs: 2 x per-token weights x tokens +
    4 x d x attended pairs per layer; MFU against 790 TFLOP/s."""
    import unicharacter as U

    dtype = common.pick_dtype(device)[0]
    if size == "bagel-7b":
        model = random_weights(lambda: U.Bagel(U.BAGEL_7B), device, dtype)
        models = U.Models(model, None, None, dict(bos=0, eos=1, soi=2, eoi=3, pad=4), 378, toy=False)
    else:
        cfg = U.resolve_config(U.Config())
        models = U.load_models(cfg, device, dtype)
        resolution, prompt_tokens = cfg.image_size, 16
    model, arch = models.model.eval().requires_grad_(False), models.model.arch
    side = resolution // arch.latent_downsample
    n_lat, d, layers = side * side, arch.hidden, arch.layers
    und, gen = bagel_linear_weights(model, "und"), bagel_linear_weights(model, "gen")
    ids = [[("text", list(range(5, 5 + prompt_tokens)), False)] for _ in range(group)]

    def prefill():
        with torch.no_grad():
            emb, pos, mask, _, _, valid, nxt = U.pack(models, ids)
            return U.Prefix(emb, pos, valid, nxt, model.language_model.model(emb, pos, mask)[1])

    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(prefill, device, repeats, 1) / 1e3
    flops = group * (2 * und * prompt_tokens + 4 * d * layers * prompt_tokens * (prompt_tokens + 1) / 2)
    rows.append({"section": "unicharacter", "size": size, "what": f"prefill {group} prompts x {prompt_tokens} tokens",
                 "s": round(s, 4), "mfu": round(flops / s / PEAK_BF16_FLOPS, 4), "bandwidth_tb_s": None,
                 "peak_gb": round(common.peak_memory_gb(device), 1)})
    pair = prefill().cfg_pair()
    x = torch.randn(group, n_lat, arch.latent_dim, device=device)
    q = n_lat + 2
    step_flops = lambda rows_: rows_ * (2 * gen * n_lat + 2 * und * 2 + 4 * d * layers * q * (q + prompt_tokens))

    def flow_step():
        with torch.no_grad():
            U.guided_velocity(models, pair, x, 0.7, (side, side), 4.0, 0.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(flow_step, device, repeats, 1) / 1e3
    rows.append({"section": "unicharacter", "size": size, "what": f"flow step, group {group} + CFG, {resolution}px",
                 "s": round(s, 4), "mfu": round(step_flops(2 * group) / s / PEAK_BF16_FLOPS, 4),
                 "bandwidth_tb_s": None, "peak_gb": round(common.peak_memory_gb(device), 1)})

    params = [p for n, p in model.language_model.named_parameters() if "moe_gen" in n]
    for p in params:
        p.requires_grad_(True)
    model.language_model.model.grad_checkpointing = True
    one = pair.rows(torch.tensor([0, group], device=device))  # one sample's [cond; uncond] rows

    def update():
        v = U.guided_velocity(models, one, x[:1], 0.7, (side, side), 4.0, 0.0)
        v.square().mean().backward()
        for p in params:
            p.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(update, device, repeats, 1) / 1e3
    rows.append({"section": "unicharacter", "size": size, "what": "GRPO update: 1 sample + CFG, full gen expert, "
                 "grad ckpt", "s": round(s, 4), "mfu": round(3 * step_flops(2) / s / PEAK_BF16_FLOPS, 4),
                 "bandwidth_tb_s": None, "peak_gb": round(common.peak_memory_gb(device), 1)})
    model.language_model.model.grad_checkpointing = False
    model.requires_grad_(False)

    lm = model.language_model
    cache, valid = prefill().cache, torch.ones(group, prompt_tokens, dtype=torch.bool, device=device)

    def decode():
        with torch.no_grad():
            c, v, pos = cache, valid, torch.full((group, 1), prompt_tokens, device=device)
            token = torch.zeros(group, dtype=torch.long, device=device)
            for _ in range(text_steps):
                v = torch.cat([v, v.new_ones(group, 1)], 1)
                h, c = lm.model(model.embed(token[:, None]), pos, v[:, None, None, :], past=c)
                token, pos = lm.lm_head(h[:, -1]).argmax(-1), pos + 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(decode, device, repeats, 1) / 1e3
    weight_bytes = (und + lm.lm_head.weight.numel()) * torch.finfo(dtype).bits / 8  # weights read per token step
    rows.append({"section": "unicharacter", "size": size, "what": f"text decoding, {group} rows x {text_steps} tokens",
                 "s": round(s, 4), "mfu": None, "bandwidth_tb_s": round(weight_bytes * text_steps / s / 1e12, 4),
                 "peak_gb": round(common.peak_memory_gb(device), 1)})
    return rows


# -----------------------------------------------------------------------------
# uae: Qwen2.5-VL-3B caption decoding, an SD3.5-Large denoising step of a group with CFG, the stage-3 update

QWEN25_VL_3B = dict(  # Qwen2.5-VL-3B-Instruct's config.json: the UAE encoder (hidden 2048 feeds the projector)
    text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=True),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    tie_word_embeddings=True)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
HBM_BYTES_PER_S = 3.0e12  # one H100 (reference/performance.md)


def _built(device: torch.device, dtype: torch.dtype, make):
    """make() with parameters created directly on the device in the dtype (random init, no fp32 copy)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(default)


def _uae_of_size(size: str, device: torch.device, dtype: torch.dtype):
    """uae.Models: the embedded toy's tiny models (random), or Qwen2.5-VL-3B + projector + SD3.5-Large with random
    weights (the toy's tokenizer and chat template: prompts only need token ids)."""
    import uae
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    models = uae.toy_models()
    if size != "tiny":
        tok = models.tokenizer
        special = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                   ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                   ("vision_end_token_id", "<|vision_end|>"))}
        config = Qwen2_5_VLConfig(**QWEN25_VL_3B, **special)
        models.llm = _built(device, dtype, lambda: Qwen2_5_VLForConditionalGeneration(config))
        models.transformer = _built(device, dtype, lambda: SD3Transformer2DModel(**SD35_LARGE))
        models.projector = _built(device, dtype, lambda: uae.make_projector(2048, 4096))
        models.vae = AutoencoderKL(  # SD3.5's VAE layout (8x down, 16 channels): latent_shape reads it
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
        models.pooled = torch.randn(1, 2048)
        models.image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=65536)  # UAE's: 81 tokens
    for m in (models.llm, models.projector, models.transformer, models.vae):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    models.pooled = models.pooled.to(device, dtype)
    return models


def bench_uae(device: torch.device, repeats: int = 3, size: str = "tiny", group: int = 8,
              caption_tokens: int = 256, resolution: int = 512, context_words: int = 300) -> list[dict]:
    """uae.py's code paths: a group of `group` captions of one image (uae.sample_captions: prefill, then
    caption_tokens static-KV-cache token steps, eager and as a replayed CUDA graph per step), one CFG denoising step
    of the group through uae.velocity (2 x group rows, the conditioning of a caption of about context_words tokens),
    and the stage-3 update of one trained step
    (uae.decoder_grpo_step: old re-score, policy forward + backward with gradient checkpointing and DiT LoRA r32,
    KL reference forward, AdamW). --size full: Qwen2.5-VL-3B and SD3.5-Large with random weights; tiny: the toy."""
    import uae

    dtype = common.pick_dtype(device)[0]
    models = _uae_of_size(size, device, dtype)
    if size == "tiny":
        resolution, caption_tokens, context_words = uae.TOY_RES, 16, 20
    rows = []

    def row(what, s, target, **extra):
        rows.append({"section": "uae", "size": size, "what": what, "s": round(s, 4),
                     "ms_per_token": extra.get("ms_per_token"), "tokens_per_s": extra.get("tokens_per_s"),
                     "hbm_bound_ms": extra.get("hbm_bound_ms"), "images_per_s": extra.get("images_per_s"),
                     "target": target, "peak_gb": round(common.peak_memory_gb(device), 1)})

    image = common.tensor_to_pil(torch.rand(3, 256, 256) * 2 - 1)
    inputs = uae.caption_inputs(models, [image] * group)
    generator = torch.Generator(device).manual_seed(0)
    lm = models.lm
    config = lm.config
    weights = sum(m.weight.numel() for m in lm.layers.modules() if isinstance(m, torch.nn.Linear))
    weights += models.llm.lm_head.weight.numel()
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    context = inputs.ids.shape[1] + caption_tokens - 1  # the static cache: every step attends over all its slots
    step_bytes = (weights + kv * group * context) * torch.finfo(dtype).bits / 8  # weights + KV cache read per step
    for graphs in (False, True):  # every caption takes caption_tokens steps (stop_early=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        s = median_ms(lambda: uae.sample_captions(models, inputs, caption_tokens, 0.7, generator, graphs, False),
                      device, repeats, 1) / 1e3
        how = "CUDA graph per step" if graphs else "eager steps"
        row(f"caption: prefill + {caption_tokens} token steps, {group} rows, {how}", s,
            "<= 2x HBM bound per token step", ms_per_token=round(1e3 * s / caption_tokens, 2),
            tokens_per_s=round(group * caption_tokens / s, 1),
            hbm_bound_ms=round(1e3 * step_bytes / HBM_BYTES_PER_S, 4))

    text = " ".join(["big red square on white"] * (context_words // 5))
    with torch.no_grad():
        cond, pooled = uae.condition(models, [text] * group)  # (2 group, L, 4096): [negative; positive]
    c, h, w = uae.latent_shape(models, resolution)
    x = torch.randn(group, c, h, w, device=device)

    def denoise():
        with torch.no_grad():
            uae.velocity(models, x, 0.7, cond, pooled, 5.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(denoise, device, repeats) / 1e3
    row(f"denoising step, group {group} + CFG (batch {2 * group}), {resolution}px, {cond.shape[1]} context tokens",
        s, "<= 0.27 s (full)", images_per_s=round(group / (10 * s), 3))

    cfg = uae.Config(num_steps=10, noise_level=0.7, guidance=5.0, beta_decoder=0.04, grad_checkpointing=True)
    common.inject_lora(models.transformer, list(uae.SD3_LORA_TARGETS), cfg.dit_lora_rank, cfg.dit_lora_alpha,
                       init="gaussian")
    models.transformer.to(device).enable_gradient_checkpointing()
    params = common.lora_parameters(models.transformer)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr_decoder, weight_decay=cfg.weight_decay)
    sigmas = uae.sigmas_for(models, cfg.num_steps, resolution)
    batch = {"latents": torch.randn(cfg.num_steps + 1, group, c, h, w, device=device), "sigmas": sigmas,
             "log_probs": torch.zeros(1, group, device=device), "train_steps": [1], "cond": cond, "pooled": pooled}
    advantages = torch.randn(group, device=device)

    def backward_only():
        models.transformer.train()
        uae.velocity(models, x, 0.7, cond, pooled, 5.0).square().mean().backward()
        for p in params:
            p.grad = None
        models.transformer.eval()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(backward_only, device, repeats, 1) / 1e3
    row(f"stage-3 update: forward + backward of one step, group {group} + CFG, LoRA r32, grad ckpt", s,
        "<= 0.80 s (full)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = median_ms(lambda: uae.decoder_grpo_step(models, optimizer, cfg, batch, advantages), device, repeats, 1) / 1e3
    row("stage-3 decoder_grpo_step per trained step (old re-score, policy fwd + bwd, KL reference, AdamW)", s, "")
    return rows


# -----------------------------------------------------------------------------
# psr: FLUX.1 Kontext with 2 references - denoising steps of a group, the whole SDE rollout, the GRPO update


def bench_psr(device: torch.device, repeats: int = 3, size: str = "tiny", group: int = 6, resolution: int = 512,
              refs: int = 2, text_tokens: int = 512) -> list[dict]:
    """psr.py's code paths with random weights: one denoising step of a group (psr.velocity, no grad), the whole
    rollout (psr.rollout: the SDE at each of the 28 steps, log-probs, VAE decode) and one trained timestep of the
    GRPO update (psr.grpo_step: re-score, clipped loss, backward; LoRA r64, gradient checkpointing).
    --size kontext-12b: FLUX.1 Kontext [dev]'s architecture (FLUX.1-dev's configuration with the guidance
    embedding) and FLUX's VAE; tiny: the embedded default's model classes, untrained."""
    import psr

    dtype = common.pick_dtype(device)[0]
    if size == "kontext-12b":
        tf, vae = flux_12b(device, dtype)  # the VAE stays fp32, as psr.load_models keeps it
        models = psr.Models(tf, vae.to(device).eval(), None, None, None, None, max_text_len=text_tokens)
        cfg = psr.Config(resolution=resolution, ref_resolution=resolution, group_size=group)  # the paper's values
    else:
        models = psr.random_toy_models(psr.TOY_SEED)
        models.transformer.to(device, dtype)
        models.vae.to(device)
        cfg = psr.Config(**{**psr.TOY_SETTINGS, "sde_window": 0, "group_size": group})
        resolution, text_tokens = cfg.resolution, models.max_text_len
    tf = models.transformer.requires_grad_(False).eval()
    models.vae.requires_grad_(False)
    grid = psr.latent_grid(models, resolution)
    ref_grid = psr.latent_grid(models, cfg.ref_resolution)
    ref_tokens = refs * (ref_grid[0] // 2) * (ref_grid[1] // 2)
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    cond = psr.Condition(text=rand(group, text_tokens, tf.config.joint_attention_dim),
                         pooled=rand(group, tf.config.pooled_projection_dim),
                         refs=rand(group, ref_tokens, tf.config.in_channels),
                         ids=psr.frame_ids((grid[0] // 2, grid[1] // 2), [(ref_grid[0] // 2, ref_grid[1] // 2)] * refs),
                         grid=grid)
    x = psr.initial_noise(models, cfg, group, torch.Generator(device).manual_seed(0))
    flops = flux_flops(tf, group, x.shape[1] + ref_tokens, text_tokens)
    what = f"group {group}, {resolution}px, {refs} refs, {text_tokens} text tokens"
    rows = []

    def measure(fn, reps, warmup=2):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return median_ms(fn, device, reps, warmup) / 1e3, round(common.peak_memory_gb(device), 1)

    def step():
        with torch.no_grad():
            psr.velocity(models, x, torch.full((group,), 0.7, device=device), cond, cfg.guidance)

    s, peak = measure(step, repeats)
    rows.append({"section": "psr", "size": size, "what": f"rollout denoising step, {what}", "s": round(s, 4),
                 "images_per_s": None, "mfu": round(flops / s / PEAK_BF16_FLOPS, 3), "peak_gb": peak})

    steps = (range(cfg.num_steps), range(max(1, int(cfg.num_steps * cfg.timestep_fraction))))
    out = {}

    def whole():
        out.update(psr.rollout(models, cfg, cond, torch.Generator(device).manual_seed(0), steps))

    s, peak = measure(whole, max(1, min(repeats, 3)), warmup=1)
    rows.append({"section": "psr", "size": size, "what": f"rollout: {cfg.num_steps} SDE steps + VAE decode, {what}",
                 "s": round(s, 4), "images_per_s": round(group / s, 3),
                 "mfu": round(cfg.num_steps * flops / s / PEAK_BF16_FLOPS, 3), "peak_gb": peak})

    common.inject_lora(tf, psr.LORA_TARGETS, rank=64, alpha=128, init="gaussian")  # fp32 adapters, as psr.add_lora
    tf.enable_gradient_checkpointing()
    one = {"states": out["states"][:1], "next": out["next"][:1], "log_probs": out["log_probs"][:1], "steps": [0],
           "sigmas": out["sigmas"]}  # one trained timestep of the stored rollout
    adv = torch.linspace(-1, 1, group, device=device)
    params = common.lora_parameters(tf)

    def update():
        psr.grpo_step(models, cfg, cond, one, adv)
        for p in params:
            p.grad = None

    s, peak = measure(update, repeats)
    trained = len(steps[1])
    rows.append({"section": "psr", "size": size, "what": f"GRPO update, one trained step (LoRA r64, grad ckpt; "
                 f"x {trained} steps = {s * trained:.1f} s per group), {what}", "s": round(s, 4),
                 "images_per_s": None, "mfu": round(3 * flops / s / PEAK_BF16_FLOPS, 3), "peak_gb": peak})
    return rows


# -----------------------------------------------------------------------------
# CLI

SECTIONS = {"matching": bench_matching, "umo": bench_umo, "unirl": bench_unirl, "unicharacter": bench_unicharacter,
            "uae": bench_uae, "psr": bench_psr}
SIZES = {"umo": ("tiny", "flux-12b"), "unirl": ("tiny", *JANUS_SIZES), "unicharacter": ("tiny", "bagel-7b"),
         "uae": ("tiny", "full"), "psr": ("tiny", "kontext-12b")}  # --size values each method section knows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="section(s) to run; default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row after warm-up (default: 20)")
    parser.add_argument("--size", default="tiny",
                        help="model size for the method sections: tiny (embedded default, any device) or a real "
                             "architecture with random weights: " + ", ".join(
                                 f"{k}: {'/'.join(v[1:])}" for k, v in SIZES.items()))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact totals in the checks
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    results = []
    sections = args.section or sorted(SECTIONS)
    known = [s for s in sections if s == "matching" or args.size in SIZES.get(s, ())]
    if not known:
        parser.error(f"--size {args.size} is not a size of section(s) {', '.join(sections)}: see --help")
    for section in sections:
        if section not in known:
            print(f"\n{section}: skipped (no size {args.size!r}; it has {', '.join(SIZES[section])})")
            continue
        kwargs = {"size": args.size} if section != "matching" else {}
        rows = SECTIONS[section](device, repeats=args.repeats, **kwargs)
        keys = list(rows[0])
        print("\n" + " | ".join(keys))
        for r in rows:
            print(" | ".join(str(r[k]) for k in keys), flush=True)
        results += rows
    print(json.dumps({"env": env, "results": results}))


if __name__ == "__main__":
    main()
