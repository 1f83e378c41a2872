"""
common.py: the code that several method files share exactly, tested once in tests/.

    runtime     dataclass config -> argparse, torchrun detection, print0, seeding, dtype choice, atomic save,
                checkpoint/resume, one-line-per-step metric log
    LoRA        LoRALinear, injection by module-name pattern, adapter-off context (the KL reference policy),
                merge/unmerge, safetensors save/load in PEFT/diffusers naming with strict key checks
    flow        shifted sigma schedules, Euler step, the Flow-GRPO SDE step with its Gaussian log-prob,
                the KL between two policies' step means, x0 prediction, classifier-free guidance
    FLUX        2x2 latent packing, RoPE position ids, the velocity call with reference tokens, prompt encoding,
                VAE encode/decode with the config's shift and scale (umo.py and psr.py)
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
import threading
import time
import tokenize
import typing
from pathlib import Path

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


def given_fields(cls, parser: argparse.ArgumentParser, argv: list[str] | None) -> frozenset[str]:
    """The fields of `cls` whose flag appears in `argv`: argparse only fills an attribute that the namespace lacks
    or that a parsed flag sets, so the ones still holding the marker were not given."""
    unset = object()
    marked = argparse.Namespace(**{f.name: unset for f in dataclasses.fields(cls)})
    namespace = parser.parse_args(argv, namespace=marked)
    return frozenset(f.name for f in dataclasses.fields(cls) if getattr(namespace, f.name) is not unset)


def apply_toy_settings(cfg, settings: dict, note: str, given: frozenset[str] = frozenset()):
    """The embedded default's config: each of `settings` replaces its field unless the field is in `given` (the
    flags typed on the command line, see given_fields) or differs from the dataclass default (set in Python).
    Prints `note` and every replacement."""
    defaults = type(cfg)()
    changes = {k: v for k, v in settings.items() if k not in given and getattr(cfg, k) == getattr(defaults, k)}
    print0(note + (": " + ", ".join(f"{k} {getattr(cfg, k)} -> {v}" for k, v in changes.items()) if changes else ""))
    return dataclasses.replace(cfg, **changes)


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
    """Every rank waits for the others before the group is torn down: a rank that destroys a gloo group while its
    peer still talks to it can abort the peer ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
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


def toy_cpu_threads(device: torch.device) -> None:
    """The embedded default on CPU runs one torch thread per process unless OMP_NUM_THREADS is set: its matrices
    are tiny, and OpenMP workers spinning against other processes on shared cores made toy runs 5-40x slower."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        print0("one CPU thread per process for the tiny toy models (set OMP_NUM_THREADS to choose)")


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


def average_gradients(params: list[torch.Tensor]) -> None:
    """Data parallelism over the trainable (LoRA) parameters: one all-reduce of all gradients, flattened.

    Used instead of wrapping a 12B model in DDP when only adapters train and a step runs several forwards
    (no-grad sampling, then gradient steps); call it after the last backward, before clipping."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()


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


def save_lora_training(path: str, model: nn.Module, optimizer, step: int, config: dict) -> None:
    """Checkpoint of an adapter run (step, LoRA weights, optimizer, config, RNG); every rank calls it.

    Non-finite adapters are refused, so the previous checkpoint stays the last good one."""
    if not all(torch.isfinite(p).all() for p in lora_parameters(model)):
        raise FloatingPointError(f"non-finite LoRA weights at step {step}: not overwriting {path}")
    save_checkpoint(path, {"step": step, "lora": lora_state_dict(model), "optimizer": optimizer.state_dict(),
                           "config": config})


def resume_lora_training(path: str, model: nn.Module, optimizer) -> int:
    """Restores what save_lora_training wrote (strict LoRA keys, optimizer, RNG) and returns the step to go on from."""
    state = load_checkpoint(path)
    load_lora(model, state["lora"], prefix="")
    optimizer.load_state_dict(state["optimizer"])
    print0(f"resumed from {path} at step {state['step']}")
    return state["step"]


class MetricLog:
    """One rank-0 line per step (fields in the order given, `|` between) and one JSON object per step."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.path, self.total, self.enabled = os.path.join(out_dir, "metrics.jsonl"), total_steps, enabled
        self.start_step, self.t0 = start_step, time.time()
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if start_step == 0:  # a fresh run starts a fresh file; a resumed one keeps the steps before it
                open(self.path, "w").close()
            else:
                self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        """Drops lines logged after the checkpoint a run resumes from (they will be logged again)."""
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(self.path, "w") as f:
                f.writelines(kept)

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
# FLUX latents and calls, shared exactly by umo.py (UNO on FLUX.1-dev) and psr.py (FLUX.1 Kontext)
# Reference images enter FLUX as extra image tokens after the target's; each method places them in RoPE space with
# its own offsets (UNO: past the target along rows/columns; Kontext: frame index 1, 2, ...) built from flux_ids.


def flux_pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's 2x2 patch tokens, row-major."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def flux_unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of flux_pack; h, w are latent (not token) sizes."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_ids(h: int, w: int, frame: int = 0, row: int = 0, col: int = 0) -> torch.Tensor:
    """RoPE position ids (h*w, 3) of an h x w token grid, row-major: (frame, row + i, col + j)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = frame
    ids[..., 1] = torch.arange(h)[:, None] + row
    ids[..., 2] = torch.arange(w)[None, :] + col
    return ids.reshape(h * w, 3)


def flux_velocity(transformer: nn.Module, x: torch.Tensor, refs: torch.Tensor, text: torch.Tensor,
                  pooled: torch.Tensor, img_ids: torch.Tensor, sigma: torch.Tensor, guidance: float) -> torch.Tensor:
    """FLUX velocity (B, L, 4C) in fp32 for target tokens x (B, L, 4C) at sigma (B,).

    refs (B, L_ref, 4C) are clean reference tokens appended after the target (L_ref may be 0); they share the
    target's timestep, guidance and blocks, and their outputs are cut off. img_ids (L + L_ref, 3) place both.
    `guidance` feeds FLUX-dev/Kontext's distilled guidance embedding: no CFG batch is needed."""
    dtype = transformer.dtype
    b, n = x.shape[:2]
    out = transformer(hidden_states=torch.cat([x.to(dtype), refs.to(dtype)], dim=1), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=sigma.to(dtype), img_ids=img_ids.to(x.device, dtype),
                      txt_ids=x.new_zeros(text.shape[1], 3, dtype=dtype),
                      guidance=x.new_full((b,), guidance, dtype=dtype), return_dict=False)[0]
    return out[:, :n].float()


@torch.no_grad()
def encode_flux_prompts(prompts: list[str], t5: nn.Module, t5_tokenizer, clip: nn.Module, clip_tokenizer,
                        max_length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> T5 token embeddings (B, max_length, D_t5) and the CLIP pooled vector (B, D_clip), as diffusers'
    FluxPipeline.encode_prompt (T5 padded to max_length, CLIP to 77). Empty prompts are refused."""
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"empty prompt at batch position(s) {empty}: every sample needs a text prompt")
    device = next(t5.parameters()).device
    ids = t5_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
    text = t5(ids).last_hidden_state
    ids = clip_tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    pooled = clip(ids).pooler_output
    return text.to(dtype), pooled.to(dtype)


def vae_encode(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f): the posterior mean (deterministic),
    shifted and scaled by the VAE's config as FLUX and SD3 pipelines do."""
    mean = vae.encode(images.to(vae.dtype)).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0
    return (mean - shift) * vae.config.scaling_factor


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images (B, 3, H, W) clamped to [-1, 1]; differentiable."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(z).sample.clamp(-1, 1)


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
    # Exponential race (the Gumbel-max trick): argmax_i p_i / E_i with E_i ~ Exp(1) is i with probability p_i. Unlike
    # torch.multinomial, which validates its input with a host read, it never syncs, so it can run in a CUDA graph.
    # The clamp keeps a zero draw from turning a masked (-inf) token into NaN.
    exponential = torch.empty_like(logp).exponential_(generator=generator).clamp_min_(torch.finfo(logp.dtype).tiny)
    tokens = (logp - exponential.log()).argmax(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   top_k: int | None = None) -> torch.Tensor:
    """Log-probs of given tokens (...,) under logits (..., V) processed exactly as in sample_tokens."""
    return _process_logits(logits, temperature, top_k).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on logits (Janus-Pro): uncond + w (cond - uncond)."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def decode_tokens(lm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, num_steps: int,
                  step, generator: torch.Generator | None = None, cuda_graph: bool = False,
                  stopped: torch.Tensor | None = None, check_every: int = 32) -> None:
    """Token-by-token decoding with a static KV cache, the loop behind image-token and caption sampling.

    lm: a transformers decoder called with inputs_embeds / attention_mask / position_ids / past_key_values
    (LlamaModel in Janus, Qwen2_5_VLTextModel). embeds (B, L, D): the left-padded prefix; mask (B, L): 1 on real
    tokens; positions (B, L), or (3, B, L) for M-RoPE: each new token takes the last position + 1.
    step(hidden, index) samples token `index` (a 0-dim device tensor) from the last hidden states (B, D), writes it
    into the caller's buffers with index ops (no host reads) and returns the next input embeddings (B, 1, D). It
    runs num_steps times; the model runs on the prefix and then num_steps - 1 times on one token.

    Every decode step has the same shapes (a cache of L + num_steps - 1 slots, a boolean mask over all of them, the
    counters on the device), so with cuda_graph=True one step is captured as a CUDA graph and replayed: an eager
    7B step launches about a thousand small kernels and is bound by their launch cost, not by memory bandwidth.
    The graph draws from `generator` (registered with the graph) exactly as the eager loop does.

    stopped: an optional (B,) bool buffer that step sets in place for rows that ended (EOS); every check_every
    steps the loop reads it once and returns when every row has stopped, leaving later slots as the caller filled
    them. Without it nothing is read back to the host."""
    from transformers import StaticCache

    batch, length = mask.shape
    total = length + num_steps - 1
    device = embeds.device
    cache = StaticCache(config=lm.config, max_cache_len=total)
    slots = torch.arange(total, device=device)
    valid = F.pad(mask.bool(), (0, total - length))  # (B, total): the real prefix tokens
    query = slots[:length, None]
    # prefix (B, 1, L, total): causal, padding hidden; a padding query sees itself so no softmax row is empty
    prefix_mask = (slots <= query) & (valid[:, None, :] | (slots == query))
    hidden = lm(inputs_embeds=embeds, attention_mask=prefix_mask[:, None], position_ids=positions,
                past_key_values=cache, use_cache=True).last_hidden_state[:, -1].clone()
    step_mask = valid[:, None, None, :].clone()  # (B, 1, 1, total): grows by one slot per step
    position = positions[..., -1:].clone()
    index = torch.zeros((), dtype=torch.long, device=device)
    slot = torch.full((1,), length, dtype=torch.long, device=device)

    def advance():
        inputs = step(hidden, index).to(embeds.dtype)
        step_mask.index_fill_(-1, slot, True)
        position.add_(1)
        out = lm(inputs_embeds=inputs, attention_mask=step_mask, position_ids=position, past_key_values=cache,
                 use_cache=True).last_hidden_state
        hidden.copy_(out[:, -1])
        index.add_(1)
        slot.add_(1)

    def all_stopped(steps_done: int) -> bool:  # the loop's only host read, once every check_every steps
        return stopped is not None and steps_done % check_every == 0 and bool(stopped.all())

    warmup = 2  # eager steps before capture (lazy inits, cuBLAS workspaces); they are real steps
    if not (cuda_graph and device.type == "cuda" and num_steps - 1 > warmup):
        for done in range(1, num_steps):
            advance()
            if all_stopped(done):
                return
    else:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                advance()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):  # records one step without running it
            advance()
        for done in range(warmup + 1, num_steps):
            graph.replay()
            if all_stopped(done):
                return
    step(hidden, index)


# -----------------------------------------------------------------------------
# matching: batched linear assignment with scipy.optimize.linear_sum_assignment's semantics
# Algorithm: successive shortest augmenting paths with dual potentials (Crouse 2016), the one behind scipy's
# rectangular_lsap. Backends: a C++ kernel (g++, one ctypes call per batch), a CUDA kernel (nvcc, one warp per
# problem) and a Python loop over scipy. The kernels are compiled on first use and cached on disk.

_CPU_SRC = r"""
#include <algorithm>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
enum { kOk = 0, kInvalid = 1, kInfeasible = 2, kNoMemory = 3 };

// Scratch space reused across the problems of a batch, so the loop does not allocate.
struct Solver {
  std::vector<double> c, u, v, dist;
  std::vector<int64_t> path, col4row, row4col, order;

  // Solves one N x M problem (row-major `a`) and writes scipy-style (rows ascending, cols) into rows/cols.
  int solve(const double* a, int64_t N, int64_t M, bool maximize, int64_t* rows, int64_t* cols) {
    const bool tall = N > M;  // work on the transpose so that rows n <= columns m, like scipy
    const int64_t n = tall ? M : N, m = tall ? N : M;
    c.resize(n * m); u.assign(n, 0.0); v.assign(m, 0.0); dist.resize(m);
    path.resize(m); col4row.assign(n, -1); row4col.assign(m, -1); order.resize(m);
    // +inf forbids a pair; NaN or -inf (after the negation for maximize) is an error, as in scipy.
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < M; ++j) {
        const double x = maximize ? -a[i * M + j] : a[i * M + j];
        if (x != x || x == -kInf) return kInvalid;
        c[tall ? j * m + i : i * m + j] = x;
      }
    for (int64_t cur = 0; cur < n; ++cur) {
      // Dijkstra over reduced costs from the free row `cur`. Columns not yet reached are order[0, left); reached
      // ones pile up in order[left, m). Scanning columns from m-1 down to 0 (with swap-removal) reproduces scipy's
      // tie-breaking exactly, so results equal scipy's permutation, not only its total.
      for (int64_t k = 0; k < m; ++k) order[k] = m - 1 - k;
      std::fill(dist.begin(), dist.end(), kInf);
      int64_t left = m, i = cur, sink = -1;
      double min_val = 0.0;
      while (sink < 0) {
        const double* ci = &c[i * m];
        const double ui = u[i];
        double lowest = kInf;
        int64_t best = -1;
        for (int64_t k = 0; k < left; ++k) {
          const int64_t j = order[k];
          const double r = min_val + ci[j] - ui - v[j];
          if (r < dist[j]) { dist[j] = r; path[j] = i; }
          // On a tie prefer a free column: it ends the search early (matters for integer costs).
          if (dist[j] < lowest || (dist[j] == lowest && row4col[j] < 0)) { lowest = dist[j]; best = k; }
        }
        if (lowest == kInf) return kInfeasible;  // row i reaches no further column through finite entries
        min_val = lowest;
        const int64_t j = order[best];
        order[best] = order[--left];
        order[left] = j;
        if (row4col[j] < 0) sink = j; else i = row4col[j];
      }
      // Dual update keeps reduced costs >= 0. Every reached column j other than the sink was entered from the row
      // matched to it, so that row's potential moves by the same amount as v[j].
      u[cur] += min_val;
      for (int64_t k = left; k < m; ++k) {
        const int64_t j = order[k];
        const double delta = min_val - dist[j];
        v[j] -= delta;
        if (j != sink) u[row4col[j]] += delta;
      }
      // Flip the matching along the path sink -> ... -> cur.
      for (int64_t j = sink;;) {
        const int64_t r = path[j];
        row4col[j] = r;
        std::swap(col4row[r], j);
        if (r == cur) break;
      }
    }
    if (!tall) {
      for (int64_t i = 0; i < n; ++i) { rows[i] = i; cols[i] = col4row[i]; }
    } else {  // working columns are the original rows: listing them in order sorts the output rows
      for (int64_t j = 0, k = 0; j < m; ++j)
        if (row4col[j] >= 0) { rows[k] = j; cols[k] = row4col[j]; ++k; }
    }
    return kOk;
  }
};

}  // namespace

// Solves B problems of shape N x M (contiguous float64) one after another: the GIL is released (ctypes), and at
// 1-10 us per problem a thread pool would mostly fight torch's OpenMP workers for the cores. bad[0] / bad[1]
// receive the index of the first problem with invalid entries / without a complete matching (-1 if none; at most
// one is set: the first bad problem). Returns 0, or kNoMemory when scratch allocation failed.
extern "C" int lsap_cpu(const double* cost, int64_t B, int64_t N, int64_t M, int maximize, int64_t* rows,
                        int64_t* cols, int64_t* bad) {
  const int64_t n = std::min(N, M);
  bad[0] = bad[1] = -1;
  try {
    Solver s;
    for (int64_t b = 0; b < B; ++b) {
      const int st = s.solve(cost + b * N * M, N, M, maximize != 0, rows + b * n, cols + b * n);
      if (st != kOk) { bad[st - 1] = b; return 0; }
    }
  } catch (const std::bad_alloc&) { return kNoMemory; }
  return 0;
}
"""

_CUDA_SRC = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#define FULL 0xffffffffu
#define NO_COLUMN 0x7fffffff

// Reads element k of the input in its own dtype (codes match _DTYPE_CODE in Python); the cost is staged once, so a
// runtime switch here is cheaper than one kernel instantiation per dtype.
__device__ __forceinline__ double load(const void* p, long long k, int dtype) {
  switch (dtype) {
    case 0: return static_cast<const double*>(p)[k];
    case 1: return static_cast<const float*>(p)[k];
    case 2: return __half2float(static_cast<const __half*>(p)[k]);
    case 3: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[k]);
    case 4: return (double)static_cast<const long long*>(p)[k];
    case 5: return static_cast<const int*>(p)[k];
    case 6: return static_cast<const short*>(p)[k];
    case 7: return static_cast<const signed char*>(p)[k];
    default: return static_cast<const unsigned char*>(p)[k];  // uint8 and bool
  }
}

// Per-lane state lives in registers: lane L owns columns (and rows) L and L + 32, i.e. slot s holds index L + 32 s.
// x[slot] with a run-time slot would spill the array to local memory, so select with unrolled compares instead.
template <int S, typename T> __device__ __forceinline__ T pick(const T (&x)[S], int slot) {
  T r = x[0];
#pragma unroll
  for (int s = 1; s < S; ++s) if (slot == s) r = x[s];
  return r;
}

// One warp solves one problem; S = 1 handles up to 32 columns, S = 2 up to 64. Every branch that contains a shuffle
// depends only on warp-uniform values (b, i, j, best, key), so all 32 lanes reach each *_sync call.
template <int S>
__global__ void __launch_bounds__(128) lsap_warp(const void* cost, int dtype, long long B, int N, int M, long long sb,
                                                 long long sr, long long sc, int maximize, long long* out,
                                                 unsigned long long* err) {
  extern __shared__ double smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long b = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
  if (b >= B) return;  // whole warp leaves together
  const bool tall = N > M;  // solve the transpose so that rows n <= columns m
  const int n = tall ? M : N, m = tall ? N : M;
  double* C = smem + (size_t)warp * n * m;

  // Stage the problem in shared memory as double in working orientation (negated for maximize), checking entries.
  bool bad = false;
  for (int e = lane; e < N * M; e += 32) {
    const int r = e / M, c = e - r * M;
    double x = load(cost, b * sb + r * sr + c * sc, dtype);
    if (maximize) x = -x;
    bad |= (x != x) || (x == -CUDART_INF);
    C[tall ? c * m + r : r * m + c] = x;
  }
  if (__any_sync(FULL, bad)) {
    if (lane == 0) atomicMin(&err[0], (unsigned long long)b);
    return;
  }
  __syncwarp();  // C is written by all lanes and read by all lanes below

  double u[S], v[S], dist[S];
  int path[S], row4col[S], col4row[S];
  bool reached[S];
#pragma unroll
  for (int s = 0; s < S; ++s) { u[s] = 0; v[s] = 0; path[s] = 0; row4col[s] = -1; col4row[s] = -1; }

  for (int cur = 0; cur < n; ++cur) {
#pragma unroll
    for (int s = 0; s < S; ++s) { dist[s] = CUDART_INF; reached[s] = false; }
    unsigned long long rows_seen = 0;  // same value in every lane
    double min_val = 0;
    int i = cur, sink;
    while (true) {  // Dijkstra over reduced costs from the free row `cur`
      rows_seen |= 1ull << i;
      const double ui = __shfl_sync(FULL, pick<S>(u, i >> 5), i & 31);
      const double* Ci = C + i * m;
      // Lane-local best of the unreached columns, then a warp argmin. Order: smallest dist, then a free column
      // (ends the search; key bit 64 marks a matched one), then the smallest column index -- a total order, so the
      // xor-butterfly leaves the same winner in every lane.
      double best = CUDART_INF;
      int key = NO_COLUMN;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int j = lane + 32 * s;
        if (j < m && !reached[s]) {
          const double r = min_val + Ci[j] - ui - v[s];
          if (r < dist[s]) { dist[s] = r; path[s] = i; }
          const int k = (row4col[s] >= 0 ? 64 : 0) + j;
          if (dist[s] < best || (dist[s] == best && k < key)) { best = dist[s]; key = k; }
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const double ob = __shfl_xor_sync(FULL, best, off);
        const int ok = __shfl_xor_sync(FULL, key, off);
        if (ob < best || (ob == best && ok < key)) { best = ob; key = ok; }
      }
      if (best == CUDART_INF) {  // nothing more reachable through finite entries
        if (lane == 0) atomicMin(&err[1], (unsigned long long)b);
        return;
      }
      min_val = best;
      const int j = key & 63;
#pragma unroll
      for (int s = 0; s < S; ++s) if (lane + 32 * s == j) reached[s] = true;
      if (key < 64) { sink = j; break; }
      i = __shfl_sync(FULL, pick<S>(row4col, j >> 5), j & 31);
    }

    // Dual update: reached columns move by min_val - dist[j]; each reached row r != cur was entered through its
    // matched column col4row[r], whose dist is fetched from the lane owning that column.
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if (reached[s]) v[s] -= min_val - dist[s];
      const int r = lane + 32 * s, c = col4row[s];  // c = -1 (free row) reads lane 31 harmlessly; unused then
      double dc = __shfl_sync(FULL, dist[0], c & 31);
      if (S > 1) { const double d1 = __shfl_sync(FULL, dist[S - 1], c & 31); if (c >= 32) dc = d1; }
      if (r == cur) u[s] += min_val;
      else if (r < n && ((rows_seen >> r) & 1ull)) u[s] += min_val - dc;
    }
    // Flip the matching along the path sink -> ... -> cur; j and r are warp-uniform, owners update their slots.
    for (int j = sink;;) {
      const int r = __shfl_sync(FULL, pick<S>(path, j >> 5), j & 31);
      const int prev = __shfl_sync(FULL, pick<S>(col4row, r >> 5), r & 31);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        if (lane + 32 * s == j) row4col[s] = r;
        if (lane + 32 * s == r) col4row[s] = j;
      }
      j = prev;
      if (r == cur) break;
    }
  }

  long long* rows = out + b * n;
  long long* cols = out + B * n + b * n;
  if (!tall) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int r = lane + 32 * s;
      if (r < n) { rows[r] = r; cols[r] = col4row[s]; }
    }
  } else {  // working columns are the original rows: emit matched ones in index order so output rows are sorted
    int before = 0;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const bool matched = lane + 32 * s < m && row4col[s] >= 0;
      const unsigned mask = __ballot_sync(FULL, matched);
      if (matched) {
        const int k = before + __popc(mask & ((1u << lane) - 1));
        rows[k] = lane + 32 * s;
        cols[k] = row4col[s];
      }
      before += __popc(mask);
    }
  }
}

// Resets the error slots, launches, and reads them back: the one host sync of a call. out: int64 [rows (B*n) |
// cols (B*n) | err (2)], n = min(N, M) <= 64; strides in elements.
static cudaError_t solve_on_stream(const void* cost, int dtype, long long B, int N, int M, long long sb, long long sr,
                                   long long sc, int maximize, long long* out, cudaStream_t st, long long* pinned) {
  const int n = N < M ? N : M, m = N < M ? M : N;
  unsigned long long* err = (unsigned long long*)(out + 2 * B * n);
  cudaError_t e = cudaMemsetAsync(err, 0xff, 2 * sizeof(long long), st);  // all ones = none (-1 as int64)
  if (e != cudaSuccess) return e;
  // 4 warps per block keeps blocks small (all SMs busy at B ~ 1000) within the default 48 KB of shared memory.
  const int per_warp = n * m * (int)sizeof(double);
  const int warps = 4 * per_warp <= 48 * 1024 ? 4 : 48 * 1024 / per_warp;
  const long long blocks = (B + warps - 1) / warps;
  if (m <= 32)
    lsap_warp<1><<<blocks, 32 * warps, warps * per_warp, st>>>(cost, dtype, B, N, M, sb, sr, sc, maximize, out, err);
  else
    lsap_warp<2><<<blocks, 32 * warps, warps * per_warp, st>>>(cost, dtype, B, N, M, sb, sr, sc, maximize, out, err);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  if ((e = cudaMemcpyAsync(pinned, err, 2 * sizeof(long long), cudaMemcpyDeviceToHost, st)) != cudaSuccess) return e;
  return cudaStreamSynchronize(st);
}

// bad_host receives [first problem with invalid entries, first infeasible problem], -1 for none. Returns a cudaError_t.
extern "C" int lsap_cuda(const void* cost, int dtype, long long B, int N, int M, long long sb, long long sr,
                         long long sc, int maximize, long long* out, int device, void* stream, long long* bad_host) {
  // A page-locked buffer per host thread makes the 16-byte read-back a true async copy; calls are synchronous, so
  // another call cannot be using the same buffer.
  static thread_local long long* pinned = nullptr;
  // This runtime and torch's share the thread's current context: switch device only if needed (Python already made
  // `device` current), and switch back.
  int previous = device;
  cudaError_t e = cudaGetDevice(&previous);
  if (e == cudaSuccess && previous != device) e = cudaSetDevice(device);
  if (e == cudaSuccess && !pinned) e = cudaHostAlloc((void**)&pinned, 2 * sizeof(long long), cudaHostAllocPortable);
  if (e == cudaSuccess)
    e = solve_on_stream(cost, dtype, B, N, M, sb, sr, sc, maximize, out, (cudaStream_t)stream, pinned);
  if (previous != device) cudaSetDevice(previous);
  if (e != cudaSuccess) return (int)e;
  bad_host[0] = pinned[0];
  bad_host[1] = pinned[1];
  return 0;
}

extern "C" const char* lsap_cuda_error(int e) { return cudaGetErrorString((cudaError_t)e); }
"""

_GPU_MAX_SIDE = 64  # the CUDA kernel keeps 2 columns per lane in registers
_DTYPE_CODE = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4,
               torch.int32: 5, torch.int16: 6, torch.int8: 7, torch.uint8: 8, torch.bool: 8}
_libs = {}  # "cpu" or ("cuda", device index) -> ctypes.CDLL, or None when the kernel is unavailable
_libs_lock = threading.Lock()
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _compile(kind: str, compiler: str, src: str, suffix: str, flags: list) -> Path:
    """Compiles src into a shared library cached under a name hashing source, compiler and flags."""
    cache = Path(os.environ.get("NANOGENRL_CACHE") or Path.home() / ".cache" / "nanogenrl")
    tag = hashlib.sha256("\0".join([src, compiler, *flags]).encode()).hexdigest()[:16]
    out = cache / f"lsap_{kind}_{tag}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{out.name}.", suffix=".tmp")  # same dir: rename is atomic
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / f"lsap{suffix}").write_text(src)
            proc = subprocess.run([compiler, *flags, f"{d}/lsap{suffix}", "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        os.chmod(tmp, 0o755)  # mkstemp made it private
        os.replace(tmp, out)  # concurrent ranks each build their own temp file; the last rename wins harmlessly
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    what = "CPU" if kind == "cpu" else "CUDA " + kind.split("_")[1]
    print(f"linear_assignment: built the {what} assignment kernel in {time.perf_counter() - t0:.1f} s, cached at {out}",
          file=sys.stderr)
    return out


def _find_nvcc():
    try:  # imported lazily: slow, needs setuptools, and only matters for a first build
        from torch.utils.cpp_extension import CUDA_HOME as torch_cuda_home
    except ImportError:
        torch_cuda_home = None
    for home in (os.environ.get("CUDA_HOME"), torch_cuda_home):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _build_cuda_kernel(capability: tuple) -> Path:
    nvcc = _find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found ($CUDA_HOME/bin, torch's CUDA_HOME, PATH)")
    arch = f"{capability[0]}{capability[1]}"
    flags = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return _compile(f"cuda_sm{arch}", nvcc, _CUDA_SRC, ".cu", flags)


def _load(key, device=None):
    """Builds and loads a kernel once per process; on failure prints one line and returns None (fallback)."""
    with _libs_lock:
        if key in _libs:
            return _libs[key]
        lib = None
        try:
            if key == "cpu":
                gxx = shutil.which("g++")
                if gxx is None:
                    raise RuntimeError("no C++ compiler: g++ is not on PATH")
                flags = ["-O3", "-shared", "-fPIC", "-std=c++17"]  # no -march=native: caches get shared
                lib = ctypes.CDLL(str(_compile("cpu", gxx, _CPU_SRC, ".cpp", flags)))
                lib.lsap_cpu.argtypes = [_ptr, _i64, _i64, _i64, ctypes.c_int, _ptr, _ptr, _ptr]
            else:
                lib = ctypes.CDLL(str(_build_cuda_kernel(torch.cuda.get_device_capability(device))))
                lib.lsap_cuda.argtypes = [_ptr, ctypes.c_int, _i64, ctypes.c_int, ctypes.c_int, _i64, _i64, _i64,
                                          ctypes.c_int, _ptr, ctypes.c_int, _ptr, _ptr]
                lib.lsap_cuda_error.restype = ctypes.c_char_p
        except (RuntimeError, OSError) as e:
            what = "CPU" if key == "cpu" else "CUDA"
            instead = "a Python loop over scipy" if key == "cpu" else "the host (CPU) path"
            print(f"linear_assignment: {what} kernel unavailable ({e}); using {instead} instead", file=sys.stderr)
        _libs[key] = lib
        return lib


def _backend(device: torch.device):
    if os.environ.get("NANOGENRL_NO_KERNEL", "0") not in ("", "0"):
        return "scipy", None
    if device.type == "cuda":
        lib = _libs[("cuda", device.index)] if ("cuda", device.index) in _libs else _load(("cuda", device.index), device)
        if lib is not None:
            return "cuda-kernel", lib
    lib = _libs["cpu"] if "cpu" in _libs else _load("cpu")
    return ("cpu-kernel", lib) if lib is not None else ("scipy", None)


def assignment_backend(device) -> str:
    """Backend linear_assignment uses on `device` ("cuda-kernel", "cpu-kernel" or "scipy"); builds the kernel if
    needed. On CUDA, problems with a side > 64 still go to the host backend."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _backend(device)[0]


def _raise_first_bad(invalid: int, infeasible: int, batched: bool):
    if invalid < 0 and infeasible < 0:
        return
    first = invalid if infeasible < 0 or 0 <= invalid < infeasible else infeasible
    where = f"cost[{first}]" if batched else "cost"
    if first == invalid:
        raise ValueError(f"linear_assignment: {where} contains NaN or -inf (invalid entries)")
    raise ValueError(f"linear_assignment: {where} is infeasible (no complete matching over finite entries)")


def _solve_host(lib, a: np.ndarray, maximize: bool, batched: bool):
    B, N, M = a.shape
    n = min(N, M)
    rows, cols = np.empty((B, n), np.int64), np.empty((B, n), np.int64)
    if lib is None:  # scipy fallback, one call per problem
        from scipy.optimize import linear_sum_assignment
        for b in range(B):
            try:
                rows[b], cols[b] = linear_sum_assignment(a[b], maximize=maximize)
            except ValueError as e:  # scipy stops at the first bad problem, like the kernels
                infeasible = "infeasible" in str(e)
                _raise_first_bad(-1 if infeasible else b, b if infeasible else -1, batched)
    else:
        bad = (_i64 * 2)()
        if lib.lsap_cpu(a.ctypes.data, B, N, M, maximize, rows.ctypes.data, cols.ctypes.data, bad):
            raise MemoryError("linear_assignment: out of memory for the CPU kernel's scratch space")
        _raise_first_bad(bad[0], bad[1], batched)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def _solve_cuda(lib, cost: torch.Tensor, maximize: bool, batched: bool):
    code = _DTYPE_CODE.get(cost.dtype)
    if code is None:  # rare dtypes (uint16, float8, ...): let torch convert
        cost, code = cost.to(torch.float64), 0
    B, N, M = cost.shape
    n = min(N, M)
    # One allocation holds both outputs and the 2-slot error buffer; strides go to the kernel, so no copy is made.
    out = torch.empty(2 * B * n + 2, dtype=torch.int64, device=cost.device)
    bad = (_i64 * 2)()
    err = lib.lsap_cuda(cost.data_ptr(), code, B, N, M, *cost.stride(), maximize, out.data_ptr(), cost.device.index,
                        torch.cuda.current_stream(cost.device).cuda_stream, bad)
    if err in (35, 209, 222):  # driver older than nvcc's runtime, or no code for this GPU: use the host from now on
        print(f"linear_assignment: CUDA kernel cannot run here ({lib.lsap_cuda_error(err).decode()}); using the host "
              "(CPU) path instead", file=sys.stderr)
        _libs[("cuda", cost.device.index)] = None
        return None, None
    if err:
        raise RuntimeError(f"linear_assignment: CUDA error {err}: {lib.lsap_cuda_error(err).decode()}")
    _raise_first_bad(bad[0], bad[1], batched)
    return out[: B * n].view(B, n), out[B * n : 2 * B * n].view(B, n)


def linear_assignment(cost: torch.Tensor, maximize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched scipy.optimize.linear_sum_assignment.

    cost: (B, N, M) or (N, M) real tensor, any N, M >= 0. Returns (row_ind, col_ind), int64, shape (B, min(N, M)) (or
    (min(N, M),)), on cost.device: rows ascending, col_ind[k] the column matched to row_ind[k]; the total is minimal
    (maximal with maximize=True). After negation for maximize, +inf forbids a pair; NaN / -inf, or a problem without
    a complete matching over finite entries, raises ValueError naming the first such batch index. Computes in float64.
    Backends (see assignment_backend): CUDA tensors with N, M <= 64 use a CUDA kernel (one warp per problem, one host
    sync per call); larger ones and CPU tensors use a multithreaded C++ kernel on the host; if g++ is missing, or
    NANOGENRL_NO_KERNEL=1 is set, a Python loop over scipy. Kernels build on first use into $NANOGENRL_CACHE
    (default ~/.cache/nanogenrl). Equal-cost optima may be permuted differently on CUDA than in scipy; totals agree.
    """
    if cost.dim() not in (2, 3) or cost.is_complex():
        raise ValueError(f"linear_assignment: expected a real (N, M) or (B, N, M) tensor, got {tuple(cost.shape)}")
    batched = cost.dim() == 3
    c3 = cost if batched else cost.unsqueeze(0)
    B, N, M = c3.shape
    if B * N * M == 0:
        rows = torch.empty(B, min(N, M), dtype=torch.int64, device=cost.device)
        return (rows, rows.clone()) if batched else (rows[0], rows[0].clone())
    name, lib = _backend(cost.device)
    rows = None
    if name == "cuda-kernel" and max(N, M) <= _GPU_MAX_SIDE:
        same = cost.device.index == torch.cuda.current_device()
        # torch's guard switches device without creating a context on the device it restores
        with contextlib.nullcontext() if same else torch.cuda.device(cost.device):
            rows, cols = _solve_cuda(lib, c3.detach(), maximize, batched)  # None if the kernel cannot run here
    if rows is None:  # CPU tensor, side > 64, or no usable CUDA kernel
        lib = _backend(torch.device("cpu"))[1]
        host = c3.detach().cpu()
        if host.dtype == torch.bfloat16:  # numpy has no bfloat16
            host = host.float()
        a = np.ascontiguousarray(host.numpy(), dtype=np.float64)
        rows, cols = (t.to(cost.device) for t in _solve_host(lib, a, bool(maximize), batched))
    return (rows, cols) if batched else (rows[0], cols[0])


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
