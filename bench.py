"""
bench.py: speed and memory, never quality (quality lives in the README's results table).

    python bench.py                          # every section that exists, on the default device
    python bench.py --section matching --device cuda

Sections:
    matching    batched linear assignment (common.linear_assignment) on B x N x M random costs: a Python loop over
                scipy (with the device->host->device transfers when the costs live on a GPU), our C++ CPU path and
                our CUDA kernel. Median ms per batch after warm-up; every total is checked against scipy's optimum.
    umo         the FLUX transformer through umo.velocity (the training code path) with random weights: a rollout
                denoising step (no grad) and a LoRA update step (forward + backward, gradient checkpointing) for a
                group, seconds, peak memory and model FLOP utilisation. --size flux-12b is the real architecture
                (needs a large GPU); --size tiny is the embedded default's model (any device).

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
    from diffusers import FluxTransformer2DModel

    dtype = common.pick_dtype(device)[0]
    if size == "flux-12b":
        with torch.device("meta"):
            tf = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's configuration
        tf = tf.to_empty(device=device).to(dtype)
        for p in tf.parameters():
            torch.nn.init.normal_(p, std=0.02)
        latent = resolution // 8
    else:
        cfg = umo.Config(**umo.TOY_SETTINGS)
        tf = umo.load_models(cfg, device, dtype).transformer
        resolution, text_tokens, latent = cfg.resolution, 16, cfg.resolution // 2
    tf.requires_grad_(False)
    models = umo.Models(tf, *[None] * 7, max_text_len=text_tokens)
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
    return rows


# -----------------------------------------------------------------------------
# CLI

SECTIONS = {"matching": bench_matching, "umo": bench_umo}


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
    parser.add_argument("--size", choices=["tiny", "flux-12b"], default="tiny",
                        help="model size for the method sections: tiny (embedded default) or the real architecture")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact totals in the checks
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    results = []
    for section in args.section or sorted(SECTIONS):
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
