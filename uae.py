"""
UAE: a unified model as an auto-encoder. Qwen2.5-VL captions an image (the encoder, image -> text), SD3.5 redraws it
from the caption (the decoder, text -> image), and the similarity of the two images trains both with RL.

Paper: "Unified Multimodal Model as Auto-Encoder" (v1: "Can Understanding and Generation Truly Benefit Together - or
Just Coexist?"), arXiv 2509.09666. Public code (PKU-YuanGroup/UAE): inference and Unified-Bench only, no training.

    image -> Qwen2.5-VL (+LoRA) samples a caption (temperature 0.7)
          -> the caption is re-encoded text-only in the "generate" chat role by the same LLM; its last-layer states
             of all tokens -> projector MLP (2048 -> 8192, GELU, -> 4096) -> SD3 encoder_hidden_states
          -> SD3.5 DiT (+LoRA) denoises with CFG against a fixed negative prompt; pooled input = CLIP-L/G of ""
          -> reward = cosine of CLIP ViT-L/14 (and optionally DINOv2) embeddings of original and reconstruction

Unified-GRPO, in stages (--stages, --stage-steps):
    1  cold start: the decoder (DiT LoRA + projector) learns to reconstruct each image from the encoder's captions
       with the SD3 rectified-flow loss
    2  generation for understanding: GRPO on the caption tokens (G captions per image, exact token log-probs),
       reward = similarity of the image and its reconstruction from that caption
    3  understanding for generation: Flow-GRPO on the DiT LoRA (G SDE reconstructions per caption), same reward

Where we differ from the paper and the public code (reference/uae.md), and why:
- No RL hyperparameter is published: group sizes, learning rates, KL weights, clip ranges and steps per stage here
  are ours (Flow-GRPO's for stage 3). Stage 2 uses a token-mean loss (DAPO) rather than GRPO's per-caption mean,
  whose 1/|o| favours short captions, and the paper's signature is captions growing.
- Cold start uses the flow-matching loss on the encoder's captions, not the released file's 1 - cos(CLIP) through
  10 differentiable sampling steps (which also scales [0, 1] images by 1/255 a second time).
- Batches: the positives of a batch and the negative prompt are right-padded together to the batch's longest
  (the demo pads one positive with the negative: identical for one prompt). Pad tokens keep counting positions,
  as in the demo's caption-then-redraw path (on a fresh model its first call puts pads at position 1).
- fix: every checkpoint key is checked. The demo loads llm_lora with strict=False and silently runs the base
  model on any mismatch; the released lmms-eval wrapper even uses the "user" role.
- The SD3 text encoders only give the pooled vector of the empty string: T5 is never loaded (the demo runs it and
  discards its output). --pooled takes that vector stored on disk instead.
- The encoder's images go through Qwen2VLImageProcessor(Pil) with the folder's max_pixels (UAE ships 65536, about
  81 visual tokens); no video processor, so torchvision is not needed.

Embedded default (no paths, CPU, nothing downloaded): tiny Qwen2_5_VLForConditionalGeneration, SD3Transformer2DModel,
AutoencoderKL, CLIPModel and Dinov2Model of the real classes; a word-level tokenizer and the chat template built in
code; synthetic 32x32 images of a square (size x colour x background). The VAE, the captioner (weakly: it names a
random subset of the attributes) and the decoder (from such partial captions) are pre-trained in code once and
cached; the reward encoders are random. Measured against paired runs without updates (same seed: the same images,
captions and noise):
- stage 1 lowers its flow-matching loss to 0.82 of the no-update run's over steps 5-20 (the reward stays within noise);
- stage 2 teaches the captioner to name what the decoder needs most (the background): the reward climbs above the
  no-update run within 10 steps. Captions first grow (2.9 -> 5.3 tokens by step 10) and then shrink to the background
  alone: the toy captioner's colour and size words are guesses (right 5 of 30 and 10 of 21 times), a wrong size or
  background word costs more reward than none and a guessed colour gains nothing, so the paper's longer-captions
  "aha moment" cannot pay off here;
- stage 3 does not learn: the decoder already redraws what a caption says (0.95-0.99 from full captions) and the rest
  of the gap is what the caption leaves out, which no decoder can recover (within a group, rewards differ by guesses
  of missing attributes, which are independent of the caption). Its test checks the update's direction instead.

Commands:
    python uae.py --train                                              # embedded toy, CPU, a few minutes
    python uae.py --train --qwen-dir UAE/llm_model --processor-dir UAE/llm_model_preprocessor \\
        --llm-lora UAE/llm_lora --sd3-dir SD3.5-Large --dit-dir UAE/dit --dit-lora UAE/dit_lora \\
        --clip-dir clip-vit-large-patch14 --data images.jsonl           # 1 GPU
    torchrun --standalone --nproc_per_node=8 uae.py --train ...same flags...
    python uae.py --caption img.jpg [model flags]                      # prints the caption
    python uae.py --generate "a red bus in the snow" [model flags]     # <out_dir>/generate.png
    python uae.py --reconstruct img.jpg [model flags]                  # caption, redraw, side by side, similarity
    python uae.py --evaluate --bench-images UniBench/Image --clip-dir ... --dinov2-dir ... --dinov3-dir ...
    python uae.py --score GENERATED_DIR --bench-images UniBench/Image --clip-dir ...   # Unified-Bench on saved images

Requires common.py next to it.
"""

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import os
import random
import textwrap
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# The demo's fixed strings (PKU-YuanGroup/UAE demo.py): the negative prompt of CFG and the captioning instruction,
# trailing spaces and line breaks included (the tokens must match what the released weights saw).
NEGATIVE_PROMPT = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
CAPTION_INSTRUCTION = ("You are an expert vision-language model.  \n"
                       "Your task is: Given an input image, generate a **textual description** of the image. If there "
                       "is text in the image, transcribe it inside double quotes \"\".  \n"
                       "Now, carefully analyze the input image and output the full description. ")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PROJECTOR_KEYS = ("projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias")
# flow_grpo's SD3 LoRA targets (scripts/train_sd3.py); UAE's dit_lora brings its own in adapter_config.json
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")


@dataclass
class Config:
    # ---- model
    qwen_dir: str | None = None  # UAE "llm" folder: Qwen2.5-VL-3B with the projector weights; none = the embedded toy
    processor_dir: str | None = None  # tokenizer, image processor, chat template (UAE llm_model_preprocessor)
    llm_lora: str | None = None  # UAE "llm_lora" folder (safetensors shards) or our llm_lora.safetensors
    sd3_dir: str | None = None  # SD3.5-Large, diffusers layout (vae/, scheduler/, text_encoder/, text_encoder_2/, ...)
    dit_dir: str | None = None  # UAE "dit" folder (fine-tuned SD3Transformer2DModel); default <sd3_dir>/transformer
    dit_lora: str | None = None  # UAE "dit_lora" PEFT folder or our dit_lora.safetensors
    projector: str | None = None  # our projector.safetensors (replaces the projector stored in --qwen-dir)
    pooled: str | None = None  # safetensors with key "pooled" (2048,): SD3's pooled embedding of ""; none = compute it
    llm_lora_rank: int = 32  # encoder LoRA rank (UAE demo: r 32, all linear layers of the LLM)
    llm_lora_alpha: float = 64.0  # encoder LoRA alpha (UAE demo: 64)
    dit_lora_rank: int = 32  # decoder LoRA rank when no --dit-lora is given (flow_grpo SD3: 32)
    dit_lora_alpha: float = 64.0  # decoder LoRA alpha (flow_grpo SD3: 64)
    # ---- data
    data: str | None = None  # JSONL with {"image": path} per line (training images); none = synthetic toy images
    resolution: int = 512  # decoder resolution in training rollouts (UAE cold-start code: 512)
    images_per_rank: int = 2  # images per step and rank; each brings its whole group
    bench_images: str | None = None  # Unified-Bench references (UniBench/Image, 100 images) for --evaluate/--score
    # ---- rollout
    group_size: int = 8  # captions per image (stage 2) or reconstructions per caption (stage 3)
    caption_temperature: float = 0.7  # UAE demo: do_sample, temperature 0.7
    max_caption_tokens: int = 512  # UAE demo: max_new_tokens 512 (always decoded: no host read in the loop)
    cuda_graphs: bool = True  # replay each caption decode step as a CUDA graph (CUDA only; eager elsewhere)
    num_steps: int = 10  # denoising steps of training rollouts (cold-start code and Flow-GRPO: 10)
    eval_steps: int = 40  # denoising steps for --generate/--reconstruct/--evaluate (UAE demo: 40)
    eval_resolution: int = 1024  # resolution for --generate/--reconstruct/--evaluate (UAE demo: 1024)
    guidance: float = 5.0  # CFG scale against the negative prompt (UAE demo: 5.0)
    noise_level: float = 0.7  # Flow-GRPO SDE noise level a (stage 3)
    sde_window: int = 0  # stage 3: SDE (and trained) steps in a random window of the first half; 0 = all (Flow-GRPO)
    # ---- reward
    clip_dir: str | None = None  # local CLIP ViT-L/14 (transformers CLIPModel folder): reward and Unified-Bench
    dinov2_dir: str | None = None  # local DINOv2-L (transformers): reward (if dino_weight > 0) and Unified-Bench
    dinov3_dir: str | None = None  # local DINOv3 ViT-L/16 (transformers): Unified-Bench only
    longclip_dir: str | None = None  # LongCLIP-L converted to a transformers CLIPModel folder: Unified-Bench only
    clip_weight: float = 1.0  # reward weight of the CLIP cosine (the released code's only reward model)
    dino_weight: float = 0.0  # reward weight of the DINOv2 CLS cosine (the reward is the weighted mean)
    # ---- optimisation
    stages: tuple[int, ...] = (1, 2, 3)  # Unified-GRPO stages to run, in order (1 cold start, 2 encoder, 3 decoder)
    stage_steps: tuple[int, ...] = (200, 500, 500)  # steps of each listed stage (not published)
    lr_cold: float = 1e-5  # stage 1 learning rate (DiT LoRA + projector)
    lr_encoder: float = 1e-5  # stage 2 learning rate (LLM LoRA)
    lr_decoder: float = 3e-4  # stage 3 learning rate (DiT LoRA; Flow-GRPO SD3.5)
    beta_encoder: float = 0.04  # stage 2 weight of the k3 KL to the LLM with adapters off
    beta_decoder: float = 0.04  # stage 3 weight of Flow-GRPO's step-mean KL to the DiT with adapters off
    clip_encoder: float = 0.2  # stage 2 PPO clip on per-token ratios
    clip_decoder: float = 1e-4  # stage 3 PPO clip on per-step ratios (Flow-GRPO)
    adv_clip: float = 5.0  # advantages clamped to +-this (Flow-GRPO)
    timestep_fraction: float = 0.99  # stage 3 without --sde-window trains int(num_steps * this) steps (Flow-GRPO: 9/10)
    cond_dropout: float = 0.1  # stage 1: share of captions replaced by the negative prompt (keeps CFG's branch trained)
    num_minibatches: int = 1  # optimiser steps per rollout batch
    max_grad_norm: float = 1.0  # gradient clipping after the cross-rank sync
    weight_decay: float = 1e-4  # AdamW weight decay (flow_grpo)
    grad_checkpointing: bool = False  # recompute activations in updates (LLM and DiT)
    # ---- logging
    out_dir: str = "runs/uae"  # metrics.jsonl, samples/, {llm_lora,dit_lora,projector}.safetensors, checkpoint/
    sample_every: int = 50  # save originals | reconstructions every N steps
    save_every: int = 100  # checkpoint and adapters every N steps (and at the end)
    resume: bool = False  # continue from <out_dir>/checkpoint/latest.pt
    # ---- system
    seed: int = 0  # seeds data order, sampling noise and LoRA init
    device: str = "auto"  # auto, cuda or cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16
    # ---- embedded toy (only without --qwen-dir)
    toy_pretrain_steps: int = 700  # in-code pre-training of the tiny decoder (0 = random tiny models, wiring only)
    toy_caption_steps: int = 200  # in-code pre-training of the tiny captioner (names a random half of the attributes)


# Without --qwen-dir these replace the defaults wherever a flag still holds its default (printed). Temperature 1:
# the toy captioner's pre-trained distribution is what RL has to explore (it names each attribute half the time).
# Stage 3 uses Flow-GRPO-Fast's window (3 SDE steps in the first half, noise 1.3, as unicharacter.py's toy): 3
# trained steps instead of 7 per update; measured, neither setting makes stage 3 learn on the toy (see the top).
TOY_SETTINGS = dict(resolution=32, eval_resolution=32, images_per_rank=4, max_caption_tokens=6,
                    caption_temperature=1.0, num_steps=8, eval_steps=8, guidance=3.0, dino_weight=1.0,
                    noise_level=1.3, sde_window=3,
                    stage_steps=(5, 40, 10), lr_cold=1e-3, lr_encoder=1e-3, lr_decoder=1e-3,
                    clip_decoder=1e-3, llm_lora_rank=8, llm_lora_alpha=16.0, dit_lora_rank=8, dit_lora_alpha=16.0,
                    sample_every=10, save_every=20)


def resolve_config(cfg: Config, given: frozenset[str] = frozenset()) -> Config:
    """The config a run uses: with no --qwen-dir, the toy's settings for every field that is neither
    typed on the command line (`given`) nor changed from its default (printed)."""
    if cfg.qwen_dir is not None:
        return cfg
    return common.apply_toy_settings(cfg, TOY_SETTINGS, "embedded toy settings", given)


# -----------------------------------------------------------------------------
# model loading


@dataclass
class Models:
    llm: nn.Module  # Qwen2_5_VLForConditionalGeneration: the encoder, and the text stage of the decoder
    tokenizer: object
    image_processor: object  # Qwen2VLImageProcessorPil
    chat_template: str
    projector: nn.Sequential  # Linear(hidden, 2 x joint) -> GELU -> Linear(2 x joint, joint)
    transformer: nn.Module  # SD3Transformer2DModel
    vae: nn.Module  # AutoencoderKL
    scheduler: object  # FlowMatchEulerDiscreteScheduler (only its sigmas are used)
    pooled: torch.Tensor  # (1, D_pooled): SD3's CLIP-L + CLIP-G pooled embedding of ""
    stop_ids: tuple[int, ...]  # tokens that end a caption (<|im_end|>, <|endoftext|>)
    banned_ids: tuple[int, ...]  # vision placeholders a caption may not contain (they would be read as image slots)
    pad_id: int
    image_token_id: int
    toy: str | None = None  # None for real weights; "pre-trained" or "random" for the embedded tiny models

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def lm(self) -> nn.Module:
        """The text decoder (4.50's `uae_model.model`, where UAE puts its LoRA)."""
        return self.llm.model.language_model


def make_projector(hidden: int, joint: int) -> nn.Sequential:
    """UAE's projector (Qwen2_5_VLWithLongContext.projector): hidden -> 2 x joint -> GELU -> joint; keys 0.* and 2.*."""
    return nn.Sequential(nn.Linear(hidden, 2 * joint), nn.GELU(), nn.Linear(2 * joint, joint))


def _require(path: str | None, what: str) -> str:
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of every .safetensors file in a folder (sharded checkpoints)."""
    from safetensors.torch import load_file

    _require(path, "weights")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def vision_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)


def _check_loading(info: dict, where: str, allowed_unexpected=lambda k: False) -> None:
    """transformers/diffusers only warn about key mismatches; here any mismatch is an error naming the keys."""
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not allowed_unexpected(k))
    if unexpected:
        bad["unexpected_keys"] = unexpected
    if bad:
        shown = {k: v[:8] + (["..."] if len(v) > 8 else []) for k, v in bad.items()}
        raise ValueError(f"weights in {where} do not match the model: {shown}")


def load_qwen(cfg: Config, dtype: torch.dtype):
    """UAE's "llm" folder: Qwen2.5-VL weights (4.50 key layout, converted by transformers on load) plus the projector,
    which transformers reports as unexpected keys and we load ourselves. Every other mismatch is an error."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    folder = _require(cfg.qwen_dir, "--qwen-dir")
    proc_dir = cfg.processor_dir or folder
    for name in ("config.json",):
        _require(os.path.join(folder, name), f"{name} of --qwen-dir")
    _require(os.path.join(proc_dir, "preprocessor_config.json"), "preprocessor_config.json of --processor-dir")
    llm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    _check_loading(info, folder, allowed_unexpected=lambda k: k.startswith("projector."))
    tokenizer = AutoTokenizer.from_pretrained(proc_dir)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(proc_dir)
    template = None
    for name in ("chat_template.json", "chat_template.jinja"):
        path = os.path.join(proc_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                template = json.load(f)["chat_template"] if name.endswith(".json") else f.read()
            break
    template = template or tokenizer.chat_template
    if not template:
        raise FileNotFoundError(f"no chat template in {proc_dir} (chat_template.json, chat_template.jinja or the "
                                "tokenizer's): the 'generate' role needs Qwen2.5-VL's template")
    tensors = {k: v for k, v in read_tensors(folder).items() if k.startswith("projector.")}
    # UAE hard-codes 4096 (SD3.5's joint_attention_dim); the file's shapes decide, load_models checks the DiT agrees
    joint = tensors["projector.2.weight"].shape[0] if "projector.2.weight" in tensors else 4096
    projector = make_projector(llm.config.text_config.hidden_size, joint)
    load_projector(projector, tensors, folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(
        "<|endoftext|>")
    eos = llm.generation_config.eos_token_id
    stops = tuple(sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                          tokenizer.convert_tokens_to_ids("<|im_end|>"), pad}))
    common.print0(f"encoder image size limits {dict(image_processor.size)} (UAE ships max_pixels 65536, about 81 "
                  "visual tokens)")
    return llm, tokenizer, image_processor, template, projector.to(dtype), stops, pad, llm.config.image_token_id


def load_projector(projector: nn.Sequential, tensors: dict, where: str) -> None:
    sd = {k.removeprefix("projector."): v for k, v in tensors.items()}
    expected = projector.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                    if k in sd and sd[k].shape != v.shape)
    if missing or unexpected or shapes:
        raise ValueError(f"projector weights in {where} do not match Linear(hidden, 2 joint) -> GELU -> "
                         f"Linear(2 joint, joint): missing {['projector.' + k for k in missing]}, unexpected "
                         f"{['projector.' + k for k in unexpected]}, shape mismatch {shapes}")
    projector.load_state_dict(sd)


def qwen_key(key: str) -> str:
    """A key of UAE's llm_lora shards (or of any PEFT/transformers-4.50 Qwen2.5-VL file) in transformers-5 naming.

    UAE wraps `uae_model.model` (the 4.50 text decoder) with PEFT: `model.base_model.model.layers.0...q_proj
    .lora_A.default.weight`, base weights as `...q_proj.base_layer.weight`; the vision tower is `visual.*`."""
    key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    key = key.replace(".base_layer.", ".")
    for peft in ("model.base_model.model.", "base_model.model.model.", "base_model.model."):
        if key.startswith(peft):
            key = "model." + key[len(peft):]
            break
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def load_llm_lora(models: Models, tensors: dict[str, torch.Tensor], path: str) -> None:
    """UAE's llm_lora (all shards: LoRA A/B, and whatever base or projector weights they carry, as the demo's
    load_state_dict would load them) or our llm_lora.safetensors, keys in qwen_key naming, into an LLM that already
    has LoRA modules. Keys that fit nothing, LoRA modules the file does not cover and shape mismatches are errors."""
    lora = {k.removeprefix("model.language_model."): v for k, v in tensors.items() if ".lora_" in k}
    if not lora:
        raise ValueError(f"{path} holds no LoRA weights (no '.lora_A.' keys)")
    base = {k: v for k, v in tensors.items() if ".lora_" not in k and not k.startswith("projector.")}
    params = models.llm.state_dict()
    named = {k.replace(".base.", "."): k for k in params}  # our LoRALinear keeps the wrapped Linear as `.base`
    unexpected = sorted(k for k in base if k not in named)
    shapes = sorted(k for k in base if k in named and params[named[k]].shape != base[k].shape)
    if unexpected or shapes:
        raise ValueError(f"{path}: keys that fit no Qwen2.5-VL weight: {unexpected[:8]}; shape mismatches: "
                         f"{shapes[:8]}")
    common.load_lora(models.lm, lora, prefix="")  # strict: missing/unexpected LoRA modules are named
    with torch.no_grad():
        for k, v in base.items():
            params[named[k]].copy_(v)
    projector = {k: v for k, v in tensors.items() if k.startswith("projector.")}
    if projector:
        load_projector(models.projector, projector, path)
    common.print0(f"llm_lora: {len(lora) // 2} adapters, {len(base)} base and {len(projector)} projector tensors "
                  f"from {path}")


def add_llm_lora(models: Models, cfg: Config) -> None:
    """UAE's encoder LoRA: r 32 / alpha 64, gaussian init, on every Linear of the text decoder (PEFT 'all-linear')."""
    rank, alpha, tensors = cfg.llm_lora_rank, cfg.llm_lora_alpha, None
    if cfg.llm_lora:  # rank from the file's tensors, alpha from our files' metadata (UAE's shards: the demo's 64)
        tensors = {qwen_key(k): v for k, v in read_tensors(cfg.llm_lora).items()}
        rank = next((v.shape[0] for k, v in tensors.items() if ".lora_A." in k), rank)
        alpha = lora_file_alpha(cfg.llm_lora) or alpha
    targets = [n for n, m in models.lm.named_modules() if isinstance(m, nn.Linear)]
    common.inject_lora(models.lm, targets, rank, alpha, init="gaussian")
    if tensors is not None:
        load_llm_lora(models, tensors, cfg.llm_lora)
    models.lm.to(models.device)


def lora_file_alpha(path: str) -> float | None:
    """lora_alpha from the metadata common.save_lora writes (None for other files)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        packed = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return next((float(v) for k, v in packed.items() if k.endswith("lora_alpha")), None)


def add_dit_lora(models: Models, cfg: Config) -> None:
    """UAE's dit_lora (a PEFT folder: adapter_config.json + adapter_model.safetensors), our dit_lora.safetensors, or a
    fresh adapter on flow_grpo's SD3 targets. The modules named in the file are the ones adapted; a PEFT folder's
    target_modules must all be covered by the file."""
    path = cfg.dit_lora
    if path is None:
        common.inject_lora(models.transformer, list(SD3_LORA_TARGETS), cfg.dit_lora_rank, cfg.dit_lora_alpha,
                           init="gaussian")
        models.transformer.to(models.device)
        return
    file = os.path.join(path, "adapter_model.safetensors") if os.path.isdir(path) else path
    tensors = read_tensors(_require(file, "DiT LoRA weights"))
    sd = {k.replace(".default.", ".").removeprefix("base_model.model.").removeprefix("transformer."): v
          for k, v in tensors.items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd if ".lora_A." in k})
    if not modules:
        raise ValueError(f"{file} holds no LoRA weights (no '.lora_A.' keys)")
    alpha, pattern, targets = None, {}, None
    if os.path.isdir(path):
        with open(_require(os.path.join(path, "adapter_config.json"), "adapter_config.json of --dit-lora")) as f:
            peft = json.load(f)
        alpha, pattern, targets = peft.get("lora_alpha"), peft.get("alpha_pattern") or {}, peft.get("target_modules")
    linears = {n for n, m in models.transformer.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(targets, list):  # every Linear the config targets must have weights in the file
        missing = sorted(n for n in linears if any(n == t or n.endswith("." + t) for t in targets)
                         and n not in modules)
        if missing:
            raise ValueError(f"{file} lacks LoRA weights for {len(missing)} targeted modules: {missing[:8]}")
    for name in modules:  # rank from the tensors, alpha from the config (or the file's metadata, read by load_lora)
        rank = sd[f"{name}.lora_A.weight"].shape[0]
        common.inject_lora(models.transformer, [name], rank, pattern.get(name, alpha), init="gaussian")
    common.load_lora(models.transformer, file if not os.path.isdir(path) else sd, prefix="transformer.")
    models.transformer.to(models.device)
    common.print0(f"dit_lora: {len(modules)} adapters from {path}")


def load_sd3(cfg: Config, dtype: torch.dtype):
    """SD3.5's DiT (UAE's fine-tuned "dit" folder, or the official transformer), VAE and scheduler, strictly."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    sd3 = _require(cfg.sd3_dir, "--sd3-dir (SD3.5-Large in diffusers layout)")
    if cfg.dit_dir:
        transformer, info = SD3Transformer2DModel.from_pretrained(_require(cfg.dit_dir, "--dit-dir"), torch_dtype=dtype,
                                                                   output_loading_info=True)
    else:
        transformer, info = SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer", torch_dtype=dtype,
                                                                   output_loading_info=True)
    _check_loading(info, cfg.dit_dir or os.path.join(sd3, "transformer"))
    vae, info = AutoencoderKL.from_pretrained(sd3, subfolder="vae", torch_dtype=dtype, output_loading_info=True)
    _check_loading(info, os.path.join(sd3, "vae"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler")
    if cfg.pooled:
        from safetensors.torch import load_file

        pooled = load_file(_require(cfg.pooled, "--pooled")).get("pooled")
        if pooled is None:
            raise KeyError(f"{cfg.pooled} has no tensor named 'pooled'")
    else:
        pooled = empty_prompt_pooled(sd3)
    pooled = pooled.reshape(1, -1)
    if pooled.shape[1] != transformer.config.pooled_projection_dim:
        raise ValueError(f"pooled embedding has {pooled.shape[1]} dims, the DiT expects "
                         f"{transformer.config.pooled_projection_dim}")
    return transformer, vae, scheduler, pooled.to(dtype)


@torch.no_grad()
def empty_prompt_pooled(sd3_dir: str) -> torch.Tensor:
    """SD3's pooled vector of "": CLIP-L and CLIP-G text_embeds concatenated (diffusers _get_clip_prompt_embeds,
    77 tokens padded). The demo also runs T5 and discards it; we do not load it."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    parts = []
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tokenizer = CLIPTokenizer.from_pretrained(_require(os.path.join(sd3_dir, tok), f"{tok} of --sd3-dir"))
        model, info = CLIPTextModelWithProjection.from_pretrained(os.path.join(sd3_dir, enc),
                                                                  output_loading_info=True)
        _check_loading(info, os.path.join(sd3_dir, enc))
        ids = tokenizer("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        parts.append(model(ids).text_embeds.float())
    return torch.cat(parts, dim=-1)[0]


def load_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    """Real weights from local folders, or the embedded tiny models (pre-trained in code once, cached)."""
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = False  # oneDNN is slower than torch's kernels on the toy's small convolutions
    if cfg.qwen_dir is None:
        common.toy_cpu_threads(device)
        models = load_toy(cfg)
    else:
        llm, tokenizer, image_processor, template, projector, stops, pad, image_token = load_qwen(cfg, dtype)
        transformer, vae, scheduler, pooled = load_sd3(cfg, dtype)
        models = Models(llm, tokenizer, image_processor, template, projector, transformer, vae, scheduler, pooled,
                        stops, vision_ids(tokenizer), pad, image_token)
        joint = transformer.config.joint_attention_dim
        if joint != projector[2].out_features:
            raise ValueError(f"the projector outputs {projector[2].out_features} dims, the DiT's joint_attention_dim "
                             f"is {joint}")
    if cfg.projector:  # ours, from a cold-start run: replaces the checkpoint's
        load_projector(models.projector, read_tensors(cfg.projector), cfg.projector)
    for m in (models.llm, models.projector, models.transformer, models.vae):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    models.pooled = models.pooled.to(device, dtype)
    return models


# ---- the embedded toy: tiny models of the real classes, a tokenizer built in code, synthetic images

TOY_RES = 32
TOY_SIZES = {"small": 8, "big": 20}  # side of the square in pixels
TOY_COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
              "yellow": (1.0, 1.0, -1.0)}
TOY_BACKGROUNDS = {"black": -0.8, "white": 0.8}
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's default system prompt
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<unk>")
# Qwen2.5-VL's chat format (its template renders any role, "generate" included), reduced to text and images
TOY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def toy_attributes(rng: random.Random) -> dict:
    return {"size": rng.choice(list(TOY_SIZES)), "color": rng.choice(list(TOY_COLORS)),
            "background": rng.choice(list(TOY_BACKGROUNDS))}


def toy_image(attrs: dict) -> torch.Tensor:
    """(3, 32, 32) in [-1, 1]: a centred square of a colour and size on a background."""
    img = torch.full((3, TOY_RES, TOY_RES), TOY_BACKGROUNDS[attrs["background"]])
    side = TOY_SIZES[attrs["size"]]
    lo = (TOY_RES - side) // 2
    img[:, lo:lo + side, lo:lo + side] = torch.tensor(TOY_COLORS[attrs["color"]])[:, None, None]
    return img


def toy_caption(attrs: dict, keep: tuple[bool, bool, bool] = (True, True, True)) -> str:
    """'big red square on white'; keep says which of size, colour, background are named."""
    words = [attrs["size"]] * keep[0] + [attrs["color"]] * keep[1] + ["square"]
    return " ".join(words + ["on", attrs["background"]] * keep[2])


def toy_tokenizer():
    """Word-level tokenizer over every word the toy's prompts use, with Qwen's special tokens, built in memory."""
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join([SYSTEM_PROMPT, CAPTION_INSTRUCTION, NEGATIVE_PROMPT, "system user assistant generate square on",
                     *TOY_SIZES, *TOY_COLORS, *TOY_BACKGROUNDS])
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text.lower())))  # what the Whitespace pre-tokenizer splits
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(list(QWEN_SPECIALS) + words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(QWEN_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")


def toy_models() -> Models:
    """Tiny random models of the real classes (about 0.9 M parameters in all), built in code."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = toy_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(0)  # the toy "checkpoint" does not depend on --seed
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    llm = Qwen2_5_VLForConditionalGeneration(config)
    # 32 px images are resized to 56 x 56: 4 x 4 patches of 14 px, 4 visual tokens after the 2 x 2 merge
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=TOY_RES, mid_block_add_attention=False,
                        scaling_factor=1.0, shift_factor=0.0)  # 32 px -> 16 x 16 latents -> 8 x 8 DiT tokens
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5's scheduler config: static shift 3
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))  # stands in for CLIP-L/G of ""
    return Models(llm, tok, image_processor, TOY_CHAT_TEMPLATE, make_projector(64, 64), transformer, vae, scheduler,
                  pooled, (ids["<|im_end|>"], ids["<|endoftext|>"]), vision_ids(tok), ids["<|endoftext|>"],
                  ids["<|image_pad|>"], toy="random")


def toy_batch(rng: random.Random, n: int) -> tuple[list[dict], torch.Tensor]:
    attrs = [toy_attributes(rng) for _ in range(n)]
    return attrs, torch.stack([toy_image(a) for a in attrs])


def pretrain_toy(models: Models, steps: int, caption_steps: int, log_every: int = 200) -> None:
    """Stands in for the released checkpoints: (1) the VAE becomes an autoencoder of toy images (a random one is
    not), (2) the captioner learns, weakly, to name a random subset of the attributes (each with probability 1/2),
    (3) the decoder (DiT + projector; LLM frozen, as in UAE's decoder pre-training) learns to draw from such
    partial captions with the flow-matching loss, and from the negative prompt (CFG's other branch).
    The captioner goes first: the same LLM then makes the decoder's conditioning."""
    rng, gen = random.Random("uae-toy"), torch.Generator().manual_seed(0)
    vae = models.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(200 if steps else 0):
        _, x = toy_batch(rng, 16)
        loss = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD3-style normalisation of the latents: (z - shift) * scale has mean 0, std 1
        z = vae.encode(toy_batch(rng, 256)[1]).latent_dist.mode()
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    if steps:
        common.print0(f"toy VAE fitted: reconstruction MSE {loss.item():.4f}")

    # Only the vision tower and the output head learn to caption: the text decoder stays as it is, so its states of
    # text-only prompts (the decoder's conditioning) keep telling caption words apart (training all of it with this
    # little data washed that out: the decoder then ignored the caption).
    llm = models.llm.train().requires_grad_(False)
    head = list(llm.model.visual.parameters()) + [llm.lm_head.weight]
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=3e-3, weight_decay=0.0)
    for step in range(caption_steps):
        attrs, x = toy_batch(rng, 16)
        captions = [toy_caption(a, tuple(rng.random() < 0.5 for _ in range(3))) for a in attrs]
        loss = caption_nll(models, caption_inputs(models, [common.tensor_to_pil(i) for i in x]), captions).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    llm.eval().requires_grad_(False)
    if caption_steps:
        common.print0(f"toy captioner: caption NLL {loss.item():.3f} after {caption_steps} steps")

    params = list(models.transformer.parameters()) + list(models.projector.parameters())
    for p in params:
        p.requires_grad_(True)
    models.transformer.train()
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # settles the tiny DiT
    for step in range(steps):
        attrs, x = toy_batch(rng, 32)
        # mostly full captions (each attribute kept with probability 0.8): the caption is what the DiT must read
        captions = [toy_caption(a, tuple(rng.random() < 0.8 for _ in range(3))) for a in attrs]
        drop = [rng.random() < 0.1 for _ in attrs]
        loss = flow_matching_loss(models, captions, common.vae_encode(models.vae, x), gen, drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if step % log_every == 0 or step == steps - 1:
            common.print0(f"toy decoder pre-training {step + 1}/{steps}: flow-matching loss {loss.item():.4f}")
    models.transformer.eval().requires_grad_(False)
    models.projector.requires_grad_(False)


def toy_cache_key(cfg: Config) -> str:
    """Hash of the code and constants the pre-trained toy depends on, and of the library versions."""
    import diffusers
    import transformers

    # syntax trees, not source text: comments and formatting can change, the cache stays valid
    functions = (toy_models, toy_tokenizer, toy_batch, toy_attributes, toy_image, toy_caption, pretrain_toy,
                 caption_nll, caption_logits, caption_inputs, flow_matching_loss, condition, llm_states, generate_ids,
                 chat_ids, make_projector, velocity)
    code = [ast.dump(ast.parse(textwrap.dedent(inspect.getsource(f)))) for f in functions]
    data = (TOY_RES, TOY_SIZES, TOY_COLORS, TOY_BACKGROUNDS, QWEN_SPECIALS, TOY_CHAT_TEMPLATE, NEGATIVE_PROMPT,
            CAPTION_INSTRUCTION, torch.__version__, transformers.__version__, diffusers.__version__,
            cfg.toy_pretrain_steps, cfg.toy_caption_steps)
    return hashlib.sha256("\n".join(code + [repr(data)]).encode()).hexdigest()[:16]


def load_toy(cfg: Config) -> Models:
    """The embedded tiny models; pre-trained once by rank 0 and cached in $NANOGENRL_CACHE (~/.cache/nanogenrl)."""
    models = toy_models()
    if cfg.toy_pretrain_steps == 0 and cfg.toy_caption_steps == 0:
        return models
    parts = {"llm": models.llm, "projector": models.projector, "transformer": models.transformer, "vae": models.vae}
    cache = os.path.join(os.environ.get("NANOGENRL_CACHE") or os.path.expanduser("~/.cache/nanogenrl"),
                         f"uae_toy_{toy_cache_key(cfg)}.pt")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and not os.path.exists(cache):
        common.print0(f"pre-training the embedded tiny models once (cached at {cache})")
        t0 = time.time()
        pretrain_toy(models, cfg.toy_pretrain_steps, cfg.toy_caption_steps)
        state = {k: m.state_dict() for k, m in parts.items()}
        state["vae_config"] = {k: models.vae.config[k] for k in ("shift_factor", "scaling_factor")}
        common.atomic_save(cache, lambda tmp: torch.save(state, tmp))
        common.print0(f"toy pre-training took {time.time() - t0:.0f} s")
    if dist.is_initialized():
        dist.barrier()  # the other ranks read rank 0's file: identical weights everywhere
    state = torch.load(cache, map_location="cpu", weights_only=True)
    for k, m in parts.items():
        m.load_state_dict(state[k])
    models.vae.register_to_config(**state["vae_config"])
    models.toy = "pre-trained"
    return models


# -----------------------------------------------------------------------------
# conditioning: the caption, re-encoded by the LLM in the "generate" role, through the projector


def chat_ids(models: Models, messages: list[dict]) -> list[int]:
    """Token ids of a conversation with the generation prompt appended (the demo: apply_chat_template, then
    tokenizer.encode of the text)."""
    text = models.tokenizer.apply_chat_template(messages, chat_template=models.chat_template, tokenize=False,
                                                add_generation_prompt=True)
    return models.tokenizer.encode(text)


def generate_ids(models: Models, prompt: str) -> list[int]:
    """`<|im_start|>system ...<|im_end|> <|im_start|>generate\\n{prompt}<|im_end|> <|im_start|>assistant\\n`."""
    return chat_ids(models, [{"role": "generate", "content": [{"type": "text", "text": prompt}]}])


def llm_states(models: Models, prompts: list[str]) -> torch.Tensor:
    """(1 + B, L, hidden): last-layer states (after the final RMSNorm) of every token, pads included, of the
    negative prompt (row 0) and the prompts, right-padded together with <|endoftext|>; attention mask = not pad.
    Positions run 0..L-1 over pads too (see the docstring at the top)."""
    rows = [generate_ids(models, NEGATIVE_PROMPT)] + [generate_ids(models, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [models.pad_id] * (width - len(r)) for r in rows], device=models.device)
    mask = ids.ne(models.pad_id).long()
    pos = torch.arange(width, device=ids.device).expand(len(rows), -1)
    return models.lm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state


def condition(models: Models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's CFG batch: encoder_hidden_states (2B, L, joint) = [negative x B; prompts] and the pooled
    vector (2B, D_pooled), the same for both halves (the demo passes it as pooled and negative pooled)."""
    states = models.projector(llm_states(models, prompts))  # (1 + B, L, 4096)
    b = len(prompts)
    cond = torch.cat([states[:1].expand(b, -1, -1), states[1:]])
    return cond, models.pooled.expand(2 * b, -1)


# -----------------------------------------------------------------------------
# rollout: captions with exact token log-probs, and the decoder's sampling


@dataclass
class CaptionInputs:
    ids: torch.Tensor  # (B, P) prompt tokens, left-padded
    mask: torch.Tensor  # (B, P)
    pos: torch.Tensor  # (3, B, P) multimodal RoPE positions
    mm: torch.Tensor  # (B, P) 1 at image tokens
    pixel_values: torch.Tensor  # (sum of patches, patch dim)
    grid: torch.Tensor  # (B, 3) image grid (t, h, w) in patches

    def rows(self, idx: list[int]) -> "CaptionInputs":
        patches = self.grid.prod(-1)
        start = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        pix = torch.cat([self.pixel_values[int(start[i]):int(start[i + 1])] for i in idx])
        return CaptionInputs(self.ids[idx], self.mask[idx], self.pos[:, idx], self.mm[idx], pix, self.grid[idx])


def caption_inputs(models: Models, images: list) -> CaptionInputs:
    """The demo's captioning prompt (instruction text, then the image, as the user) for PIL images."""
    out = models.image_processor(images=images, return_tensors="pt")
    grid = out["image_grid_thw"]
    merge = models.image_processor.merge_size ** 2
    pad_token = models.tokenizer.convert_ids_to_tokens(models.image_token_id)
    template = models.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": CAPTION_INSTRUCTION}, {"type": "image"}]}],
        chat_template=models.chat_template, tokenize=False, add_generation_prompt=True)
    rows = [models.tokenizer.encode(template.replace(pad_token, pad_token * (int(g.prod()) // merge), 1))
            for g in grid]
    width = max(map(len, rows))
    dev = models.device
    ids = torch.tensor([[models.pad_id] * (width - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    mm = (ids == models.image_token_id).int()
    grid = grid.to(dev)
    pos, _ = models.llm.model.get_rope_index(ids, mm, grid, attention_mask=mask)
    return CaptionInputs(ids, mask, pos, mm, out["pixel_values"].to(dev, models.llm.dtype), grid)


def caption_logits(models: Models, inp: CaptionInputs, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) in fp32 for caption tokens (B, T): one forward over prompt + tokens[:, :-1].
    Positions continue after the prompt's last one, as incremental decoding places them."""
    b, t = tokens.shape
    ones = inp.mask.new_ones(b, t - 1)
    pos = torch.cat([inp.pos, inp.pos[:, :, -1:] + torch.arange(1, t, device=tokens.device)], 2)
    out = models.llm(input_ids=torch.cat([inp.ids, tokens[:, :-1]], 1), attention_mask=torch.cat([inp.mask, ones], 1),
                     position_ids=pos, pixel_values=inp.pixel_values, image_grid_thw=inp.grid,
                     mm_token_type_ids=torch.cat([inp.mm, torch.zeros_like(ones, dtype=inp.mm.dtype)], 1),
                     logits_to_keep=t)
    return out.logits.float()


def caption_mask(models: Models, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens of each caption up to and including its first stop token (the actions)."""
    stop = torch.isin(tokens, torch.tensor(models.stop_ids, device=tokens.device)).int()
    return (stop.cumsum(1) - stop) == 0


def ban_vision_tokens(models: Models, logits: torch.Tensor) -> torch.Tensor:
    """The policy never emits vision placeholders: a sampled <|image_pad|> would become an image slot when the
    caption is re-scored (transformers then finds more image tokens than image features)."""
    return logits.index_fill(-1, torch.tensor(models.banned_ids, device=logits.device), float("-inf"))


def caption_logprobs(models: Models, inp: CaptionInputs, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T) log-probs of caption tokens under the temperature-scaled policy, as sample_captions drew them."""
    return common.token_logprobs(ban_vision_tokens(models, caption_logits(models, inp, tokens)), tokens, temperature)


@torch.no_grad()
def sample_captions(models: Models, inp: CaptionInputs, max_tokens: int, temperature: float,
                    generator: torch.Generator | None = None, cuda_graph: bool = False, stop_early: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions: (tokens (B, T), log-probs (B, T)); after its stop token a row holds <|endoftext|> with log-prob 0.

    common.decode_tokens runs the text model with a static KV cache (one step replayed as a CUDA graph with
    cuda_graph); rows that stopped are fed pads whose tokens are overwritten, and the loop ends once every row has
    stopped (one host read every 32 steps; stop_early=False always runs max_tokens steps, as bench.py times them).
    T is then trimmed to the longest caption."""
    llm, b, dev = models.llm, inp.ids.shape[0], inp.ids.device
    # the prefix as Qwen2.5-VL's forward builds it: token embeddings with the merged ViT features at image slots
    embeds = llm.get_input_embeddings()(inp.ids)  # (B, P, D)
    features = torch.cat(llm.model.get_image_features(inp.pixel_values, inp.grid, return_dict=True).pooler_output)
    embeds = embeds.masked_scatter(inp.mm.bool()[..., None], features.to(embeds.dtype))
    stops = torch.tensor(models.stop_ids, device=dev)
    banned = torch.tensor(models.banned_ids, device=dev)
    tokens = torch.full((b, max_tokens), models.pad_id, dtype=torch.long, device=dev)
    logps = torch.zeros(b, max_tokens, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)

    def step(hidden, index):
        logits = llm.lm_head(hidden).float().index_fill_(-1, banned, float("-inf"))  # (B, V), see ban_vision_tokens
        token, logp = common.sample_tokens(logits, temperature, generator=generator)
        token = torch.where(done, models.pad_id, token)
        tokens.index_copy_(1, index[None], token[:, None])
        logps.index_copy_(1, index[None], torch.where(done, 0.0, logp)[:, None])
        done.logical_or_(torch.isin(token, stops))  # in place: the captured graph keeps reading this buffer
        return llm.get_input_embeddings()(token)[:, None]  # (B, 1, D)

    common.decode_tokens(models.lm, embeds, inp.mask, inp.pos, max_tokens, step, generator, cuda_graph,
                         stopped=done if stop_early else None)
    length = int(caption_mask(models, tokens).sum(1).max())
    return tokens[:, :length], logps[:, :length]


def caption_texts(models: Models, tokens: torch.Tensor) -> list[str]:
    keep = caption_mask(models, tokens)
    return [models.tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
            for row, m in zip(tokens.cpu(), keep.cpu())]


def caption_nll(models: Models, inp: CaptionInputs, captions: list[str]) -> torch.Tensor:
    """(B,) mean NLL of caption tokens + <|im_end|> (the toy captioner's pre-training loss)."""
    rows = [models.tokenizer.encode(c) + [models.stop_ids[0]] for c in captions]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [models.pad_id] * (width - len(r)) for r in rows], device=models.device)
    valid = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows], device=models.device)
    nll = F.cross_entropy(caption_logits(models, inp, tokens).transpose(1, 2), tokens, reduction="none")
    return (nll * valid).sum(1) / valid.sum(1)


def latent_shape(models: Models, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return models.transformer.config.in_channels, resolution // factor, resolution // factor


def sigmas_for(models: Models, steps: int, resolution: int) -> torch.Tensor:
    """(steps + 1,) sigmas of the checkpoint's FlowMatchEulerDiscreteScheduler (SD3.5: static shift 3), as the SD3
    pipeline sets them (with its resolution-dependent mu where the config asks for dynamic shifting)."""
    sched, kwargs = models.scheduler, {}
    if sched.config.use_dynamic_shifting:
        c, h, w = latent_shape(models, resolution)
        p = models.transformer.config.patch_size
        kwargs["mu"] = common.flux_mu(h * w // p ** 2, sched.config.base_image_seq_len,
                                      sched.config.max_image_seq_len, sched.config.base_shift,
                                      sched.config.max_shift)
    sched.set_timesteps(steps, **kwargs)
    return sched.sigmas.float().cpu()


def velocity(models: Models, x: torch.Tensor, sigma: float, cond: torch.Tensor, pooled: torch.Tensor,
             guidance: float) -> torch.Tensor:
    """Guided velocity (B, C, h, w) in fp32 from one DiT call on the CFG batch [x; x] with [negative; positive]
    states. SD3 takes timesteps on 0..1000 (scheduler.timesteps = 1000 sigma)."""
    tf = models.transformer
    t = torch.full((2 * x.shape[0],), 1000.0 * sigma, device=x.device)
    out = tf(hidden_states=torch.cat([x, x]).to(tf.dtype), timestep=t, encoder_hidden_states=cond,
             pooled_projections=pooled, return_dict=False)[0]
    return common.cfg_split(out.float(), guidance)


def initial_noise(models: Models, n: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, *latent_shape(models, resolution), generator=generator, device=generator.device).to(
        models.device)


@torch.no_grad()
def sample_images(models: Models, cond: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor, steps: int,
                  guidance: float) -> torch.Tensor:
    """Euler ODE from noise (B, C, h, w) with CFG; returns images (B, 3, H, W) in [-1, 1], fp32."""
    sigmas = sigmas_for(models, steps, noise.shape[-1] * 2 ** (len(models.vae.config.block_out_channels) - 1))
    x = noise.float()
    for i in range(steps):
        x = common.euler_step(x, velocity(models, x, float(sigmas[i]), cond, pooled, guidance), float(sigmas[i]),
                              float(sigmas[i + 1]))
    return common.vae_decode(models.vae, x).float()


def sde_steps(cfg: Config, generator: torch.Generator) -> range:
    """The stage-3 steps that use the SDE and are trained. Without --sde-window every step is stochastic and the
    first int(num_steps * timestep_fraction) are trained (Flow-GRPO); with it, a window of that many steps drawn
    from the step's generator within the first half of the steps (high noise), ODE elsewhere (Flow-GRPO-Fast)."""
    if cfg.sde_window <= 0:
        return range(max(1, int(cfg.num_steps * cfg.timestep_fraction)))
    width = min(cfg.sde_window, cfg.num_steps)
    start = int(torch.randint(0, max(1, cfg.num_steps // 2 - width + 1), (1,), generator=generator,
                              device=generator.device))
    return range(start, start + width)


@torch.no_grad()
def sde_rollout(models: Models, cfg: Config, cond: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor,
                generator: torch.Generator) -> dict:
    """Flow-GRPO rollout: the SDE step at the steps of sde_steps (the Euler step elsewhere), storing what the update
    re-scores: latents (T+1, B, ...), the SDE steps' log-probs (len(train_steps), B), sigmas; and the images."""
    sigmas = sigmas_for(models, cfg.num_steps, cfg.resolution)
    train_steps = sde_steps(cfg, generator)
    stochastic = range(cfg.num_steps) if cfg.sde_window <= 0 else train_steps
    x, latents, logps = noise.float(), [noise.float()], []
    for i in range(cfg.num_steps):
        v = velocity(models, x, float(sigmas[i]), cond, pooled, cfg.guidance)
        if i in stochastic:
            x, logp, _, _ = common.sde_step_with_logprob(x, v, float(sigmas[i]), float(sigmas[i + 1]),
                                                         cfg.noise_level, generator=generator)
            if i in train_steps:
                logps.append(logp)
        else:
            x = common.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        latents.append(x)
    return {"latents": torch.stack(latents), "log_probs": torch.stack(logps), "sigmas": sigmas,
            "train_steps": list(train_steps), "images": common.vae_decode(models.vae, x).float()}


# -----------------------------------------------------------------------------
# reward: cosine of image embeddings of the original and its reconstruction


@dataclass
class Embedder:
    name: str
    model: nn.Module
    processor: object  # transformers image processor (or ConfigImageProcessor where it needs torchvision)
    kind: str  # "clip": projected image features (get_image_features); "cls": last_hidden_state[:, 0]


def _get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class ConfigImageProcessor:
    """A folder's preprocessor_config.json applied with PIL: for processors that exist only with torchvision in this
    transformers (DINOv3's). Resize (shortest edge, or height x width), optional centre crop, rescale, normalise."""

    def __init__(self, folder: str):
        with open(_require(os.path.join(folder, "preprocessor_config.json"), "preprocessor_config.json")) as f:
            c = json.load(f)
        self.size, self.crop_size = c.get("size", {"height": 224, "width": 224}), c.get("crop_size")
        self.do_center_crop = bool(c.get("do_center_crop")) and self.crop_size is not None
        self.image_mean, self.image_std = c["image_mean"], c["image_std"]
        self.resample, self.rescale = c.get("resample", 2), c.get("rescale_factor", 1 / 255)

    def __call__(self, images, return_tensors="pt"):
        import numpy as np

        out = []
        for img in images:
            w, h = img.size
            if _get(self.size, "shortest_edge"):
                s = _get(self.size, "shortest_edge") / min(w, h)
                img = img.resize((round(w * s), round(h * s)), self.resample)
            else:
                img = img.resize((_get(self.size, "width"), _get(self.size, "height")), self.resample)
            if self.do_center_crop:
                cw, ch = self.crop_size["width"], self.crop_size["height"]
                left, top = (img.size[0] - cw) // 2, (img.size[1] - ch) // 2
                img = img.crop((left, top, left + cw, top + ch))
            x = np.asarray(img, dtype=np.float32) * self.rescale
            out.append((x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32))
        return {"pixel_values": torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()}


def load_embedder(name: str, folder: str | None, flag: str, device: torch.device) -> Embedder:
    """CLIP (CLIPModel, projected features) or a DINO (AutoModel, CLS token) from a local transformers folder."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel

    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{name} needs {flag}: a local transformers folder with config.json (got {folder})")
    kind = "clip" if AutoConfig.from_pretrained(folder).model_type == "clip" else "cls"
    model, info = (CLIPModel if kind == "clip" else AutoModel).from_pretrained(folder, output_loading_info=True)
    _check_loading(info, folder)
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
    except ImportError:  # this transformers builds DINOv3's processor only with torchvision
        processor = ConfigImageProcessor(folder)
    return Embedder(name, model.to(device).eval().requires_grad_(False), processor, kind)


def toy_embedders(device: torch.device) -> list[Embedder]:
    """Tiny random CLIP and DINOv2 of the real classes: random ViTs still see a square's colour, size and
    background (each changes the cosine; measured 0.95 / 0.96 / 0.75 for CLIP)."""
    from transformers import (BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel, Dinov2Config,
                              Dinov2Model)

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TOY_RES, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=len(QWEN_SPECIALS),
                                                 bos_token_id=0, eos_token_id=1, pad_token_id=0),
                                vision_config=vision, projection_dim=32))
    dino = Dinov2Model(Dinov2Config(**vision))
    size = {"shortest_edge": TOY_RES}
    crop = {"height": TOY_RES, "width": TOY_RES}
    return [Embedder("clip", clip.to(device).eval(), CLIPImageProcessorPil(size=size, crop_size=crop), "clip"),
            Embedder("dinov2", dino.to(device).eval(), BitImageProcessorPil(size=size, crop_size=crop), "cls")]


def features(emb: Embedder, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings (B, D) in fp32."""
    pixel_values = pixel_values.to(next(emb.model.parameters()).device, next(emb.model.parameters()).dtype)
    if emb.kind == "clip":
        out = emb.model.get_image_features(pixel_values=pixel_values)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: an output object
    else:
        out = emb.model(pixel_values=pixel_values).last_hidden_state[:, 0]
    return F.normalize(out.float(), dim=-1)


def tensor_pixels(emb: Embedder, images: torch.Tensor) -> torch.Tensor:
    """The processor's resize / centre crop / normalisation on (B, 3, H, W) tensors in [-1, 1] (no trip through
    PIL during training; bicubic with antialiasing, as PIL resizes)."""
    p = emb.processor
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    if _get(p.size, "shortest_edge"):
        s = _get(p.size, "shortest_edge") / min(h, w)
        size = (round(h * s), round(w * s))
    else:
        size = (_get(p.size, "height"), _get(p.size, "width"))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    if getattr(p, "do_center_crop", False) and p.crop_size is not None:
        ch, cw = _get(p.crop_size, "height"), _get(p.crop_size, "width")
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
    mean = torch.tensor(p.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(p.image_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_reward(cfg: Config, device: torch.device, toy: bool) -> list[tuple[Embedder, float]]:
    """The reward's encoders with their weights (only those with weight > 0)."""
    if toy:
        pairs = zip(toy_embedders(device), (cfg.clip_weight, cfg.dino_weight))
    else:
        pairs = []
        if cfg.clip_weight > 0:
            pairs.append((load_embedder("clip", cfg.clip_dir, "--clip-dir", device), cfg.clip_weight))
        if cfg.dino_weight > 0:
            pairs.append((load_embedder("dinov2", cfg.dinov2_dir, "--dinov2-dir", device), cfg.dino_weight))
    pairs = [(e, w) for e, w in pairs if w > 0]
    if not pairs:
        raise ValueError("the reward needs clip_weight > 0 or dino_weight > 0")
    return pairs


@torch.no_grad()
def reward(embedders: list[tuple[Embedder, float]], originals: torch.Tensor,
           reconstructions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction similarity (B,): the weight-averaged cosine of the encoders' embeddings of original and
    reconstruction (images (B, 3, H, W) in [-1, 1]); also each encoder's cosine."""
    parts = {e.name: (features(e, tensor_pixels(e, originals)) * features(e, tensor_pixels(e, reconstructions))).sum(-1)
             for e, _ in embedders}
    total = sum(w * parts[e.name] for e, w in embedders) / sum(w for _, w in embedders)
    return total.cpu(), {k: v.cpu() for k, v in parts.items()}


# -----------------------------------------------------------------------------
# update: cold start (flow matching), GRPO on caption tokens, Flow-GRPO on the DiT


def flow_matching_loss(models: Models, captions: list[str], latents: torch.Tensor, generator: torch.Generator,
                       drop: list[bool] | None = None) -> torch.Tensor:
    """SD3's rectified-flow loss: x_s = (1 - s) x0 + s noise, s = sigmoid(N(0, 1)) (SD3's logit-normal sampling),
    MSE(v, noise - x0), conditioned on projector(LLM states) of the captions; rows flagged in `drop` get the
    negative prompt's states (CFG's other branch). The LLM is frozen here (UAE's decoder training); gradients reach
    the projector and the DiT."""
    b = len(captions)
    with torch.no_grad():
        hidden = llm_states(models, captions)
    states = models.projector(hidden)
    cond = states[1:]
    if drop is not None and any(drop):
        cond = torch.where(torch.tensor(drop, device=cond.device)[:, None, None], states[:1].expand(b, -1, -1), cond)
    x0 = latents.float()
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    s = torch.sigmoid(torch.randn(b, generator=generator, device=generator.device)).to(x0.device)
    x = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    tf = models.transformer
    v = tf(hidden_states=x.to(tf.dtype), timestep=1000 * s, encoder_hidden_states=cond,
           pooled_projections=models.pooled.expand(b, -1), return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """(r - mean of the image's group) / (std of the group + 1e-4), population std, clamped to +-clip. A group is
    one image's samples, all on one rank."""
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return adv.view(-1).clamp(-clip, clip)


def minibatches(n: int, count: int) -> list[range]:
    """`count` contiguous chunks (some may be empty): every rank runs the same number of optimiser steps."""
    edges = [round(i * n / count) for i in range(count + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(count)]


def apply_gradients(optimizer, params: list, cfg: Config) -> tuple[float, bool]:
    """Average the accumulated gradients over ranks (one flat all-reduce), clip, step. A non-finite norm skips the
    step on every rank; a zero norm (nothing to learn anywhere) leaves Adam alone. Returns (norm, stepped)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    common.average_gradients(params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    stepped = bool(torch.isfinite(norm))
    if stepped and norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), stepped


def backward_if_finite(loss: torch.Tensor) -> bool:
    """A rank whose loss is not finite contributes zero gradients (and says so)."""
    if torch.isfinite(loss):
        loss.backward()
        return True
    return False


def mean_stats(stats: dict) -> dict:
    return {k: (sum(v) / len(v) if v else float("nan")) if isinstance(v, list) else v for k, v in stats.items()}


def encoder_grpo_step(models: Models, optimizer, cfg: Config, batch: dict, advantages: torch.Tensor) -> dict:
    """GRPO on caption tokens (stage 2): per-token ratio, PPO clip, k3 KL to the LLM with adapters off.

    Old and reference log-probs are re-scored before any update with the same chunks as the update, so the first
    ratio is exactly 1 (the KV-cached sampler agrees to the last bits; the gap is logged). Loss: a token mean over
    the chunk of max(-A r, -A clip(r)) + beta k3, k3 = exp(ref - logp) - (ref - logp) - 1."""
    params = common.lora_parameters(models.lm)
    tokens, inputs = batch["tokens"], batch["inputs"]
    valid = caption_mask(models, tokens).float()
    chunks = minibatches(len(tokens), cfg.num_minibatches)

    def score(c: range) -> torch.Tensor:
        return caption_logprobs(models, inputs.rows(list(c)), tokens[c.start:c.stop], cfg.caption_temperature)

    with torch.no_grad():
        old = [score(c) if len(c) else None for c in chunks]
        with common.lora_disabled(models.lm):
            ref = [score(c) if len(c) else None for c in chunks]
    gap = max((float(((o - batch["log_probs"][c.start:c.stop]) * valid[c.start:c.stop]).abs().max())
               for o, c in zip(old, chunks) if o is not None), default=0.0)
    stats = {"loss": [], "kl": [], "clip_frac": [], "grad_norm": [], "ratio0": float("nan"), "logp_gap": gap,
             "skipped_updates": 0}
    models.llm.train(cfg.grad_checkpointing)  # transformers checkpoints only in train mode; Qwen has no dropout
    for k, c in enumerate(chunks):
        if len(c):
            logp = score(c)
            m, adv = valid[c.start:c.stop], advantages[c.start:c.stop, None].to(logp.device)
            ratio = torch.exp(logp - old[k])
            clipped = ratio.clamp(1 - cfg.clip_encoder, 1 + cfg.clip_encoder)
            policy = torch.maximum(-adv * ratio, -adv * clipped)
            log_ref = ref[k] - logp
            kl = torch.exp(log_ref) - log_ref - 1
            loss = ((policy + cfg.beta_encoder * kl) * m).sum() / m.sum().clamp(min=1)
            backward_if_finite(loss)
            stats["loss"].append(float(loss.detach()))
            stats["kl"].append(float((kl.detach() * m).sum() / m.sum().clamp(min=1)))
            stats["clip_frac"].append(float(((ratio.detach() != clipped.detach()).float() * m).sum() / m.sum()))
            if k == 0:
                stats["ratio0"] = float((ratio.detach() * m).sum() / m.sum())
        norm, stepped = apply_gradients(optimizer, params, cfg)
        stats["grad_norm"].append(norm)
        stats["skipped_updates"] += not stepped
    models.llm.eval()
    return mean_stats(stats)


def cfg_rows(cond: torch.Tensor, c: range) -> torch.Tensor:
    """Rows c of both halves of a [negative; positive] batch."""
    b = cond.shape[0] // 2
    return torch.cat([cond[c.start:c.stop], cond[b + c.start:b + c.stop]])


def decoder_grpo_step(models: Models, optimizer, cfg: Config, batch: dict, advantages: torch.Tensor) -> dict:
    """Flow-GRPO on the DiT LoRA (stage 3): re-score each stored SDE transition with the same CFG batch, per-step
    clipped ratio, KL of step means to the DiT with adapters off; backward per timestep, one optimiser step per
    chunk. Old log-probs are re-scored before the update (first ratio exactly 1; the gap to the rollout's is logged)."""
    params = common.lora_parameters(models.transformer)
    latents, sigmas, cond, pooled = batch["latents"], batch["sigmas"], batch["cond"], batch["pooled"]
    steps = batch["train_steps"]
    trained = len(steps)
    chunks = minibatches(latents.shape[1], cfg.num_minibatches)

    def step(c: range, j: int):
        x = latents[j, c.start:c.stop]
        v = velocity(models, x, float(sigmas[j]), cfg_rows(cond, c), cfg_rows(pooled, c), cfg.guidance)
        return common.sde_step_with_logprob(x, v, float(sigmas[j]), float(sigmas[j + 1]), cfg.noise_level,
                                            prev_sample=latents[j + 1, c.start:c.stop])[1:]

    with torch.no_grad():
        old = [[step(c, j)[0] for j in steps] if len(c) else None for c in chunks]
    gap = max((float((old[k][n] - batch["log_probs"][n, c.start:c.stop]).abs().max())
               for k, c in enumerate(chunks) if len(c) for n in range(trained)), default=0.0)
    stats = {"loss": [], "kl": [], "clip_frac": [], "grad_norm": [], "ratio0": float("nan"), "logp_gap": gap,
             "skipped_updates": 0}
    models.transformer.train(cfg.grad_checkpointing)
    for k, c in enumerate(chunks):
        for n, j in enumerate(steps if len(c) else []):
            logp, mean, std_dev_t = step(c, j)
            adv = advantages[c.start:c.stop].to(logp.device)
            ratio = torch.exp(logp - old[k][n])
            clipped = ratio.clamp(1 - cfg.clip_decoder, 1 + cfg.clip_decoder)
            policy = torch.maximum(-adv * ratio, -adv * clipped).mean()
            kl = torch.zeros((), device=logp.device)
            if cfg.beta_decoder > 0:
                with torch.no_grad(), common.lora_disabled(models.transformer):
                    x = latents[j, c.start:c.stop]
                    v_ref = velocity(models, x, float(sigmas[j]), cfg_rows(cond, c), cfg_rows(pooled, c), cfg.guidance)
                    mean_ref = common.sde_step_with_logprob(
                        x, v_ref, float(sigmas[j]), float(sigmas[j + 1]), cfg.noise_level,
                        prev_sample=latents[j + 1, c.start:c.stop])[2]
                kl = common.step_mean_kl(mean, mean_ref, std_dev_t).mean()
            loss = policy + cfg.beta_decoder * kl
            backward_if_finite(loss / trained)
            stats["loss"].append(float(loss.detach()))
            stats["kl"].append(float(kl.detach()))
            stats["clip_frac"].append(float((ratio.detach() != clipped.detach()).float().mean()))
            if k == 0 and n == 0:
                stats["ratio0"] = float(ratio.detach().mean())
        norm, stepped = apply_gradients(optimizer, params, cfg)
        stats["grad_norm"].append(norm)
        stats["skipped_updates"] += not stepped
    models.transformer.eval()
    return mean_stats(stats)


# -----------------------------------------------------------------------------
# train


def stage_of(cfg: Config, step: int) -> int:
    """The Unified-GRPO stage a global step belongs to."""
    end = 0
    for stage, n in zip(cfg.stages, cfg.stage_steps):
        end += n
        if step < end:
            return stage
    return cfg.stages[-1]


def load_rows(cfg: Config) -> list[dict] | None:
    if cfg.data is None:
        return None
    rows = common.read_jsonl(cfg.data, required=("image",))
    base = os.path.dirname(os.path.abspath(cfg.data))
    return [{**r, "image": os.path.join(base, r["image"])} for r in rows]


def step_images(cfg: Config, rows: list[dict] | None, step: int, rank: int) -> torch.Tensor:
    """This rank's images for a step, (n, 3, R, R) in [-1, 1]: image index = (step, rank, i), so ranks see different
    images and a resumed run sees the same ones. Real data is visited in a seeded permutation per epoch."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = []
    for i in range(cfg.images_per_rank):
        index = (step * world + rank) * cfg.images_per_rank + i
        if rows is None:
            out.append(toy_image(toy_attributes(random.Random(f"{cfg.seed}-{index}"))))
            continue
        epoch, k = divmod(index, len(rows))
        order = list(range(len(rows)))
        random.Random(f"{cfg.seed}-epoch-{epoch}").shuffle(order)
        image = common.load_image(rows[order[k]]["image"])
        out.append(common.pil_to_tensor(common.resize_center_crop(image, size=(cfg.resolution, cfg.resolution))))
    return torch.stack(out)


@torch.no_grad()
def caption_images(models: Models, cfg: Config, images: torch.Tensor, per_image: int,
                   generator: torch.Generator) -> dict:
    """per_image sampled captions of each image (rows grouped by image): inputs, tokens, log-probs, texts."""
    pils = [common.tensor_to_pil(x) for x in images for _ in range(per_image)]
    inputs = caption_inputs(models, pils)
    tokens, logps = sample_captions(models, inputs, cfg.max_caption_tokens, cfg.caption_temperature, generator,
                                    cfg.cuda_graphs)
    lengths = (caption_mask(models, tokens).sum(1) - torch.isin(
        tokens, torch.tensor(models.stop_ids, device=tokens.device)).any(1).long()).float()
    return {"inputs": inputs, "tokens": tokens, "log_probs": logps, "texts": caption_texts(models, tokens),
            "caption_len": float(lengths.mean())}


@torch.no_grad()
def cold_start_rollout(models: Models, cfg: Config, embedders, images: torch.Tensor,
                       generator: torch.Generator) -> dict:
    """Stage 1's data: group_size captions per image (what the decoder learns from) and, for the log, the reward of
    a reconstruction from each image's first caption, before the update."""
    g = cfg.group_size
    caps = caption_images(models, cfg, images, g, generator)
    originals = images.to(models.device)
    cond, pooled = condition(models, caps["texts"][::g])
    recon = sample_images(models, cond, pooled, initial_noise(models, len(images), cfg.resolution, generator),
                          cfg.num_steps, cfg.guidance)
    rewards, parts = reward(embedders, originals, recon)
    return {"rewards": rewards, "parts": parts, "texts": caps["texts"][::g], "captions": caps["texts"],
            "recon": recon, "originals": originals, "caption_len": caps["caption_len"], "group": 1}


def cold_start_step(models: Models, optimizer, cfg: Config, batch: dict, generator: torch.Generator) -> dict:
    """Stage 1's update: the decoder (DiT LoRA + projector) learns to reconstruct each image from each of its
    captions with the flow-matching loss; cond_dropout of the captions are replaced by the negative prompt."""
    captions, g = batch["captions"], cfg.group_size
    with torch.no_grad():
        latents = common.vae_encode(models.vae, batch["originals"]).repeat_interleave(g, 0)
    drop = (torch.rand(len(captions), generator=generator, device=generator.device) < cfg.cond_dropout).tolist()
    models.transformer.train(cfg.grad_checkpointing)
    loss = flow_matching_loss(models, captions, latents, generator, drop)
    backward_if_finite(loss)
    params = common.lora_parameters(models.transformer) + list(models.projector.parameters())
    norm, stepped = apply_gradients(optimizer, params, cfg)
    models.transformer.eval()
    return {"loss": float(loss.detach()), "grad_norm": norm, "skipped_updates": int(not stepped)}


@torch.no_grad()
def encoder_rollout(models: Models, cfg: Config, embedders, images: torch.Tensor, generator: torch.Generator) -> dict:
    """Stage 2: G captions per image, each decoded by the frozen decoder from the same noise (within a group only
    the caption differs), rewarded by similarity to the image."""
    g = cfg.group_size
    caps = caption_images(models, cfg, images, g, generator)
    cond, pooled = condition(models, caps["texts"])
    noise = initial_noise(models, len(images), cfg.resolution, generator).repeat_interleave(g, 0)
    recon = sample_images(models, cond, pooled, noise, cfg.num_steps, cfg.guidance)
    originals = images.to(models.device).repeat_interleave(g, 0)
    rewards, parts = reward(embedders, originals, recon)
    return {**caps, "recon": recon, "originals": originals, "rewards": rewards, "parts": parts, "group": g}


@torch.no_grad()
def decoder_rollout(models: Models, cfg: Config, embedders, images: torch.Tensor, generator: torch.Generator) -> dict:
    """Stage 3: one caption per image, G SDE reconstructions from it (different noise), rewarded as in stage 2."""
    g = cfg.group_size
    caps = caption_images(models, cfg, images, 1, generator)
    texts = [t for t in caps["texts"] for _ in range(g)]
    cond, pooled = condition(models, texts)
    roll = sde_rollout(models, cfg, cond, pooled, initial_noise(models, len(texts), cfg.resolution, generator),
                       generator)
    originals = images.to(models.device).repeat_interleave(g, 0)
    rewards, parts = reward(embedders, originals, roll["images"])
    return {**roll, "cond": cond, "pooled": pooled, "texts": texts, "caption_len": caps["caption_len"],
            "recon": roll["images"], "originals": originals, "rewards": rewards, "parts": parts, "group": g}


def trainables(models: Models) -> list[torch.Tensor]:
    return (common.lora_parameters(models.lm) + common.lora_parameters(models.transformer)
            + list(models.projector.parameters()))


def save_training(path: str, models: Models, optimizers: dict, step: int, cfg: Config) -> None:
    """Checkpoint (every rank calls it: RNG states are gathered); non-finite weights are refused, so the previous
    checkpoint stays the last good one."""
    if not all(torch.isfinite(p).all() for p in trainables(models)):
        raise FloatingPointError(f"non-finite weights at step {step}: not overwriting {path}")
    common.save_checkpoint(path, {"step": step, "llm_lora": common.lora_state_dict(models.lm),
                                  "dit_lora": common.lora_state_dict(models.transformer),
                                  "projector": models.projector.state_dict(),
                                  "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                                  "config": dataclasses.asdict(cfg)})


def resume_training(path: str, models: Models, optimizers: dict) -> int:
    state = common.load_checkpoint(path)
    common.load_lora(models.lm, state["llm_lora"], prefix="")
    common.load_lora(models.transformer, state["dit_lora"], prefix="")
    models.projector.load_state_dict(state["projector"])
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    common.print0(f"resumed from {path} at step {state['step']}")
    return state["step"]


def export_weights(models: Models, out_dir: str) -> None:
    """llm_lora.safetensors (PEFT keys of the text decoder, as UAE wraps it), dit_lora.safetensors (diffusers keys,
    load_lora_weights reads them), projector.safetensors (UAE's projector.* keys)."""
    from safetensors.torch import save_file

    common.save_lora(models.lm, os.path.join(out_dir, "llm_lora.safetensors"), prefix="base_model.model.")
    common.save_lora(models.transformer, os.path.join(out_dir, "dit_lora.safetensors"), prefix="transformer.")
    sd = {f"projector.{k}": v.detach().contiguous().cpu() for k, v in models.projector.state_dict().items()}
    common.atomic_save(os.path.join(out_dir, "projector.safetensors"), lambda tmp: save_file(sd, tmp))


def train(cfg: Config) -> None:
    d = common.init_dist(cfg.device)
    if len(cfg.stages) != len(cfg.stage_steps) or not set(cfg.stages) <= {1, 2, 3} or not cfg.stages:
        raise ValueError(f"--stages {cfg.stages} and --stage-steps {cfg.stage_steps} must list the same number of "
                         "entries, stages among 1, 2, 3")
    total = sum(cfg.stage_steps)
    dtype, reason = common.pick_dtype(d.device, cfg.dtype)
    common.print0(f"dtype {dtype} ({reason}); {d.world_size} rank(s) x {cfg.images_per_rank} image(s) x group "
                  f"{cfg.group_size}; stages {cfg.stages} for {cfg.stage_steps} steps")
    models = load_models(cfg, d.device, dtype)
    common.seed_everything(cfg.seed)  # the same adapter init on every rank
    add_llm_lora(models, cfg)
    add_dit_lora(models, cfg)
    common.seed_everything(cfg.seed + d.rank)
    embedders = load_reward(cfg, d.device, models.toy is not None)
    if cfg.grad_checkpointing:
        models.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models.transformer.enable_gradient_checkpointing()
    models.projector.requires_grad_(True)  # trained in stage 1 only (the only optimizer that holds it)
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    optimizers = {"cold": adamw(common.lora_parameters(models.transformer) + list(models.projector.parameters()),
                                cfg.lr_cold),
                  "encoder": adamw(common.lora_parameters(models.lm), cfg.lr_encoder),
                  "decoder": adamw(common.lora_parameters(models.transformer), cfg.lr_decoder)}
    ckpt = os.path.join(cfg.out_dir, "checkpoint", "latest.pt")
    start = resume_training(ckpt, models, optimizers) if cfg.resume else 0
    if d.is_main:
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
        common.save_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
    rows = load_rows(cfg)
    log = common.MetricLog(cfg.out_dir, total, start, enabled=d.is_main)
    skipped_groups = 0
    for step in range(start, total):
        t0 = time.time()
        stage = stage_of(cfg, step)
        generator = common.step_generator(cfg.seed, step, d.rank, device=d.device)
        images = step_images(cfg, rows, step, d.rank)
        if stage == 1:
            batch = cold_start_rollout(models, cfg, embedders, images, generator)
            common.synchronize(d.device)
            t_rollout = time.time() - t0
            stats = cold_start_step(models, optimizers["cold"], cfg, batch, generator)
        else:
            batch = (encoder_rollout if stage == 2 else decoder_rollout)(models, cfg, embedders, images, generator)
            common.synchronize(d.device)
            t_rollout = time.time() - t0
            g = batch["group"]
            finite = torch.isfinite(batch["rewards"]).view(-1, g).all(1)  # a group with a NaN reward is left out
            skipped = torch.tensor(float((~finite).sum()), device=d.device)
            if dist.is_initialized():
                dist.all_reduce(skipped)
            skipped_groups += int(skipped)
            safe = torch.where(finite.repeat_interleave(g), batch["rewards"], 0.0)
            adv = group_advantages(safe, g, cfg.adv_clip) * finite.repeat_interleave(g)
            step_fn = encoder_grpo_step if stage == 2 else decoder_grpo_step
            stats = step_fn(models, optimizers["encoder" if stage == 2 else "decoder"], cfg, batch, adv)
        common.synchronize(d.device)
        t_update = time.time() - t0 - t_rollout
        r = batch["rewards"]
        metrics = {"stage": stage, "reward": float(r.nanmean()), "reward_std": float(r.std(unbiased=False)),
                   **{f"r_{k}": float(v.nanmean()) for k, v in batch["parts"].items()},
                   "caption_len": batch["caption_len"]}
        if batch["group"] > 1:  # the spread GRPO learns from: within each image's group
            group_std = r.view(-1, batch["group"]).std(1, unbiased=False)
            metrics.update(group_std=float(group_std.mean()), zero_std=float((group_std == 0).float().mean()))
        metrics.update(stats)
        metrics = common.all_reduce_mean(metrics, d.device)
        metrics.update(stage=stage, groups_skipped=skipped_groups, t_rollout=t_rollout, t_update=t_update,
                       mem_gb=common.peak_memory_gb(d.device))
        log.log(step, metrics)
        done = step + 1 == total
        if d.is_main and (step % cfg.sample_every == 0 or done):
            n = min(8, len(batch["recon"]))
            grid = torch.cat([batch["originals"][:n].float().cpu(), batch["recon"][:n].float().cpu()])
            common.save_grid(grid, os.path.join(cfg.out_dir, "samples", f"step_{step + 1:06d}.png"), nrow=n)
            with open(os.path.join(cfg.out_dir, "samples", f"step_{step + 1:06d}.txt"), "w") as f:
                f.write("\n".join(batch["texts"][:n]) + "\n")
        if (step + 1) % cfg.save_every == 0 or done:
            save_training(ckpt, models, optimizers, step + 1, cfg)
            if d.is_main:
                export_weights(models, cfg.out_dir)
    common.cleanup_dist()


# -----------------------------------------------------------------------------
# evaluate: Unified-Bench (caption each reference image, redraw it, compare)

BENCH_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tiff", ".webp")


def bench_files(folder: str) -> list[str]:
    """Image files under a folder, recursively, sorted (Score_i2i.py's rglob and extension list)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    found = [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
             if f.lower().endswith(BENCH_EXTENSIONS)]
    return sorted(found)


def match_generated(references: list[str], generated: list[str]) -> dict[str, str | None]:
    """Reference file name -> its generated image: same file name, else same stem, else stem "recon_<stem>"
    (Score_i2i.py's order); None when there is none."""
    by_name = {os.path.basename(p): p for p in generated}
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in generated}
    out = {}
    for ref in references:
        name = os.path.basename(ref)
        stem = os.path.splitext(name)[0]
        out[name] = by_name.get(name) or by_stem.get(stem) or by_stem.get("recon_" + stem)
    return out


def load_bench_embedders(cfg: Config, device: torch.device, toy: bool) -> list[Embedder]:
    """Unified-Bench's encoders that have a folder: CLIP-L/14, DINOv2-L, DINOv3-L/16, LongCLIP-L (converted)."""
    if toy:
        return toy_embedders(device)
    wanted = [("clip", cfg.clip_dir, "--clip-dir"), ("dinov2", cfg.dinov2_dir, "--dinov2-dir"),
              ("dinov3", cfg.dinov3_dir, "--dinov3-dir"), ("longclip", cfg.longclip_dir, "--longclip-dir")]
    embedders = [load_embedder(name, folder, flag, device) for name, folder, flag in wanted if folder]
    if not embedders:
        raise ValueError("Unified-Bench needs at least one of --clip-dir, --dinov2-dir, --dinov3-dir, --longclip-dir")
    return embedders


@torch.no_grad()
def embed_files(emb: Embedder, paths: list[str], batch: int = 16) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of image files, each preprocessed by the encoder's own processor (PIL)."""
    out = []
    for i in range(0, len(paths), batch):
        images = [common.load_image(p) for p in paths[i:i + batch]]
        out.append(features(emb, emb.processor(images=images, return_tensors="pt")["pixel_values"]).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def unified_bench(reference_dir: str, generated_dir: str, embedders: list[Embedder]) -> dict:
    """Per image and encoder: cosine of L2-normalised embeddings of reference and generated image; per encoder:
    average / min / max over matched images; overall = mean of the encoders' averages (the paper's Unified score is
    it x 100). The JSON layout is Score_i2i.py's (model_types, similarities_by_model, statistics_by_model, summary);
    a reference without a generated image scores null and is left out of the statistics."""
    refs = bench_files(reference_dir)
    if not refs:
        raise ValueError(f"no images ({', '.join(BENCH_EXTENSIONS)}) in {reference_dir}")
    matches = match_generated(refs, bench_files(generated_dir))
    pairs = [(r, matches[os.path.basename(r)]) for r in refs if matches[os.path.basename(r)]]
    result = {"model_types": [e.name for e in embedders], "similarities_by_model": {}, "statistics_by_model": {}}
    averages = {}
    for emb in embedders:
        sims = (embed_files(emb, [r for r, _ in pairs]) * embed_files(emb, [g for _, g in pairs])).sum(-1).tolist()
        scores = dict.fromkeys((os.path.basename(r) for r in refs), None)
        scores.update({os.path.basename(r): s for (r, _), s in zip(pairs, sims)})
        result["similarities_by_model"][emb.name] = scores
        stats = {"total_images": len(refs), "valid_pairs": len(sims)}
        if sims:
            averages[emb.name] = sum(sims) / len(sims)
            stats.update(average_similarity=averages[emb.name], min_similarity=min(sims), max_similarity=max(sims))
        result["statistics_by_model"][emb.name] = stats
    overall = sum(averages.values()) / len(averages) if averages else None
    ranked = sorted(averages.items(), key=lambda kv: kv[1])
    result["summary"] = {"models_used": [e.name for e in embedders], "average_scores_by_model": averages,
                         "overall_average": overall, "unified_score": None if overall is None else 100 * overall,
                         "best_model": list(ranked[-1]) if ranked else None,
                         "worst_model": list(ranked[0]) if ranked else None}
    return result


def print_bench(result: dict) -> None:
    for name, s in result["statistics_by_model"].items():
        if s["valid_pairs"]:
            common.print0(f"{name:9s} average {s['average_similarity']:.4f}  min {s['min_similarity']:.4f}  "
                          f"max {s['max_similarity']:.4f}  ({s['valid_pairs']}/{s['total_images']} images)")
        else:
            common.print0(f"{name:9s} no matched images")
    if result["summary"]["overall_average"] is not None:
        common.print0(f"overall   {result['summary']['overall_average']:.4f}  (Unified score "
                      f"{result['summary']['unified_score']:.2f})")


def evaluate(cfg: Config) -> dict:
    """Unified-Bench: caption every reference image, redraw it from the caption (eval steps/resolution/CFG), save it
    as <out_dir>/bench/recon_<stem>.png, then score. Without --bench-images the toy writes 16 synthetic references."""
    d = common.init_dist(cfg.device)
    dtype, _ = common.pick_dtype(d.device, cfg.dtype)
    models = load_inference_models(cfg, d.device, dtype)
    reference_dir = cfg.bench_images
    out = os.path.join(cfg.out_dir, "bench")
    if reference_dir is None:
        if models.toy is None:
            raise ValueError("--evaluate needs --bench-images (UniBench/Image)")
        reference_dir = os.path.join(out, "reference")
        if d.is_main:
            for i in range(16):
                attrs = toy_attributes(random.Random(f"bench-{i}"))
                os.makedirs(reference_dir, exist_ok=True)
                common.tensor_to_pil(toy_image(attrs)).save(os.path.join(reference_dir, f"{i}.png"))
        if dist.is_initialized():
            dist.barrier()
    refs = bench_files(reference_dir)
    for index in range(d.rank, len(refs), d.world_size):  # images sharded by rank
        generator = common.step_generator(cfg.seed, -1, index, device=d.device)  # step -1: never a training draw
        text, image = reconstruct(models, cfg, common.load_image(refs[index]), generator)
        stem = os.path.splitext(os.path.basename(refs[index]))[0]
        os.makedirs(out, exist_ok=True)
        common.tensor_to_pil(image).save(os.path.join(out, f"recon_{stem}.png"))
        with open(os.path.join(out, f"recon_{stem}.txt"), "w") as f:
            f.write(text + "\n")
    if dist.is_initialized():
        dist.barrier()
    result = None
    if d.is_main:
        result = unified_bench(reference_dir, out, load_bench_embedders(cfg, d.device, models.toy is not None))
        common.save_json(os.path.join(cfg.out_dir, "unified_bench.json"), result)
        print_bench(result)
        common.print0(f"({cfg.out_dir}/unified_bench.json)")
    common.cleanup_dist()
    return result


# -----------------------------------------------------------------------------
# inference


def load_inference_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    models = load_models(cfg, device, dtype)
    if cfg.llm_lora:
        add_llm_lora(models, cfg)
    if cfg.dit_lora:
        add_dit_lora(models, cfg)
    return models


def toy_note(models: Models) -> str | None:
    if models.toy == "random":
        return "note: the embedded default's tiny random captioner (random weights): its caption is random tokens"
    if models.toy:
        return ("note: the embedded default's tiny captioner, pre-trained in code on synthetic squares only; "
                "pass --qwen-dir for the real model")
    return None


@torch.no_grad()
def caption(models: Models, cfg: Config, image, generator: torch.Generator | None = None) -> str:
    """The demo's caption: instruction + image, sampled at caption_temperature, at most max_caption_tokens."""
    inputs = caption_inputs(models, [image])
    tokens, _ = sample_captions(models, inputs, cfg.max_caption_tokens, cfg.caption_temperature, generator,
                                cfg.cuda_graphs)
    return caption_texts(models, tokens)[0]


@torch.no_grad()
def generate(models: Models, cfg: Config, prompt: str, generator: torch.Generator) -> torch.Tensor:
    """One image (3, H, W) in [-1, 1] for a prompt: eval_steps Euler steps, CFG against the negative prompt."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return draw(models, cfg, prompt, generator)


@torch.no_grad()
def draw(models: Models, cfg: Config, text: str, generator: torch.Generator) -> torch.Tensor:
    cond, pooled = condition(models, [text])
    noise = initial_noise(models, 1, cfg.eval_resolution, generator)
    return sample_images(models, cond, pooled, noise, cfg.eval_steps, cfg.guidance)[0]


def reconstruct(models: Models, cfg: Config, image, generator: torch.Generator) -> tuple[str, torch.Tensor]:
    """I2T2I: caption the image as text, then redraw it from the text alone (the demo's --input_img path). An empty
    caption is redrawn from the empty "generate" prompt, as in training."""
    text = caption(models, cfg, image, generator)
    return text, draw(models, cfg, text, generator)


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="UAE (arXiv 2509.09666): Qwen2.5-VL captioner -> SD3.5 decoder, "
                                                 "Unified-GRPO on reconstruction similarity. No --qwen-dir: the "
                                                 "embedded toy.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="run Unified-GRPO (torchrun for several GPUs)")
    mode.add_argument("--evaluate", action="store_true", help="Unified-Bench: caption, redraw, score -> JSON")
    mode.add_argument("--score", metavar="GENERATED_DIR", help="Unified-Bench scores of saved images vs --bench-images")
    mode.add_argument("--caption", metavar="IMAGE", help="print the encoder's caption of an image")
    mode.add_argument("--generate", metavar="PROMPT", help="draw an image -> <out_dir>/generate.png")
    mode.add_argument("--reconstruct", metavar="IMAGE", help="caption, redraw, save side by side, print similarity")
    common.add_config_args(parser, Config)
    args = parser.parse_args(argv)
    cfg = resolve_config(common.config_from_args(Config, args), common.given_fields(Config, parser, argv))
    if args.train:
        return train(cfg)
    if args.evaluate:
        return evaluate(cfg)
    device = common.init_dist(cfg.device).device
    if args.score:
        if cfg.bench_images is None:
            raise ValueError("--score needs --bench-images (the reference folder)")
        result = unified_bench(cfg.bench_images, args.score, load_bench_embedders(cfg, device, cfg.qwen_dir is None))
        common.save_json(os.path.join(cfg.out_dir, "unified_bench.json"), result)
        print_bench(result)
        return result
    models = load_inference_models(cfg, device, common.pick_dtype(device, cfg.dtype)[0])
    generator = common.step_generator(cfg.seed, device=device)
    if toy_note(models) and (args.caption or args.reconstruct):
        common.print0(toy_note(models))
    if args.caption:
        common.print0(caption(models, cfg, common.load_image(args.caption), generator))
    elif args.generate is not None:
        path = os.path.join(cfg.out_dir, "generate.png")
        image = generate(models, cfg, args.generate, generator)
        common.save_grid(image[None].cpu(), path, nrow=1)
        common.print0(f"saved {path}")
    else:
        image = common.load_image(args.reconstruct)
        text, recon = reconstruct(models, cfg, image, generator)
        original = common.pil_to_tensor(common.resize_center_crop(image, size=(cfg.eval_resolution,) * 2))
        path = os.path.join(cfg.out_dir, "reconstruct.png")
        common.save_grid(torch.stack([original, recon.cpu()]), path, nrow=2)
        common.print0(f"caption: {text}")
        if models.toy is None and cfg.clip_dir is None and cfg.dinov2_dir is None:
            common.print0("similarity: not computed (give --clip-dir and/or --dinov2-dir)")
        else:
            weighted = dataclasses.replace(cfg, clip_weight=1.0 if models.toy or cfg.clip_dir else 0.0,
                                           dino_weight=1.0 if models.toy or cfg.dinov2_dir else 0.0)
            _, parts = reward(load_reward(weighted, device, models.toy is not None), original[None].to(device),
                              recon[None])
            common.print0("similarity: " + ", ".join(f"{k} {float(v[0]):.4f}" for k, v in parts.items()))
        common.print0(f"saved {path} (original | reconstruction)")


if __name__ == "__main__":
    main()
