"""
common.py: the code that several method files share exactly, tested once in tests/.

    runtime     dataclass config -> argparse, torchrun detection, print0, seeding, dtype choice, atomic save,
                checkpoint/resume, one-line-per-step metric log
    LoRA        LoRALinear, injection by module-name pattern, adapter-off context (the KL reference policy),
                merge/unmerge, safetensors save/load in PEFT/diffusers naming with strict key checks
    flow        shifted sigma schedules, Euler step, the Flow-GRPO SDE step with its Gaussian log-prob,
                the KL between two policies' step means, x0 prediction, classifier-free guidance
    tokens      temperature/top-k sampling that returns token log-probs, re-scoring, CFG on logits
    matching    linear_assignment: batched Hungarian matching (C++ on CPU, a CUDA kernel on GPU)
    image io    load (EXIF, RGB), resize/centre-crop to multiples of 16, tensors in [-1, 1], grids

Every method file says "requires common.py next to it": copying a method means copying two files.
Method-specific math (rewards, advantages, losses, model calls, conditioning) stays in the method files.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fnmatch
import hashlib
import inspect
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
import typing

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# runtime: config and command line


def _field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each `name: type = default` line of a dataclass: its --help text."""
    source = inspect.getsource(cls)
    comments = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = lines[tok.start[0] - 1]
            name = line.split(":", 1)[0].strip()
            if name.isidentifier() and ":" in line[: tok.start[1]]:
                comments[name] = tok.string.lstrip("#").strip()
    return comments


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag-name per dataclass field (dashes on the command line, underscores in code), help from its comment."""
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults reproduce the README run)")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, flag = hints[f.name], "--" + f.name.replace("_", "-")
        help_text = f"{comments.get(f.name, '')} (default: {default})"
        args = typing.get_args(kind)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) in (list, tuple):
            group.add_argument(flag, nargs="*", type=args[0], default=default, metavar=f.name.upper(), help=help_text)
        else:
            if type(None) in args:  # Optional[X]: the flag takes an X
                kind = next(a for a in args if a is not type(None))
            group.add_argument(flag, type=kind, default=default, metavar=f.name.upper(), help=help_text)


def config_from_args(cls, args: argparse.Namespace):
    """Builds the dataclass from parsed arguments (lists become tuples where the field is a tuple)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is tuple:
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


# -----------------------------------------------------------------------------
# runtime: torchrun, seeding, dtype


@dataclasses.dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_dist(device: str = "auto") -> Dist:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain `python x.py` is the same code path with world size 1."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, dev)


def cleanup_dist() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every other rank stays quiet)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices). Callers pass seed + rank so ranks draw different noise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, prompt, ...): noise that a resumed run reproduces exactly."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def pick_dtype(device: torch.device, requested: str = "auto") -> tuple[torch.dtype, str]:
    """The compute dtype and the reason for it (printed by the caller, so nobody is surprised by a default)."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {requested!r}")
        return names[requested], f"{requested} requested"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16: the GPU supports it (the methods' papers train FLUX/SD3/LLMs in bf16)"
    if device.type == "cuda":
        return torch.float16, "fp16: the GPU has no bf16"
    return torch.float32, "fp32: on CPU bf16 matrix products are slow and log-prob ratios need the precision"


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages logged metrics over ranks (NaN-safe: a rank without a value sends NaN and is left out)."""
    if not dist.is_initialized() or not values:
        return dict(values)
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    finite = torch.isfinite(t)
    sums, counts = torch.where(finite, t, 0.0), finite.double()
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    return {k: (s / c).item() if c > 0 else float("nan") for k, s, c in zip(values, sums, counts)}


def peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def synchronize(device: torch.device) -> None:
    """Only for timing at step edges: never call it inside a sampling loop."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# runtime: atomic save, checkpoint and resume


def atomic_save(path: str, write) -> None:
    """write(tmp_path), fsync, rename: a crash or a full disk mid-write leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    atomic_save(path, write)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Called by every rank: gathers each rank's RNG states, then rank 0 writes one file atomically.

    `state` holds what the method needs to resume (step, trainable weights, optimizer state, config, ...)."""
    rng = [_rng_state()]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, _rng_state())
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_save(path, lambda tmp: torch.save({**state, "rng": rng}, tmp))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str) -> dict:
    """Loads a checkpoint written by save_checkpoint and restores this rank's RNG states."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from e
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(state["rng"]) != world:
        print0(f"note: {path} was written by {len(state['rng'])} ranks, this run has {world}; "
               "weights and optimizer resume, random streams start afresh")
    else:
        _set_rng_state(state["rng"][rank])
    return state


class MetricLog:
    """One rank-0 line per step (fields in the order given, `|` between) and one JSON object per step."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.path, self.total, self.enabled = os.path.join(out_dir, "metrics.jsonl"), total_steps, enabled
        self.start_step, self.t0 = start_step, time.time()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step - 1)
        fields = [f"step {step + 1}/{self.total} ({100 * (step + 1) / self.total:.0f}%)"]
        fields += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        print(" | ".join(fields + [f"eta {int(eta) // 60}m{int(eta) % 60:02d}s"]), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step + 1, **metrics}) + "\n")


# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) * B A x, with B = 0 at init so training starts from the base model.

    Names follow PEFT (lora_A: (rank, in), lora_B: (out, rank)) so saved keys are `<module>.lora_A.weight`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, init: str = "kaiming",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank = base, rank
        self.alpha = float(alpha if alpha is not None else rank)  # no alpha (XLabs, UMO): scale 1
        self.enabled, self.merged = True, False
        base.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        if init == "gaussian":  # flow_grpo / PEFT "gaussian": A ~ N(0, 1/rank)
            nn.init.normal_(self.lora_A, std=1.0 / rank)
        elif init == "kaiming":  # PEFT's default, the same as nn.Linear's own init
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', got {init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled and not self.merged:
            # low-rank path in the activations' dtype: no fp32 copy of a large activation
            y = y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def _matches(name: str, pattern: str) -> bool:
    # PEFT-style suffix match ("to_q" hits "blocks.3.attn.to_q") or a glob over the full name
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float | None = None,
                init: str = "kaiming", dtype: torch.dtype = torch.float32) -> list[str]:
    """Wraps every nn.Linear whose name matches a target pattern; freezes nothing else (the caller does).

    Returns the wrapped module names. A pattern that matches no Linear is an error, not a silent no-op."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(_matches(n, t) for t in targets)]
    unused = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unused:
        raise ValueError(f"LoRA target patterns matched no nn.Linear: {unused}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, init, dtype))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model with adapters off: Flow-GRPO's KL reference policy, with no copy of the weights."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise RuntimeError("lora_disabled needs unmerged adapters: call unmerge_lora(model) first")
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, p in zip(modules, previous):
            m.enabled = p


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """PEFT/diffusers names: `<prefix><module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank)."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{prefix}{name}.lora_A.weight"] = m.lora_A.detach()
        sd[f"{prefix}{name}.lora_B.weight"] = m.lora_B.detach()
    return sd


def save_lora(model: nn.Module, path: str, prefix: str = "transformer.", dtype: torch.dtype | None = None) -> None:
    """Writes the adapters atomically as safetensors that diffusers' `load_lora_weights` reads.

    Rank and alpha go into the metadata the way diffusers writes them (`lora_adapter_metadata`, LoraConfig
    kwargs under the component prefix); modules with another rank/alpha go into rank_pattern/alpha_pattern."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_lora: the model has no LoRA modules")
    ranks = [m.rank for m in modules.values()]
    alphas = [m.alpha for m in modules.values()]
    r, a = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    config = {"r": r, "lora_alpha": a, "target_modules": sorted(modules),
              "rank_pattern": {n: m.rank for n, m in modules.items() if m.rank != r},
              "alpha_pattern": {n: m.alpha for n, m in modules.items() if m.alpha != a}}
    component = prefix.rstrip(".")
    packed = {f"{component}.{k}" if component else k: v for k, v in config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}
    sd = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in lora_state_dict(model, prefix).items()}
    atomic_save(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


def _normalise_lora_key(key: str, prefix: str) -> str:
    # PEFT's in-memory names carry the adapter name (`.lora_A.default.weight`) and `base_model.model.`
    key = key.replace(".default.weight", ".weight")
    for p in (prefix, "base_model.model."):
        if p and key.startswith(p):
            key = key[len(p):]
    return key


def load_lora(model: nn.Module, source: str | dict, prefix: str = "transformer.", strict: bool = True) -> list[str]:
    """Loads adapters into a model that already has matching LoRA modules (inject_lora first).

    Missing keys, unexpected keys and shape mismatches are listed by name and refused unless strict=False,
    in which case the caller gets the list back. The public UMO/UAE code loads with strict=False and silently
    runs the base model when nothing matches; we never do. Rank/alpha come from the file's metadata."""
    from safetensors import safe_open

    where, config = "state dict", {}
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"LoRA file not found: {source}")
        where = source
        with safe_open(source, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        packed = json.loads(meta.get("lora_adapter_metadata", "{}"))
        component = prefix.rstrip(".")
        config = {k[len(component) + 1:] if component and k.startswith(component + ".") else k: v
                  for k, v in packed.items()}
    else:
        sd = source
    sd = {_normalise_lora_key(k, prefix): v for k, v in sd.items()}
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if keys]
    if problems and (strict or mismatched):
        raise ValueError(f"LoRA keys of {where} do not match the model: " + "; ".join(problems))
    modules = lora_modules(model)
    with torch.no_grad():
        for name, m in modules.items():
            if f"{name}.lora_A.weight" in sd:
                m.lora_A.copy_(sd[f"{name}.lora_A.weight"])
                m.lora_B.copy_(sd[f"{name}.lora_B.weight"])
            if "lora_alpha" in config:
                m.alpha = float(config.get("alpha_pattern", {}).get(name, config["lora_alpha"]))
    return missing + unexpected


# -----------------------------------------------------------------------------
# flow matching: schedules, Euler and the Flow-GRPO SDE step
# Convention (diffusers FLUX/SD3): x_sigma = (1 - sigma) x0 + sigma noise, velocity v = noise - x0, and
# sampling runs sigma from 1 (noise) down to 0 (data).


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: mu linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def sigma_schedule(num_steps: int, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """(num_steps + 1,) sigmas from 1 to 0: linspace(1, 1/N, N) shifted, then 0 (the FLUX/BAGEL/SD3 pipelines).

    A static shift s maps sigma -> s sigma / (1 + (s - 1) sigma); a FLUX mu maps it -> e^mu / (e^mu + 1/sigma - 1)."""
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return x + (sigma_next - sigma) * v


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x - sigma * v


def _per_sample(s, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as a float32 tensor that broadcasts against x of any rank."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *[1] * (x.ndim - 1)) if s.ndim else s


def sde_step_with_logprob(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float,
                          prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """One Flow-GRPO SDE step (arXiv 2505.05470; flow_grpo sd3_sde_with_logprob.py), all in fp32.

    s_t = a sqrt(sigma / (1 - sigma)), mu = x + dt [v + s_t^2 / (2 sigma) (x + (1 - sigma) v)], std = s_t sqrt(-dt),
    dt = sigma_next - sigma < 0. At sigma = 1 the division uses sigma_next instead (flow_grpo uses sigmas[1],
    which is sigma_next at the first step). Returns (x_next, log_prob (B,), mean, s_t): the log-prob is the
    Gaussian log-density of the detached sample averaged (not summed) over all non-batch dims, so gradients
    flow only through the mean. Pass prev_sample to re-score a stored transition. noise_level 0 is the Euler step."""
    x, v = x.float(), v.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    safe = torch.where(sigma >= 1.0, sigma_next, sigma)
    std_dev_t = noise_level * torch.sqrt(sigma / (1.0 - safe))
    mean = x + dt * (v + std_dev_t**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v))
    std = std_dev_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().float()
    log_prob = (-((prev_sample - mean) ** 2) / (2.0 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std_dev_t


def step_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL penalty per sample: mean over dims of (mu_theta - mu_ref)^2 / (2 s_t^2).

    The exact Gaussian KL would sum over dims and divide by s_t^2 (-dt); flow_grpo drops -dt and averages
    (author, issue #22: it stops late small-dt steps from being under-weighted; beta is scaled to match)."""
    sq = (mean.float() - mean_ref.float()) ** 2 / (2.0 * std_dev_t**2)
    return sq.mean(dim=tuple(range(1, mean.ndim)))


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u). Run both branches as one batch [uncond; cond]."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_split(out: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided output from a batched forward whose first half is unconditional and second half conditional."""
    v_uncond, v_cond = out.chunk(2)
    return cfg_combine(v_uncond, v_cond, scale)


def sde_window(num_steps: int, window: int, generator: torch.Generator | None = None) -> range:
    """Steps that use the SDE (the rest are ODE): Flow-GRPO-Fast/MixGRPO's random window in the high-noise half."""
    if window >= num_steps:
        return range(num_steps)
    start = int(torch.randint(0, max(1, num_steps // 2 - window + 1), (1,), generator=generator))
    return range(start, start + window)


# -----------------------------------------------------------------------------
# token sampling with log-probs (autoregressive text and image tokens)


def _process_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row of logits (..., V); returns (tokens, log-probs under the distribution sampled).

    The log-prob is that of the temperature/top-k distribution actually sampled from, which is what a policy
    gradient needs; token_logprobs re-scores with the same processing, so the first ratio is exactly 1."""
    logp = _process_logits(logits, temperature, top_k)
    flat = logp.reshape(-1, logp.shape[-1])
    tokens = torch.multinomial(flat.exp(), 1, generator=generator).reshape(logp.shape[:-1])
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   top_k: int | None = None) -> torch.Tensor:
    """Log-probs of given tokens (...,) under logits (..., V) processed exactly as in sample_tokens."""
    return _process_logits(logits, temperature, top_k).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on logits (Janus-Pro): uncond + w (cond - uncond)."""
    return uncond + scale * (cond - uncond)


# -----------------------------------------------------------------------------
# image io


def load_image(path: str):
    """PIL RGB image with the EXIF orientation applied; a missing or corrupt file is named in the error."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def resize_center_crop(img, long_side: int | None = None, size: tuple[int, int] | None = None, multiple: int = 16):
    """Resizes so the long side is `long_side` (or covers `size` = (W, H)), then centre-crops to multiples of 16."""
    from PIL import Image

    w, h = img.size
    if size is not None:
        scale = max(size[0] / w, size[1] / h)
        target_w, target_h = size
    else:
        scale = (long_side or max(w, h)) / max(w, h)
        target_w, target_h = round(w * scale), round(h * scale)
    target_w, target_h = max(multiple, target_w // multiple * multiple), max(multiple, target_h // multiple * multiple)
    new_w, new_h = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return img.crop((left, top, left + target_w, top + target_h))


def pil_to_tensor(img) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_pil(t: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL image."""
    from PIL import Image

    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """Saves (B, 3, H, W) images in [-1, 1] as one PNG grid, atomically."""
    b, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = images.new_full((3, ncol * h, nrow * w), -1.0)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    atomic_save(path, lambda tmp: tensor_to_pil(grid).save(tmp, format="PNG"))


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """Reads a JSONL data file; a bad line or a missing field is reported with the file and line number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{i}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no data lines")
    return rows
