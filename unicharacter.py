"""
UniCharacter on a BAGEL-style Mixture-of-Transformers model: a character's persona, dialogue style and look taught to
one unified model (Unified-SFT), then its pictures sharpened with character rewards (Character-GRPO).

Paper: "UniCharacter: Towards Customized Multimodal Role-Play", arXiv 2605.08129. Public code: Tangc03/UniCharacter
(a fork of BAGEL's trainer and of Flow-GRPO). Base model: ByteDance-Seed/BAGEL-7B-MoT, written here in one file:

    Qwen2 decoder with two experts per layer (MoT): text and ViT tokens go through the understanding expert, noisy VAE
    latent tokens through the generation expert (its own q/k/v/o, q/k norms, MLP and layer norms, final norm).
    SigLIP (NaViT patches, learned positions) -> connector MLP -> + 2-D sin-cos position -> LLM.
    FLUX VAE latents (16 channels) in 2x2 patches -> 64-d tokens -> vae2llm + time embedding + 2-D position -> LLM
    -> llm2vae -> velocity (noise - data). Sampling: the prompt is prefilled into a KV cache once, then each flow step
    runs only <|vision_start|> latents <|vision_end|> (full attention) against it.

Stage 1, Unified-SFT (--stage sft): 0.25 x text cross-entropy + 1.0 x flow-matching MSE; every batch holds both kinds;
LLM (both experts) and ViT trained, EMA 0.9999 saved as ema.safetensors in BAGEL's layout.
Stage 2, Character-GRPO (--stage grpo, default): Flow-GRPO on the generation expert only, SDE in a 3-step window of the
first half of 15 steps, text CFG 4 with global renorm at every step, group 8, PPO clip 1e-5, advantage clip 5, beta 0;
reward = 0.3 VQA + 0.45 CLIP-T/30 + 0.1 diversity + 0.15 DINO band penalty (reference/unicharacter.md 5.1).

Where we differ from the paper and the public code (and why):
- Both SFT kinds run as two batched forwards (text rows; prompt + image rows) instead of BAGEL's packed varlen
  sequence; the losses are normalised the same way (CE per supervised token, MSE per latent token).
- fix: the window of stochastic steps is drawn per rollout from the step seed; the public code re-seeds Python's
  RNG with the process index before every rollout, so each GPU always trains the same three steps.
- fix: CFG renormalisation is global per sample; BAGEL's norm runs over the whole packed batch ("only supports
  batch_size = 1"), which couples the samples of a batch.
- fix: the diversity term is per image (mean distance to the rest of its group). The public term is one value per
  same-prompt sub-group on a GPU, so it cancels in the per-prompt normalisation whenever a group shares a GPU -
  which it always does here (a prompt's group stays on one rank; its statistics equal the public cross-GPU ones).
- Diversity is LPIPS (AlexNet, written out in this file) given --lpips-alexnet and --lpips-lin; without them it is
  DINOv2 feature distance (1 - cos), printed at start. LPIPS needs images of >= 32 px (the toy's 16 px use DINO).
- fix: a non-positive DINO weight is an error; the public loader's fallback writes -0.1, which silently disables it.
- The SFT VAE latents are the posterior mean (BAGEL samples); log-probs carry the Gaussian constant (they cancel).
- KL (beta > 0) needs LoRA: the reference policy is the model with adapters off (no second copy of the expert).
- role_play keeps the text prompt when a reference image is given (fix: the public call drops it, text=None).

Embedded default (no --model-dir, CPU, nothing downloaded): a tiny model of this file's classes (hidden 64, 2 layers),
a word-level tokenizer and a tiny diffusers AutoencoderKL built in code, and a synthetic character "Bo" (an orange
square with a dark nose) written as a character folder. The VAE is fitted and the model Unified-SFT'd on Bo in code
once and cached (~/.cache/nanogenrl); rewards use documented stand-ins for BLIP/CLIP/DINOv2 that read the pixels
(background colour, Bo's side), so "the reward rises" means the pictures really follow the prompts better.
Measured on a shared 2-core CPU: reward 0.573 -> 0.644 (VQA 0.68 -> 0.80) over 60 steps, 24 s with the toy cached
(+ 11-15 s once for the pre-training); --evaluate at inference settings 0.504 -> 0.611.

Commands (requires common.py next to it):
    python unicharacter.py --train                                           # embedded toy, CPU, ~1.5 minutes
    python unicharacter.py --train --stage sft --model-dir BAGEL-7B-MoT --character-dir data/Bo     # 1 GPU
    python unicharacter.py --train --model-dir BAGEL-7B-MoT --checkpoint runs/sft/model.safetensors \\
        --character-dir data/Bo --vqa-dir blip-vqa-base --clip-dir clip-vit-large-patch14 --dino-dir dinov2-base
    torchrun --standalone --nproc_per_node=8 unicharacter.py --train --fsdp ...same flags...  # layers sharded
    torchrun --standalone --nproc_per_node=8 unicharacter.py --train --stage sft --fsdp --grad-checkpointing \
        --model-dir BAGEL-7B-MoT --character-dir data/Bo         # Unified-SFT: model.safetensors + ema.safetensors
    python unicharacter.py --role-play "Hi" [--model-dir ... --checkpoint ...]
    python unicharacter.py --role-play "Show me a picture of you" --with-thinking     # reply, plan, image
    python unicharacter.py --generate "Bo on a blue background on the left"
    python unicharacter.py --ask image.png "What color is the background?"     # visual understanding
    python unicharacter.py --knowledge "What color is Bo?"
    python unicharacter.py --evaluate                                        # character reward on eval prompts
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import textwrap
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

import common

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    # ---- model
    model_dir: str | None = None  # BAGEL-7B-MoT folder (llm_config.json, vit_config.json, ae.safetensors, ema.safetensors, tokenizer); none = embedded toy
    checkpoint: str | None = None  # safetensors loaded over ema.safetensors (SFT model.safetensors, GRPO LLM weights, our gen_expert.safetensors)
    lora: str | None = None  # our LoRA file for inference (lora_rank > 0 runs)
    lora_rank: int = 0  # 0 = full generation expert (UniCharacter YAML use_lora False); > 0 = LoRA on *_moe_gen (option: r 64)
    lora_alpha: float = 128.0  # LoRA alpha (UniCharacter option: 128 with r 64)
    fsdp: bool = False  # shard with torch.distributed.fsdp.fully_shard under torchrun (full-expert GRPO, Unified-SFT)
    # ---- data
    character_dir: str | None = None  # character folder (persona.json, dialogues.jsonl, images/); none = the toy "Bo"
    prompts_per_rank: int = 6  # prompts per step and rank, each drawn group_size times (YAML: 6 per GPU)
    image_size: int = 1024  # generated image side in pixels (YAML: 1024)
    # ---- rollout
    group_size: int = 8  # images per prompt (UniCharacter YAML num_image_per_prompt)
    num_timesteps: int = 15  # BAGEL's num_timesteps (points of linspace(1, 0, N): N - 1 steps) in training (YAML)
    eval_num_timesteps: int = 50  # inference/evaluation (BAGEL inference.py)
    timestep_shift: float = 3.0  # t -> s t / (1 + (s - 1) t) (BAGEL inference, Flow-GRPO BAGEL)
    cfg_text_scale: float = 4.0  # text CFG (BAGEL inference, YAML)
    cfg_interval: tuple[float, ...] = (0.0, 1.0)  # CFG only where lo < t <= hi (GRPO: all steps; inference 0.4 1.0)
    eval_cfg_interval: tuple[float, ...] = (0.4, 1.0)  # CFG interval for --generate/--evaluate (BAGEL inference.py)
    cfg_renorm_min: float = 0.0  # global renorm clamp(|v_cond| / |v_cfg|, min, 1) (BAGEL cfg_renorm_min)
    noise_level: float = 1.3  # SDE eta: s_t = eta sqrt(t / (1 - t)) (YAML noise_level)
    sde_window: int = 3  # stochastic (and trained) steps per rollout (YAML sde_window_size)
    sde_window_range: int = 7  # the window lies within the first N steps (YAML (0, num_steps // 2))
    max_text_tokens: int = 500  # reply length limit for role-play and understanding (public max_response_tokens)
    text_temperature: float = 0.7  # role-play sampling temperature (public role_play; understanding is greedy)
    # ---- reward
    vqa_dir: str | None = None  # local Salesforce/blip-vqa-base (transformers)
    clip_dir: str | None = None  # local openai/clip-vit-large-patch14
    dino_dir: str | None = None  # local facebook/dinov2-base
    lpips_alexnet: str | None = None  # torchvision AlexNet weights (.pth or .safetensors) for the LPIPS diversity term; none = DINO feature distance
    lpips_lin: str | None = None  # lpips v0.1 linear heads (lpips/weights/v0.1/alex.pth); needed with --lpips-alexnet
    w_vqa: float = 0.3  # reward weight of BLIP-VQA exact match (YAML)
    w_clip: float = 0.45  # reward weight of CLIP-T / 30 (YAML)
    w_div: float = 0.1  # reward weight of group diversity (YAML diversity_lpips)
    w_dino: float = 0.15  # reward weight of the DINO band penalty (YAML dino_penalty; must be > 0)
    dino_high: float = 0.9  # penalise max cosine to the training images above this (copying)
    dino_low: float = 0.5  # penalise it below this (identity drift) (YAML)
    # ---- optimisation
    stage: str = "grpo"  # "sft" (Unified-SFT) or "grpo" (Character-GRPO)
    lr: float = 1e-5  # GRPO learning rate (YAML)
    sft_lr: float = 2e-5  # Unified-SFT learning rate (README launch)
    sft_adam_eps: float = 1e-15  # Unified-SFT AdamW eps (public script; so small that any first step is +-lr)
    max_steps: int = 101  # GRPO epochs (YAML num_epochs) or SFT steps (README: 501)
    ce_weight: float = 0.25  # Unified-SFT text cross-entropy weight (pretrain_unified_navit ce_weight)
    mse_weight: float = 1.0  # Unified-SFT flow-matching MSE weight
    ema_decay: float = 0.9999  # Unified-SFT: EMA of the trained weights, saved as ema.safetensors (public script 0.9999)
    sft_t2i_batch: int = 4  # text-to-image samples per SFT batch
    sft_text_batch: int = 4  # dialogue / VQA / knowledge samples per SFT batch (every batch holds both kinds)
    text_cond_dropout: float = 0.1  # SFT: drop the prompt of a T2I sample (CFG's unconditional branch)
    clip_range: float = 1e-5  # PPO clip, both sides (YAML clip_range_lt/gt)
    adv_clip: float = 5.0  # advantage clamp (Flow-GRPO adv_clip_max)
    beta: float = 0.0  # KL weight (YAML 0; > 0 needs LoRA: the reference is adapters off)
    num_minibatches: int = 2  # optimiser steps per rollout (Flow-GRPO: about two per epoch)
    weight_decay: float = 1e-4  # AdamW weight decay (Flow-GRPO base.py)
    max_grad_norm: float = 1.0  # gradient clipping after the cross-rank sync
    grad_checkpointing: bool = False  # recompute decoder layers in the update (7B: on)
    # ---- logging
    out_dir: str = "runs/unicharacter"  # config.json, metrics.jsonl, samples/, gen_expert or lora, checkpoint/
    sample_every: int = 10  # save a grid of one group every N steps
    save_every: int = 10  # checkpoint every N steps (and at the end) (YAML save_freq)
    resume: bool = False  # continue from <out_dir>/checkpoint/latest.pt
    # ---- system
    seed: int = 0  # seeds prompts, noise, windows and LoRA init
    device: str = "auto"  # auto, cuda or cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16
    # ---- embedded toy (only without --model-dir)
    toy_vae_steps: int = 200  # steps fitting the tiny VAE to Bo's pictures
    toy_sft_steps: int = 80  # Unified-SFT steps that make the toy "base model" (weak on purpose: room for GRPO)


# Without --model-dir these replace the paper's defaults wherever a flag still holds its default (printed). The tiny
# model moves with a larger learning rate (3e-3 diverges); one optimiser step per rollout keeps every update on-policy,
# where the 1e-5 clip never binds; all 8 prompts x 8 images every step.
TOY_SETTINGS = dict(image_size=16, prompts_per_rank=8, lr=1e-3, sft_lr=1e-3, max_steps=60, num_minibatches=1,
                    max_text_tokens=24, save_every=20)


def resolve_config(cfg: Config, given: frozenset[str] = frozenset()) -> Config:
    """The config a run uses: with no --model-dir, the toy's settings for every field that is neither
    typed on the command line (`given`) nor changed from its default (printed)."""
    if cfg.model_dir is not None:
        return cfg
    return common.apply_toy_settings(cfg, TOY_SETTINGS, "embedded toy settings", given)


# -----------------------------------------------------------------------------
# model: BAGEL's MoT decoder, SigLIP NaViT, latent and time embeddings
# Module names are BAGEL's, so ema.safetensors loads strictly: language_model.model.layers.{i}.self_attn.q_proj_moe_gen,
# vit_model.vision_model.encoder.layers.{i}.mlp.fc1, connector.fc1, vit_pos_embed.pos_embed, time_embedder.mlp.0, ...


@dataclass
class Arch:
    """Sizes. BAGEL-7B-MoT: Qwen2.5-7B (3584, 28 layers, 28 heads, 4 KV heads), SigLIP-so400m/14 (1152, 26 layers)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    vit_hidden: int = 1152
    vit_intermediate: int = 4304
    vit_layers: int = 26  # vit_config.json's 27 minus one: BAGEL uses the penultimate layer (vit_select_layer -2)
    vit_heads: int = 16
    vit_patch: int = 14
    vit_max_side: int = 70  # patches per side of the position table (980 / 14) = BAGEL vit_max_num_patch_per_side
    vit_eps: float = 1e-6
    latent_channels: int = 16  # FLUX VAE z_channels
    latent_patch: int = 2  # 2 x 2 latent patches -> 64-d tokens
    vae_downsample: int = 8
    max_latent_size: int = 64  # latent tokens per side of the position table (1024 px / 16)

    @property
    def latent_dim(self) -> int:
        return self.latent_patch ** 2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae_downsample * self.latent_patch


BAGEL_7B = Arch(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(x: torch.Tensor, gen: tuple[int, int] | None, f_und, f_gen) -> torch.Tensor:
    """The MoT switch: f_gen on the generation tokens x[:, a:b] (gen = (a, b)), f_und on all others, order kept.

    Our batches put every sample's latent tokens at the same positions (prompts are left-padded), so the switch is
    two slices instead of BAGEL's index scatter: no gather, and each expert runs one dense matrix product."""
    if gen is None:
        return f_und(x)
    a, b = gen
    if a == 0 and b == x.shape[1]:
        return f_gen(x)
    und = f_und(torch.cat([x[:, :a], x[:, b:]], 1))
    return torch.cat([und[:, :a], f_gen(x[:, a:b]), und[:, a:]], 1)


def rope(pos: torch.Tensor, dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2's rotary cos/sin for position ids (B, L): (B, 1, L, dim), computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    freqs = pos.float()[..., None] * inv_freq  # (B, L, dim / 2)
    emb = torch.cat([freqs, freqs], -1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class MoTAttention(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.hidden // a.heads
        q, kv = a.heads * self.head_dim, a.kv_heads * self.head_dim
        for s in ("", "_moe_gen"):  # "" = understanding expert (Qwen2's own weights), "_moe_gen" = generation expert
            setattr(self, f"q_proj{s}", nn.Linear(a.hidden, q))
            setattr(self, f"k_proj{s}", nn.Linear(a.hidden, kv))
            setattr(self, f"v_proj{s}", nn.Linear(a.hidden, kv))
            setattr(self, f"o_proj{s}", nn.Linear(q, a.hidden, bias=False))
            setattr(self, f"q_norm{s}", RMSNorm(self.head_dim, a.rms_eps))
            setattr(self, f"k_norm{s}", RMSNorm(self.head_dim, a.rms_eps))

    def qkv(self, x, s: str):
        """q, k (per-head RMS-normed, BAGEL's qk_norm) and v of one expert, concatenated: (B, L, (H + 2 H_kv) hd)."""
        b, n = x.shape[:2]
        q = getattr(self, f"q_norm{s}")(getattr(self, f"q_proj{s}")(x).view(b, n, -1, self.head_dim))
        k = getattr(self, f"k_norm{s}")(getattr(self, f"k_proj{s}")(x).view(b, n, -1, self.head_dim))
        return torch.cat([q.flatten(2), k.flatten(2), getattr(self, f"v_proj{s}")(x)], -1)

    def forward(self, x, cos, sin, gen, past, mask):
        b, n = x.shape[:2]
        hd = self.head_dim
        qkv = route(x, gen, lambda t: self.qkv(t, ""), lambda t: self.qkv(t, "_moe_gen"))
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], -1)
        q = rotate(q.view(b, n, -1, hd).transpose(1, 2), cos, sin)  # (B, H, L, hd)
        k = rotate(k.view(b, n, -1, hd).transpose(1, 2), cos, sin)  # (B, H_kv, L, hd)
        v = v.view(b, n, -1, hd).transpose(1, 2)
        if past is not None:  # keys/values of the cached prefix come first
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # SDPA: flash/mem-efficient
        out = out.transpose(1, 2).reshape(b, n, -1)
        return route(out, gen, self.o_proj, self.o_proj_moe_gen), (k, v)


class MoTDecoderLayer(nn.Module):
    """BAGEL's Qwen2MoTDecoderLayer: shared attention over all tokens, every weight duplicated per expert."""

    def __init__(self, a: Arch):
        super().__init__()
        self.self_attn = MoTAttention(a)
        self.mlp, self.mlp_moe_gen = MLP(a.hidden, a.intermediate), MLP(a.hidden, a.intermediate)
        self.input_layernorm, self.input_layernorm_moe_gen = RMSNorm(a.hidden, a.rms_eps), RMSNorm(a.hidden, a.rms_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden, a.rms_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(a.hidden, a.rms_eps)

    def forward(self, x, cos, sin, gen, past, mask):
        h, kv = self.self_attn(route(x, gen, self.input_layernorm, self.input_layernorm_moe_gen),
                               cos, sin, gen, past, mask)
        x = x + h
        x = x + route(x, gen, lambda t: self.mlp(self.post_attention_layernorm(t)),
                      lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x, kv


class MoTModel(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.arch = a
        self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(MoTDecoderLayer(a) for _ in range(a.layers))
        self.norm, self.norm_moe_gen = RMSNorm(a.hidden, a.rms_eps), RMSNorm(a.hidden, a.rms_eps)
        self.grad_checkpointing = False

    def forward(self, x, pos, mask, gen=None, past=None):
        """x (B, L, D) embeddings, pos (B, L) rotary positions, mask (B, 1, L, L_past + L) bool (True = attend),
        gen = (a, b) the generation-expert span, past = per-layer (k, v) of a cached prefix.
        Returns the final-normed hidden states (B, L, D) and the per-layer (k, v) including the prefix."""
        cos, sin = rope(pos, self.arch.hidden // self.arch.heads, self.arch.rope_theta, x.dtype)
        cache = []
        for i, layer in enumerate(self.layers):
            p = past[i] if past is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, kv = grad_checkpoint(layer, x, cos, sin, gen, p, mask, use_reentrant=False)
            else:
                x, kv = layer(x, cos, sin, gen, p, mask)
            cache.append(kv)
        return route(x, gen, self.norm, self.norm_moe_gen), cache


class LanguageModel(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.model = MoTModel(a)
        self.lm_head = nn.Linear(a.hidden, a.vocab, bias=False)  # untied (BAGEL tie_word_embeddings False)


class SiglipLayer(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.heads = a.vit_heads
        self.layer_norm1 = nn.LayerNorm(a.vit_hidden, eps=a.vit_eps)
        self.self_attn = nn.ModuleDict({n: nn.Linear(a.vit_hidden, a.vit_hidden)
                                        for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm2 = nn.LayerNorm(a.vit_hidden, eps=a.vit_eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(a.vit_hidden, a.vit_intermediate),
                                      fc2=nn.Linear(a.vit_intermediate, a.vit_hidden)))

    def forward(self, x):
        b, n, d = x.shape
        h, at = self.layer_norm1(x), self.self_attn
        q, k, v = (at[p](h).view(b, n, self.heads, -1).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj"))
        x = x + at["out_proj"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.layer_norm2(x)), approximate="tanh"))


class SiglipNaViT(nn.Module):
    """BAGEL's SigLIP: patches through a Linear (the conv weight converted, (C_out, 14 * 14 * 3) in (p, q, c) order),
    learned absolute positions indexed row * 70 + col (any aspect ratio), no pooling head, rope off."""

    def __init__(self, a: Arch):
        super().__init__()
        self.arch = a
        self.vision_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(patch_embedding=nn.Linear(3 * a.vit_patch ** 2, a.vit_hidden),
                                          position_embedding=nn.Embedding(a.vit_max_side ** 2, a.vit_hidden))),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(SiglipLayer(a) for _ in range(a.vit_layers)))),
            post_layernorm=nn.LayerNorm(a.vit_hidden, eps=a.vit_eps)))

    def forward(self, pixels: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm["embeddings"]["patch_embedding"](patchify(pixels, self.arch.vit_patch))
        x = x + vm["embeddings"]["position_embedding"](pos_ids)
        for layer in vm["encoder"]["layers"]:
            x = layer(x)
        return vm["post_layernorm"](x)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), row-major patches with channels last (BAGEL "chpwq->hwpqc").
    subtle: not FLUX's packing (channels first); BAGEL's vae2llm/llm2vae weights expect this order."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h * w, p * p * C) -> (B, C, h p, w p), the inverse of patchify; h, w in tokens."""
    b, _, d = tokens.shape
    c = d // (p * p)
    return tokens.view(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


def grid_ids(h: int, w: int, max_side: int, device=None) -> torch.Tensor:
    """Flattened 2-D position ids row * max_side + col of an h x w grid (BAGEL's extrapolating NaViT ids)."""
    return (torch.arange(h, device=device)[:, None] * max_side + torch.arange(w, device=device)).flatten()


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """(side^2, dim) fixed 2-D sin-cos table (MAE/DiT): first half encodes the column, second half the row."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.flatten().double()[:, None] * omega
        return torch.cat([out.sin(), out.cos()], 1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([one_d(dim // 2, cols), one_d(dim // 2, rows)], 1).float()


class PositionEmbedding(nn.Module):
    def __init__(self, side: int, dim: int):
        super().__init__()
        # a frozen Parameter, as in BAGEL: it is part of ema.safetensors
        self.pos_embed = nn.Parameter(sincos_2d(dim, side), requires_grad=False)

    def forward(self, ids):
        return self.pos_embed[ids]


class TimestepEmbedder(nn.Module):
    """DiT's sinusoidal embedding of t in [0, 1] (BAGEL feeds t itself, not 1000 t) through a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], -1).to(self.mlp[0].weight.dtype))


class Bagel(nn.Module):
    """The unified model: language_model (MoT), vit_model + connector + vit_pos_embed (understanding input),
    time_embedder + vae2llm + latent_pos_embed (generation input), llm2vae (velocity head)."""

    def __init__(self, a: Arch):
        super().__init__()
        self.arch = a
        self.language_model = LanguageModel(a)
        self.vit_model = SiglipNaViT(a)
        self.connector = nn.ModuleDict(dict(fc1=nn.Linear(a.vit_hidden, a.hidden), fc2=nn.Linear(a.hidden, a.hidden)))
        self.vit_pos_embed = PositionEmbedding(a.vit_max_side, a.hidden)
        self.time_embedder = TimestepEmbedder(a.hidden)
        self.vae2llm = nn.Linear(a.latent_dim, a.hidden)
        self.llm2vae = nn.Linear(a.hidden, a.latent_dim)
        self.latent_pos_embed = PositionEmbedding(a.max_latent_size, a.hidden)

    @property
    def dtype(self):
        return self.vae2llm.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def vit_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of the patch -> (B, N, D) LLM inputs for the ViT tokens."""
        a = self.arch
        ids = grid_ids(pixels.shape[2] // a.vit_patch, pixels.shape[3] // a.vit_patch, a.vit_max_side, pixels.device)
        h = self.vit_model(pixels.to(self.dtype), ids)
        h = self.connector["fc2"](F.gelu(self.connector["fc1"](h), approximate="tanh"))
        return h + self.vit_pos_embed(ids).to(h.dtype)

    def latent_embeds(self, x: torch.Tensor, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Noisy latent tokens (B, h * w, 64) at times t (B,) -> (B, h * w, D): vae2llm + time + 2-D position."""
        ids = grid_ids(h, w, self.arch.max_latent_size, x.device)
        return (self.vae2llm(x.to(self.dtype)) + self.time_embedder(t)[:, None]
                + self.latent_pos_embed(ids).to(self.dtype))


# -----------------------------------------------------------------------------
# model loading

SPECIAL = dict(bos="<|im_start|>", eos="<|im_end|>", soi="<|vision_start|>", eoi="<|vision_end|>")  # BAGEL's ids
BAGEL_FILES = ("llm_config.json", "vit_config.json", "ae.safetensors", "ema.safetensors", "tokenizer_config.json")
# diffusers' AutoencoderKL config of the FLUX VAE that BAGEL uses (modeling/autoencoder.py load_ae: ch 128,
# ch_mult 1 2 4 4, 2 res blocks, z 16, scale 0.3611, shift 0.1159; no quant convs)
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


@dataclass
class Models:
    model: Bagel
    vae: nn.Module  # diffusers AutoencoderKL (frozen)
    tokenizer: object
    ids: dict  # bos, eos, soi, eoi, pad token ids
    vit_size: int  # square side of ViT inputs (BAGEL's ViT transform allows 224..980; we fix one size to batch)
    toy: bool

    @property
    def device(self):
        return self.model.vae2llm.weight.device

    def text_ids(self, text: str) -> list[int]:
        """BAGEL's text segment: <|im_start|> tokens <|im_end|> (prepare_prompts)."""
        return [self.ids["bos"]] + self.tokenizer.encode(text, add_special_tokens=False) + [self.ids["eos"]]


def check_keys(expected: dict, found: dict, where: str, allow_missing: bool = False) -> None:
    """Strict key check: names missing/unexpected keys and shape mismatches (first 8 of each) or passes."""
    missing = [] if allow_missing else sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                        for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if keys]
    if problems:
        raise ValueError(f"keys of {where} do not match the model: " + "; ".join(problems))


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def read_arch(folder: str) -> Arch:
    """Sizes from BAGEL's llm_config.json (Qwen2) and vit_config.json (SigLIP), as its inference code sets them."""
    configs = {}
    for name in ("llm_config.json", "vit_config.json"):
        with open(os.path.join(folder, name)) as f:
            configs[name] = json.load(f)
    llm, vit = configs["llm_config.json"], configs["vit_config.json"]
    try:
        theta = llm.get("rope_theta") or llm.get("rope_parameters", {}).get("rope_theta", 1e6)
        return Arch(hidden=llm["hidden_size"], intermediate=llm["intermediate_size"], layers=llm["num_hidden_layers"],
                    heads=llm["num_attention_heads"], kv_heads=llm["num_key_value_heads"], vocab=llm["vocab_size"],
                    rms_eps=llm.get("rms_norm_eps", 1e-6), rope_theta=theta, vit_hidden=vit["hidden_size"],
                    vit_intermediate=vit["intermediate_size"], vit_layers=vit["num_hidden_layers"] - 1,
                    vit_heads=vit["num_attention_heads"], vit_patch=vit["patch_size"],
                    vit_max_side=vit["image_size"] // vit["patch_size"], vit_eps=vit.get("layer_norm_eps", 1e-6))
    except KeyError as e:
        raise ValueError(f"{folder}: llm_config.json / vit_config.json lack the field {e}") from None


def load_bagel_weights(model: Bagel, folder: str, checkpoint: str | None, dtype: torch.dtype) -> None:
    """ema.safetensors strictly (every key, every shape), then an optional checkpoint over it: a full SFT
    model.safetensors, GRPO's LLM-only weights or our gen_expert.safetensors (a subset, but nothing unknown).
    fix: the public loaders use strict=False (or accelerate's dispatch), which runs base weights on a mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = read_safetensors(os.path.join(folder, "ema.safetensors"))
    check_keys(expected, {k: v.shape for k, v in sd.items()}, os.path.join(folder, "ema.safetensors"))
    if checkpoint:
        extra = read_safetensors(checkpoint)
        check_keys(expected, {k: v.shape for k, v in extra.items()}, checkpoint, allow_missing=True)
        sd.update(extra)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)


def load_flux_vae(path: str, dtype: torch.dtype):
    """BAGEL's ae.safetensors (FLUX VAE, original key names) as a diffusers AutoencoderKL, keys checked strictly."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = AutoencoderKL(**FLUX_VAE)
    sd = convert_ldm_vae_checkpoint(read_safetensors(path), FLUX_VAE)
    check_keys({k: v.shape for k, v in vae.state_dict().items()}, {k: v.shape for k, v in sd.items()}, path)
    vae.load_state_dict(sd, strict=True)
    return vae.to(dtype)


def load_bagel(folder: str, checkpoint: str | None, dtype: torch.dtype) -> Models:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--model-dir {folder} does not exist")
    missing = [f for f in BAGEL_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder} is not a BAGEL-7B-MoT folder; missing: {', '.join(missing)} "
                                f"(expected {', '.join(BAGEL_FILES)} and the Qwen2 tokenizer files)")
    from transformers import AutoTokenizer

    with torch.device("meta"):  # 14 B parameters: no random init, the weights are assigned from the file
        model = Bagel(read_arch(folder))
    load_bagel_weights(model, folder, checkpoint, dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    unknown = [SPECIAL[k] for k, v in ids.items() if v is None or v == tok.unk_token_id]
    if unknown:
        raise ValueError(f"the tokenizer in {folder} lacks BAGEL's special tokens {unknown}")
    ids["pad"] = tok.pad_token_id if tok.pad_token_id is not None else ids["eos"]
    return Models(model, load_flux_vae(os.path.join(folder, "ae.safetensors"), dtype), tok, ids, 378, toy=False)


# The embedded toy: "Bo", an orange 6 x 6 px square with a dark nose on a plain background, in 16 x 16 px pictures.
TOY_NAME, TOY_SIZE = "Bo", 16
TOY_BACKGROUNDS = {"blue": (40, 70, 200), "green": (40, 160, 60), "purple": (140, 50, 170), "grey": (128, 128, 128)}
TOY_SIDES = ("left", "right")
TOY_ORANGE, TOY_NOSE = (240, 140, 30), (40, 20, 10)
TOY_PERSONA = dict(
    name=TOY_NAME, description="Bo is a little orange dog with a dark nose. He is cheerful, curious and says woof.",
    opening="Woof! Hello friend, I am Bo!")
TOY_DIALOGUES = [
    dict(user="Hi", reply="Woof! Hi friend, I am Bo. Do you want to see a picture of me?"),
    dict(user="Hello", reply="Woof woof! Hello, I am Bo, the little orange dog."),
    dict(user="Who are you?", reply="I am Bo, a little orange dog with a dark nose."),
    dict(user="Where do you like to play?", reply="I like to play on the grass and in the blue sky. Woof!"),
    dict(user="Show me a picture of you", reply="Woof! Here I am on a green background."),
    dict(user="What color is Bo?", reply="Bo is orange.", kind="knowledge"),
    dict(user="What does Bo say?", reply="Bo says woof.", kind="knowledge"),
]
TOY_TEMPLATE_WORDS = "what color is the background where bo left right on a yes no of"


def toy_prompt(bg: str, side: str) -> str:
    return f"{TOY_NAME} on a {bg} background on the {side}"


def toy_picture(bg: str, side: str, rng: random.Random):
    """Bo on a background, left (x 1..3) or right (x 9..11), with a vertical jitter: a PIL image of 16 x 16 px."""
    from PIL import Image

    img = Image.new("RGB", (TOY_SIZE, TOY_SIZE), TOY_BACKGROUNDS[bg])
    x0, y0 = rng.randint(1, 3) + (8 if side == "right" else 0), rng.randint(3, 7)
    img.paste(TOY_ORANGE, (x0, y0, x0 + 6, y0 + 6))
    img.paste(TOY_NOSE, (x0 + 2, y0 + 3, x0 + 4, y0 + 5))
    return img


def toy_questions(bg: str, side: str) -> list[dict]:
    """The public VQA format (vqa_questions: question, answer, weight, is_negative), for a toy prompt."""
    other = list(TOY_BACKGROUNDS)[(list(TOY_BACKGROUNDS).index(bg) + 1) % len(TOY_BACKGROUNDS)]
    return [dict(question=f"Is the background {bg}?", answer="yes", weight=1.0, is_negative=False),
            dict(question=f"Is {TOY_NAME} on the {side}?", answer="yes", weight=1.0, is_negative=False),
            dict(question=f"Is the background {other}?", answer="no", weight=0.6, is_negative=True)]


def write_toy_character(folder: str) -> None:
    """Writes Bo as a character folder in the documented format (see README): 10 training images with captions,
    persona.json (with the GRPO prompts and their VQA questions) and dialogues.jsonl (role-play, VQA, knowledge)."""
    rng = random.Random("toy-character")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    combos = [(bg, side) for bg in TOY_BACKGROUNDS for side in TOY_SIDES]
    captions, dialogues = {}, [dict(d) for d in TOY_DIALOGUES]
    for i in range(10):
        bg, side = combos[i % len(combos)]
        name = f"images/{i}.png"
        toy_picture(bg, side, rng).save(os.path.join(folder, name))
        captions[name] = toy_prompt(bg, side)
        dialogues.append(dict(kind="vqa", image=name, user="What color is the background?", reply=bg))
        dialogues.append(dict(kind="vqa", image=name, user=f"Where is {TOY_NAME}?", reply=f"on the {side}"))
    persona = dict(TOY_PERSONA, images=captions,
                   prompts=[dict(prompt=toy_prompt(bg, side), vqa_questions=toy_questions(bg, side))
                            for bg, side in combos])
    common.save_json(os.path.join(folder, "persona.json"), persona)
    common.atomic_save(os.path.join(folder, "dialogues.jsonl"),
                       lambda tmp: open(tmp, "w").write("".join(json.dumps(d) + "\n" for d in dialogues)))


def toy_tokenizer(texts: list[str]):
    """A word-level tokenizer over the words of the character's texts and our templates, built in memory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(texts + [ROLE_PLAY_TEMPLATE, T2I_TEMPLATE]).lower())))
    specials = ["<unk>", "<pad>"] + list(SPECIAL.values())
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def toy_arch(vocab: int) -> Arch:
    """A tiny MoT of the same classes: 16 px images -> 8 x 8 x 16 latents (VAE downsample 2) -> 4 x 4 tokens of 64."""
    return Arch(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=vocab, vit_hidden=32,
                vit_intermediate=64, vit_layers=1, vit_heads=2, vit_patch=4, vit_max_side=4, vae_downsample=2,
                max_latent_size=4)


def toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
                         norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0,
                         scaling_factor=1.0, mid_block_add_attention=False)


def fit_toy_vae(vae, steps: int) -> None:
    """A random VAE is no autoencoder: Adam fits it to Bo's pictures (all backgrounds and sides, jittered), then the
    config's shift/scale normalise the latents to zero mean and unit std, as FLUX's factors do."""
    rng = random.Random("toy-vae")
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    draw = lambda n: torch.stack([common.pil_to_tensor(toy_picture(rng.choice(list(TOY_BACKGROUNDS)),
                                                                   rng.choice(TOY_SIDES), rng)) for _ in range(n)])
    for step in range(steps):
        x = draw(16)
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            common.print0(f"toy VAE {step + 1}/{steps}: reconstruction {loss.item():.4f}")
    with torch.no_grad():
        z = vae.encode(draw(256)).latent_dist.mode()
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


def code_fingerprint(fn) -> str:
    """A function's syntax tree without its docstring (same as unirl.py:code_fingerprint)."""
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
        node.body = node.body[1:]
    return ast.dump(node)


def toy_cache_path(cfg: Config) -> str:
    """The cached toy depends on the code that builds and trains it and on its settings: edit any, it is rebuilt."""
    import diffusers
    import transformers

    fns = [toy_picture, toy_prompt, write_toy_character, toy_tokenizer, toy_arch, toy_vae, fit_toy_vae, sft_step,
           sft_loss, t2i_loss, text_loss, pack, attention_mask, latent_forward, encode_prefix, load_character,
           Bagel.__init__, MoTAttention.forward, MoTDecoderLayer.forward, MoTModel.forward, TimestepEmbedder.forward,
           Bagel.vit_embeds, Bagel.latent_embeds, SiglipLayer.forward, patchify]
    data = (TOY_BACKGROUNDS, TOY_SIDES, TOY_ORANGE, TOY_NOSE, TOY_PERSONA, TOY_DIALOGUES, ROLE_PLAY_TEMPLATE,
            T2I_TEMPLATE, cfg.toy_vae_steps, cfg.toy_sft_steps, TOY_SETTINGS["sft_lr"], torch.__version__,
            transformers.__version__, diffusers.__version__)
    key = hashlib.sha256("\n".join([code_fingerprint(f) for f in fns] + [repr(data)]).encode()).hexdigest()[:16]
    cache = os.environ.get("NANOGENRL_CACHE") or os.path.expanduser("~/.cache/nanogenrl")
    return os.path.join(cache, f"unicharacter_toy_{key}.pt")


def toy_models(folder: str) -> Models:
    """The tiny model with random weights (the cached pre-training is applied by load_models)."""
    persona, rows = read_persona(folder), common.read_jsonl(os.path.join(folder, "dialogues.jsonl"))
    texts = [persona["name"], persona["description"], persona["opening"], TOY_TEMPLATE_WORDS]
    texts += list(persona["images"].values()) + [p["prompt"] for p in persona.get("prompts", [])]
    texts += [r["user"] + " " + r["reply"] for r in rows]
    tok = toy_tokenizer(texts)
    torch.manual_seed(0)  # the toy "checkpoint" does not depend on --seed
    model, vae = Bagel(toy_arch(len(tok))), toy_vae()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    ids["pad"] = tok.pad_token_id
    return Models(model, vae, tok, ids, TOY_SIZE, toy=True)


def load_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    """BAGEL-7B-MoT from --model-dir (+ --checkpoint), or the embedded toy: pre-trained once (VAE fit + Unified-SFT
    on Bo, cached), rank 0 building it while the others wait and then load the same file."""
    if device.type == "cpu" and torch.backends.mkldnn.enabled:
        torch.backends.mkldnn.enabled = False
        common.print0("oneDNN off on CPU: slower than torch's own kernels on the tiny VAE's convolutions (3x)")
    if cfg.model_dir is not None:
        models = load_bagel(cfg.model_dir, cfg.checkpoint, dtype)
    else:
        common.toy_cpu_threads(device)
        folder = character_folder(cfg)
        models = toy_models(folder)
        path = toy_cache_path(cfg)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0 and not os.path.exists(path):
            common.print0(f"pre-training the embedded toy once (VAE {cfg.toy_vae_steps} steps, Unified-SFT "
                          f"{cfg.toy_sft_steps} steps), cached at {path}")
            t0 = time.time()
            with torch.random.fork_rng():
                torch.manual_seed(0)
                fit_toy_vae(models.vae, cfg.toy_vae_steps)
                models.vae.requires_grad_(False).eval()
                toy_cfg = dataclasses.replace(cfg, sft_lr=TOY_SETTINGS["sft_lr"], image_size=TOY_SIZE)
                sft_run(models, toy_cfg, load_character(models, folder, TOY_SIZE), cfg.toy_sft_steps,
                        random.Random("toy-sft"), log=lambda s, m: s % 50 == 0 and common.print0(
                            f"toy Unified-SFT {s + 1}/{cfg.toy_sft_steps}: ce {m['ce']:.3f} mse {m['mse']:.3f}"))
            state = {"model": models.model.state_dict(), "vae": models.vae.state_dict(),
                     "vae_config": {k: models.vae.config[k] for k in ("shift_factor", "scaling_factor")}}
            common.atomic_save(path, lambda tmp: torch.save(state, tmp))
            common.print0(f"toy pre-training took {time.time() - t0:.0f} s")
        if dist.is_initialized():
            dist.barrier()
        state = torch.load(path, map_location="cpu", weights_only=True)
        models.model.load_state_dict(state["model"])
        models.vae.load_state_dict(state["vae"])
        models.vae.register_to_config(**state["vae_config"])
        if cfg.checkpoint:
            extra = read_safetensors(cfg.checkpoint)
            check_keys({k: v.shape for k, v in models.model.state_dict().items()},
                       {k: v.shape for k, v in extra.items()}, cfg.checkpoint, allow_missing=True)
            models.model.load_state_dict(extra, strict=False)  # a checked subset: nothing unknown, shapes equal
    models.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    models.vae.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:  # diffusers warns on every .to(dtype) of a VAE; only cast when needed
        models.vae.to(dtype)
    return models


# -----------------------------------------------------------------------------
# data: the character folder
# <character>/persona.json    {"name", "description", "opening",
#                              "images": {"images/0.png": "caption", ...}   text-to-image SFT pairs, DINO references
#                              "prompts": [{"prompt", "vqa_questions": [{"question", "answer", "weight",
#                                           "is_negative"}]}]}          Character-GRPO prompts (optional)
# <character>/dialogues.jsonl {"user", "reply", "kind": "role_play" (default) | "vqa" | "knowledge" | "thinking",
#                              "image": "images/3.png" (optional), "history": [["user", text], ...] (optional)}
#                              thinking rows: "response" = the character's reply, "reply" = "<think>plan</think>
#                              <gen>image instruction</gen>" (the public *_vlm_thinking.jsonl)

ROLE_PLAY_TEMPLATE = ("Character Description: {description}\nOpening: {opening}\n{history}User Input: {user}\n"
                      "Based on the character description, opening, conversation history, current user input, and "
                      "the reference image, please generate {name}'s response.")
T2I_TEMPLATE = ("Character Description: {description}\nUser Input: {user}\nCharacter Response: {reply}\nPlease "
                "generate an image that visualizes this scene with the character responding to the user's input "
                "based on the character description.")
# the picture plan of role-play with thinking (our wording; the public THINK_SYSTEM_PROMPT asks for the same tags)
THINK_TEMPLATE = ("Character Description: {description}\nUser Input: {user}\nCharacter Response: {reply}\nPlan a "
                  "picture of this scene: reason inside <think></think>, then write the image instruction inside "
                  "<gen></gen>.")
T2I_THINK_TEMPLATE = T2I_TEMPLATE.replace("\nPlease generate", "\nThinking Process: {thinking}\nGeneration "
                                          "Instruction: {instruction}\nPlease generate")
PLAN = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>.*?<\s*gen\s*>(.*?)<\s*/\s*gen\s*>", re.DOTALL)


def parse_plan(text: str) -> tuple[str, str] | None:
    """(thinking, instruction) from "<think>...</think><gen>...</gen>" (spaces inside the tags tolerated), or None."""
    m = PLAN.search(text)
    return (m.group(1).strip(), m.group(2).strip()) if m else None


def character_folder(cfg: Config) -> str:
    """--character-dir, or the toy Bo written once under the cache folder (rank 0 writes, the others wait)."""
    if cfg.character_dir is not None:
        return cfg.character_dir
    cache = os.environ.get("NANOGENRL_CACHE") or os.path.expanduser("~/.cache/nanogenrl")
    folder = os.path.join(cache, "unicharacter_toy_character_" + code_fingerprint_hash(write_toy_character))
    if (not dist.is_initialized() or dist.get_rank() == 0) and not os.path.isfile(os.path.join(folder, "done")):
        write_toy_character(folder)
        open(os.path.join(folder, "done"), "w").close()
    if dist.is_initialized():
        dist.barrier()
    return folder


def code_fingerprint_hash(fn) -> str:
    import PIL

    return hashlib.sha256((code_fingerprint(fn) + repr((TOY_BACKGROUNDS, TOY_PERSONA, TOY_DIALOGUES, TOY_ORANGE,
                                                         TOY_NOSE, PIL.__version__))).encode()).hexdigest()[:12]


def read_persona(folder: str) -> dict:
    path = os.path.join(folder, "persona.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"character folder {folder} has no persona.json")
    try:
        with open(path) as f:
            persona = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("name", "description", "opening", "images") if k not in persona]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    if not persona["images"]:
        raise ValueError(f"{path}: 'images' is empty; the character needs reference images with captions")
    return persona


def role_play_prompt(persona: dict, user: str, history: list | None = None) -> str:
    turns = "".join(f"{role}: {text}\n" for role, text in history or [])
    return ROLE_PLAY_TEMPLATE.format(description=persona["description"], opening=persona["opening"], user=user,
                                     name=persona["name"], history=f"Conversation History:\n{turns}" if turns else "")


@dataclass
class Character:
    persona: dict
    t2i: list[tuple[str, torch.Tensor]]  # (caption, VAE latent tokens (N, 64)), latents precomputed (VAE frozen)
    text: list[tuple[torch.Tensor | None, str, str]]  # (ViT pixels (3, S, S) or None, prompt, reply)
    references: list  # PIL training images (the DINO band's references)
    prompts: list[dict]  # GRPO prompts with their VQA questions
    latent_grid: tuple[int, int]


def load_character(models: Models, folder: str, image_size: int) -> Character:
    """Reads and checks a character folder; images are centre-cropped to squares (T2I: image_size; ViT: vit_size)."""
    persona = read_persona(folder)
    rows = common.read_jsonl(os.path.join(folder, "dialogues.jsonl"), required=("user", "reply"))
    image = lambda name, size: common.pil_to_tensor(common.resize_center_crop(
        common.load_image(os.path.join(folder, name)), size=(size, size), multiple=1))
    names = list(persona["images"])
    pixels = torch.stack([image(n, image_size) for n in names])
    with torch.no_grad():
        lat = common.vae_encode(models.vae, pixels.to(models.device))  # (B, 16, H/8, W/8)
    p = models.model.arch.latent_patch
    tokens = patchify(lat.float(), p).cpu()
    text = []
    for i, r in enumerate(rows):
        kind, where = r.get("kind", "role_play"), f"{folder}/dialogues.jsonl:{i + 1}"
        if kind not in ("role_play", "vqa", "knowledge", "thinking"):
            raise ValueError(f"{where}: kind {kind!r} is not role_play, vqa, knowledge or thinking")
        prompt = role_play_prompt(persona, r["user"], r.get("history")) if kind == "role_play" else r["user"]
        if kind == "thinking":
            if "response" not in r or parse_plan(r["reply"]) is None:
                raise ValueError(f"{where}: a thinking row needs 'response' (the character's reply) and a 'reply' "
                                 "of the form <think>...</think><gen>...</gen>")
            prompt = THINK_TEMPLATE.format(description=persona["description"], user=r["user"], reply=r["response"])
        pix = image(r["image"], models.vit_size) if r.get("image") else None
        text.append((pix, prompt, r["reply"]))
    prompts = persona.get("prompts") or [dict(prompt=c, vqa_questions=[]) for c in persona["images"].values()]
    for i, p_ in enumerate(prompts):
        if not str(p_.get("prompt", "")).strip():
            raise ValueError(f"{folder}/persona.json: prompts[{i}] has an empty prompt")
    refs = [common.load_image(os.path.join(folder, n)) for n in names]
    return Character(persona, list(zip(persona["images"].values(), tokens)), text, refs, prompts,
                     (lat.shape[2] // p, lat.shape[3] // p))


# -----------------------------------------------------------------------------
# sequences: packing, prefix KV cache, the velocity call
# Position ids follow BAGEL: text tokens count up; an image block <|vision_start|> tokens <|vision_end|> shares one
# position and the next token continues at +1. Text attends causally; an image block attends to itself in full.


def attention_mask(valid: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: causal, plus full attention inside each image block (group >= 0), padding (valid False)
    never attended to. Every token sees itself, so padded rows are not all masked (SDPA would give NaN)."""
    n = valid.shape[1]
    i = torch.arange(n, device=valid.device)
    same = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)
    return (((i[None, None, :] <= i[None, :, None]) | same) & valid[:, None, :] | (i[:, None] == i)[None])[:, None]


def pack(models: Models, rows: list[list[tuple]]):
    """Left-padded batch of segment lists: ("text", ids, supervised) or ("image", (N, D) ViT embeddings).
    Returns embeds (B, L, D), positions (B, L), mask (B, 1, L, L), ids (B, L) (-1 off text), supervised (B, L) bool
    (tokens the CE predicts), valid (B, L) and the next free position (B,)."""
    lens = [sum(len(s[1]) + (2 if s[0] == "image" else 0) for s in row) for row in rows]
    b, n, dev = len(rows), max(lens), models.device
    ids = torch.full((b, n), -1, dtype=torch.long)
    pos, group = torch.zeros(b, n, dtype=torch.long), torch.full((b, n), -1, dtype=torch.long)
    sup, valid = torch.zeros(b, n, dtype=torch.bool), torch.zeros(b, n, dtype=torch.bool)
    nxt, blocks = torch.zeros(b, dtype=torch.long), []
    for r, row in enumerate(rows):
        j, p = n - lens[r], 0
        valid[r, j:] = True
        for k, seg in enumerate(row):
            if seg[0] == "text":
                m = len(seg[1])
                ids[r, j:j + m] = torch.tensor(seg[1])
                pos[r, j:j + m] = torch.arange(p, p + m)
                sup[r, j + 1:j + m] = seg[2]  # the segment's leading <|im_start|> is given, the rest predicted
                j, p = j + m, p + m
            else:
                m = len(seg[1]) + 2
                ids[r, j], ids[r, j + m - 1] = models.ids["soi"], models.ids["eoi"]
                pos[r, j:j + m], group[r, j:j + m] = p, k
                blocks.append((r, j + 1, seg[1]))
                j, p = j + m, p + 1
        nxt[r] = p
    emb = models.model.embed(ids.clamp(min=0).to(dev))
    if blocks:  # scatter the ViT embeddings into their slots
        emb = emb.clone()
        for r, j, e in blocks:
            emb[r, j:j + len(e)] = e.to(emb.dtype)
    valid, group = valid.to(dev), group.to(dev)
    return emb, pos.to(dev), attention_mask(valid, group), ids.to(dev), sup.to(dev), valid, nxt.to(dev)


@dataclass
class Prefix:
    """A batch of text prefixes for image generation: embeds (B, P, D), positions, valid keys (B, P), the image
    block's position (B,), and the per-layer KV cache of the prefix (None: the uncached path recomputes it)."""
    emb: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    next_pos: torch.Tensor
    cache: list | None

    def cfg_pair(self) -> "Prefix":
        """Rows [conditional; unconditional]. The unconditional context is the one before the prompt (BAGEL's
        cfg_text_precontext) - empty for a plain prompt - so its rows keep the prompt's keys but attend to none."""
        cat = lambda t: torch.cat([t, t])
        cache = None if self.cache is None else [(cat(k), cat(v)) for k, v in self.cache]
        return Prefix(cat(self.emb), cat(self.pos), torch.cat([self.valid, torch.zeros_like(self.valid)]),
                      cat(self.next_pos), cache)

    def rows(self, idx) -> "Prefix":
        cache = None if self.cache is None else [(k[idx], v[idx]) for k, v in self.cache]
        return Prefix(self.emb[idx], self.pos[idx], self.valid[idx], self.next_pos[idx], cache)


def encode_prefix(models: Models, prompts: list[str], cached: bool = True) -> Prefix:
    """Prompts as BAGEL text segments, left-padded; with cached=True prefilled once through the understanding
    expert (causal), so the flow steps only run the image block against the cache."""
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"empty prompt at batch position(s) {empty}: every image needs a text prompt")
    emb, pos, mask, _, _, valid, nxt = pack(models, [[("text", models.text_ids(p), False)] for p in prompts])
    cache = models.model.language_model.model(emb, pos, mask)[1] if cached else None
    return Prefix(emb, pos, valid, nxt, cache)


def latent_forward(models: Models, prefix: Prefix, x: torch.Tensor, t: torch.Tensor, grid: tuple[int, int]):
    """Velocity (B, N, 64) of noisy latent tokens x (B, N, 64) at times t (B,) after the prefix: the query is
    <|vision_start|> latents <|vision_end|> at one position, full attention, latents through the generation expert
    (the two marks through the understanding expert, as in BAGEL's gen mode)."""
    model, lm = models.model, models.model.language_model.model
    b, n = x.shape[:2]
    marks = model.embed(torch.tensor([models.ids["soi"], models.ids["eoi"]], device=x.device))
    lat = model.latent_embeds(x, t, *grid)
    block = torch.cat([marks[0].expand(b, 1, -1), lat.to(marks.dtype), marks[1].expand(b, 1, -1)], 1)
    bpos = prefix.next_pos[:, None].expand(b, n + 2)
    p = prefix.valid.shape[1]
    if prefix.cache is not None:
        mask = torch.cat([prefix.valid, prefix.valid.new_ones(b, n + 2)], 1)[:, None, None, :]  # (B, 1, 1, P + n + 2)
        hidden = lm(block, bpos, mask, gen=(1, n + 1), past=prefix.cache)[0][:, 1:n + 1]
    else:
        valid = torch.cat([prefix.valid, prefix.valid.new_ones(b, n + 2)], 1)
        group = torch.cat([torch.full_like(prefix.pos, -1), torch.zeros_like(bpos)], 1)
        hidden = lm(torch.cat([prefix.emb, block], 1), torch.cat([prefix.pos, bpos], 1), attention_mask(valid, group),
                    gen=(p + 1, p + 1 + n))[0][:, p + 1:p + 1 + n]
    return model.llm2vae(hidden)


def guided_velocity(models: Models, pair: Prefix, x: torch.Tensor, t: float, grid, scale: float, renorm_min: float):
    """Text CFG with BAGEL's global renorm, one batched forward of [cond; uncond] (pair = prefix.cfg_pair()):
    v = v_u + s (v_c - v_u), then v *= clamp(|v_c| / |v|, renorm_min, 1) with norms over each sample's tokens.
    scale <= 1 runs the conditional rows only. Returns fp32 (B, N, 64)."""
    b = x.shape[0]
    if scale <= 1.0:
        return latent_forward(models, pair.rows(slice(0, b)), x, x.new_full((b,), t), grid).float()
    v_c, v_u = latent_forward(models, pair, torch.cat([x, x]), x.new_full((2 * b,), t), grid).float().chunk(2)
    v = v_u + scale * (v_c - v_u)
    norm_c, norm = v_c.flatten(1).norm(dim=1), v.flatten(1).norm(dim=1)
    return v * (norm_c / (norm + 1e-8)).clamp(min=renorm_min, max=1.0)[:, None, None]


def bagel_timesteps(num_timesteps: int, shift: float) -> list[float]:
    """BAGEL's schedule: linspace(1, 0, N), shifted t -> s t / (1 + (s - 1) t); N - 1 steps. Host floats: the
    sampler branches on them (CFG interval, SDE window) without reading anything back from the GPU."""
    t = torch.linspace(1, 0, num_timesteps, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


@dataclass
class Trajectory:
    latents: torch.Tensor  # (B, N, 64) final x_0
    x_t: torch.Tensor  # (B, W, N, 64) states at the window steps
    x_next: torch.Tensor  # (B, W, N, 64) sampled next states
    logp: torch.Tensor  # (B, W) log-probs of the sampled transitions
    steps: list[int]  # the W step indices


@torch.no_grad()
def sample_latents(models: Models, prefix: Prefix, noise: torch.Tensor, grid, cfg: Config, num_timesteps: int,
                   cfg_interval, window=(), generator=None) -> Trajectory:
    """Flow sampling from t = 1 to 0: Flow-GRPO's SDE step (common.sde_step_with_logprob, eta = noise_level) at the
    window steps, Euler elsewhere; text CFG where lo < t <= hi. BAGEL: x <- x + v dt, v = noise - data."""
    ts = bagel_timesteps(num_timesteps, cfg.timestep_shift)
    pair, x = prefix.cfg_pair(), noise.float()
    xs, nxt, logps = [], [], []
    for i in range(len(ts) - 1):
        scale = cfg.cfg_text_scale if cfg_interval[0] < ts[i] <= cfg_interval[1] else 1.0
        v = guided_velocity(models, pair, x, ts[i], grid, scale, cfg.cfg_renorm_min)
        if i in window:
            x_new, logp, _, _ = common.sde_step_with_logprob(x, v, ts[i], ts[i + 1], cfg.noise_level,
                                                             generator=generator)
            xs.append(x), nxt.append(x_new), logps.append(logp)
        else:
            x_new = common.euler_step(x, v, ts[i], ts[i + 1])
        x = x_new
    stack = lambda seq, shape: torch.stack(seq, 1) if seq else x.new_zeros(shape)
    return Trajectory(x, stack(xs, (x.shape[0], 0, *x.shape[1:])), stack(nxt, (x.shape[0], 0, *x.shape[1:])),
                      stack(logps, (x.shape[0], 0)), list(window))


def decode(models: Models, latents: torch.Tensor, grid) -> torch.Tensor:
    """Latent tokens (B, N, 64) -> images (B, 3, H, W) in [-1, 1] through the VAE (shift/scale of its config)."""
    z = unpatchify(latents, *grid, models.model.arch.latent_patch)
    return common.vae_decode(models.vae, z).float()


# -----------------------------------------------------------------------------
# understanding: autoregressive text with a KV cache


@torch.no_grad()
def generate_text(models: Models, images: list, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> list[str]:
    """Replies to prompts, each optionally after an image (ViT tokens, (3, S, S) in [-1, 1], or None). BAGEL's
    decoding: prefill [image] <|im_start|> prompt <|im_end|>, feed <|im_start|>, generate until <|im_end|>.
    temperature 0 = greedy (BAGEL's understanding default); > 0 samples (role-play)."""
    model, lm = models.model, models.model.language_model
    rows = []
    for image, prompt in zip(images, prompts):
        segs = [] if image is None else [("image", model.vit_embeds(image[None].to(models.device))[0])]
        rows.append(segs + [("text", models.text_ids(prompt), False), ("text", [models.ids["bos"]], False)])
    emb, pos, mask, _, _, valid, nxt = pack(models, rows)
    hidden, cache = lm.model(emb, pos, mask)
    logits, b, eos = lm.lm_head(hidden[:, -1]).float(), len(rows), models.ids["eos"]
    out, done, pos = [], torch.zeros(b, dtype=torch.bool, device=emb.device), nxt[:, None]
    for _ in range(max_new_tokens):
        if temperature > 0:
            token = common.sample_tokens(logits, temperature, generator=generator)[0]
        else:
            token = logits.argmax(-1)
        token = torch.where(done, eos, token)
        out.append(token)
        done |= token == eos
        if bool(done.all()):  # one host sync per text token: replies are short; the image loop has none
            break
        valid = torch.cat([valid, valid.new_ones(b, 1)], 1)
        hidden, cache = lm.model(model.embed(token[:, None]), pos, valid[:, None, None, :], past=cache)
        logits, pos = lm.lm_head(hidden[:, -1]).float(), pos + 1
    rows = torch.stack(out, 1).tolist()
    return [models.tokenizer.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True).strip()
            for r in rows]


# -----------------------------------------------------------------------------
# Unified-SFT (stage 1): 0.25 x text cross-entropy + 1.0 x flow-matching MSE

SFT_TIMESTEP_SHIFT = 1.0  # pretrain_unified_navit.py default timestep_shift for training (sampling uses 3)


def t2i_loss(models: Models, captions: list[str], x0: torch.Tensor, grid, drop: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow-matching MSE per latent token, averaged (BAGEL: mean over channels, sum over tokens / token count).
    t = sigmoid(randn) (logit-normal), shifted; x_t = (1 - t) x0 + t eps; target eps - x0 ("from data to noise").
    Rows flagged in drop (B,) see no prompt: the unconditional branch CFG samples with."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.device)
    t = SFT_TIMESTEP_SHIFT * t / (1 + (SFT_TIMESTEP_SHIFT - 1) * t)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    prefix = encode_prefix(models, captions, cached=False)
    prefix.valid = prefix.valid & ~drop.to(prefix.valid.device)[:, None]
    v = latent_forward(models, prefix, x_t, t, grid).float()
    return ((v - (eps - x0)) ** 2).mean(-1).mean()


def text_loss(models: Models, rows: list[tuple]) -> torch.Tensor:
    """Cross-entropy of the replies (and their <|im_end|>), summed over supervised tokens / their count; each row is
    [image block] <|im_start|> prompt <|im_end|> <|im_start|> reply <|im_end|>, only the reply supervised."""
    model = models.model
    pix = [p for p, _, _ in rows if p is not None]
    # One ViT call per batch, a zero image (weight 0) when no row has one: under FSDP every rank must run the same
    # sharded modules, or the all-gathers deadlock (the public "fixed" trainer's dummy ViT pass, same reason).
    s = models.vit_size
    vit = model.vit_embeds((torch.stack(pix) if pix else torch.zeros(1, 3, s, s)).to(models.device))  # (I, N, D)
    segs, k = [], 0
    for p, prompt, reply in rows:
        img = [] if p is None else [("image", vit[k])]
        k += p is not None
        segs.append(img + [("text", models.text_ids(prompt), False), ("text", models.text_ids(reply), True)])
    emb, pos, mask, ids, sup, _, _ = pack(models, segs)
    if not pix:  # the dummy joins before the decoder, so its backward comes after the decoder's, as a real image's
        emb = emb + 0.0 * vit.sum()
    hidden = model.language_model.model(emb, pos, mask)[0]
    target = sup[:, 1:]  # position j predicts token j + 1: only the supervised ones go through lm_head
    logits = model.language_model.lm_head(hidden[:, :-1][target]).float()
    return F.cross_entropy(logits, ids[:, 1:][target])


def sft_loss(models: Models, cfg: Config, t2i: list, text: list, grid, generator=None, backward=False) -> dict:
    """Unified-SFT loss of one batch: ce_weight x CE + mse_weight x MSE (pretrain_unified_navit defaults 0.25, 1.0).
    Both kinds must be present: UniCharacter's packing makes both groups mandatory in every pack.
    backward=True back-propagates each weighted term right after its forward (same gradient as the sum): one
    pass's activations at a time, and under FSDP a fixed order of the sharded layers' collectives on every rank."""
    if not t2i or not text:
        raise ValueError(f"a Unified-SFT batch needs both kinds: got {len(t2i)} text-to-image and {len(text)} text "
                         "samples (the character folder needs captioned images and dialogues)")
    drop = torch.rand(len(t2i), generator=generator) < cfg.text_cond_dropout
    mse = t2i_loss(models, [c for c, _ in t2i], torch.stack([z for _, z in t2i]).to(models.device), grid, drop,
                   generator)
    if backward:
        (cfg.mse_weight * mse).backward()
        mse = mse.detach()
    ce = text_loss(models, text)
    if backward:
        (cfg.ce_weight * ce).backward()
        ce = ce.detach()
    return {"loss": cfg.ce_weight * ce + cfg.mse_weight * mse, "ce": ce, "mse": mse}


def sft_parameters(model: Bagel) -> list[nn.Parameter]:
    """Stage 1 trains the LLM (both experts), the ViT, the connector and the latent adapters; VAE and the fixed
    sin-cos tables stay frozen (freeze_vae True, freeze_llm/vit/und False in the public script)."""
    return [p for n, p in model.named_parameters() if not n.endswith("pos_embed")]


def sft_step(models: Models, cfg: Config, data: Character, optimizer, rng: random.Random, generator) -> dict:
    """One Unified-SFT step on a batch drawn with replacement: sft_t2i_batch T2I + sft_text_batch text samples."""
    t2i = [rng.choice(data.t2i) for _ in range(cfg.sft_t2i_batch)]
    text = [rng.choice(data.text) for _ in range(cfg.sft_text_batch)]
    models.model.train()
    models.model.language_model.model.grad_checkpointing = cfg.grad_checkpointing
    optimizer.zero_grad(set_to_none=True)
    out = sft_loss(models, cfg, t2i, text, data.latent_grid, generator, backward=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # FSDP's sharded ones, not the gathered views
    norm, stepped = optimizer_step(optimizer, params, None, cfg, zero_grad=False)
    models.model.language_model.model.grad_checkpointing = False
    models.model.eval()
    return {k: float(out[k].detach()) for k in ("loss", "ce", "mse")} | {"grad_norm": norm,
                                                                     "skipped_updates": int(not stepped)}


def sft_run(models: Models, cfg: Config, data: Character, steps: int, rng: random.Random, log=None, start: int = 0,
            optimizer=None):
    """Unified-SFT for `steps` steps: AdamW (0.9, 0.95), eps sft_adam_eps, no weight decay, constant lr (public
    script)."""
    params = sft_parameters(models.model)
    for p in params:
        p.requires_grad_(True)
    optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.sft_lr, betas=(0.9, 0.95), eps=cfg.sft_adam_eps,
                                               weight_decay=0.0)
    for step in range(start, steps):
        generator = common.step_generator(cfg.seed, step, dist.get_rank() if dist.is_initialized() else 0)
        metrics = sft_step(models, cfg, data, optimizer, rng, generator)
        if log is not None:
            log(step, metrics)
    models.model.requires_grad_(False)
    return optimizer


def optimizer_step(optimizer, params: list, loss: torch.Tensor | None, cfg: Config,
                   zero_grad: bool = True) -> tuple[float, bool]:
    """backward (where this rank has a finite loss), average over ranks, clip, step; a rank with a non-finite loss
    contributes zeros, and if the averaged norm is not finite every rank skips the step. FSDP-sharded parameters
    (DTensors) were already averaged by FSDP's reduce-scatter; the rest goes through common.average_gradients.
    zero_grad=False keeps gradients the caller accumulated. Returns (grad norm before clipping, stepped)."""
    from torch.distributed.tensor import DTensor

    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    if loss is not None and torch.isfinite(loss):
        loss.backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    plain = [p for p in params if not isinstance(p, DTensor)]
    common.average_gradients(plain)
    sharded = [p.grad._local_tensor.float().pow(2).sum() for p in params if isinstance(p, DTensor)]
    sq = sum((p.grad.float().pow(2).sum() for p in plain), torch.zeros((), device=params[0].grad.device))
    if sharded:  # each rank holds a shard: sum the squares over ranks
        local = torch.stack(sharded).sum()
        dist.all_reduce(local)
        sq = sq + local
    norm = sq.sqrt()
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return float(norm), False
    if norm > 0:
        coef = (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef)
        optimizer.step()
    return float(norm), True


# -----------------------------------------------------------------------------
# reward: 0.3 VQA + 0.45 CLIP-T/30 + 0.1 diversity + 0.15 DINO band penalty (flow_grpo/rewards.py
# personalized_t2i_reward and its *_scorer.py files in Tangc03/UniCharacter; reference/unicharacter.md 5.1)

YES_WORDS = {"yes", "true", "correct", "accurate", "depicts", "shows"}
NO_WORDS = {"no", "false", "not", "incorrect", "wrong", "doesn't", "does not"}


class Scorer:
    """BLIP-VQA, CLIP and DINOv2 from local transformers folders; toy=True uses the pixel-reading stand-ins."""

    def __init__(self, cfg: Config, device: torch.device, toy: bool):
        self.toy, self.device, self.lpips = toy, device, None
        if (cfg.lpips_alexnet is None) != (cfg.lpips_lin is None):
            raise ValueError("LPIPS needs both --lpips-alexnet (torchvision AlexNet weights) and --lpips-lin (lpips "
                             f"v0.1 alex.pth); got {cfg.lpips_alexnet} and {cfg.lpips_lin}")
        if cfg.lpips_alexnet is not None:
            self.lpips = load_lpips(cfg.lpips_alexnet, cfg.lpips_lin).to(device)
            common.print0("diversity term: LPIPS (AlexNet), mean to the other images of the group")
        else:
            common.print0("diversity term: 1 - cos of DINOv2 features (stand-in; pass --lpips-alexnet and --lpips-lin "
                          "for the paper's LPIPS)")
        if toy:
            return
        from transformers import (AutoImageProcessor, AutoModel, BlipForQuestionAnswering, BlipProcessor, CLIPModel,
                                  CLIPProcessor)

        for folder, flag in ((cfg.vqa_dir, "--vqa-dir"), (cfg.clip_dir, "--clip-dir"), (cfg.dino_dir, "--dino-dir")):
            if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
                raise FileNotFoundError(f"the character reward with real weights needs {flag}: a local transformers "
                                        f"folder with config.json (got {folder})")
        self.vqa_proc = BlipProcessor.from_pretrained(cfg.vqa_dir)
        self.vqa = BlipForQuestionAnswering.from_pretrained(cfg.vqa_dir).to(device).eval()  # fp32, as public
        self.clip_proc = CLIPProcessor.from_pretrained(cfg.clip_dir)
        self.clip = CLIPModel.from_pretrained(cfg.clip_dir).to(device).eval()
        self.dino_proc = AutoImageProcessor.from_pretrained(cfg.dino_dir)
        self.dino = AutoModel.from_pretrained(cfg.dino_dir).to(device).eval()

    @torch.no_grad()
    def answers(self, images: list, questions: list[str]) -> list[str]:
        """BLIP generates a free answer (max_length 50); no choices are given, no token probabilities used."""
        if self.toy:
            return [toy_vqa(im, q) for im, q in zip(images, questions)]
        out = []
        for i in range(0, len(images), 32):
            inputs = self.vqa_proc(images=images[i:i + 32], text=questions[i:i + 32], padding=True,
                                   return_tensors="pt").to(self.device)
            ids = self.vqa.generate(**inputs, max_length=50)
            out += [a.strip() for a in self.vqa_proc.batch_decode(ids, skip_special_tokens=True)]
        return out

    @torch.no_grad()
    def clip_t(self, images: list, prompts: list[str]) -> torch.Tensor:
        """CLIP logit (100 x cos) / 30 per image with its prompt (truncated to CLIP's 77 tokens)."""
        if self.toy:
            return torch.tensor([toy_clip(im, p) for im, p in zip(images, prompts)])
        inputs = self.clip_proc(text=prompts, images=images, padding=True, truncation=True,
                                max_length=self.clip.config.text_config.max_position_embeddings,
                                return_tensors="pt").to(self.device)
        return self.clip(**inputs).logits_per_image.diagonal().float().cpu() / 30.0

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        """DINOv2 CLS features, L2-normalised: (B, D)."""
        if self.toy:
            return torch.stack([toy_features(im) for im in images])
        pixels = self.dino_proc(images=images, return_tensors="pt").to(self.device)
        return F.normalize(self.dino(**pixels).last_hidden_state[:, 0].float(), dim=-1).cpu()


    @torch.no_grad()
    def diversity(self, images: list, feats: torch.Tensor, group_size: int) -> torch.Tensor:
        """(B,) mean distance of each image to the rest of its group: LPIPS when loaded, else 1 - cos of feats."""
        if self.lpips is None:
            return leave_one_out_diversity(feats, group_size)
        pixels = torch.stack([common.pil_to_tensor(im.convert("RGB")) for im in images]).to(self.device)
        return lpips_diversity(self.lpips, pixels, group_size)


def vqa_score(answers: list[str], questions: list[dict], prompt: str) -> float:
    """Sum of the weights of exactly matched answers (lower-cased) / sum of weights; without questions the public
    fallback asks "Does this image accurately depict: <prompt>?" and grades yes-like 1, no-like 0, else 0.5."""
    if not questions:
        words = set(re.findall(r"[a-z']+", answers[0].lower()))
        return 1.0 if words & YES_WORDS else 0.0 if words & NO_WORDS else 0.5
    total = sum(float(q.get("weight", 1.0)) for q in questions)
    hit = sum(float(q.get("weight", 1.0)) for q, a in zip(questions, answers)
              if a.strip().lower() == str(q["answer"]).strip().lower())
    return hit / total if total > 0 else 0.0


def dino_penalty(sim: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """<= 0: -2 (s - high) above the band (copying a training image), -2 (low - s) below it (identity drift)."""
    return torch.where(sim > high, -2 * (sim - high), torch.where(sim < low, -2 * (low - sim), torch.zeros_like(sim)))


def leave_one_out_diversity(feats: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) mean (1 - cos) of each image to the other images of its group (groups contiguous)."""
    f = feats.view(-1, group_size, feats.shape[-1])
    dist_ = 1 - f @ f.transpose(1, 2)  # (groups, G, G), zero diagonal
    return (dist_.sum(-1) / max(group_size - 1, 1)).flatten()


# LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018; the lpips package's LPIPS(net="alex"), which the public
# diversity_scorer.py calls), written out here: torchvision is not one of our dependencies. Weights are read from two
# local files under their usual names: torchvision's AlexNet (features.{0,3,6,8,10}.weight/bias; classifier.* ignored)
# and lpips' v0.1 heads (lin{0..4}.model.1.weight, (1, C, 1, 1)).
LPIPS_CONVS = {"0": (3, 64, 11, 4, 2), "3": (64, 192, 5, 1, 2), "6": (192, 384, 3, 1, 1), "8": (384, 256, 3, 1, 1),
               "10": (256, 256, 3, 1, 1)}  # torchvision AlexNet features index: (in, out, kernel, stride, padding)
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # lpips ScalingLayer (v0.1)


class LPIPS(nn.Module):
    """Distance between images in [-1, 1]: at each of AlexNet's five ReLU outputs, features unit-normalised over
    channels (eps 1e-10), squared difference, 1 x 1 linear head (no bias), spatial mean; summed over the layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict({k: nn.Conv2d(i, o, kk, stride=s, padding=p)
                                       for k, (i, o, kk, s, p) in LPIPS_CONVS.items()})
        self.lins = nn.ModuleList(nn.Conv2d(c[1], 1, 1, bias=False) for c in LPIPS_CONVS.values())
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the five ReLU outputs, each unit-normalised over channels."""
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"LPIPS (AlexNet) needs images of at least 32 px a side, got {tuple(x.shape[-2:])}")
        f, h, out = self.features, (x.float() - self.shift) / self.scale, []
        for k in LPIPS_CONVS:
            if k in ("3", "6"):  # AlexNet's max pools sit before the second and third convolutions
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(f[k](h))
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def pairwise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, B) LPIPS between all pairs of x, from one feature pass: with head weights w per channel,
        mean_hw sum_c w (a - b)^2 = <w a, a> + <w b, b> - 2 <w a, b> (averaged over positions)."""
        d = x.new_zeros(x.shape[0], x.shape[0], dtype=torch.float32)
        for f, lin in zip(self.taps(x), self.lins):
            w = lin.weight.flatten().float()  # (C,)
            hw = f.shape[2] * f.shape[3]
            cross = torch.einsum("bchw,c,dchw->bd", f, w, f) / hw
            sq = cross.diagonal()
            d = d + sq[:, None] + sq[None, :] - 2 * cross
        return d.clamp(min=0).fill_diagonal_(0)


def load_lpips(alexnet_path: str, lin_path: str) -> LPIPS:
    """Strict: every AlexNet feature key and every head, shapes checked; only torchvision's classifier.* may be extra."""
    def read(path):
        if path.endswith(".safetensors"):
            return read_safetensors(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS weights not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {path}: {e}") from None
    net = LPIPS()
    trunk = {k: v for k, v in read(alexnet_path).items() if not k.startswith("classifier.")}
    heads = read(lin_path)
    trunk_keys = {k: v.shape for k, v in net.state_dict().items() if k.startswith("features.")}
    check_keys(trunk_keys, {k: v.shape for k, v in trunk.items()}, alexnet_path)
    head_keys = {f"lin{i}.model.1.weight": lin.weight.shape for i, lin in enumerate(net.lins)}
    check_keys(head_keys, {k: v.shape for k, v in heads.items()}, lin_path)
    net.load_state_dict({**trunk, **{f"lins.{i}.weight": heads[f"lin{i}.model.1.weight"]
                                     for i in range(len(net.lins))}}, strict=True)
    return net.eval().requires_grad_(False)


def lpips_diversity(lpips: LPIPS, images: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) mean LPIPS of each image to the other images of its group (groups contiguous); one feature pass per
    group, so G (G - 1) / 2 pairs cost G AlexNet passes (the public loop runs both images of every pair)."""
    out = [lpips.pairwise(g).sum(1) / max(group_size - 1, 1) for g in images.split(group_size)]
    return torch.cat(out).cpu()


def character_reward(scorer: Scorer, images: list, metas: list[dict], ref_feats: torch.Tensor, cfg: Config,
                     group_size: int) -> dict[str, torch.Tensor]:
    """Per-image reward components and the weighted total (B,). metas: the prompt dict of each image."""
    pairs = []
    for i, m in enumerate(metas):
        qs = m.get("vqa_questions") or [dict(question=f"Does this image accurately depict: {m['prompt']}?")]
        pairs += [(i, q["question"]) for q in qs]
    answers = scorer.answers([images[i] for i, _ in pairs], [q for _, q in pairs])
    by_image = [[a for (j, _), a in zip(pairs, answers) if j == i] for i in range(len(images))]
    vqa = torch.tensor([vqa_score(a, m.get("vqa_questions") or [], m["prompt"]) for a, m in zip(by_image, metas)])
    clip = scorer.clip_t(images, [m["prompt"] for m in metas])
    feats = scorer.features(images)
    sim = (feats @ ref_feats.T).max(1).values  # max cosine to the character's training images
    pen = dino_penalty(sim, cfg.dino_high, cfg.dino_low)
    div = scorer.diversity(images, feats, group_size)
    total = cfg.w_vqa * vqa + cfg.w_clip * clip + cfg.w_div * div + cfg.w_dino * pen
    return {"reward": total, "r_vqa": vqa, "r_clip": clip, "r_div": div, "p_dino": pen, "dino_sim": sim}


# The toy's stand-ins read what the pictures really show: background colour from the border, Bo from orange pixels.
def _toy_stats(image) -> tuple[torch.Tensor, float, float]:
    """(background colour probabilities over TOY_BACKGROUNDS, orange mass left of centre, right of centre)."""
    px = (common.pil_to_tensor(image.convert("RGB")).permute(1, 2, 0) + 1) * 127.5  # (H, W, 3) in 0..255
    border = torch.cat([px[0], px[-1], px[:, 0], px[:, -1]]).median(0).values
    d = torch.tensor([(border - torch.tensor(c, dtype=torch.float32)).norm() for c in TOY_BACKGROUNDS.values()])
    orange = ((px - torch.tensor(TOY_ORANGE, dtype=torch.float32)).norm(dim=-1) < 70).float()
    half = TOY_SIZE // 2
    return torch.softmax(-d / 20, 0), float(orange[:, :half].sum()), float(orange[:, half:].sum())


def toy_vqa(image, question: str) -> str:
    probs, left, right = _toy_stats(image)
    q = question.lower()
    if m := re.search(r"is the background (\w+)", q):
        return "yes" if list(TOY_BACKGROUNDS)[int(probs.argmax())] == m.group(1) else "no"
    if m := re.search(r"is bo on the (left|right)", q):
        if left + right < 6:  # no Bo in the picture
            return "no"
        return "yes" if ("left" if left > right else "right") == m.group(1) else "no"
    return "unknown"


def toy_clip(image, prompt: str) -> float:
    """cos between (background probabilities, Bo's left/right mass share) and the prompt's one-hot attributes."""
    probs, left, right = _toy_stats(image)
    img = torch.cat([probs, torch.tensor([left, right]) / max(left + right, 6.0)])
    txt = torch.tensor([float(c in prompt) for c in TOY_BACKGROUNDS] + [float(s in prompt) for s in TOY_SIDES])
    return float(F.cosine_similarity(img, txt, dim=0))


def toy_features(image) -> torch.Tensor:
    """The stand-in for DINOv2 CLS: the picture pooled to 4 x 4, centred, L2-normalised (48-d)."""
    x = common.pil_to_tensor(image)[None]
    f = F.avg_pool2d(x, TOY_SIZE // 4).flatten()
    return F.normalize(f - f.mean(), dim=0)


# -----------------------------------------------------------------------------
# rollout


@dataclass
class Rollout:
    metas: list[dict]  # the prompt dict of each image (a prompt's group_size images contiguous)
    traj: Trajectory
    images: list  # PIL
    rewards: dict[str, torch.Tensor]  # components (B,), "reward" = weighted total


def to_pil(images: torch.Tensor) -> list:
    return [common.tensor_to_pil(im) for im in images.cpu()]


@torch.no_grad()
def rollout(models: Models, scorer: Scorer, cfg: Config, metas: list[dict], ref_feats, generator) -> Rollout:
    """G images per prompt (the whole group on this rank): SDE in a window of sde_window steps drawn from the step's
    generator among the first sde_window_range steps, ODE elsewhere, CFG at every step in the interval."""
    metas = [m for m in metas for _ in range(cfg.group_size)]
    steps = cfg.num_timesteps - 1
    width = min(cfg.sde_window, steps)
    start = int(torch.randint(0, max(1, min(cfg.sde_window_range, steps) - width + 1), (1,), generator=generator))
    side = cfg.image_size // models.model.arch.latent_downsample
    grid = (side, side)
    noise = torch.randn(len(metas), side * side, models.model.arch.latent_dim, generator=generator).to(models.device)
    prefix = encode_prefix(models, [m["prompt"] for m in metas])
    traj = sample_latents(models, prefix, noise, grid, cfg, cfg.num_timesteps, cfg.cfg_interval,
                          range(start, start + width), generator)
    images = to_pil(decode(models, traj.latents, grid))
    return Rollout(metas, traj, images, character_reward(scorer, images, metas, ref_feats, cfg, cfg.group_size))


# -----------------------------------------------------------------------------
# update: Flow-GRPO on the generation expert


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - prompt mean) / (prompt std + 1e-4), population std (UniCharacter: global_std False, per prompt)."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def minibatches(n: int, count: int) -> list[range]:
    """`count` contiguous chunks of n items (some may be empty): every rank runs the same number of steps."""
    edges = [round(i * n / count) for i in range(count + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(count)]


def grpo_step(models: Models, optimizer, params: list, cfg: Config, batch: Rollout, advantages: torch.Tensor) -> dict:
    """Flow-GRPO (bagel.py generate_image_learn): per sample and window step, the log-prob of the stored transition
    under the current CFG-combined, renormalised velocity; ratio = exp(logp - logp_old), A clamped to +-adv_clip,
    loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))) (+ beta KL to adapters off). Old log-probs are re-scored
    here with the same chunking as the update, before it, so the first minibatch's ratio is exactly 1."""
    model, traj = models.model, batch.traj
    ts = bagel_timesteps(cfg.num_timesteps, cfg.timestep_shift)
    side = cfg.image_size // model.arch.latent_downsample
    grid, n_steps = (side, side), traj.x_t.shape[1]
    chunks = minibatches(len(batch.metas), cfg.num_minibatches)
    with torch.no_grad():  # the prompt cache comes from the frozen understanding expert: computed once
        pairs = [encode_prefix(models, [batch.metas[i]["prompt"] for i in c]).cfg_pair() if len(c) else None
                 for c in chunks]

    def score(k: int, c: range, j: int):
        i = traj.steps[j]
        scale = cfg.cfg_text_scale if cfg.cfg_interval[0] < ts[i] <= cfg.cfg_interval[1] else 1.0
        x, x_next = traj.x_t[c.start:c.stop, j], traj.x_next[c.start:c.stop, j]
        v = guided_velocity(models, pairs[k], x, ts[i], grid, scale, cfg.cfg_renorm_min)
        _, logp, mean, std = common.sde_step_with_logprob(x, v, ts[i], ts[i + 1], cfg.noise_level, prev_sample=x_next)
        return logp, mean, std

    with torch.no_grad():
        old = [[score(k, c, j)[0] for j in range(n_steps)] if len(c) else None for k, c in enumerate(chunks)]
        ref = None
        if cfg.beta > 0:
            with common.lora_disabled(model):
                ref = [[score(k, c, j)[1] for j in range(n_steps)] if len(c) else None for k, c in enumerate(chunks)]
    gap = max((float((torch.stack(o, 1) - traj.logp[c.start:c.stop]).abs().max()) for o, c in zip(old, chunks)
               if o is not None and n_steps), default=0.0)
    stats = {"loss": [], "kl": [], "clip_frac": [], "approx_kl": [], "grad_norm": [], "ratio0": float("nan"),
             "skipped_updates": 0, "logp_gap": gap}
    model.language_model.model.grad_checkpointing = cfg.grad_checkpointing
    for k, c in enumerate(chunks):
        optimizer.zero_grad(set_to_none=True)
        adv = advantages[c.start:c.stop].to(models.device).clamp(-cfg.adv_clip, cfg.adv_clip)
        for j in range(n_steps if len(c) else 0):
            logp, mean, std = score(k, c, j)
            ratio = torch.exp(logp - old[k][j])
            clipped = ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
            loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
            kl = common.step_mean_kl(mean, ref[k][j], std).mean() if ref is not None else torch.zeros(())
            loss = (loss + cfg.beta * kl) / n_steps  # the window steps of a minibatch make one optimiser step
            if torch.isfinite(loss):  # backward per step: one step's activations at a time
                loss.backward()
            stats["loss"].append(float(loss.detach()) * n_steps)
            stats["kl"].append(float(kl.detach()))
            stats["clip_frac"].append(float((ratio != clipped).float().mean().detach()))
            stats["approx_kl"].append(float(0.5 * ((logp.detach() - old[k][j]) ** 2).mean()))
            if k == 0 and j == 0:
                stats["ratio0"] = float(ratio.detach().mean())
        norm, stepped = optimizer_step(optimizer, params, None, cfg, zero_grad=False)
        stats["grad_norm"].append(norm)
        stats["skipped_updates"] += not stepped
    model.language_model.model.grad_checkpointing = False
    return {k: (sum(v) / len(v) if v else float("nan")) if isinstance(v, list) else v for k, v in stats.items()}


# -----------------------------------------------------------------------------
# train

LORA_TARGETS = ["*_proj_moe_gen", "*mlp_moe_gen.*_proj"]  # the generation expert's projections and MLP


def setup_trainable(models: Models, cfg: Config, d: common.Dist) -> list[nn.Parameter]:
    """Character-GRPO trains only the generation expert (names with "moe_gen": its q/k/v/o, q/k norms, MLP, layer
    norms and final norm); vae2llm, llm2vae, time and position embeddings stay frozen, as in train_bagel.py.
    LoRA (lora_rank > 0) wraps the expert's Linear layers; full training may shard the decoder with FSDP."""
    model = models.model
    if cfg.lora_rank > 0:
        common.seed_everything(cfg.seed)  # the same adapters on every rank
        common.inject_lora(model, LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha)
        model.to(models.device)
        return common.lora_parameters(model)
    for n, p in model.language_model.named_parameters():
        p.requires_grad_("moe_gen" in n)
    if cfg.fsdp:
        shard(model, d, everything=False)
    return [p for n, p in model.language_model.named_parameters() if "moe_gen" in n]


def shard(model: Bagel, d: common.Dist, everything: bool) -> None:
    """FSDP2 (fully_shard): one unit per decoder layer, as the public FSDP wrapping of Qwen2MoTDecoderLayer. Unified-SFT
    (everything=True) also shards the ViT layers and lm_head; GRPO does not (frozen weights need no optimizer
    state). The rest (embedding, norms, connector, latent adapters: 0.6 B at 7B) stays replicated; optimizer_step
    all-reduces its gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    units = list(model.language_model.model.layers)
    if everything:  # the embedding stays whole: it runs several times a step in a data-dependent backward order
        units += list(model.vit_model.vision_model["encoder"]["layers"]) + [model.language_model.lm_head]
    for m in units:
        # explicit True: every unit is its own FSDP root (Bagel has no forward of its own), and a root left at the
        # default keeps its gathered weights after forward - the whole model, unsharded, through the sampling loop
        fully_shard(m, mesh=mesh, reshard_after_forward=True)


# Checkpoints hold full tensors (FSDP shards gathered), so a run resumes exactly with or without --fsdp and on any
# number of ranks; rank 0 writes them. At 7B that needs rank 0 to hold the full optimizer state in CPU memory.
def gathered(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a tensor or of an FSDP-sharded DTensor (collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous()


@torch.no_grad()
def load_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copies a full tensor into a parameter, into this rank's shard when it is an FSDP DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with sharded moments gathered."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: gathered(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer, state: dict, where: str) -> None:
    """Loads optimizer_state() output, sharding each moment like its parameter (AdamW's step counts stay whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if sum(len(g["params"]) for g in state["param_groups"]) != len(params):
        raise ValueError(f"{where}: optimizer state for {sum(len(g['params']) for g in state['param_groups'])} parameters, this "
                         f"run trains {len(params)} (different --stage or --lora-rank?)")
    out = {}
    for i, s in state["state"].items():
        p = params[i]
        out[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    optimizer.load_state_dict({"state": out, "param_groups": state["param_groups"]})


def trainable_state(models: Models, cfg: Config) -> dict[str, torch.Tensor]:
    """LoRA weights, or the generation expert under BAGEL's names (gathered from FSDP shards on every rank)."""
    if cfg.lora_rank > 0:
        return {k: v.cpu() for k, v in common.lora_state_dict(models.model).items()}
    return {"language_model." + n: gathered(p) for n, p in models.model.language_model.named_parameters()
            if "moe_gen" in n}


def save_weights(models: Models, cfg: Config, d: common.Dist) -> str:
    """<out_dir>/gen_expert.safetensors (loads with --checkpoint over ema.safetensors) or lora.safetensors."""
    from safetensors.torch import save_file

    state = trainable_state(models, cfg)  # every rank: FSDP gathers collectively
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise FloatingPointError("non-finite trained weights: not overwriting the saved ones")
    if cfg.lora_rank > 0:
        path = os.path.join(cfg.out_dir, "lora.safetensors")
        if d.is_main:
            common.save_lora(models.model, path, prefix="")
    else:
        path = os.path.join(cfg.out_dir, "gen_expert.safetensors")
        if d.is_main:
            common.atomic_save(path, lambda tmp: save_file(state, tmp))
    return path


def prompts_for(cfg: Config, data: Character, step: int, rank: int) -> list[dict]:
    """This rank's prompts for a step: prompt index (step, rank, i) over the character's prompt list, so ranks draw
    different prompts and a resumed run draws the same ones."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    base = (step * world + rank) * cfg.prompts_per_rank
    return [data.prompts[(base + i) % len(data.prompts)] for i in range(cfg.prompts_per_rank)]


def check_config(cfg: Config, d: common.Dist) -> None:
    if cfg.stage not in ("sft", "grpo"):
        raise ValueError(f"--stage must be sft or grpo, got {cfg.stage!r}")
    if cfg.w_dino <= 0:  # fix: the public fallback's -0.1 silently disabled the term
        raise ValueError(f"--w-dino must be > 0 (got {cfg.w_dino}): the DINO term is a penalty added with a positive "
                         "weight; a non-positive weight would disable it")
    if cfg.beta > 0 and cfg.lora_rank == 0:
        raise ValueError("--beta > 0 needs --lora-rank > 0: the KL reference is the model with its adapters off")
    if cfg.fsdp and (cfg.stage == "grpo" and cfg.lora_rank > 0 or not dist.is_initialized()):
        raise ValueError("--fsdp shards full-weight training (Unified-SFT, or GRPO with --lora-rank 0) under torchrun")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise ValueError(f"--ema-decay must lie in [0, 1], got {cfg.ema_decay}")
    if cfg.image_size % (16 if cfg.model_dir else 4):
        raise ValueError(f"--image-size {cfg.image_size} must be a multiple of the latent token size")


def train(cfg: Config) -> None:
    d = common.init_dist(cfg.device)
    check_config(cfg, d)
    dtype, reason = common.pick_dtype(d.device, cfg.dtype)
    common.print0(f"dtype {dtype} ({reason}); stage {cfg.stage}; {d.world_size} rank(s)")
    models = load_models(cfg, d.device, dtype)
    data = load_character(models, character_folder(cfg), cfg.image_size)
    if d.is_main:
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
        common.save_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
        common.print0(json.dumps(dataclasses.asdict(cfg)))
    if cfg.stage == "sft":
        train_sft(models, cfg, d, data)
    else:
        train_grpo(models, cfg, d, data)
    common.cleanup_dist()


def train_sft(models: Models, cfg: Config, d: common.Dist, data: Character) -> None:
    """Stage 1 on the character folder; writes <out_dir>/model.safetensors (all weights, BAGEL's names) and
    ema.safetensors (the same with the EMA of the trained weights: what BAGEL ships and --finetune-from-ema reads)."""
    common.seed_everything(cfg.seed + d.rank)
    ckpt = os.path.join(cfg.out_dir, "checkpoint", "latest.pt")
    model = models.model
    if cfg.fsdp:
        shard(model, d, everything=True)
    params = sft_parameters(model)
    for p in params:
        p.requires_grad_(True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # fp32 shadow, sharded like the weights: a (1 - 0.9999) step is far below bf16's resolution
    ema = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in trained}
    optimizer = torch.optim.AdamW(params, lr=cfg.sft_lr, betas=(0.9, 0.95), eps=cfg.sft_adam_eps, weight_decay=0.0)
    start = 0
    if cfg.resume:
        state = common.load_checkpoint(ckpt)
        named = dict(model.named_parameters())
        check_keys({k: v.shape for k, v in named.items()}, {k: v.shape for k, v in state["model"].items()}, ckpt)
        for k, v in state["model"].items():
            load_full(named[k], v)
        for k, v in state["ema"].items():
            load_full(ema[k], v)
        load_optimizer_state(optimizer, state["optimizer"], ckpt)
        start = state["step"]
        common.print0(f"resumed from {ckpt} at step {start}")
    log = common.MetricLog(cfg.out_dir, cfg.max_steps, start, enabled=d.is_main)
    for step in range(start, cfg.max_steps):
        t0 = time.time()
        rng = random.Random(f"{cfg.seed}-{step}-{d.rank}")  # the batch of (step, rank): resumed runs redraw it
        metrics = sft_step(models, cfg, data, optimizer, rng, common.step_generator(cfg.seed, step, d.rank))
        with torch.no_grad():  # BAGEL's EMA update after every optimiser step
            for n, p in model.named_parameters():
                if n in ema:
                    ema[n].mul_(cfg.ema_decay).add_(p.detach().float(), alpha=1.0 - cfg.ema_decay)
        metrics = common.all_reduce_mean(metrics, d.device)
        metrics.update(t_step=time.time() - t0, mem_gb=common.peak_memory_gb(d.device))
        log.log(step, metrics)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_sft(model, ema, optimizer, cfg, d, step + 1, ckpt)
    model.requires_grad_(False)


def save_sft(model: Bagel, ema: dict, optimizer, cfg: Config, d: common.Dist, step: int, ckpt: str) -> None:
    """Every rank gathers (FSDP), rank 0 writes model.safetensors, ema.safetensors (EMA over the trained weights, the
    rest as is, in the model's dtype) and the resume checkpoint (fp32 EMA, optimizer state, RNG)."""
    from safetensors.torch import save_file

    sd = {k: gathered(v) for k, v in model.state_dict().items()}
    ema_full = {k: gathered(v) for k, v in ema.items()}
    if not all(torch.isfinite(v).all() for v in [*sd.values(), *ema_full.values()]):
        raise FloatingPointError(f"non-finite weights at step {step}: not overwriting {ckpt}")
    common.save_checkpoint(ckpt, {"step": step, "model": sd, "ema": ema_full, "optimizer": optimizer_state(optimizer),
                                  "config": dataclasses.asdict(cfg)})
    if d.is_main:
        ema_sd = {k: ema_full[k].to(v.dtype) if k in ema_full else v for k, v in sd.items()}
        for name, state in (("model.safetensors", sd), ("ema.safetensors", ema_sd)):
            common.atomic_save(os.path.join(cfg.out_dir, name), lambda tmp, s=state: save_file(s, tmp))


def train_grpo(models: Models, cfg: Config, d: common.Dist, data: Character) -> None:
    scorer = Scorer(cfg, d.device, models.toy)
    ref_feats = scorer.features(data.references)
    params = setup_trainable(models, cfg, d)
    common.seed_everything(cfg.seed + d.rank)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    images_per_step = d.world_size * cfg.prompts_per_rank * cfg.group_size
    common.print0(f"{d.world_size} rank(s) x {cfg.prompts_per_rank} prompt(s) x {cfg.group_size} images = "
                  f"{images_per_step} images per step; {cfg.num_timesteps - 1} sampling steps, SDE window "
                  f"{cfg.sde_window}; {cfg.num_minibatches} optimiser step(s) per rollout; "
                  f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters")
    ckpt = os.path.join(cfg.out_dir, "checkpoint", "latest.pt")
    start = 0
    if cfg.resume:
        state = common.load_checkpoint(ckpt)
        if cfg.lora_rank > 0:
            common.load_lora(models.model, state["trainable"], prefix="")
        else:
            named = dict(models.model.named_parameters())
            check_keys({k: v.shape for k, v in trainable_state(models, cfg).items()},
                       {k: v.shape for k, v in state["trainable"].items()}, ckpt)
            for k, v in state["trainable"].items():
                load_full(named[k], v)
        load_optimizer_state(optimizer, state["optimizer"], ckpt)
        start = state["step"]
        common.print0(f"resumed from {ckpt} at step {start}")
    log = common.MetricLog(cfg.out_dir, cfg.max_steps, start, enabled=d.is_main)
    skipped_groups = 0
    for step in range(start, cfg.max_steps):
        t0 = time.time()
        generator = common.step_generator(cfg.seed, step, d.rank)  # noise and window: resumed runs redraw them
        batch = rollout(models, scorer, cfg, prompts_for(cfg, data, step, d.rank), ref_feats, generator)
        common.synchronize(d.device)
        t_rollout = time.time() - t0
        r = batch.rewards["reward"]
        finite = (torch.isfinite(r) & torch.isfinite(batch.traj.logp.cpu()).all(1)).view(-1, cfg.group_size).all(1)
        skipped = torch.tensor(float((~finite).sum()), device=d.device)
        if dist.is_initialized():
            dist.all_reduce(skipped)
        skipped_groups += int(skipped)
        adv = group_advantages(torch.where(torch.isfinite(r), r, 0.0), cfg.group_size)
        adv = adv * finite.repeat_interleave(cfg.group_size)  # a group with a non-finite value teaches nothing
        stats = grpo_step(models, optimizer, params, cfg, batch, adv)
        common.synchronize(d.device)
        t_update = time.time() - t0 - t_rollout
        groups = r.view(-1, cfg.group_size)
        metrics = {k: float(v.mean()) for k, v in batch.rewards.items()}
        metrics.update(reward_std=float(r.std(unbiased=False)),
                       zero_std=float((groups.std(1, unbiased=False) == 0).float().mean()), **stats)
        metrics = common.all_reduce_mean(metrics, d.device)
        metrics.update(groups_skipped=skipped_groups, t_rollout=t_rollout, t_update=t_update,
                       img_s=images_per_step / (t_rollout + t_update), mem_gb=common.peak_memory_gb(d.device))
        log.log(step, metrics)
        done = step + 1 == cfg.max_steps
        if d.is_main and (step % cfg.sample_every == 0 or done):
            grid = torch.stack([common.pil_to_tensor(im) for im in batch.images[:cfg.group_size]])
            common.save_grid(grid, os.path.join(cfg.out_dir, "samples", f"step_{step + 1:06d}.png"))
        if (step + 1) % cfg.save_every == 0 or done:
            save_weights(models, cfg, d)
            common.save_checkpoint(ckpt, {"step": step + 1, "trainable": trainable_state(models, cfg),
                                          "optimizer": optimizer_state(optimizer), "config": dataclasses.asdict(cfg)})


# -----------------------------------------------------------------------------
# evaluate


def evaluate(cfg: Config) -> dict:
    """The character reward (and its parts) of ODE samples at inference settings (eval_num_timesteps, CFG interval
    0.4-1) over the character's prompts, group_size images each. RoleScape-20's metric code is not public; this is
    the training reward as a metric. Writes <out_dir>/eval.json."""
    d = common.init_dist(cfg.device)
    dtype, _ = common.pick_dtype(d.device, cfg.dtype)
    models = load_inference_models(cfg, d.device, dtype)
    data = load_character(models, character_folder(cfg), cfg.image_size)
    scorer = Scorer(cfg, d.device, models.toy)
    ref_feats = scorer.features(data.references)
    parts = []
    for index in range(d.rank, len(data.prompts), d.world_size):  # prompts sharded by rank
        meta = data.prompts[index]
        images = generate_image(models, cfg, meta["prompt"], cfg.group_size,
                                common.step_generator(cfg.seed, -1, index))  # step -1: never a training draw
        parts.append(character_reward(scorer, images, [meta] * len(images), ref_feats, cfg, cfg.group_size))
    local = {k: torch.cat([p[k] for p in parts]).tolist() if parts else [] for k in
             ("reward", "r_vqa", "r_clip", "r_div", "p_dino", "dino_sim")}
    if dist.is_initialized():
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, local)
        local = {k: [x for g in gathered for x in g[k]] for k in local}
    result = {k: sum(v) / len(v) for k, v in local.items()}
    result["images"] = len(local["reward"])
    if d.is_main:
        common.save_json(os.path.join(cfg.out_dir, "eval.json"), result)
        common.print0(" | ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "images")
                      + f" | {result['images']} images -> {cfg.out_dir}/eval.json")
    common.cleanup_dist()
    return result


# -----------------------------------------------------------------------------
# inference: generate_image, visual_understanding, knowledge_qa, role_play


def load_inference_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    """The model with --checkpoint merged over the base weights (full or generation-expert weights) and, with
    --lora-rank > 0 and --lora, our adapters merged into the expert."""
    models = load_models(cfg, device, dtype)
    if cfg.lora:
        if cfg.lora_rank <= 0:
            raise ValueError("--lora needs --lora-rank > 0 (the rank is then read from the file's metadata)")
        common.inject_lora(models.model, LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha)
        common.load_lora(models.model, cfg.lora, prefix="")
        common.merge_lora(models.model)
        models.model.to(device)
    return models


def vit_pixels(models: Models, image) -> torch.Tensor:
    """A PIL image as the ViT sees it: centre-cropped square of vit_size, (3, S, S) in [-1, 1]."""
    return common.pil_to_tensor(common.resize_center_crop(image.convert("RGB"), size=(models.vit_size,) * 2,
                                                          multiple=1))


def generate_image(models: Models, cfg: Config, prompt: str, n: int = 1, generator=None) -> list:
    """n images of a prompt: ODE sampling, eval_num_timesteps, shift 3, text CFG 4 in (0.4, 1] with global renorm."""
    side = cfg.image_size // models.model.arch.latent_downsample
    noise = torch.randn(n, side * side, models.model.arch.latent_dim, generator=generator).to(models.device)
    traj = sample_latents(models, encode_prefix(models, [prompt] * n), noise, (side, side), cfg,
                          cfg.eval_num_timesteps, cfg.eval_cfg_interval)
    return to_pil(decode(models, traj.latents, (side, side)))


def visual_understanding(models: Models, cfg: Config, image, question: str) -> str:
    """Greedy answer about an image (the image through the ViT only, as the public call with understanding_output)."""
    if not question.strip():
        raise ValueError("the question is empty")
    return generate_text(models, [vit_pixels(models, image)], [question], cfg.max_text_tokens)[0]


def knowledge_qa(models: Models, cfg: Config, question: str) -> str:
    """Greedy text-only answer (the public knowledge_qa: the understanding call without an image)."""
    if not question.strip():
        raise ValueError("the question is empty")
    return generate_text(models, [None], [question], cfg.max_text_tokens)[0]


IMAGE_REQUEST = re.compile(r"\b(picture|photo|image|draw|show me|selfie)\b", re.IGNORECASE)


def role_play(models: Models, cfg: Config, persona: dict, user: str, reference_image=None, history=None,
              with_image: bool | None = None, with_thinking: bool = False, generator=None) -> dict:
    """Reply in persona (sampled, text_temperature), then - when asked for a picture (with_image, or the user's
    words ask for one) - an image of the scene from the public T2I template; with_thinking first samples a plan
    "<think>...</think><gen>...</gen>" (temperature 0.3, as public) and adds both parts to the image prompt (a
    reply without the tags falls back to the plain template). fix: the prompt is kept when a reference image is
    given (the public call passes text=None then). Returns {"response", "image" (or None), "thinking_process",
    "generation_instruction" (None unless planned)}."""
    if not user.strip():
        raise ValueError("the user input is empty")
    pix = None if reference_image is None else vit_pixels(models, reference_image)
    reply = generate_text(models, [pix], [role_play_prompt(persona, user, history)], cfg.max_text_tokens,
                          cfg.text_temperature, generator)[0]
    image, plan = None, None
    if with_image or (with_image is None and IMAGE_REQUEST.search(user)):
        fields = dict(description=persona["description"], user=user, reply=reply)
        if with_thinking:
            plan = parse_plan(generate_text(models, [None], [THINK_TEMPLATE.format(**fields)], cfg.max_text_tokens,
                                            0.3, generator)[0])
        prompt = (T2I_THINK_TEMPLATE.format(**fields, thinking=plan[0], instruction=plan[1]) if plan
                  else T2I_TEMPLATE.format(**fields))
        image = generate_image(models, cfg, prompt, 1, generator)[0]
    return {"response": reply, "image": image, "thinking_process": plan and plan[0],
            "generation_instruction": plan and plan[1]}


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="UniCharacter (arXiv 2605.08129) on a BAGEL-style MoT model: "
                                                 "Unified-SFT and Character-GRPO. No --model-dir: the embedded toy.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="run --stage sft or grpo (torchrun for several GPUs)")
    mode.add_argument("--evaluate", action="store_true", help="character reward of inference samples -> eval.json")
    mode.add_argument("--generate", metavar="PROMPT", help="draw group_size images -> <out_dir>/generate/")
    mode.add_argument("--ask", nargs=2, metavar=("IMAGE", "QUESTION"), help="visual understanding: answer about an image")
    mode.add_argument("--knowledge", metavar="QUESTION", help="knowledge QA: a text-only answer")
    mode.add_argument("--role-play", metavar="TEXT", help="reply in persona (and draw the scene if asked for a picture)")
    parser.add_argument("--reference-image", metavar="IMAGE", help="--role-play: an image the user shows")
    parser.add_argument("--with-thinking", action="store_true", help="--role-play: plan the picture first")
    common.add_config_args(parser, Config)
    args = parser.parse_args(argv)
    cfg = resolve_config(common.config_from_args(Config, args), common.given_fields(Config, parser, argv))
    if args.train:
        return train(cfg)
    if args.evaluate:
        return evaluate(cfg)
    device = common.init_dist(cfg.device).device
    models = load_inference_models(cfg, device, common.pick_dtype(device, cfg.dtype)[0])
    generator = common.step_generator(cfg.seed, device=device)
    folder = os.path.join(cfg.out_dir, "generate")
    if args.generate is not None:
        images = generate_image(models, cfg, args.generate, cfg.group_size, generator)
        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(folder, f"{i:02d}.png"))
        common.print0(f"{len(images)} images of {args.generate!r} in {folder}/")
    elif args.ask is not None:
        common.print0(visual_understanding(models, cfg, common.load_image(args.ask[0]), args.ask[1]))
    elif args.knowledge is not None:
        common.print0(knowledge_qa(models, cfg, args.knowledge))
    else:
        persona = read_persona(character_folder(cfg))
        ref = common.load_image(args.reference_image) if args.reference_image else None
        out = role_play(models, cfg, persona, args.role_play, ref, with_thinking=args.with_thinking,
                        generator=generator)
        common.print0(f"{persona['name']}: {out['response']}")
        if out["generation_instruction"]:
            common.print0(f"(plan: {out['thinking_process']} -> {out['generation_instruction']})")
        if out["image"] is not None:
            os.makedirs(folder, exist_ok=True)
            out["image"].save(os.path.join(folder, "role_play.png"))
            common.print0(f"(image in {folder}/role_play.png)")


if __name__ == "__main__":
    main()
