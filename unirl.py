"""
UniRL on Janus-Pro: a unified model that improves its image generation with its own understanding.

Paper: "Self-Improving Unified Multimodal Models via Supervised and Reinforcement Learning", arXiv 2505.23380.
The public code (showlab/UniRL) releases Show-o text-to-image inference only: no training code and no Janus
code. The loop below is rebuilt from the paper's abstract, appendix and pipeline figure:

    a prompt from one of GenEval's six categories, with its ground truth
      -> the model draws G images (autoregressive image tokens, classifier-free guidance, VQ decoder)
      -> the same model answers the category's question about each image (its SigLIP understanding path)
      -> a grader gives partial credit against the ground truth (the figure: 0 / +1 / +2 for "four bowls")
      -> GRPO on the image tokens (default), or SFT on the images it judged correct (--algo sft)

Where we differ from the paper (and why):
- Judge: a deterministic keyword grader with partial credit per attribute (object, count, colour, relation),
  not the LLM "same / not same" judge of the released evaluation code (Qwen2.5-7B-Instruct-1M).
- GRPO: the paper gives no formula. We use per-token clipped ratios on the image tokens of the CFG-mixed policy,
  per-prompt group advantages, and a k3 KL to the same model with its LoRA adapters off; beta 0.2 is inferred
  from the released run name. LoRA instead of full fine-tuning.
- SFT is the paper's non-end-to-end variant: image-token NLL on the images the model judged fully correct, plus
  NLL of the ground-truth answer about them. The end-to-end straight-through Gumbel-Softmax path is not built:
  Janus reads images through SigLIP on pixels, so it would have to go through the VQ decoder.
- Evaluation: GenEval's rules (thresholds, counting exclusion, position rule, per-tag accuracy, overall = mean of
  the six tags) with an open-vocabulary detector from transformers (OWLv2 or Grounding DINO: boxes, no masks)
  instead of Mask2Former, and a zero-shot CLIP colour check on the box crop (GenEval pastes the mask on grey).

Embedded default (no flags, CPU, nothing downloaded): a tiny JanusForConditionalGeneration of the real class and a
word-level tokenizer, both built in code, in a toy world of 4x4 image tokens (16 codes are "a <colour> <class>"
for 4 classes x 4 colours, 48 are background). Its VQ decoder is set to paint each code as a flat colour patch
(a random decoder paints nearly the same picture for every code), and the model is pre-trained in code once
(cached on disk) to answer the six questions about such pictures, cluttered ones included, and weakly to draw
them. The self-judged reward is the tiny model's own answers graded against the prompts; the log also shows
`toy_geneval`, GenEval's rule applied to what the tokens really hold, so you see whether the judge is being fooled.
Measured on a 2-core CPU: reward 0.32 -> 0.76 and toy_geneval 0.26 -> 0.58 over 60 steps, in about 2 minutes
(1.5 of them the one-time pre-training).

Commands:
    python unirl.py --train                                          # embedded toy, CPU, ~2 minutes
    python unirl.py --train --model-dir /path/Janus-Pro-7B           # 1 GPU, real weights (transformers format)
    torchrun --standalone --nproc_per_node=8 unirl.py --train --model-dir /path/Janus-Pro-7B
    python unirl.py --generate "a photo of a red cup" --model-dir /path/Janus-Pro-7B --lora runs/unirl/lora.safetensors
    python unirl.py --ask image.png "What is the color of the object?" --model-dir /path/Janus-Pro-7B
    python unirl.py --evaluate --model-dir /path/Janus-Pro-7B --lora runs/unirl/lora.safetensors \
        --eval-prompts geneval/prompts/evaluation_metadata.jsonl --detector-dir /path/owlv2 --clip-dir /path/clip-l14

Requires common.py next to it.
"""

import argparse
import ast
import dataclasses
import functools
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
import torch.nn.functional as F
import transformers
from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil,
                          JanusProcessor, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig, PreTrainedTokenizerFast)

import common

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Config:
    # ---- model
    model_dir: str | None = None  # transformers-format Janus-Pro-1B/-7B folder; none = the embedded tiny Janus
    lora: str | None = None  # LoRA file to load for --generate/--ask/--evaluate (ours: <out_dir>/lora.safetensors)
    lora_rank: int = 32  # LoRA rank (the paper fine-tunes all weights; adapters give a free reference policy)
    lora_alpha: float = 64.0  # LoRA alpha (scale alpha/rank)
    lora_targets: tuple[str, ...] = ("*language_model*_proj", "*generation_*")  # Linear layers with adapters (globs)
    # ---- data
    categories: tuple[str, ...] = TAGS  # prompt categories (paper appendix: six predefined categories)
    train_prompts: int = 0  # a fixed pool of this many training prompts (0 = fresh prompts every step)
    prompts_per_rank: int = 1  # prompts per step and rank, each with group_size images (paper: group = per-GPU batch)
    eval_prompts: str | None = None  # GenEval evaluation_metadata.jsonl for --evaluate; none = generated prompts
    holdout_prompts: str | None = None  # prompts training never draws (paper: GenEval's 553); default --eval-prompts
    eval_num_prompts: int = 60  # generated evaluation prompts when no file is given (held out by seed from training)
    eval_images_per_prompt: int = 4  # GenEval README: 4 images per prompt
    # ---- rollout
    group_size: int = 8  # images per prompt (paper appendix: group 8 for Janus)
    cfg_scale: float = 5.0  # logit CFG weight (Janus-Pro generation_inference.py cfg_weight)
    temperature: float = 1.0  # image-token sampling temperature (Janus-Pro generation_inference.py)
    cuda_graphs: bool = True  # replay each image-token decode step as a CUDA graph (CUDA only; eager elsewhere)
    max_answer_tokens: int = 48  # greedy answer length (released Show-o MMU code: 100)
    # ---- reward
    detector_dir: str | None = None  # local OWLv2 or Grounding DINO folder (--evaluate with real weights)
    clip_dir: str | None = None  # local CLIP folder for the colour check (GenEval: OpenAI ViT-L/14)
    det_threshold: float = 0.3  # GenEval's detection score threshold (Mask2Former scores; recalibrate for OWLv2)
    det_threshold_counting: float = 0.9  # GenEval's threshold on counting prompts
    det_max_objects: int = 16  # GenEval: at most 16 detections per class
    # ---- optimisation
    algo: str = "grpo"  # "grpo" or "sft" (the paper explores both)
    lr: float = 1e-5  # paper appendix (Janus and Show-o)
    max_steps: int = 3000  # released Show-o GRPO checkpoint is checkpoint-3001 (reference/unirl.md)
    beta: float = 0.2  # KL weight, inferred from the released run name "..._beta_0_2_..."
    clip_range: float = 0.2  # PPO clip on per-token ratios (paper gives none; DeepSeekMath GRPO uses 0.2)
    num_minibatches: int = 2  # optimiser steps per rollout batch (flow_grpo: two per epoch)
    max_grad_norm: float = 1.0  # gradient clipping after the cross-rank sync (flow_grpo)
    weight_decay: float = 1e-4  # AdamW weight decay (flow_grpo config/base.py)
    grad_checkpointing: bool = False  # recompute activations in the update (7B x 2 CFG rows x 576 tokens)
    # ---- logging
    out_dir: str = "runs/unirl"  # config.json, metrics.jsonl, samples/, lora.safetensors, checkpoint/
    sample_every: int = 50  # save a grid of one group's images every N steps
    save_every: int = 100  # checkpoint and LoRA every N steps (and at the end)
    resume: bool = False  # continue from <out_dir>/checkpoint/latest.pt
    # ---- system
    seed: int = 0  # seeds prompts, sampling noise and LoRA init
    device: str = "auto"  # auto, cuda or cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16
    # ---- embedded toy (only without --model-dir)
    toy_pretrain_steps: int = 2000  # steps of in-code pre-training of the tiny model (understanding and drawing)
    toy_gen_pretrain_steps: int = 40  # of those, the first N also train drawing (few: leave room to improve)


# Without --model-dir these replace the paper's defaults wherever a flag still holds its default (train() prints each).
# The tiny model needs a larger learning rate; a pool of 6 prompts (one per category), all drawn 16 times every step,
# gives GRPO enough samples per prompt to move within a minute; with 16 tokens per image and zero-mean advantages
# the k3 KL term would otherwise outweigh the policy term, hence beta 0.01.
TOY_SETTINGS = dict(lr=3e-3, max_steps=60, train_prompts=6, prompts_per_rank=6, group_size=16, beta=0.01, lora_rank=8,
                    lora_alpha=16.0, sample_every=10, save_every=20, eval_num_prompts=48, max_answer_tokens=16)


def resolve_config(cfg: Config, given: frozenset[str] = frozenset()) -> Config:
    """The config a run uses: with no --model-dir, the toy's settings for every field that is neither
    typed on the command line (`given`) nor changed from its default (printed)."""
    if cfg.model_dir is not None:
        return cfg
    return common.apply_toy_settings(cfg, TOY_SETTINGS, "embedded toy settings", given)


# -----------------------------------------------------------------------------
# model loading

# The toy world of the embedded default: 4x4 image tokens; code k < 16 is "a <colour> <class>" (k = 4 class + colour),
# codes 16..63 are background. Colour names are the hue painted (the class shifts the tint), so samples read right.
TOY_CLASSES = ("cat", "dog", "car", "cup")
TOY_COLORS = ("red", "green", "blue", "yellow")
TOY_GRID, TOY_CODES, TOY_OBJECTS = 4, 64, 16
TOY_PALETTE = {  # 0..10 levels per RGB channel, per colour: cat, dog, car, cup
    "red": [(10, 0, 0), (10, 5, 0), (10, 0, 5), (10, 5, 5)],
    "green": [(0, 10, 0), (5, 10, 0), (0, 10, 5), (5, 10, 5)],
    "blue": [(0, 0, 10), (5, 0, 10), (0, 5, 10), (5, 5, 10)],
    "yellow": [(10, 10, 0), (10, 10, 5), (10, 6, 0), (6, 10, 5)]}
TOY_GREYS = [(2, 2, 2), (3, 3, 3), (2, 3, 3), (3, 2, 2)]
SPECIAL = dict(bos="<|begin▁of▁sentence|>", eos="<|end▁of▁sentence|>", pad="<｜▁pad▁｜>", unk="<unk>",
               image="<image_placeholder>", boi="<begin_of_image>", eoi="<end_of_image>")
# Janus-Pro's conversation format (tokenizer chat template of the released checkpoints) without the system prompt.
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image_placeholder>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}")


@dataclass
class Models:
    model: JanusForConditionalGeneration
    processor: JanusProcessor
    bos_id: int
    eos_id: int
    pad_id: int
    boi_id: int
    num_image_tokens: int  # 576 for Janus-Pro (24 x 24 at 384 px), 16 in the toy
    toy: bool

    @property
    def device(self):
        return self.model.lm_head.weight.device


def toy_code_of(cls: str, color: str) -> int:
    return TOY_CLASSES.index(cls) * len(TOY_COLORS) + TOY_COLORS.index(color)


def toy_cell_box(cell: int) -> tuple[float, float, float, float]:
    row, col = divmod(cell, TOY_GRID)
    return (col, row, col + 1, row + 1)  # x0, y0, x1, y1 in cell units


def toy_detect(tokens: list[int]) -> dict[str, list[tuple[tuple, str]]]:
    """The toy's stand-in detector: reads objects off the tokens (raster order); {class: [(box, colour), ...]}."""
    found = {}
    for cell, code in enumerate(tokens):
        if code < TOY_OBJECTS:
            cls, color = TOY_CLASSES[code // len(TOY_COLORS)], TOY_COLORS[code % len(TOY_COLORS)]
            found.setdefault(cls, []).append((toy_cell_box(cell), color))
    return found


def toy_correct(meta: dict, tokens: list[int]) -> bool:
    """GenEval's check on a toy picture, with the stand-in detector and the colours of the codes."""
    found = toy_detect(tokens)
    color = {box: c for hits in found.values() for box, c in hits}
    return geneval_correct(meta, {cls: [box for box, _ in hits] for cls, hits in found.items()},
                           lambda cls, boxes: [color[box] for box in boxes])


def toy_scene(meta: dict, rng: random.Random) -> list[int]:
    """Tokens of a picture that satisfies a prompt: its objects in random free cells, background elsewhere."""
    while True:  # rejection sampling for the position rule (a few tries at most)
        tokens = [rng.randrange(TOY_OBJECTS, TOY_CODES) for _ in range(TOY_GRID ** 2)]
        free = rng.sample(range(TOY_GRID ** 2), TOY_GRID ** 2)
        cells = []
        for req in meta["include"]:
            cells.append([free.pop() for _ in range(req["count"])])
            for cell in cells[-1]:
                tokens[cell] = toy_code_of(req["class"], req.get("color") or rng.choice(TOY_COLORS))
        if all(relative_position(toy_cell_box(a), toy_cell_box(b)) == {req["position"][0]}  # not diagonal
               for req, own in zip(meta["include"], cells) if "position" in req
               for a in own for b in cells[req["position"][1]]):
            return tokens


def toy_answer(tokens: list[int], tag: str) -> str:
    """What is true of a toy picture, phrased like the ground-truth answers: the labels of the toy pre-training.
    The 'main' class is the most frequent (ties: first in raster order); colours are of its first instance."""
    found = toy_detect(tokens)
    order = sorted(found, key=lambda c: -len(found[c]))  # stable: raster order breaks ties
    if not order:
        return "nothing"
    a, b = order[0], (order[1] if len(order) > 1 else None)
    (box_a, color_a), n = found[a][0], len(found[a])
    if tag == "single_object":
        return a
    if tag == "counting":
        return f"{NUMBERS[n] if n < len(NUMBERS) else 'many'} {a if n == 1 else geneval_plural(a)}"
    if tag == "colors":
        return color_a
    if b is None:
        return f"There is {with_article(a)}"
    if tag == "two_object":
        return f"There is {with_article(a)} and {with_article(b)}"
    if tag == "position":  # on a diagonal, the axis with the larger offset
        box_b = found[b][0][0]
        dx, dy = box_a[0] - box_b[0], box_a[1] - box_b[1]
        order = RELATIONS if abs(dx) >= abs(dy) else RELATIONS[2:] + RELATIONS[:2]
        relations = relative_position(box_a, box_b)
        return f"The {a} is {next((r for r in order if r in relations), 'near')} the {b}"
    return f"The {a} is {color_a} and the {b} is {found[b][0][1]}"


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word the toy's prompts, questions and answers use, built in memory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    text = " ".join(list(QUESTIONS.values()) + list(TOY_CLASSES) + [geneval_plural(c) for c in TOY_CLASSES]
                    + list(TOY_COLORS) + list(NUMBERS) + list(RELATIONS) + ["a an photo of and there is the near many"
                                                                          " nothing :"])
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))
    specials = list(SPECIAL.values()) + ["<|User|>", "<|Assistant|>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token=SPECIAL["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(  # BOS first, as Janus-Pro's LlamaTokenizer does
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"], padding_side="left",
        extra_special_tokens={"image_token": SPECIAL["image"], "boi_token": SPECIAL["boi"],
                              "eoi_token": SPECIAL["eoi"]})


@torch.no_grad()
def paint_toy_decoder(vq) -> None:
    """Sets the VQ decoder so that code k decodes to a flat patch of colour TOY_PALETTE (exactly, 4x4 px per token).

    Each code is a +-1 vector: a thermometer code of its 0..10 level per channel (10 entries each). The decoder's
    residual and attention blocks become identities (zeroed output convs), upsampling convs pass through, and
    conv_in writes (+x, -x) pairs so every GroupNorm group holds values of mean 0 and variance 1: the norms then
    leave the code unchanged, and conv_out (sum of the thermometer) gives the level. swish(x) - swish(-x) = x."""
    levels = [TOY_PALETTE[col][ci] for ci in range(len(TOY_CLASSES)) for col in TOY_COLORS]
    levels = torch.tensor(levels + [TOY_GREYS[i % len(TOY_GREYS)] for i in range(TOY_CODES - TOY_OBJECTS)])
    dim = vq.quantize.embedding.weight.shape[1]
    bits = torch.ones(TOY_CODES, dim)
    for ch in range(3):
        bits[:, 10 * ch:10 * ch + 10] = torch.where(levels[:, ch:ch + 1] > torch.arange(10), 1.0, -1.0)
    vq.quantize.embedding.weight.copy_(bits)

    def centre_tap(conv, weight):
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = weight

    latent = vq.post_quant_conv.out_channels
    centre_tap(vq.post_quant_conv, math.sqrt(dim) * torch.eye(latent, dim))  # undo the codebook's l2 normalisation
    dec = vq.decoder
    width = dec.conv_in.out_channels  # 2 channels per GroupNorm group
    pairs = torch.zeros(width, latent)
    pairs[0::2] = torch.eye(latent)[: width // 2]
    pairs[1::2] = -torch.eye(latent)[: width // 2]
    centre_tap(dec.conv_in, pairs)
    for m in dec.modules():
        if hasattr(m, "conv2"):  # resnet block: x + 0
            m.conv2.weight.zero_(), m.conv2.bias.zero_()
        elif hasattr(m, "proj_out"):  # attention block: x + 0
            m.proj_out.weight.zero_(), m.proj_out.bias.zero_()
        elif hasattr(m, "conv") and isinstance(m.conv, torch.nn.Conv2d):  # upsample: nearest, then identity
            centre_tap(m.conv, torch.eye(m.conv.in_channels))
    dec.norm_out.weight.fill_(1.0), dec.norm_out.bias.zero_()
    out = torch.zeros(3, width)
    for ch in range(3):
        out[ch, 20 * ch:20 * ch + 20:2], out[ch, 20 * ch + 1:20 * ch + 20:2] = 0.1, -0.1
    centre_tap(dec.conv_out, out)  # pixel = 0.1 * sum(thermometer) = (level - 5) / 5 in [-1, 1]


def toy_model() -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A tiny Janus of the real class (about 0.9 M parameters) with its processor, all built in code."""
    tokenizer = toy_tokenizer()
    image_processor = JanusImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3)
    processor = JanusProcessor(image_processor, tokenizer, chat_template=TOY_CHAT_TEMPLATE, num_image_tokens=16)
    hidden = 64
    config = JanusConfig(
        text_config=LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                                max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        # 16 px images in 4 px patches: one SigLIP patch per image token, like 384 px / 16 px = 24 x 24 in Janus-Pro
        vision_config=JanusVisionConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                        patch_size=4, projection_dim=hidden, num_image_tokens=16, depth=1),
        # base_channels 64 = two channels per GroupNorm group (paint_toy_decoder needs the pairs)
        vq_config=JanusVQVAEConfig(embed_dim=32, num_embeddings=TOY_CODES, base_channels=64,
                                   channel_multiplier=[1, 1, 1], num_res_blocks=0, latent_channels=32,
                                   projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=1),
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL["image"]))
    torch.manual_seed(0)  # the toy "checkpoint" does not depend on --seed
    model = JanusForConditionalGeneration(config)
    paint_toy_decoder(model.model.vqmodel)
    return model, processor


def pretrain_toy(models: Models, steps: int, gen_steps: int, batch: int = 64, drop_prob: float = 0.3) -> None:
    """Stands in for Janus-Pro's pre-training: answers to the six questions about toy pictures (all `steps`) and
    drawing pictures for prompts (the first `gen_steps`, so that drawing starts weak and leaves room to improve).

    Pictures are clean renderings of random prompts, half of them cluttered with one to six random objects. The
    painted decoder is local (each token paints its own 4x4 px), so pictures are tiled from patches decoded once."""
    from PIL import Image

    model, rng = models.model, random.Random("toy-pretrain")
    with torch.no_grad():  # (TOY_CODES, 4, 4, 3) uint8: the patch each code decodes to
        flat = torch.arange(TOY_CODES)[:, None].expand(-1, TOY_GRID ** 2)
        patches = to_uint8(model.decode_image_tokens(flat))[:, :4, :4]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        metas = [make_prompt(rng, rng.choice(TAGS), TOY_CLASSES, TOY_COLORS) for _ in range(batch)]
        scenes = [toy_scene(m, rng) for m in metas]
        for s in scenes[: batch // 2]:  # clutter, so that the judge still counts right when drawings go astray
            for _ in range(rng.randint(1, 6)):
                s[rng.randrange(len(s))] = rng.randrange(TOY_OBJECTS)
        grids = patches[torch.tensor(scenes)].view(batch, TOY_GRID, TOY_GRID, 4, 4, 3)
        pictures = grids.permute(0, 1, 3, 2, 4, 5).reshape(batch, 16, 16, 3)  # (B, H, W, 3)
        images = [Image.fromarray(p.numpy()) for p in pictures]
        tags = [rng.choice(TAGS) for _ in range(batch)]
        loss = answer_nll(models, images, [QUESTIONS[t] for t in tags],
                          [toy_answer(s, t) for s, t in zip(scenes, tags)]).mean()
        if step < gen_steps:
            drop = torch.tensor([rng.random() < drop_prob for _ in metas])  # the unconditional row CFG needs
            loss = loss + image_token_nll(models, [m["prompt"] for m in metas], torch.tensor(scenes), drop).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            common.print0(f"toy pre-training {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()


def load_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    """Janus-Pro from a local transformers-format folder, or the embedded tiny Janus (pre-trained once, cached)."""
    if device.type == "cpu" and torch.backends.mkldnn.enabled:
        torch.backends.mkldnn.enabled = False
        common.print0("oneDNN off on CPU: slower than torch's own kernels on small convolutions (toy VQ decoder: 2x)")
    if cfg.model_dir is None:
        common.toy_cpu_threads(device)
        model, processor = toy_model()
        cache = os.path.join(os.environ.get("NANOGENRL_CACHE") or os.path.expanduser("~/.cache/nanogenrl"),
                             f"unirl_toy_{toy_cache_key(cfg)}.pt")
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0 and not os.path.exists(cache):
            common.print0(f"pre-training the embedded tiny Janus once ({cfg.toy_pretrain_steps} steps, "
                          f"cached at {cache})")
            t0 = time.time()
            pretrain_toy(toy_models(model, processor), cfg.toy_pretrain_steps, cfg.toy_gen_pretrain_steps)
            common.atomic_save(cache, lambda tmp: torch.save(model.state_dict(), tmp))
            common.print0(f"toy pre-training took {time.time() - t0:.0f} s")
        if dist.is_initialized():
            dist.barrier()  # the other ranks load rank 0's file: identical weights everywhere
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        models = toy_models(model, processor)
    else:
        models = load_janus(cfg.model_dir, dtype)
    models.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return models


def toy_cache_key(cfg: Config) -> str:
    """Hash of everything the pre-trained toy depends on: the code that builds and trains it, its constants and the
    library versions. Edit any of it and the toy is pre-trained afresh."""
    code = [code_fingerprint(f) for f in (
        toy_model, paint_toy_decoder, toy_tokenizer, pretrain_toy, toy_scene, toy_answer, toy_detect, toy_code_of,
        toy_cell_box, make_prompt, with_article, geneval_plural, relative_position, answer_nll, image_token_nll,
        image_token_logits, generation_inputs, understanding_batch, positions, to_uint8)]
    data = (TOY_CLASSES, TOY_COLORS, TOY_PALETTE, TOY_GREYS, SPECIAL, TOY_CHAT_TEMPLATE, QUESTIONS, NUMBERS, RELATIONS,
            torch.__version__, transformers.__version__, cfg.toy_pretrain_steps, cfg.toy_gen_pretrain_steps)
    return hashlib.sha256("\n".join(code + [repr(data)]).encode()).hexdigest()[:16]


def code_fingerprint(fn) -> str:
    """A function's syntax tree without its docstring: comments and docstrings can change, the cache stays valid."""
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
        node.body = node.body[1:]
    return ast.dump(node)


def toy_models(model, processor) -> Models:
    tok = processor.tokenizer
    return Models(model, processor, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                  tok.convert_tokens_to_ids(SPECIAL["boi"]), TOY_GRID ** 2, toy=True)


PEFT_PREFIX = "base_model.model."  # our LoRA keys are PEFT's adapter keys, so peft can read the file too
JANUS_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def load_janus(folder: str, dtype: torch.dtype) -> Models:
    """A transformers-format Janus-Pro checkpoint (deepseek-community/Janus-Pro-1B, -7B); keys are checked strictly."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--model-dir {folder} does not exist")
    missing = [f for f in JANUS_FILES if not os.path.isfile(os.path.join(folder, f))]
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors (or model.safetensors.index.json with its shards)")
    hint = ("the original deepseek-ai/Janus-Pro-* release (model_type multi_modality, pytorch_model*.bin) "
            "converts with transformers' models/janus/convert_janus_weights_to_hf.py")
    if missing:
        raise FileNotFoundError(f"{folder} is not a transformers-format Janus-Pro folder; "
                                f"missing: {', '.join(missing)} (expected {', '.join(JANUS_FILES)} and the "
                                f"weights; {hint})")
    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "janus":
        raise ValueError(f"{folder}/config.json has model_type {model_type!r}, expected 'janus'; {hint}")
    # fix: transformers only warns about missing or unexpected keys; a mismatch here is an error, not the base model
    model, info = JanusForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"weights in {folder} do not match JanusForConditionalGeneration: {bad}")
    processor = JanusProcessor.from_pretrained(folder)
    tok, gen = processor.tokenizer, model.generation_config
    pad = tok.pad_token_id if tok.pad_token_id is not None else gen.pad_token_id
    boi = tok.convert_tokens_to_ids(processor.image_start_token)
    num_tokens = math.prod(model.model.vqmodel.quantize.quant_state_dims)  # 24 x 24 = 576 at 384 px
    return Models(model, processor, tok.bos_token_id, tok.eos_token_id, pad, boi, num_tokens, toy=False)


# -----------------------------------------------------------------------------
# reward

# GenEval's vocabulary (djghosh13/geneval prompts/create_prompts.py, object_names.txt): 80 COCO classes, 10 colours.
COCO_CLASSES = tuple(
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,parking meter,"
    "bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,"
    "skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,"
    "cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,"
    "potted plant,bed,dining table,toilet,tv,laptop,computer mouse,tv remote,computer keyboard,cell phone,microwave,"
    "oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush".split(","))
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = ("left of", "right of", "above", "below")
# The fixed question per category (showlab/UniRL validation_prompts/evaluation_metadata_qa.jsonl), verbatim.
QUESTIONS = {
    "single_object": "What is the main item in this image?",
    "two_object": "What are two items in this image?",
    "counting": "How many items in this image?",
    "colors": "What is the color of the object?",
    "position": "What are two objects and What is position relationship between two main items? Use one sentence.",
    "color_attr": "What are two objects and the colors of two objects in the image? Use one sentence",
}


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def geneval_plural(name: str) -> str:
    return name + "es" if name.endswith("s") else name + "s"  # parity: GenEval's rule ("skises", "knifes")


def make_prompt(rng: random.Random, tag: str, classes=COCO_CLASSES, colors=GENEVAL_COLORS) -> dict:
    """One prompt of a GenEval category, in GenEval's metadata format plus the UniRL question and ground-truth answer.

    Templates, counts (2-4, with an exclude clause at count + 1), relations and "no coloured person" follow GenEval's
    create_prompts.py; answers follow the examples of UniRL's QA file ("two clocks", "The dog is right of ...")."""
    a, b = rng.sample(classes, 2)  # two distinct classes; single-object prompts use only a
    if tag in ("colors", "color_attr") and "person" in (a, b):  # parity: GenEval never colours a person
        a, b = rng.sample([c for c in classes if c != "person"], 2)
    c1, c2 = rng.sample(colors, 2)
    exclude = []
    if tag == "single_object":
        include, prompt, answer = [{"class": a, "count": 1}], f"a photo of {with_article(a)}", a
    elif tag == "two_object":
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        prompt = f"a photo of {with_article(a)} and {with_article(b)}"
        answer = f"There is {with_article(a)} and {with_article(b)}"
    elif tag == "counting":
        n = rng.randint(2, 4)
        include, exclude = [{"class": a, "count": n}], [{"class": a, "count": n + 1}]
        prompt, answer = f"a photo of {NUMBERS[n]} {geneval_plural(a)}", f"{NUMBERS[n]} {geneval_plural(a)}"
    elif tag == "colors":
        include, prompt, answer = [{"class": a, "count": 1, "color": c1}], f"a photo of {with_article(c1)} {a}", c1
    elif tag == "position":  # GenEval: the reference object B comes first, A carries ("rel", 0)
        rel = rng.choice(RELATIONS)
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        prompt, answer = f"a photo of {with_article(a)} {rel} {with_article(b)}", f"The {a} is {rel} the {b}"
    elif tag == "color_attr":
        include = [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}]
        prompt = f"a photo of {with_article(c1)} {a} and {with_article(c2)} {b}"
        answer = f"The {a} is {c1} and the {b} is {c2}"
    else:
        raise ValueError(f"unknown category {tag!r}; expected one of {TAGS}")
    return {"tag": tag, "include": include, "exclude": exclude, "prompt": prompt,
            "question": QUESTIONS[tag], "answer": answer}


IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
             "scissors": "scissors", "bus": "buses", "glass": "glasses", "couch": "couches", "sandwich": "sandwiches",
             "toothbrush": "toothbrushes", "bench": "benches", "tv": "tvs"}
RELATION_WORDS = [("to the left of", "left of"), ("on the left of", "left of"), ("left of", "left of"),
                  ("to the right of", "right of"), ("on the right of", "right of"), ("right of", "right of"),
                  ("on top of", "above"), ("above", "above"), ("over", "above"),
                  ("below", "below"), ("beneath", "below"), ("underneath", "below"), ("under", "below")]
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_POINTS = {"single_object": 1, "two_object": 2, "counting": 2, "colors": 1, "position": 3, "color_attr": 4}


def _surface_forms(classes) -> list[tuple[list[str], str]]:
    """(words, class) for singular, GenEval plural and English plural; longest first so "hot dog" beats "dog"."""
    forms = set()
    for c in classes:
        head, _, last = c.rpartition(" ")
        english = IRREGULAR.get(last, last + "es" if last.endswith(("s", "sh", "ch", "x")) else last + "s")
        for form in (c, geneval_plural(c), (head + " " + english).strip()):
            forms.add((tuple(form.split()), c))
    return sorted(([list(w), c] for w, c in forms), key=lambda f: -len(f[0]))


def _find(words: list[str], phrases) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, value) matches of (word list, value) phrases, longest phrase first."""
    taken, found = set(), []
    for phrase, value in phrases:
        n = len(phrase)
        for i in range(len(words) - n + 1):
            if words[i:i + n] == phrase and not taken & set(range(i, i + n)):
                taken |= set(range(i, i + n))
                found.append((i, i + n, value))
    return sorted(found)


def grade_answer(answer: str, meta: dict) -> tuple[int, int, bool]:
    """Partial credit of an answer against a prompt's ground truth: (points, max points, parsed).

    One point per correct attribute, as in the paper's figure ("Two chairs" 0, "Three bowls" +1, "Four bowls" +2 for
    "four bowls"): each required object named, the count, each object's colour (the colour named in the object's
    clause: "the cat is red and the dog is blue"), and the relation (either order: "the cat is left of the dog" =
    "the dog is right of the cat"). An answer naming no object, colour, number or relation is unparsable: 0."""
    words = re.findall(r"[a-z0-9]+|[,;.]", answer.lower())
    clause = [0]
    for w in words:  # clause index per word: a new clause after "and" or punctuation
        clause.append(clause[-1] + (w in ("and", ",", ";", ".")))
    include, tag = meta["include"], meta["tag"]
    classes = [req["class"] for req in include]
    objects = _find(words, _surface_forms(set(COCO_CLASSES) | set(TOY_CLASSES) | set(classes)))
    first = {}  # the first mention of a required class in each clause is the object ("the orange is orange")
    for s, e, c in objects:
        first.setdefault((clause[s], c), (s, e))
    own = {i for (_, c), (s, e) in first.items() if c in classes for i in range(s, e)}
    said_colors = _find(words, [([c], c) for c in set(GENEVAL_COLORS) | set(TOY_COLORS)])
    colors = [h for h in said_colors if h[0] not in own] or said_colors  # a lone "orange" is still a colour
    numbers = _find(words, [([w], i) for i, w in enumerate(NUMBERS)] + [([str(i)], i) for i in range(100)])
    relations = _find(words, [(p.split(), r) for p, r in RELATION_WORDS])
    if not (objects or colors or numbers or relations):  # counted as `unparsed` in the log
        return 0, MAX_POINTS[tag], False
    named = {c for _, _, c in objects}
    points = sum(c in named for c in classes)
    if tag == "counting":
        points += bool(numbers) and numbers[0][2] == include[0]["count"]
    elif tag == "colors":  # the question asks for the colour only
        points = int(bool(colors) and colors[0][2] == include[0]["color"])
    elif tag == "position":
        a, b, rel = include[1]["class"], include[0]["class"], include[1]["position"][0]
        for start, end, said in relations[:1]:
            pair = [c for s, _, c in objects if s < start][-1:] + [c for s, _, c in objects if s >= end][:1]
            points += (pair == [a, b] and said == rel) or (pair == [b, a] and said == OPPOSITE[rel])
    elif tag == "color_attr":
        for req in include:
            where = [clause[s] for s, _, c in objects if c == req["class"]][:1]
            said = [c for s, _, c in colors if [clause[s]] == where][:1]
            points += bool(where) and said == [req["color"]]
    return int(points), MAX_POINTS[tag], True


def reward(models: Models, images: list, metas: list[dict], cfg: Config) -> tuple[torch.Tensor, list[str], float]:
    """The self-judged reward: the model answers each image's category question; the grader scores it in [0, 1].
    Returns (rewards (B,), answers, fraction of unparsable answers)."""
    answers = answer_questions(models, images, [m["question"] for m in metas], cfg.max_answer_tokens)
    grades = [grade_answer(a, m) for a, m in zip(answers, metas)]
    rewards = torch.tensor([p / mx for p, mx, _ in grades], dtype=torch.float32)
    return rewards, answers, sum(not ok for _, _, ok in grades) / max(len(grades), 1)


def relative_position(box_a, box_b) -> set[str]:
    """GenEval's position rule: relations of box A relative to box B (x0, y0, x1, y1; y grows downwards).

    The centre offset is shrunk by 0.1 x (size A + size B) per axis, then divided by the raw offset's length;
    "left of" if dx < -0.5, "right of" if dx > 0.5, "above" if dy < -0.5, "below" if dy > 0.5 (several may hold)."""
    offset, dims = [], []
    for lo, hi in ((0, 2), (1, 3)):
        offset.append((box_a[lo] + box_a[hi]) / 2 - (box_b[lo] + box_b[hi]) / 2)
        dims.append(abs(box_a[hi] - box_a[lo]) + abs(box_b[hi] - box_b[lo]))
    revised = [max(abs(o) - 0.1 * d, 0.0) * math.copysign(1.0, o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = (r / math.hypot(*offset) for r in revised)
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def geneval_correct(meta: dict, found: dict[str, list], color_of) -> bool:
    """GenEval's `evaluate`: every include clause holds (count, colour of the top instances, position against the
    matched group of the target clause) and no exclude clause is violated. `found` maps class -> boxes sorted by
    confidence; color_of(class, boxes) returns one colour name per box."""
    matched = []  # per include clause: the boxes it matched, or None (a position clause points at one by index)
    correct = True
    for req in meta.get("include", []):
        boxes = found.get(req["class"], [])[: req["count"]]  # parity: only the most confident `count` instances
        ok = len(boxes) >= req["count"]
        if ok and "color" in req:
            ok = color_of(req["class"], boxes).count(req["color"]) >= req["count"]
        if ok and "position" in req:
            rel, target = req["position"]
            ok = matched[target] is not None and all(
                rel in relative_position(box, other) for box in boxes for other in matched[target])
        matched.append(boxes if ok else None)
        correct &= ok
    # exclude: e.g. "three cups" fails with four cups (GenEval's counting prompts carry count + 1)
    return correct and all(len(found.get(req["class"], [])) < req["count"] for req in meta.get("exclude", []))


# -----------------------------------------------------------------------------
# rollout


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (what `generate` computes from the attention mask)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def generation_inputs(models: Models, prompts: list[str]):
    """Embeddings of the CFG batch [conditional rows; unconditional rows], (2B, P, D), with mask and positions.

    Janus-Pro's unconditional row is the same token sequence with every token except BOS and <begin_of_image>
    replaced by the pad token (generation_inference.py: tokens[1:-1] = pad_id); transformers' generate does the
    same. Pad tokens stay attended to in that row, as in both."""
    texts = [models.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                                  add_generation_prompt=True) for p in prompts]
    enc = models.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"].to(models.device), enc["attention_mask"].to(models.device)
    keep = (ids == models.bos_id) | (ids == models.boi_id) | (mask == 0)
    uncond = torch.where(keep, ids, torch.full_like(ids, models.pad_id))
    ids, mask = torch.cat([ids, uncond]), torch.cat([mask, mask])  # (2B, P): [cond; uncond]
    return models.model.get_input_embeddings()(ids), mask, positions(mask)


def image_token_logits(models: Models, prompts: list[str], tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced codebook logits for every image token, (2B, T, V): conditional rows, then unconditional."""
    model, lm = models.model, models.model.model.language_model
    embeds, mask, pos = generation_inputs(models, prompts)  # the same rows, padding and positions as the sampler
    p, t = embeds.shape[1], tokens.shape[1]
    image = model.prepare_embeddings_for_image_generation(tokens[:, :-1]).repeat(2, 1, 1)  # (2B, T - 1, D)
    hidden = lm(inputs_embeds=torch.cat([embeds, image.to(embeds.dtype)], 1),
                attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], t - 1)], 1),
                position_ids=torch.cat([pos, pos[:, -1:] + torch.arange(1, t, device=pos.device)], 1)).last_hidden_state
    return model.model.generation_head(hidden[:, p - 1:]).float()  # the state before each image token predicts it


def score_image_tokens(models: Models, prompts: list[str], tokens: torch.Tensor, cfg_scale: float,
                       temperature: float) -> torch.Tensor:
    """Log-probs (B, T) of given image tokens under the CFG-mixed policy, exactly as sample_image_tokens mixes it."""
    logits = image_token_logits(models, prompts, tokens)
    cond, uncond = logits.chunk(2)
    return common.token_logprobs(common.cfg_logits(cond, uncond, cfg_scale), tokens, temperature)


@torch.no_grad()
def sample_image_tokens(models: Models, prompts: list[str], cfg_scale: float, temperature: float,
                        generator: torch.Generator | None = None, cuda_graph: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoregressive image tokens with logit CFG and a static KV cache: (tokens (B, T), log-probs (B, T)).

    Conditional and unconditional rows run as one batch of 2B; both rows are fed the same sampled token. Nothing
    is read back to the host, and with cuda_graph one decode step is a replayed CUDA graph (common.decode_tokens)."""
    model = models.model
    embeds, mask, pos = generation_inputs(models, prompts)
    b, t = len(prompts), models.num_image_tokens
    tokens = torch.zeros(b, t, dtype=torch.long, device=embeds.device)
    logps = torch.zeros(b, t, dtype=torch.float32, device=embeds.device)

    def step(hidden, index):
        logits = model.model.generation_head(hidden).float()  # (2B, V): fp32 for the softmax and its log-prob
        guided = common.cfg_logits(logits[:b], logits[b:], cfg_scale)  # u + w (c - u), then / temperature
        token, logp = common.sample_tokens(guided, temperature, generator=generator)
        tokens.index_copy_(1, index[None], token[:, None])
        logps.index_copy_(1, index[None], logp[:, None])
        # image tokens enter through Janus's generation embedding + aligner, not the text embedding table
        return model.prepare_embeddings_for_image_generation(token.repeat(2))[:, None]  # (2B, 1, D)

    common.decode_tokens(model.model.language_model, embeds, mask, pos, t, step, generator, cuda_graph)
    return tokens, logps


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) decoder output in [-1, 1] -> uint8 on the CPU, as a saved PNG would hold it."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def decode_images(models: Models, tokens: torch.Tensor) -> list:
    """PIL images from image tokens through the VQ decoder."""
    from PIL import Image

    return [Image.fromarray(a.numpy()) for a in to_uint8(models.model.decode_image_tokens(tokens))]


def understanding_batch(models: Models, images: list, questions: list[str], answers: list[str] | None = None):
    """Processor inputs for questions about images (left-padded), optionally followed by answer tokens + EOS.
    Returns (input_ids, attention_mask, position_ids, pixel_values, labels or None)."""
    texts = [models.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    enc = models.processor(text=texts, images=images, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = None
    if answers is not None:  # append answer + EOS to each prompt, then left-pad again; loss only on the answer
        tok = models.processor.tokenizer
        rows, targets = [], []
        for i, a in enumerate(answers):
            prompt = ids[i][mask[i].bool()].tolist()
            ans = tok(" " + a, add_special_tokens=False)["input_ids"] + [models.eos_id]
            rows.append(prompt + ans)
            targets.append([-100] * len(prompt) + ans)
        width = max(map(len, rows))
        ids = torch.tensor([[models.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        labels = torch.tensor([[-100] * (width - len(r)) + r for r in targets])
    dev = models.device
    pixels = enc["pixel_values"].to(dev, models.model.dtype)
    return ids.to(dev), mask.to(dev), positions(mask).to(dev), pixels, None if labels is None else labels.to(dev)


@torch.no_grad()
def answer_questions(models: Models, images: list, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers (released UniRL MMU code: top_k 1) from the understanding path, with a KV cache."""
    ids, mask, pos, pixels, _ = understanding_batch(models, images, questions)
    # Janus scatters SigLIP features into the <image_placeholder> positions; parity: the pixels are the decoded
    # image as a PNG would hold it (UniRL's Show-o feeds its own token ids instead; Janus cannot).
    out = models.model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    generated, done = [token], token == models.eos_id
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):  # one host sync per answer token: answers are short, and this is not the image loop
            break
        mask, pos = torch.cat([mask, mask.new_ones(len(ids), 1)], 1), pos[:, -1:] + 1
        out = models.model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True)
        token = torch.where(done, models.eos_id, out.logits[:, -1].argmax(-1))
        generated.append(token)
        done |= token == models.eos_id
    rows = torch.stack(generated, 1).tolist()
    tok = models.processor.tokenizer
    return [tok.decode(r[: r.index(models.eos_id)] if models.eos_id in r else r, skip_special_tokens=True).strip()
            for r in rows]


@dataclass
class Rollout:
    metas: list[dict]  # one per image (each prompt repeated group_size times, groups contiguous)
    tokens: torch.Tensor  # (B, T) sampled image tokens
    sample_logp: torch.Tensor  # (B, T) log-probs recorded while sampling (KV-cached path)
    images: list  # PIL
    answers: list[str]
    rewards: torch.Tensor  # (B,) self-judged, in [0, 1]
    unparsed: float

    def subset(self, keep: list[int]) -> "Rollout":
        return Rollout([self.metas[i] for i in keep], self.tokens[keep], self.sample_logp[keep],
                       [self.images[i] for i in keep], [self.answers[i] for i in keep], self.rewards[keep],
                       self.unparsed)


@torch.no_grad()
def rollout(models: Models, cfg: Config, metas: list[dict], generator: torch.Generator) -> Rollout:
    """G images per prompt (a whole group on this rank), the model's answers about them, and their rewards."""
    metas = [m for m in metas for _ in range(cfg.group_size)]
    tokens, logp = sample_image_tokens(models, [m["prompt"] for m in metas], cfg.cfg_scale, cfg.temperature, generator,
                                       cfg.cuda_graphs)
    images = decode_images(models, tokens)
    rewards, answers, unparsed = reward(models, images, metas, cfg)
    return Rollout(metas, tokens, logp, images, answers, rewards, unparsed)


# -----------------------------------------------------------------------------
# update


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean of the prompt's group) / (std of the group + 1e-4), population std. A group whose images all scored
    the same gets zero advantage (it teaches nothing; its share is logged as zero_std)."""
    r = rewards.view(-1, group_size)  # (prompts, G): a prompt's group is contiguous and on one rank
    # Per-prompt std, not Flow-GRPO's global std: UniRL's group is one prompt's images on one GPU (paper appendix).
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def image_token_nll(models: Models, prompts: list[str], tokens: torch.Tensor,
                    unconditional: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean NLL of image tokens, no CFG: how Janus learns to draw. Rows flagged `unconditional` (B,) use the
    padded-prompt row that CFG samples with (Janus-Pro trains it by dropping a share of the prompts)."""
    cond, uncond = image_token_logits(models, prompts, tokens.to(models.device)).chunk(2)
    if unconditional is not None:
        cond = torch.where(unconditional.to(cond.device)[:, None, None], uncond, cond)
    return F.cross_entropy(cond.transpose(1, 2), tokens.to(cond.device), reduction="none").mean(1)


def answer_nll(models: Models, images: list, questions: list[str], answers: list[str]) -> torch.Tensor:
    """(B,) mean NLL of the answer tokens (and EOS) given image and question: the paper's SFT loss on answers."""
    ids, mask, pos, pixels, labels = understanding_batch(models, images, questions, answers)
    logits = models.model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # (B, L - 1), 0 at -100
    return nll.sum(1) / (labels[:, 1:] != -100).sum(1)


def optimizer_step(optimizer, params: list, loss: torch.Tensor | None, cfg: Config) -> tuple[float, bool]:
    """backward (where this rank has a finite loss), average over ranks, clip, step. Our sampler calls submodules
    directly, which DDP's forward hook would not see, hence common.average_gradients (one flat all-reduce). A rank
    whose loss is not finite contributes zeros; if the averaged norm is still not finite, every rank skips the step.
    Returns (grad norm before clipping, stepped)."""
    optimizer.zero_grad(set_to_none=True)
    if loss is not None and torch.isfinite(loss):
        loss.backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    common.average_gradients(params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return float(norm), False
    if norm > 0:  # nothing to learn on any rank (no kept images, zero advantages at the reference): leave Adam alone
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    return float(norm), True


def minibatches(n: int, count: int) -> list[range]:
    """`count` contiguous chunks of n items (some may be empty): every rank runs the same number of optimiser steps."""
    edges = [round(i * n / count) for i in range(count + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(count)]


def grpo_step(models: Models, optimizer, cfg: Config, batch: Rollout, advantages: torch.Tensor) -> dict:
    """GRPO on image tokens: per-token ratio of the CFG-mixed policy, PPO clip, k3 KL to the adapters-off model.

    Old and reference log-probs are re-scored here, before any update, with the same chunking as the update, so
    the first minibatch's ratio is exactly 1 on-policy (the sampler's KV-cached log-probs differ in the last bits;
    their gap is logged). loss = mean_tokens[max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta k3], where
    k3 = exp(ref - logp) - (ref - logp) - 1 (DeepSeekMath GRPO, arXiv 2402.03300 eq. 4)."""
    model, params = models.model, common.lora_parameters(models.model)
    prompts = [m["prompt"] for m in batch.metas]
    # Minibatches are contiguous slices of the rollout; a group may straddle two, which is fine: advantages were
    # normalised over whole groups before the split.
    chunks = minibatches(len(prompts), cfg.num_minibatches)
    score = lambda c: score_image_tokens(models, [prompts[i] for i in c], batch.tokens[c.start:c.stop],
                                         cfg.cfg_scale, cfg.temperature)
    with torch.no_grad():
        old = [score(c) if len(c) else None for c in chunks]  # the policy that sampled, before any update
        with common.lora_disabled(model):  # the reference: the same weights with adapters off, no copy
            ref = [score(c) if len(c) else None for c in chunks]
    stats = {"loss": [], "kl": [], "clip_frac": [], "grad_norm": [], "ratio0": float("nan"), "skipped_updates": 0,
             "logp_gap": max((float((o - batch.sample_logp[c.start:c.stop]).abs().max()) for o, c in zip(old, chunks)
                              if o is not None), default=0.0)}
    model.train(cfg.grad_checkpointing)  # transformers checkpoints only in train mode; Janus has no dropout
    for k, c in enumerate(chunks):
        loss = None
        if len(c):
            logp = score(c)  # (b, T)
            adv = advantages[c.start:c.stop, None].to(logp.device)
            ratio = torch.exp(logp - old[k])  # (b, T): exactly 1 in the first minibatch, then off-policy
            clipped = torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)  # per token, as GRPO for LLMs
            policy = torch.maximum(-adv * ratio, -adv * clipped)  # PPO's pessimistic bound
            log_ref = ref[k] - logp
            kl = torch.exp(log_ref) - log_ref - 1  # k3 on the sampled tokens: >= 0, unbiased for KL(pi || ref)
            # Mean over tokens, then images: every image has the same T tokens, so GRPO's per-sequence 1/|o| and a
            # plain mean agree. (Flow-GRPO averages per step; we treat each image token as one action.)
            loss = (policy + cfg.beta * kl).mean()
            stats["loss"].append(float(loss.detach()))
            stats["kl"].append(float(kl.detach().mean()))
            stats["clip_frac"].append(float((ratio != clipped).float().mean()))
            if k == 0:
                stats["ratio0"] = float(ratio.detach().mean())
        norm, stepped = optimizer_step(optimizer, params, loss, cfg)
        stats["grad_norm"].append(norm)
        stats["skipped_updates"] += not stepped
    model.eval()
    return {k: (sum(v) / len(v) if v else float("nan")) if isinstance(v, list) else v for k, v in stats.items()}


def sft_step(models: Models, optimizer, cfg: Config, batch: Rollout) -> dict:
    """The SFT variant: keep the images the model judged fully correct (reward 1), train drawing them (image-token
    NLL) and answering about them (NLL of the ground-truth answer, weight 1, the paper's SFT loss)."""
    model, params = models.model, common.lora_parameters(models.model)
    keep = [i for i in range(len(batch.metas)) if batch.rewards[i] == 1.0]
    stats = {"loss": [], "kept": len(keep) / max(len(batch.metas), 1), "grad_norm": [], "skipped_updates": 0}
    model.train(cfg.grad_checkpointing)
    for c in minibatches(len(keep), cfg.num_minibatches):
        loss = None
        if len(c):
            idx = [keep[i] for i in c]
            metas = [batch.metas[i] for i in idx]
            loss = (image_token_nll(models, [m["prompt"] for m in metas], batch.tokens[idx]).mean()
                    + answer_nll(models, [batch.images[i] for i in idx], [m["question"] for m in metas],
                                 [m["answer"] for m in metas]).mean())
            stats["loss"].append(float(loss.detach()))
        norm, stepped = optimizer_step(optimizer, params, loss, cfg)
        stats["grad_norm"].append(norm)
        stats["skipped_updates"] += not stepped
    model.eval()
    return {k: (sum(v) / len(v) if v else float("nan")) if isinstance(v, list) else v for k, v in stats.items()}


# -----------------------------------------------------------------------------
# train


def step_prompts(cfg: Config, step: int, rank: int) -> list[dict]:
    """This rank's prompts for a step, categories in turn: prompt index = (step, rank, i), so ranks draw different
    prompts (with a pool: different slots of it) and a resumed run draws the same ones. A held-out prompt (the
    test set) is redrawn from the same stream, so training never sees it."""
    classes, colors = (TOY_CLASSES, TOY_COLORS) if cfg.model_dir is None else (COCO_CLASSES, GENEVAL_COLORS)
    held_out = held_out_prompts(cfg.holdout_prompts or cfg.eval_prompts)
    world = dist.get_world_size() if dist.is_initialized() else 1
    metas = []
    for i in range(cfg.prompts_per_rank):
        index = (step * world + rank) * cfg.prompts_per_rank + i
        if cfg.train_prompts:  # a fixed pool, visited in order: each prompt comes back every pool/batch steps
            index %= cfg.train_prompts
        rng = random.Random(f"{cfg.seed}-{index}")
        tag = cfg.categories[index % len(cfg.categories)]
        meta = make_prompt(rng, tag, classes, colors)
        for _ in range(1000):
            if meta["prompt"] not in held_out:
                break
            meta = make_prompt(rng, tag, classes, colors)
        else:
            raise ValueError(f"every {tag} prompt drawn is held out by {cfg.holdout_prompts or cfg.eval_prompts}")
        metas.append(meta)
    return metas


@functools.lru_cache(maxsize=4)
def held_out_prompts(path: str | None) -> frozenset[str]:
    """The prompt texts of a GenEval-format JSONL (evaluation_metadata.jsonl: 553 lines), compared verbatim."""
    if path is None:
        return frozenset()
    return frozenset(row["prompt"] for row in common.read_jsonl(path, required=("prompt",)))


def train(cfg: Config) -> None:
    d = common.init_dist(cfg.device)
    if cfg.algo not in ("grpo", "sft"):
        raise ValueError(f"--algo must be grpo or sft, got {cfg.algo!r}")
    dtype, reason = common.pick_dtype(d.device, cfg.dtype)
    images_per_step = d.world_size * cfg.prompts_per_rank * cfg.group_size
    common.print0(f"dtype {dtype} ({reason}); {d.world_size} rank(s) x {cfg.prompts_per_rank} prompt(s) x "
                  f"{cfg.group_size} images = {images_per_step} images per step, {cfg.num_minibatches} optimiser "
                  f"steps each")
    models = load_models(cfg, d.device, dtype)
    common.seed_everything(cfg.seed)  # same LoRA init on every rank, then per-rank streams
    common.inject_lora(models.model, list(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha)
    models.model.to(d.device)
    common.seed_everything(cfg.seed + d.rank)
    if cfg.grad_checkpointing:
        models.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = common.lora_parameters(models.model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint", "latest.pt")
    start = common.resume_lora_training(ckpt_path, models.model, optimizer) if cfg.resume else 0
    if d.is_main:
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
        common.save_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
        common.print0(json.dumps(dataclasses.asdict(cfg)))
    held_out = held_out_prompts(cfg.holdout_prompts or cfg.eval_prompts)
    if held_out:
        common.print0(f"{len(held_out)} prompts held out of training: {cfg.holdout_prompts or cfg.eval_prompts}")
    log = common.MetricLog(cfg.out_dir, cfg.max_steps, start, enabled=d.is_main)
    skipped_groups = 0
    for step in range(start, cfg.max_steps):
        t0 = time.time()
        # noise seeded by (seed, step, rank): a resumed run draws exactly what the uninterrupted one drew
        generator = common.step_generator(cfg.seed, step, d.rank, device=d.device)
        batch = rollout(models, cfg, step_prompts(cfg, step, d.rank), generator)
        common.synchronize(d.device)
        t_rollout = time.time() - t0
        # A group with a non-finite reward or sampling log-prob is left out of the update and counted.
        finite = (torch.isfinite(batch.rewards) & torch.isfinite(batch.sample_logp.cpu()).all(1))
        finite = finite.view(-1, cfg.group_size).all(1).repeat_interleave(cfg.group_size)
        skipped = torch.tensor(float((~finite).sum()) / cfg.group_size, device=d.device)
        if dist.is_initialized():
            dist.all_reduce(skipped)
        skipped_groups += int(skipped)
        kept = batch.subset(finite.nonzero().flatten().tolist())
        if cfg.algo == "grpo":
            stats = grpo_step(models, optimizer, cfg, kept, group_advantages(kept.rewards, cfg.group_size))
        else:
            stats = sft_step(models, optimizer, cfg, kept)
        common.synchronize(d.device)
        t_update = time.time() - t0 - t_rollout
        r = batch.rewards.view(-1, cfg.group_size)
        metrics = {"reward": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std(unbiased=False)),
                   "zero_std": float((r.std(1, unbiased=False) == 0).float().mean()), "unparsed": batch.unparsed}
        for tag in TAGS:
            hits = [float(x) for m, x in zip(batch.metas, batch.rewards) if m["tag"] == tag]
            metrics[f"r_{tag}"] = sum(hits) / len(hits) if hits else float("nan")
        if models.toy:
            metrics["toy_geneval"] = sum(map(toy_correct, batch.metas, batch.tokens.tolist())) / len(batch.metas)
        metrics.update(stats)
        metrics = common.all_reduce_mean(metrics, d.device)  # NaN-safe: a rank without a category sends NaN
        metrics.update(groups_skipped=skipped_groups, t_rollout=t_rollout, t_update=t_update,
                       img_s=images_per_step / (t_rollout + t_update), mem_gb=common.peak_memory_gb(d.device))
        log.log(step, metrics)
        done = step + 1 == cfg.max_steps
        if d.is_main and (step % cfg.sample_every == 0 or done):
            grid = torch.stack([common.pil_to_tensor(im) for im in batch.images[:cfg.group_size]])
            common.save_grid(grid, os.path.join(cfg.out_dir, "samples", f"step_{step + 1:06d}.png"))
        if (step + 1) % cfg.save_every == 0 or done:  # every rank calls save_checkpoint (it gathers RNG states)
            common.save_lora_training(ckpt_path, models.model, optimizer, step + 1, dataclasses.asdict(cfg))
            if d.is_main:
                common.save_lora(models.model, os.path.join(cfg.out_dir, "lora.safetensors"), prefix=PEFT_PREFIX)
    common.cleanup_dist()


# -----------------------------------------------------------------------------
# evaluate

CLIP_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")  # GenEval


def grounding_dino_detect(detector, processor, image, names: list[str], threshold: float) -> tuple[dict, list[str]]:
    """Grounding DINO queried with "name1. name2." -> ({"scores", "boxes" (xyxy pixels)}, class per box).

    A query's class is the name whose text tokens score highest, its score that maximum. (transformers'
    post-processing labels a query with every token over a text threshold, which can merge two names into a label
    that is neither.)"""
    inputs = processor(text=". ".join(names) + ".", images=image, return_tensors="pt").to(detector.device)
    out = detector(**inputs)
    ids = inputs["input_ids"][0].tolist()
    probs = out.logits[0].sigmoid()  # (queries, text tokens)
    columns = []
    for name in names:  # the token span of each name inside the caption
        span = processor.tokenizer(name, add_special_tokens=False)["input_ids"]
        start = next((i for i in range(len(ids)) if ids[i:i + len(span)] == span), None)
        if start is None:
            raise ValueError(f"class {name!r} is not in the detector's tokenised caption (truncated at "
                             f"{len(ids)} tokens?)")
        columns.append(probs[:, start:start + len(span)].amax(-1))
    scores, label = torch.stack(columns, -1).max(-1)  # (queries,)
    keep = scores > threshold
    w, h = image.size
    cx, cy, bw, bh = (out.pred_boxes[0][keep] * torch.tensor([w, h, w, h], device=probs.device)).unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    return {"scores": scores[keep], "boxes": boxes}, [names[i] for i in label[keep].tolist()]


def load_scorer(cfg: Config, device: torch.device):
    """GenEval's scorer with transformers models: returns score(image, meta) -> (correct, detections by class).

    Detector: OWLv2 (queried with all 80 COCO classes, so classes compete for a box as in GenEval's closed-set
    Mask2Former) or Grounding DINO (queried with the prompt's classes: its text input holds 256 tokens). Colour:
    zero-shot CLIP over GenEval's 10 colours and 3 templates on the box crop (GenEval pastes the mask on #999)."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor, CLIPModel, CLIPProcessor

    for folder, flag in ((cfg.detector_dir, "--detector-dir"), (cfg.clip_dir, "--clip-dir")):
        if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"evaluation with real weights needs {flag}: a local transformers folder with "
                                    f"config.json (got {folder})")
    kind = AutoConfig.from_pretrained(cfg.detector_dir).model_type
    if kind not in ("owlv2", "grounding-dino"):
        raise ValueError(f"{cfg.detector_dir}: detector model_type {kind!r}; expected owlv2 or grounding-dino")
    det_proc = AutoProcessor.from_pretrained(cfg.detector_dir)
    detector = AutoModelForZeroShotObjectDetection.from_pretrained(cfg.detector_dir).to(device).eval()
    clip_proc = CLIPProcessor.from_pretrained(cfg.clip_dir)
    clip = CLIPModel.from_pretrained(cfg.clip_dir).to(device).eval()

    @torch.no_grad()
    def detect(image, meta) -> dict[str, list]:
        threshold = cfg.det_threshold_counting if meta["tag"] == "counting" else cfg.det_threshold
        if kind == "owlv2":
            names = list(COCO_CLASSES)
            inputs = det_proc(text=[[f"a photo of {with_article(c)}" for c in names]], images=image,
                              padding="max_length", truncation=True, return_tensors="pt",
                              max_length=detector.config.text_config.max_position_embeddings)  # 16 for OWLv2
            side = max(image.size)  # OWLv2 pads to a square: its boxes are relative to the padded image
            res = det_proc.post_process_grounded_object_detection(detector(**inputs.to(device)), threshold=threshold,
                                                                  target_sizes=[(side, side)])[0]
            labels = [names[i] for i in res["labels"].tolist()]
        else:
            names = sorted({r["class"] for r in meta["include"] + meta.get("exclude", [])})
            res, labels = grounding_dino_detect(detector, det_proc, image, names, threshold)
        found = {}
        for score, box, label in sorted(zip(res["scores"].tolist(), res["boxes"].tolist(), labels), reverse=True):
            if label in names and len(found.get(label, [])) < cfg.det_max_objects:
                found.setdefault(label, []).append(box)
        return found

    def projected(out):  # transformers 5 returns an output object whose pooler_output is the projection
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def colors_of(image, cls, boxes) -> list[str]:
        texts = [t.format(c=c, cls=cls) for c in GENEVAL_COLORS for t in CLIP_TEMPLATES]
        tokens = clip_proc(text=texts, padding=True, truncation=True, return_tensors="pt",
                           max_length=clip.config.text_config.max_position_embeddings)
        text = projected(clip.get_text_features(**tokens.to(device)))
        text = F.normalize(F.normalize(text, dim=-1).view(len(GENEVAL_COLORS), len(CLIP_TEMPLATES), -1).mean(1), dim=-1)
        crops = [image.crop((math.floor(x0), math.floor(y0), max(math.ceil(x1), math.floor(x0) + 1),
                             max(math.ceil(y1), math.floor(y0) + 1))) for x0, y0, x1, y1 in boxes]  # >= 1 px
        pixels = clip_proc(images=crops, return_tensors="pt").to(device)
        feats = F.normalize(projected(clip.get_image_features(**pixels)), dim=-1)
        return [GENEVAL_COLORS[i] for i in (feats @ text.T).argmax(1).tolist()]

    def score(image, meta) -> tuple[bool, dict]:
        found = detect(image, meta)
        return geneval_correct(meta, found, lambda cls, boxes: colors_of(image, cls, boxes)), found

    return score


def evaluate(cfg: Config) -> dict:
    """GenEval-style accuracy per tag and overall (mean of the tags), plus the model's own judgement of the same
    images (self_reward). Toy: the stand-in detector reads the tokens. Writes <out_dir>/eval.json."""
    d = common.init_dist(cfg.device)
    dtype, _ = common.pick_dtype(d.device, cfg.dtype)
    models = load_inference_models(cfg, d.device, dtype)
    if cfg.eval_prompts:
        metas = common.read_jsonl(cfg.eval_prompts, required=("tag", "include", "prompt"))
        for m in metas:
            m.setdefault("question", QUESTIONS[m["tag"]])
    else:  # held out from training by their seed stream (the toy's prompt space is small: overlaps happen)
        classes, colors = (TOY_CLASSES, TOY_COLORS) if models.toy else (COCO_CLASSES, GENEVAL_COLORS)
        metas = [make_prompt(random.Random(f"eval-{cfg.seed}-{i}"), TAGS[i % len(TAGS)], classes, colors)
                 for i in range(cfg.eval_num_prompts)]
    score = None if models.toy else load_scorer(cfg, d.device)
    rows = []
    for index in range(d.rank, len(metas), d.world_size):  # prompts sharded by rank
        meta, n = metas[index], cfg.eval_images_per_prompt
        generator = common.step_generator(cfg.seed, -1, index, device=d.device)  # step -1: never a training draw
        tokens, _ = sample_image_tokens(models, [meta["prompt"]] * n, cfg.cfg_scale, cfg.temperature, generator,
                                           cfg.cuda_graphs)
        images = decode_images(models, tokens)
        if models.toy:
            correct = [toy_correct(meta, t) for t in tokens.tolist()]
        else:
            correct = [score(image, meta)[0] for image in images]
        self_reward, _, _ = reward(models, images, [meta] * n, cfg)  # the model's own verdict, for the imbalance
        rows += [{"tag": meta["tag"], "prompt": meta["prompt"], "correct": c, "self_reward": float(s)}
                 for c, s in zip(correct, self_reward)]
    if dist.is_initialized():
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    result = {"per_tag": {}, "self_reward": {}}
    for tag in TAGS:
        hits = [r for r in rows if r["tag"] == tag]
        if hits:
            result["per_tag"][tag] = sum(r["correct"] for r in hits) / len(hits)
            result["self_reward"][tag] = sum(r["self_reward"] for r in hits) / len(hits)
    result["overall"] = sum(result["per_tag"].values()) / len(result["per_tag"])  # GenEval: unweighted tag mean
    result["images"] = len(rows)
    if d.is_main:
        common.save_json(os.path.join(cfg.out_dir, "eval.json"), {**result, "rows": rows})
        for tag, acc in result["per_tag"].items():
            common.print0(f"{tag:14s} {acc:.3f}   self-judged {result['self_reward'][tag]:.3f}")
        common.print0(f"{'overall':14s} {result['overall']:.3f}   ({len(rows)} images; {cfg.out_dir}/eval.json)")
    common.cleanup_dist()
    return result


# -----------------------------------------------------------------------------
# inference


def load_inference_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    models = load_models(cfg, device, dtype)
    if cfg.lora:
        common.inject_lora(models.model, list(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha)
        common.load_lora(models.model, cfg.lora, prefix=PEFT_PREFIX)  # rank/alpha from the file's metadata
        models.model.to(device)
    return models


def generate(models: Models, cfg: Config, prompt: str, generator: torch.Generator | None = None) -> list:
    """group_size images for a prompt (CFG, temperature as in training)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    tokens, _ = sample_image_tokens(models, [prompt] * cfg.group_size, cfg.cfg_scale, cfg.temperature, generator,
                                    cfg.cuda_graphs)
    return decode_images(models, tokens)


def ask(models: Models, cfg: Config, image, question: str) -> str:
    """The model's greedy answer to a question about an image (the understanding path UniRL judges with)."""
    if not question.strip():
        raise ValueError("the question is empty")
    return answer_questions(models, [image], [question], cfg.max_answer_tokens)[0]


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="UniRL (arXiv 2505.23380) on Janus-Pro: self-improvement by its "
                                                 "own understanding, GRPO or SFT. No --model-dir: the embedded toy.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="run the self-improving loop (torchrun for several GPUs)")
    mode.add_argument("--evaluate", action="store_true", help="GenEval-style accuracy per tag -> <out_dir>/eval.json")
    mode.add_argument("--generate", metavar="PROMPT", help="draw group_size images -> <out_dir>/generate/")
    mode.add_argument("--ask", nargs=2, metavar=("IMAGE", "QUESTION"), help="answer a question about an image")
    common.add_config_args(parser, Config)
    args = parser.parse_args(argv)
    cfg = resolve_config(common.config_from_args(Config, args), common.given_fields(Config, parser, argv))
    if args.train:
        train(cfg)
    elif args.evaluate:
        evaluate(cfg)
    else:
        device = common.init_dist(cfg.device).device
        models = load_inference_models(cfg, device, common.pick_dtype(device, cfg.dtype)[0])
        if args.generate is not None:
            images = generate(models, cfg, args.generate, common.step_generator(cfg.seed, device=device))
            folder = os.path.join(cfg.out_dir, "generate")
            os.makedirs(folder, exist_ok=True)
            for i, image in enumerate(images):
                image.save(os.path.join(folder, f"{i:02d}.png"))
            common.print0(f"{len(images)} images of {args.generate!r} in {folder}/")
        else:
            common.print0(ask(models, cfg, common.load_image(args.ask[0]), args.ask[1]))


if __name__ == "__main__":
    main()
