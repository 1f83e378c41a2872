"""
umo.py: UMO, Unified Multi-identity Optimization (arXiv 2509.06818), on UNO / FLUX.1-dev.

Multi-identity customization keeps each identity and does not confuse them when "which generated face is which
reference" is solved as a global assignment: MIMR (multi-identity matching reward) matches reference and
generated faces with the Hungarian algorithm, rewards matched cosine similarity (+1) and penalises every other
cell (-1). Training is ReReFL (the paper's Algorithm 1): sample from pure noise without gradient down to a random
late step, take one step with gradient, predict x0, decode, and ascend the reward plus a flow-matching loss on
the target. A Flow-GRPO variant with MIMR as the reward is here too (--algorithm grpo).

What differs from the paper and the public code (bytedance/UMO released inference and the reward model only):
- The training loop is rebuilt from Algorithm 1; data, steps and resolution are not published (we use UNO's 512).
- Reference identities come from the reference images (the paper's definition) by default; the released MIMR
  takes them from the target image (--identity-source target).
- fix: the released detector input subtracts the BGR mean twice (MIMR.get_bbox and facexlib 0.3.0's
  batched_detect_faces both do); we subtract it once, the distribution RetinaFace was trained on.
- fix: the released code loads LoRAs with strict=False; we check every key and refuse mismatches.
- The rewarded faces are found by RetinaFace (not differentiable) and embedded through a differentiable
  alignment warp and ArcFace, as released; evaluation uses the same ArcFace (the paper's eval uses IR-SE50).
- UNO runs on diffusers' FluxTransformer2DModel: reference latents are extra image tokens after the target's,
  with UNO's position offsets, and the output is cut back to the target tokens (UNO's own code is a BFL fork).

Commands (requires common.py next to it):
    python umo.py --train                                            # embedded default: tiny models, CPU, minutes
    python umo.py --train --flux-dir FLUX.1-dev --lora UMO_UNO.safetensors \\
        --retinaface detection_Resnet50_Final.pth --arcface glint_cosface_r50.pth --data train.jsonl   # 1 GPU
    torchrun --standalone --nproc_per_node=8 umo.py --train ...same flags...                         # 8 GPUs
    python umo.py --generate "two people at a cafe" --ref a.jpg --ref b.jpg [--lora PATH]
    python umo.py --evaluate --data eval.jsonl ...                   # ID-Sim / ID-Conf as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# config


@dataclasses.dataclass
class Config:
    # ---- model
    flux_dir: str | None = None  # FLUX.1-dev folder in diffusers layout; none = the embedded tiny model
    lora: str | None = None  # adapter to start from: UNO/UMO_UNO.safetensors (XLabs keys) or ours (PEFT keys)
    retinaface: str | None = None  # facexlib detection_Resnet50_Final.pth (needed with --flux-dir)
    arcface: str | None = None  # arcface_torch r50 backbone.pth, e.g. Glint360K CosFace r50 (needed with --flux-dir)
    lora_rank: int = 512  # paper 4.1.1 (UNO's LoRA); a --lora file's own rank wins
    pe: str = "d"  # UNO reference position offsets: d (diagonal, UNO default), h, w, o (none)
    # ---- data
    data: str | None = None  # JSONL {"prompt", "refs": [paths], "target": path}; none = synthetic identities
    resolution: int = 512  # generated image side (UNO's training resolution)
    ref_long_side: int = 0  # reference long side; 0 = UNO's rule: 512 for one reference, 320 for several
    identity_source: str = "refs"  # where reference identities come from: refs (paper) or target (released MIMR code)
    # ---- rollout
    num_steps: int = 25  # sampling steps T (paper: 25 for UNO)
    guidance: float = 4.0  # FLUX distilled guidance (UNO inference default)
    grad_window: int = 10  # ReReFL: the gradient step is one of the last this many steps (paper: [Ts, Te] = [1, 10])
    group_size: int = 8  # GRPO: images per prompt (Flow-GRPO 1-GPU config: 8)
    grpo_steps: int = 10  # GRPO: SDE rollout steps (Flow-GRPO: 10)
    noise_level: float = 0.7  # GRPO: SDE noise level a (Flow-GRPO)
    # ---- reward
    face_conf: float = 0.8  # RetinaFace confidence threshold (facexlib default)
    eval_scale: float = 100.0  # ID-Sim/ID-Conf scale: 100 = XVerseBench (cos x 100), 10 = OmniContext (0-10)
    # ---- optimisation
    algorithm: str = "rerefl"  # rerefl (paper Algorithm 1) or grpo (Flow-GRPO with MIMR)
    lr: float = 5e-6  # paper 4.1.1
    weight_decay: float = 0.01  # AdamW (UNO's trainer)
    pretrain_weight: float = 1.0  # lambda on the flow-matching loss on the target (paper 4.1.1: 1)
    clip_range: float = 1e-4  # GRPO ratio clip (Flow-GRPO)
    kl_beta: float = 0.04  # GRPO KL weight to the adapter-disabled model (Flow-GRPO)
    adv_clip: float = 5.0  # GRPO advantage clamp (Flow-GRPO)
    timestep_fraction: float = 0.99  # GRPO: trained fraction of the rollout steps (Flow-GRPO: 9 of 10)
    max_grad_norm: float = 1.0  # gradient clipping after the all-reduce
    batch_size: int = 1  # prompts per rank per step (paper: total batch 8 on 8 GPUs)
    max_steps: int = 2000  # optimizer steps
    grad_checkpointing: bool = True  # recompute activations in the backward (memory for LoRA r512 on FLUX)
    # ---- logging
    out_dir: str = "runs/umo"  # config.json, metrics.jsonl, samples/, lora.safetensors, checkpoint/
    sample_every: int = 100  # save a sample grid every this many steps
    save_every: int = 100  # write checkpoint/latest.pt every this many steps
    # ---- system
    seed: int = 0  # base seed; noise is seeded per (seed, step, rank, sample) so resumed runs repeat exactly
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    resume: bool = False  # continue from out_dir/checkpoint/latest.pt


# The embedded default (no --flux-dir) is a toy, like CartPole: tiny models of the real classes and synthetic
# identities, sized to learn in about a minute on 2 CPU cores. These values replace flags left at their default.
TOY_SETTINGS = dict(resolution=16, num_steps=8, guidance=1.0, grad_window=3, lora_rank=32, lr=1e-2,
                    weight_decay=0.0, max_steps=400, group_size=4, grpo_steps=6, sample_every=50, save_every=50,
                    batch_size=2, grad_checkpointing=False)


def resolve_config(cfg: Config, given: frozenset[str] = frozenset()) -> Config:
    """The config a run uses: with no --flux-dir, the toy's settings for every field that is neither
    typed on the command line (`given`) nor changed from its default (printed)."""
    if cfg.flux_dir is not None:
        return cfg
    note = "embedded default (no --flux-dir): tiny FLUX/VAE/CLIP/T5/ArcFace, synthetic identities, slot detector"
    return common.apply_toy_settings(cfg, TOY_SETTINGS, note, given)


# -----------------------------------------------------------------------------
# model loading: FLUX.1-dev (diffusers) with UNO's multi-reference conditioning


@dataclasses.dataclass
class Models:
    transformer: nn.Module  # diffusers FluxTransformer2DModel with LoRA modules injected
    vae: nn.Module  # diffusers AutoencoderKL (FLUX: 16 latent channels, scale 0.3611, shift 0.1159)
    clip: nn.Module  # CLIP-L text encoder: pooled prompt vector
    clip_tokenizer: object
    t5: nn.Module  # T5-XXL encoder: per-token prompt embeddings
    t5_tokenizer: object
    detector: nn.Module  # RetinaFace, or the toy's SlotDetector
    arcface: nn.Module  # IResNet
    max_text_len: int  # T5 tokens (UNO: 512)


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> Models:
    """Real weights from local paths (strict keys everywhere), or the embedded tiny models when flux_dir is None."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    if cfg.flux_dir is None:
        common.toy_cpu_threads(device)
        models = _tiny_models(cfg)
    else:
        root = _require(cfg.flux_dir, "FLUX.1-dev folder")
        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            _require(os.path.join(root, sub), f"FLUX.1-dev component '{sub}/' (diffusers layout)")
        if not (cfg.retinaface and cfg.arcface):
            raise ValueError("--retinaface and --arcface are required with --flux-dir: MIMR needs both face nets")
        models = Models(
            transformer=FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32),
            clip=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype),
            clip_tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
            t5=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", torch_dtype=dtype),
            t5_tokenizer=T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2"),
            detector=load_retinaface(_require(cfg.retinaface, "RetinaFace weights"), conf=cfg.face_conf),
            arcface=load_arcface(_require(cfg.arcface, "ArcFace weights")),
            max_text_len=512)
    for m in (models.transformer, models.vae, models.clip, models.t5, models.detector, models.arcface):
        m.requires_grad_(False).eval().to(device)
    models.arcface.to(dtype if device.type == "cuda" else torch.float32)
    return models


def _tiny_models(cfg: Config) -> Models:
    """Tiny instances of the real classes (diffusers' own test sizes), built offline: a random CLIP, T5 and ArcFace,
    a VAE fitted to the toy images and a transformer pre-trained to draw them (see _pretrained_toy)."""
    models = _random_tiny_models(cfg.seed)
    vae_state, shift, scale, transformer_state = _pretrained_toy(cfg.seed)
    models.vae.load_state_dict(vae_state)
    models.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    models.transformer.load_state_dict(transformer_state)
    return models


def _random_tiny_models(seed: int) -> Models:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)  # the toy's random weights are the same in every run and rank
    tokenizer = _toy_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=True)
    vae = _toy_vae()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=tokenizer.vocab_size, projection_dim=32,
                                        bos_token_id=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                 vocab_size=tokenizer.vocab_size, relative_attention_num_buckets=8))
    arcface = IResNet(layers=(1, 1, 1, 1), width=8)
    arcface.eval()
    return Models(transformer, vae, clip, tokenizer, t5, tokenizer, SlotDetector(), arcface, max_text_len=16)


def _toy_vae() -> nn.Module:
    """Two VAE blocks: latents at half the image's resolution, 4 channels -> 16 per packed token (2x2 patch)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


TOY_VAE_STEPS, TOY_PRETRAIN_STEPS = 120, 400


@functools.lru_cache(maxsize=2)
def _pretrained_toy(seed: int) -> tuple[dict[str, torch.Tensor], float, float, dict[str, torch.Tensor]]:
    """The toy's "pretrained UNO", made once per process in ~10 s on CPU (CLIP, T5 and ArcFace stay random).

    1. The VAE: a random one is no autoencoder (decode(encode(target)) scores like noise), so nothing a generator
       learns would look like a target. Adam fits it to reconstruct the toy images, then its latents are normalised
       to zero mean and unit std, as FLUX's shift/scale factors do.
    2. The transformer: flow matching on the toy prompts and references, but with targets whose two faces are drawn
       at random from all identities. The base model so learns to draw faces while ignoring whose: the identity
       confusion UMO addresses, and the headroom MIMR has to close (base samples score about 0.1; the true targets
       0.22)."""
    data = toy_dataset(seed)
    faces = toy_identities(seed)
    with torch.random.fork_rng(), torch.enable_grad():  # cached per process: leaves the caller's RNG alone
        models = _random_tiny_models(seed)
        vae, tf = models.vae, models.transformer
        images = [torch.stack([r["target"] for r in data]), faces]
        opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
        for _ in range(TOY_VAE_STEPS):
            loss = sum(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x) for x in images)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            z = torch.cat([vae.encode(x).latent_dist.mode().flatten() for x in images])
        vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
        vae.requires_grad_(False)

        cond = make_condition(models, [r["prompt"] for r in data], [r["refs"] for r in data], 2 * TOY_FACE, "d")
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(tf.parameters(), lr=1e-3)
        for _ in range(TOY_PRETRAIN_STEPS):
            who = torch.randint(0, TOY_IDENTITIES, (len(data), 2), generator=generator)
            loss = flow_matching_loss(models, cond, toy_pictures(faces[who[:, 0]], faces[who[:, 1]]), generator)
            opt.zero_grad()
            loss.backward()
            opt.step()
    detach = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    return detach(vae), vae.config.shift_factor, vae.config.scaling_factor, detach(tf)


def _toy_tokenizer():
    """A word-level tokenizer built in code (the toy's prompts use a closed vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<pad>", "</s>", "<unk>", "a", "photo", "of", "and", "person", "together"]
    words += [f"id{i}" for i in range(TOY_IDENTITIES)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def position_ids(grid: tuple[int, int], ref_grids: list[tuple[int, int]], pe: str = "d") -> torch.Tensor:
    """UNO's "universal RoPE" ids (L_target + sum L_ref, 3): (0, row, col) per token, target first.

    Reference k is offset past the target and every earlier reference: pe='d' shifts rows and columns (diagonal),
    'h' rows only, 'w' columns only, 'o' not at all (bytedance/UNO sampling.prepare_multi_ip)."""
    if pe not in ("d", "h", "w", "o"):
        raise ValueError(f"pe must be one of d, h, w, o; got {pe!r}")
    out, (shift_h, shift_w) = [common.flux_ids(*grid)], grid
    for h, w in ref_grids:
        out.append(common.flux_ids(h, w, row=shift_h if pe in "dh" else 0, col=shift_w if pe in "dw" else 0))
        shift_h, shift_w = shift_h + h, shift_w + w
    return torch.cat(out)


@dataclasses.dataclass
class Condition:
    """Everything a velocity call needs besides the noisy target tokens; batch-aligned with them."""
    text: torch.Tensor  # (B, L_txt, D_txt) T5 embeddings
    pooled: torch.Tensor  # (B, D_pooled) CLIP pooled
    refs: torch.Tensor  # (B, L_ref, 4C) packed clean reference latents (L_ref may be 0)
    ids: torch.Tensor  # (L_target + L_ref, 3) image position ids
    grid: tuple[int, int]  # latent (h, w) of the target

    def repeat(self, n: int) -> "Condition":
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return Condition(rep(self.text), rep(self.pooled), rep(self.refs), self.ids, self.grid)


def velocity(models: Models, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, guidance: float) -> torch.Tensor:
    """FLUX velocity (B, L, 4C) for the target tokens x at sigma (B,). UNO: the references ride along as extra tokens
    with the target's timestep, guidance modulation, blocks and LoRA; their outputs are dropped."""
    return common.flux_velocity(models.transformer, x, cond.refs, cond.text, cond.pooled, cond.ids, sigma, guidance)


def latent_grid(models: Models, resolution: int) -> tuple[int, int]:
    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return resolution // f, resolution // f


def lat_channels(models: Models) -> int:
    return models.vae.config.latent_channels


@torch.no_grad()
def make_condition(models: Models, prompts: list[str], refs: list[list[torch.Tensor]], resolution: int,
                   pe: str) -> Condition:
    """Encodes prompts and reference images; every sample in the batch needs the same reference sizes."""
    device = models.transformer.device
    text, pooled = common.encode_flux_prompts(prompts, models.t5, models.t5_tokenizer, models.clip,
                                              models.clip_tokenizer, models.max_text_len, models.transformer.dtype)
    grid = latent_grid(models, resolution)
    ref_tokens, ref_grids = [], []
    for k in range(len(refs[0])):
        lat = common.vae_encode(models.vae, torch.stack([r[k] for r in refs]).to(device))  # (B, C, h, w)
        ref_tokens.append(common.flux_pack(lat).to(models.transformer.dtype))
        ref_grids.append((lat.shape[2] // 2, lat.shape[3] // 2))
    empty = text.new_zeros(len(prompts), 0, 4 * lat_channels(models))
    refs_packed = torch.cat(ref_tokens, dim=1) if ref_tokens else empty
    ids = position_ids((grid[0] // 2, grid[1] // 2), ref_grids, pe)
    return Condition(text, pooled, refs_packed, ids, grid)


def prepare_reference(image, num_refs: int, long_side: int = 0) -> torch.Tensor:
    """UNO's preprocess_ref: long side 512 for one reference, 320 for several, centre-cropped to multiples of 16."""
    side = long_side or (512 if num_refs == 1 else 320)
    return common.pil_to_tensor(common.resize_center_crop(image, long_side=side))


# LoRA on the modules UNO's XLabs LoRA touches: attention q/k/v/out of both streams in the 19 double blocks,
# q/k/v and the output projection (linear2) of the 38 single blocks.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "single_transformer_blocks.*.proj_out"]
XLABS_KEY = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.processor\."
                       r"(qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight")


def xlabs_to_peft(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNO/UMO XLabs LoRA keys -> PEFT keys on diffusers' FLUX modules; exact, no approximation.

    XLabs adds up @ down (no alpha, scale 1) to BFL's fused projections. A fused qkv (out 3 x 3072) splits into
    q, k, v LoRAs that share lora_A = down and take their third of up as lora_B: (up[rows] @ down) is exactly the
    q/k/v slice of the fused update. In single blocks the qkv LoRA covers only the attention rows of linear1
    (diffusers' to_q/to_k/to_v), never the MLP rows (proj_mlp); proj_lora goes to linear2 = proj_out."""
    unknown = sorted(k for k in sd if not XLABS_KEY.fullmatch(k))
    if unknown:
        raise ValueError(f"not an XLabs FLUX LoRA key: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    targets = {
        ("double_blocks", "qkv_lora1"): ["transformer_blocks.{}.attn.to_q", "transformer_blocks.{}.attn.to_k",
                                         "transformer_blocks.{}.attn.to_v"],
        ("double_blocks", "proj_lora1"): ["transformer_blocks.{}.attn.to_out.0"],
        ("double_blocks", "qkv_lora2"): ["transformer_blocks.{}.attn.add_q_proj",
                                         "transformer_blocks.{}.attn.add_k_proj",
                                         "transformer_blocks.{}.attn.add_v_proj"],
        ("double_blocks", "proj_lora2"): ["transformer_blocks.{}.attn.to_add_out"],
        ("single_blocks", "qkv_lora"): ["single_transformer_blocks.{}.attn.to_q",
                                        "single_transformer_blocks.{}.attn.to_k",
                                        "single_transformer_blocks.{}.attn.to_v"],
        ("single_blocks", "proj_lora"): ["single_transformer_blocks.{}.proj_out"],
    }
    out = {}
    for key, w in sd.items():
        kind, block, lora, part = XLABS_KEY.fullmatch(key).groups()
        if (kind, lora) not in targets:
            raise ValueError(f"{key}: {lora} does not belong in {kind}")
        names = [t.format(block) for t in targets[(kind, lora)]]
        pieces = [w] * len(names) if part == "down" else w.chunk(len(names), dim=0)
        for name, piece in zip(names, pieces):
            out[f"{name}.lora_{'A' if part == 'down' else 'B'}.weight"] = piece.contiguous()
    return out


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], int, bool]:
    """-> (PEFT-named state dict, rank, was_xlabs); the rank is read from the lora_A shapes."""
    from safetensors.torch import load_file

    sd = load_file(_require(path, "LoRA file"))
    xlabs = any(".processor." in k for k in sd)
    if xlabs:
        sd = xlabs_to_peft(sd)
    else:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks)}")
    return sd, ranks.pop(), xlabs


def add_lora(cfg: Config, models: Models) -> None:
    """Injects LoRA (rank from --lora's file if given, else --lora-rank; alpha = rank: scale 1 as XLabs) and loads."""
    sd, rank = None, cfg.lora_rank
    if cfg.lora:
        sd, rank, xlabs = read_lora_file(cfg.lora)
        common.print0(f"LoRA {cfg.lora}: rank {rank}, {'XLabs keys converted to PEFT' if xlabs else 'PEFT keys'}")
    common.inject_lora(models.transformer, LORA_TARGETS, rank=rank, alpha=rank, init="gaussian")
    if sd is not None:
        common.load_lora(models.transformer, sd, prefix="")  # strict: names every missing/unexpected key
    if cfg.grad_checkpointing:
        models.transformer.enable_gradient_checkpointing()

# -----------------------------------------------------------------------------
# reward: face detection (RetinaFace), alignment, embedding (ArcFace), MIMR
# The face nets are written here so their published checkpoints load with strict key checks (no facexlib,
# insightface, kornia or skimage needed); loaders and shapes are tested in tests/test_umo_faces.py.


# RetinaFace-R50 test-time settings (facexlib generate_config('resnet50'), detect defaults)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # two square anchors per location, in pixels, per level
STEPS = (8, 16, 32)                             # strides of the three pyramid levels
VARIANCES = (0.1, 0.2)                          # SSD-style offset scaling for centres / log-sizes
MEAN_BGR = (104.0, 117.0, 123.0)                # the detector was trained on BGR 0-255 minus this mean

# insightface's 112x112 ArcFace template (left eye, right eye, nose, left/right mouth corner). It is the older
# 96x112 template (30.2946, 51.6963), ... shifted by x + 8.0, which is how UMO's MIMR writes it: same points.
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)

# ---- strict checkpoint loading


def load_state_dict_strict(model: nn.Module, path: str) -> nn.Module:
    """Loads a .pth state dict into `model` (built on any device, meta included), refusing anything but an exact match.

    A `module.` prefix (nn.DataParallel checkpoints, e.g. detection_Resnet50_Final.pth) is stripped. Missing
    BatchNorm `num_batches_tracked` counters are the one tolerated gap: checkpoints saved by old PyTorch lack them,
    PyTorch's own loader fills them too, and they do nothing in eval mode.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not match {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {mismatched}")
    # assign=True adopts the loaded tensors, so a meta-device model never allocates its random init
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)  # frozen reward model; gradients still flow to its inputs

# ---- RetinaFace (ResNet-50): torchvision resnet50 body, FPN, SSH context modules, three 1x1 heads


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, slope: float | None = None) -> nn.Sequential:
    """conv (no bias) + BN [+ LeakyReLU], a Sequential so the keys read `.0.weight`, `.1.running_mean` (facexlib's)."""
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope, inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 x4, projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = None
        if stride != 1 or c_in != 4 * width:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, 4 * width, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """resnet50 up to layer4 (torchvision IntermediateLayerGetter drops avgpool/fc); returns strides 8, 16, 32."""

    def __init__(self, base_width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        c_in = base_width
        for i, n in enumerate(blocks):
            width = base_width * 2 ** i
            layer = [Bottleneck(c_in if j == 0 else 4 * width, width, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c_in = 4 * width

    def forward(self, x):                                              # (B, 3, H, W)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)     # (B, w, H/4, W/4)  (all sizes ceil-divided)
        c2 = self.layer1(x)                                            # (B, 4w, H/4, W/4)
        c3 = self.layer2(c2)                                           # (B, 8w, H/8, W/8)
        c4 = self.layer3(c3)                                           # (B, 16w, H/16, W/16)
        return c3, c4, self.layer4(c4)                                 # ..., (B, 32w, H/32, W/32)


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out: int, slope: float):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, out, 1, slope=slope) for c in in_channels)
        self.merge1 = _conv_bn(out, out, 3, slope=slope)
        self.merge2 = _conv_bn(out, out, 3, slope=slope)

    def forward(self, c3, c4, c5):
        p5 = self.output3(c5)
        p4 = self.merge2(self.output2(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest"))
        p3 = self.merge1(self.output1(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest"))
        return p3, p4, p5                                              # each (B, out, h_k, w_k)


class SSH(nn.Module):
    """Single-stage context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) receptive fields, concatenated."""

    def __init__(self, c: int, slope: float):
        super().__init__()
        self.conv3X3 = _conv_bn(c, c // 2, 3)
        self.conv5X5_1 = _conv_bn(c, c // 4, 3, slope=slope)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, 3)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4, 3, slope=slope)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, 3)  # lower-case x: the checkpoint's spelling

    def forward(self, x):
        t = self.conv5X5_1(x)
        u = self.conv7X7_2(t)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(t), self.conv7x7_3(u)], dim=1))


class Head(nn.Module):
    """1x1 conv predicting `k` numbers for each of the 2 anchors at every location."""

    def __init__(self, c: int, k: int, anchors: int = 2):
        super().__init__()
        self.k = k
        self.conv1x1 = nn.Conv2d(c, anchors * k, 1)

    def forward(self, x):                                              # (B, c, h, w)
        out = self.conv1x1(x).permute(0, 2, 3, 1)                      # (B, h, w, anchors*k): row, col, anchor order
        return out.reshape(x.shape[0], -1, self.k)                     # (B, h*w*anchors, k), same order as priors


class RetinaFace(nn.Module):
    """RetinaFace with a ResNet-50 body; defaults give facexlib's retinaface_resnet50 layout exactly.

    base_width / blocks / out_channels shrink it for tests and toys (e.g. 8, (1, 1, 1, 1), 16). As in the
    original, FPN/SSH activations are LeakyReLU(0.1) only when out_channels <= 64, else plain ReLU (slope 0).
    """

    def __init__(self, base_width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), out_channels: int = 256):
        super().__init__()
        slope = 0.1 if out_channels <= 64 else 0.0
        self.conf_threshold = 0.8  # facexlib's default
        self.body = ResNetBody(base_width, blocks)
        self.fpn = FPN((8 * base_width, 16 * base_width, 32 * base_width), out_channels, slope)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(out_channels, slope) for _ in range(3))
        self.ClassHead = nn.ModuleList(Head(out_channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(out_channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(out_channels, 10) for _ in range(3))

    def forward(self, x):
        """x: (B, 3, H, W) BGR 0-255 minus MEAN_BGR -> loc (B, P, 4), class logits (B, P, 2), landmarks (B, P, 10)."""
        feats = [ssh(p) for ssh, p in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(*self.body(x)))]
        return tuple(torch.cat([h(f) for h, f in zip(heads, feats)], dim=1)
                     for heads in (self.BboxHead, self.ClassHead, self.LandmarkHead))

    @torch.no_grad()
    def detect(self, images: torch.Tensor, conf_threshold: float | None = None, nms_threshold: float = 0.4):
        """images (B, 3, H, W) RGB in [-1, 1] -> per image (boxes (n, 4) x1y1x2y2, scores (n,), landmarks (n, 5, 2)).

        One batched forward at the input resolution (facexlib's use_origin_size=True: no resize), then a per-image
        threshold + NMS; faces come out by descending score. Outputs are float32 pixel coordinates.
        """
        conf_threshold = self.conf_threshold if conf_threshold is None else conf_threshold
        B, _, H, W = images.shape
        dtype = next(self.parameters()).dtype
        loc, logits, landms = self(to_detector_input(images).to(dtype))
        scores = logits.float().softmax(-1)[..., 1]                    # (B, P) face probability
        priors = prior_boxes(H, W, images.device)                      # (P, 4)
        boxes = decode_boxes(loc.float(), priors) * images.new_tensor([W, H, W, H], dtype=torch.float32)
        points = decode_landmarks(landms.float(), priors) * images.new_tensor([W, H], dtype=torch.float32)
        out = []
        for b in range(B):
            m = scores[b] > conf_threshold
            box, score, point = boxes[b][m], scores[b][m], points[b][m]
            keep = nms(box, score, nms_threshold)
            out.append((box[keep], score[keep], point[keep]))
        return out


def to_detector_input(images: torch.Tensor) -> torch.Tensor:
    """RGB [-1, 1] -> BGR 0-255 minus MEAN_BGR, the distribution the detector was trained on; done exactly once.

    UMO's MIMR.get_bbox subtracts the mean itself and then calls facexlib's batched_detect_faces, which subtracts
    self.mean_tensor again (so at tag v0.3.0, commit 260620a, the version UMO's requirements pin): UMO's detector
    sees every channel shifted by a further -(104, 117, 123). We follow the training distribution instead.
    """
    x = (images.float() * 0.5 + 0.5) * 255.0
    return x.flip(1) - x.new_tensor(MEAN_BGR).view(1, 3, 1, 1)


def prior_boxes(height: int, width: int, device=None) -> torch.Tensor:
    """Anchors (P, 4) as (cx, cy, w, h) in [0, 1] image fractions, ordered level, row, col, anchor (facexlib PriorBox).

    Feature maps are ceil(H / step) x ceil(W / step), exactly what the stride-2 convs produce; clip=False.
    P = 2 * sum_k ceil(H/s_k) * ceil(W/s_k), e.g. 16800 for 640x640.
    """
    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        fh, fw = -(-height // step), -(-width // step)
        cy = (torch.arange(fh, device=device, dtype=torch.float32) + 0.5) * step / height
        cx = (torch.arange(fw, device=device, dtype=torch.float32) + 0.5) * step / width
        cy, cx = (t.view(fh, fw, 1).expand(fh, fw, len(sizes)) for t in torch.meshgrid(cy, cx, indexing="ij"))
        s = torch.tensor(sizes, device=device, dtype=torch.float32)
        sw, sh = (s / width).expand(fh, fw, -1), (s / height).expand(fh, fw, -1)
        out.append(torch.stack([cx, cy, sw, sh], dim=-1).reshape(-1, 4))
    return torch.cat(out)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """loc (..., P, 4) offsets -> (..., P, 4) x1y1x2y2 in [0, 1] fractions (centre shift * 0.1, log-size * 0.2)."""
    centre = priors[:, :2] + loc[..., :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * VARIANCES[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """pre (..., P, 10) offsets -> (..., P, 5, 2) points in [0, 1] fractions."""
    pre = pre.unflatten(-1, (5, 2))
    return priors[:, None, :2] + pre * VARIANCES[0] * priors[:, None, 2:]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS, keeping indices in descending score order; drops a box whose IoU with a kept one is > threshold.

    Continuous areas (x2 - x1) * (y2 - y1), as torchvision.ops.nms, which facexlib's py_cpu_nms calls since
    facexlib commit efeacb3 (2021; so at v0.3.0, UMO's pin). The older numpy py_cpu_nms used (x2 - x1 + 1): its
    decisions differ slightly on small boxes. Ties in score keep the lower index first (stable sort).
    Memory O(n): one row of IoUs per kept box.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.numel() > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)

# ---- alignment: similarity fit to the template + differentiable warp


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src -> dst.

    src (n, 5, 2) e.g. detected landmarks, dst (5, 2) e.g. ARCFACE_TEMPLATE -> (n, 2, 3) float64 forward affine
    dst ~ A @ [x, y, 1]. Same result as skimage SimilarityTransform.estimate(src, dst) (Umeyama 1991): in 2-D
    a similarity is [[a, -b], [b, a]] and its least-squares fit has this closed form, so no SVD is needed.
    Coincident src points (no spread) give NaN, as in skimage.
    """
    src, dst = src.double(), dst.double().to(src.device)
    p = src - src.mean(-2, keepdim=True)                               # (n, 5, 2) centred
    q = dst - dst.mean(-2, keepdim=True)                               # (5, 2)
    norm = (p ** 2).sum((-2, -1))                                      # (n,)
    a = (p * q).sum((-2, -1)) / norm                                   # s cos(theta)
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(-1) / norm  # s sin(theta)
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (n, 2, 2)
    t = dst.mean(-2) - (rot @ src.mean(-2).unsqueeze(-1)).squeeze(-1)  # (n, 2)
    return torch.cat([rot, t.unsqueeze(-1)], dim=-1)


def _pixel_to_norm(h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
    """3x3 map from pixel coords (centres at 0..w-1) to grid_sample coords in [-1, 1] with align_corners=True."""
    return ref.new_tensor([[2.0 / (w - 1), 0.0, -1.0], [0.0, 2.0 / (h - 1), -1.0], [0.0, 0.0, 1.0]])


def warp_faces(images: torch.Tensor, image_index: torch.Tensor, affine: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Crops (n, C, size, size): crop j is images[image_index[j]] warped by the forward pixel affine affine[j].

    Same semantics as cv2.warpAffine(img, A, (size, size)) and kornia warp_affine(img, A, (size, size)) (its default
    align_corners=True): crop(u, v) = bilinear image sample at A^-1 (u, v), pixel centres at integers, zeros outside.
    Differentiable w.r.t. images (and affine); half-precision images are warped in float32.
    """
    src = images if images.dtype in (torch.float32, torch.float64) else images.float()
    _, _, H, W = src.shape
    affine = affine.double()
    bottom = affine.new_tensor([0.0, 0.0, 1.0]).expand(affine.shape[0], 1, 3)
    inv = torch.linalg.inv(torch.cat([affine, bottom], dim=1))                     # (n, 3, 3) crop px -> image px
    dst_norm, src_norm = _pixel_to_norm(size, size, inv), _pixel_to_norm(H, W, inv)
    theta = (src_norm @ inv @ torch.linalg.inv(dst_norm))[:, :2].to(src.dtype)     # crop norm -> image norm
    grid = F.affine_grid(theta, [affine.shape[0], src.shape[1], size, size], align_corners=True)
    return F.grid_sample(src[image_index], grid, mode="bilinear", padding_mode="zeros", align_corners=True)

# ---- ArcFace: insightface arcface_torch iresnet


class IBasicBlock(nn.Module):
    """BN -> 3x3 -> BN -> PReLU -> 3x3 (carries the stride) -> BN, plus the shortcut; no activation after the sum."""

    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.prelu = nn.PReLU(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch iresnet (fp16=False); defaults = iresnet50: layers (3, 4, 14, 3), width 64, 512-d output.

    Input (B, 3, 112, 112) RGB in [-1, 1] -> (B, 512) unnormalised embedding. Four stride-2 stages leave 7x7, which
    the fc flattens. Smaller `layers`/`width` build a tiny model of the same class for tests and toys.
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 14, 3), width: int = 64, num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.prelu = nn.PReLU(width)
        c_in = width
        for i, n in enumerate(layers):
            c = width * 2 ** i
            setattr(self, f"layer{i + 1}", nn.Sequential(*[IBasicBlock(c_in if j == 0 else c, c, 2 if j == 0 else 1)
                                                           for j in range(n)]))
            c_in = c
        self.bn2 = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)  # arcface_torch freezes this scale at 1 during training

    def forward(self, x):                                              # (B, 3, 112, 112)
        x = self.prelu(self.bn1(self.conv1(x)))                        # (B, w, 112, 112)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))      # (B, 8w, 7, 7)
        x = self.bn2(x).flatten(1)                                     # (B, 8w*49); training dropout is p=0: omitted
        return self.features(self.fc(x))                               # (B, num_features)


def embed_faces(arcface: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """crops (n, 3, 112, 112) RGB in [-1, 1] -> (n, 512) float32 unit vectors; keeps the graph back to the crops."""
    dtype = next(arcface.parameters()).dtype
    return F.normalize(arcface(crops.to(dtype)).float(), dim=-1)

# ---- loaders


def load_retinaface(path: str, device="cpu", conf: float = 0.8, **model_kwargs) -> RetinaFace:
    """facexlib detection_Resnet50_Final.pth (or any RetinaFace(**model_kwargs) state dict) -> frozen eval model."""
    with torch.device("meta"):
        model = RetinaFace(**model_kwargs)
    model = load_state_dict_strict(model, path).to(device)
    model.conf_threshold = conf
    return model


def load_arcface(path: str, device="cpu", **model_kwargs) -> IResNet:
    """arcface_torch r50 backbone.pth (e.g. Glint360K CosFace r50) -> frozen eval IResNet."""
    with torch.device("meta"):
        model = IResNet(**model_kwargs)
    return load_state_dict_strict(model, path).to(device)


# ---- the toy's detector and synthetic identities


class SlotDetector(nn.Module):
    """The embedded default's stand-in for RetinaFace: a random tiny detector finds nothing, so faces are where the
    synthetic data put them. layouts maps an image size (H, W) to its face boxes (x1, y1, x2, y2); each box gets
    the ArcFace template's 5 points scaled into it, so alignment, warp and ArcFace run exactly as with real faces."""

    def __init__(self, layouts: dict[tuple[int, int], list[tuple[float, float, float, float]]] | None = None):
        super().__init__()
        s = TOY_FACE
        self.layouts = layouts or {(2 * s, 2 * s): [(0, s / 2, s, 1.5 * s), (s, s / 2, 2 * s, 1.5 * s)],
                                   (s, s): [(0, 0, s, s)]}

    @torch.no_grad()
    def detect(self, images: torch.Tensor):
        boxes = images.new_tensor(self.layouts.get(tuple(images.shape[-2:]), []), dtype=torch.float32).view(-1, 4)
        unit = (ARCFACE_TEMPLATE.float() / 112).to(images.device)  # (5, 2) in [0, 1] box fractions
        points = boxes[:, None, :2] + unit * (boxes[:, None, 2:] - boxes[:, None, :2])
        return [(boxes, boxes.new_ones(len(boxes)), points) for _ in range(len(images))]


TOY_FACE = 8  # toy identity patterns are TOY_FACE px square; toy images hold two of them side by side
TOY_IDENTITIES = 3


def toy_identities(seed: int) -> torch.Tensor:
    """(TOY_IDENTITIES, 3, 8, 8) smooth random colour patterns in [-1, 1]: the toy's "faces"."""
    g = torch.Generator().manual_seed(seed + 12345)
    coarse = torch.rand(TOY_IDENTITIES, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(TOY_FACE, TOY_FACE), mode="bicubic", align_corners=False).clamp(-1, 1)


def toy_pictures(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(B, 3, 8, 8) x 2 -> (B, 3, 16, 16): two faces side by side in the middle rows, on grey."""
    s = TOY_FACE
    out = left.new_zeros(len(left), 3, 2 * s, 2 * s)
    out[:, :, s // 2:s // 2 + s, :s], out[:, :, s // 2:s // 2 + s, s:] = left, right
    return out


def toy_dataset(seed: int) -> list[dict]:
    """Every ordered pair of distinct identities: prompt, two references, and a target with them in two slots."""
    faces = toy_identities(seed)
    return [{"prompt": f"a photo of person id{a} and person id{b}", "refs": [faces[a], faces[b]],
             "target": toy_pictures(faces[a:a + 1], faces[b:b + 1])[0]}
            for a in range(TOY_IDENTITIES) for b in range(TOY_IDENTITIES) if a != b]


# ---- MIMR


def face_embeddings(models: Models, images: torch.Tensor, largest_only: bool = False) -> list[torch.Tensor]:
    """Per image, the L2-normalised ArcFace embeddings (F_i, D) of its detected faces, in one batched pass.

    Detection is not differentiable; the similarity warp and ArcFace are, so gradients reach `images`.
    largest_only keeps the largest face per image (one identity per reference image)."""
    dets = models.detector.detect(images.detach().float())
    if largest_only:
        largest = [(b[:, 2:] - b[:, :2]).prod(-1).argmax() if len(b) else None for b, _, _ in dets]
        dets = [det if k is None else tuple(t[k].unsqueeze(0) for t in det) for det, k in zip(dets, largest)]
    counts = [len(b) for b, _, _ in dets]
    if sum(counts) == 0:
        return [images.new_zeros(0, models.arcface.fc.out_features) for _ in counts]
    points = torch.cat([p for _, _, p in dets])  # (sum F_i, 5, 2)
    image_index = torch.repeat_interleave(torch.arange(len(images), device=images.device),
                                          torch.tensor(counts, device=images.device))
    crops = warp_faces(images.float(), image_index, similarity_transform(points, ARCFACE_TEMPLATE))
    return list(embed_faces(models.arcface, crops).split(counts))


def mimr(ref_embs: list[torch.Tensor], gen_embs: list[torch.Tensor]) -> torch.Tensor:
    """Multi-identity matching reward per image (B,): arXiv 2509.06818 eq. 3-4, bytedance/UMO MIMR.score_grad.

    sim = refs x generated faces (R_i, F_i) cosines; a Hungarian matching maximises the matched similarity; matched
    cells weigh +1, every other cell -1 (the confusion penalty); the reward is the mean over all R_i F_i cells.
    No face on either side: 0 with no gradient. All images are matched in a few batched calls (one per shape)."""
    b = len(ref_embs)
    r_max, f_max = max(len(e) for e in ref_embs), max(len(e) for e in gen_embs)
    if r_max == 0 or f_max == 0:
        return torch.zeros(b, device=gen_embs[0].device)
    pad = lambda es, n: torch.stack([F.pad(e, (0, 0, 0, n - len(e))) for e in es])  # noqa: E731
    refs, gens = pad(ref_embs, r_max), pad(gen_embs, f_max)                        # (B, R, D), (B, F, D)
    sim = refs @ gens.transpose(1, 2)                                              # (B, R, F)
    valid = torch.zeros(b, r_max, f_max, dtype=torch.bool, device=sim.device)
    matched = torch.zeros_like(valid)
    shapes = {(len(r), len(g)) for r, g in zip(ref_embs, gen_embs)}
    for r, f in shapes:
        idx = [i for i in range(b) if (len(ref_embs[i]), len(gen_embs[i])) == (r, f)]
        valid[idx, :r, :f] = True
        if r and f:
            rows, cols = common.linear_assignment(sim[idx, :r, :f].detach(), maximize=True)  # (n, min(r, f)) each
            matched[torch.tensor(idx, device=sim.device)[:, None], rows, cols] = True
    weight = torch.where(matched, 1.0, -1.0) * valid                              # (B, R, F): +1 / -1 / 0 (padding)
    cells = valid.sum((1, 2)).clamp(min=1)
    return (sim * weight).sum((1, 2)) / cells


def reference_embeddings(models: Models, sample: dict, source: str) -> torch.Tensor:
    """(R, D) identities of a sample: the largest face of each reference image (paper), or every face in the target
    (the released code's M; needs a target). A reference without a face contributes no identity."""
    device = models.transformer.device
    with torch.no_grad():
        if source == "target":
            if sample.get("target") is None:
                raise ValueError("--identity-source target needs a target image in every data line")
            return face_embeddings(models, sample["target"][None].to(device))[0]
        embs = [face_embeddings(models, r[None].to(device), largest_only=True)[0] for r in sample["refs"]]
        return torch.cat(embs)


def reward(models: Models, images: torch.Tensor, ref_embs: list[torch.Tensor]) -> torch.Tensor:
    """MIMR of generated images (B, 3, H, W) in [-1, 1] against each image's reference identities -> (B,)."""
    return mimr(ref_embs, face_embeddings(models, images))

# -----------------------------------------------------------------------------
# rollout


def sigmas_for(models: Models, cfg: Config, num_steps: int) -> torch.Tensor:
    """FLUX/UNO schedule: linspace(1, 0) shifted with mu linear in the number of target tokens."""
    h, w = latent_grid(models, cfg.resolution)
    return common.sigma_schedule(num_steps, mu=common.flux_mu((h // 2) * (w // 2)))


def initial_noise(models: Models, cfg: Config, n: int, generator: torch.Generator) -> torch.Tensor:
    h, w = latent_grid(models, cfg.resolution)
    noise = torch.randn(n, lat_channels(models), h, w, generator=generator)
    return common.flux_pack(noise).to(models.transformer.device)  # (n, L, 4C) float32


@torch.no_grad()
def sample_ode(models: Models, cfg: Config, cond: Condition, x: torch.Tensor, sigmas: torch.Tensor,
               stop: int | None = None) -> torch.Tensor:
    """Euler from sigmas[0] down to sigmas[stop] (default: to the end), no gradient. x: (B, L, 4C) float32."""
    for i in range(len(sigmas) - 1 if stop is None else stop):
        s = sigmas[i].expand(len(x)).to(x.device)
        x = common.euler_step(x, velocity(models, x, s, cond, cfg.guidance), sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def rollout(models: Models, cfg: Config, cond: Condition, generator: torch.Generator) -> dict:
    """GRPO rollouts: the Flow-GRPO SDE at every step; stores what the update re-scores. cond is already repeated
    group_size times per prompt. Returns latents (T+1, B, L, 4C), log_probs (T, B), final images (B, 3, H, W)."""
    sigmas = sigmas_for(models, cfg, cfg.grpo_steps)
    x = initial_noise(models, cfg, len(cond.text), generator)
    latents, log_probs = [x], []
    for i in range(cfg.grpo_steps):
        s = sigmas[i].expand(len(x)).to(x.device)
        v = velocity(models, x, s, cond, cfg.guidance)
        x, log_prob, _, _ = common.sde_step_with_logprob(x, v, sigmas[i], sigmas[i + 1], cfg.noise_level,
                                                         generator=_device_generator(generator, x.device))
        latents.append(x)
        log_probs.append(log_prob)
    images = common.vae_decode(models.vae, common.flux_unpack(x, *cond.grid))
    return {"latents": torch.stack(latents), "log_probs": torch.stack(log_probs), "sigmas": sigmas, "images": images}


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator | None:
    """SDE noise is drawn on the latents' device; on CPU the step's generator is used directly."""
    return generator if device.type == "cpu" else None

# -----------------------------------------------------------------------------
# update


def flow_matching_loss(models: Models, cond: Condition, target: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """The pretraining loss on the target (UNO train.py): x_s = (1 - s) x0 + s noise, MSE(v, noise - x0), with the
    guidance embedding at 1 as UNO trains."""
    x0 = common.flux_pack(common.vae_encode(models.vae, target)).float()  # (B, L, 4C)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = torch.rand(len(x0), generator=generator).to(x0.device)
    x_s = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    return F.mse_loss(velocity(models, x_s, s, cond, 1.0), noise - x0)


def rerefl_step(models: Models, cfg: Config, cond: Condition, ref_embs: list[torch.Tensor],
                targets: torch.Tensor | None, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """ReReFL (paper Algorithm 1): no-grad sampling from pure noise down to a random step among the last
    grad_window, one velocity call with gradient, x0 = x - sigma v, VAE decode, L = lambda L_diff - MIMR."""
    sigmas = sigmas_for(models, cfg, cfg.num_steps)
    remaining = int(torch.randint(1, cfg.grad_window + 1, (1,), generator=generator))  # t in [Ts, Te] = [1, 10]
    k = cfg.num_steps - remaining                                                        # index of the grad step
    x = sample_ode(models, cfg, cond, initial_noise(models, cfg, len(cond.text), generator), sigmas, stop=k)
    s = sigmas[k].expand(len(x)).to(x.device)
    x0 = common.x0_from_velocity(x, velocity(models, x, s, cond, cfg.guidance), s[:, None, None])
    images = common.vae_decode(models.vae, common.flux_unpack(x0, *cond.grid))
    rewards = reward(models, images, ref_embs)
    loss = -rewards.mean()
    metrics = {"reward": rewards.detach(), "grad_step": k}
    if targets is not None and cfg.pretrain_weight > 0:
        diff = flow_matching_loss(models, cond, targets, generator)
        loss = loss + cfg.pretrain_weight * diff
        metrics["diff_loss"] = diff.detach()
    return loss, {**metrics, "images": images.detach()}


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """Per-prompt normalisation (r - mean_group) / (std_group + 1e-4), population std (Flow-GRPO's per-prompt mode),
    computed on the rank that holds the whole group; clamped to +-clip."""
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return adv.view(-1).clamp(-clip, clip)


def grpo_step(models: Models, cfg: Config, cond: Condition, batch: dict, advantages: torch.Tensor) -> dict:
    """Flow-GRPO update over the trained timesteps: re-score each stored transition with the same conditioning,
    clipped ratio loss, KL of step means to the adapter-disabled model; backward per timestep (accumulated)."""
    sigmas, latents, old = batch["sigmas"], batch["latents"], batch["log_probs"]
    trained = max(1, int(cfg.grpo_steps * cfg.timestep_fraction))
    stats = {"policy_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}
    for j in range(trained):
        x, x_next = latents[j], latents[j + 1]
        s = sigmas[j].expand(len(x)).to(x.device)
        v = velocity(models, x, s, cond, cfg.guidance)
        _, log_prob, mean, std_dev_t = common.sde_step_with_logprob(x, v, sigmas[j], sigmas[j + 1], cfg.noise_level,
                                                                    prev_sample=x_next)
        ratio = torch.exp(log_prob - old[j])
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
        policy = torch.maximum(unclipped, clipped).mean()
        loss = policy
        if cfg.kl_beta > 0:
            with torch.no_grad(), common.lora_disabled(models.transformer):
                v_ref = velocity(models, x, s, cond, cfg.guidance)
                _, _, mean_ref, _ = common.sde_step_with_logprob(x, v_ref, sigmas[j], sigmas[j + 1], cfg.noise_level,
                                                                 prev_sample=x_next)
            kl = common.step_mean_kl(mean, mean_ref, std_dev_t).mean()
            loss = loss + cfg.kl_beta * kl
            stats["kl"] += kl.item() / trained
        (loss / trained).backward()
        stats["policy_loss"] += policy.item() / trained
        stats["clip_frac"] += ((ratio - 1).abs() > cfg.clip_range).float().mean().item() / trained
        if j == 0:
            stats["ratio"] = ratio.mean().item()  # exactly 1 on-policy: the first re-score equals the rollout
    return stats

# -----------------------------------------------------------------------------
# train


def load_rows(cfg: Config) -> list[dict]:
    """Data lines (paths resolved against the JSONL's folder), or the synthetic toy set (tensors)."""
    if cfg.data is None:
        return toy_dataset(cfg.seed)
    rows = common.read_jsonl(cfg.data, required=("prompt", "refs"))
    base = os.path.dirname(os.path.abspath(cfg.data))
    for i, row in enumerate(rows):
        if not row["refs"]:
            raise ValueError(f"{cfg.data}:{i + 1}: 'refs' is empty; UMO needs at least one reference image")
        row["refs"] = [os.path.join(base, p) for p in row["refs"]]
        if row.get("target"):
            row["target"] = os.path.join(base, row["target"])
    return rows


def load_sample(cfg: Config, row: dict) -> dict:
    """Reads and preprocesses one data line's images (the toy's rows are tensors already)."""
    if cfg.data is None:
        return row
    refs = [prepare_reference(common.load_image(p), len(row["refs"]), cfg.ref_long_side) for p in row["refs"]]
    target = None
    if row.get("target"):
        target = common.pil_to_tensor(common.resize_center_crop(common.load_image(row["target"]),
                                                                size=(cfg.resolution, cfg.resolution)))
    return {"prompt": row["prompt"], "refs": refs, "target": target}


def train(cfg: Config) -> list[dict]:
    """The RL loop; returns the logged metrics of every step (also in out_dir/metrics.jsonl)."""
    d = common.init_dist(cfg.device)
    dtype, why = common.pick_dtype(d.device, cfg.dtype)
    common.print0(f"umo: {cfg.algorithm} on {d.device} x {d.world_size} | {why}")
    common.seed_everything(cfg.seed + d.rank)
    models = load_models(cfg, d.device, dtype)
    add_lora(cfg, models)
    params = common.lora_parameters(models.transformer)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    all_rows = load_rows(cfg)
    rows = all_rows[d.rank::d.world_size]  # prompts sharded by rank; a GRPO group stays on its rank
    if not rows:
        raise ValueError(f"{len(all_rows)} data lines cannot feed {d.world_size} ranks")
    images_per_sample = 1 if cfg.algorithm == "rerefl" else cfg.group_size
    common.print0(f"{len(rows)} prompts per rank, {cfg.batch_size} per step, {images_per_sample} image(s) each, "
                  f"{sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters")

    ckpt_path = os.path.join(cfg.out_dir, "checkpoint", "latest.pt")
    start = common.resume_lora_training(ckpt_path, models.transformer, optimizer) if cfg.resume else 0
    if d.is_main:
        common.save_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
    log = common.MetricLog(cfg.out_dir, cfg.max_steps, start, enabled=d.is_main)
    ref_cache: dict[int, torch.Tensor] = {}
    history = []
    for step in range(start, cfg.max_steps):
        t0 = time.time()
        gen = common.step_generator(cfg.seed, step, d.rank)
        optimizer.zero_grad(set_to_none=True)
        rewards, losses, extra, skipped, shown = [], [], {}, 0, []
        for i in range(cfg.batch_size):
            flat = step * cfg.batch_size + i  # walk a fresh permutation of the shard every epoch
            perm = torch.randperm(len(rows), generator=common.step_generator(cfg.seed, flat // len(rows), d.rank))
            idx = int(perm[flat % len(rows)])
            sample = load_sample(cfg, rows[idx])
            if idx not in ref_cache:
                ref_cache[idx] = reference_embeddings(models, sample, cfg.identity_source)
            cond = make_condition(models, [sample["prompt"]], [sample["refs"]], cfg.resolution, cfg.pe)
            if cfg.algorithm == "rerefl":
                target = sample["target"][None].to(d.device) if sample.get("target") is not None else None
                loss, m = rerefl_step(models, cfg, cond, [ref_cache[idx]], target, gen)
                r, images = m["reward"], m["images"]
                if not torch.isfinite(loss):
                    skipped += 1
                    continue
                if loss.requires_grad:  # no face anywhere and no target: nothing to learn from this sample
                    (loss / cfg.batch_size).backward()
                losses.append(loss.item())
                if "diff_loss" in m:
                    extra.setdefault("diff_loss", []).append(m["diff_loss"].item())
            else:
                batch = rollout(models, cfg, cond.repeat(cfg.group_size), gen)
                with torch.no_grad():
                    r = reward(models, batch["images"], [ref_cache[idx]] * cfg.group_size)
                images = batch["images"]
                if not torch.isfinite(r).all():
                    skipped += 1
                    continue
                adv = group_advantages(r, cfg.group_size, cfg.adv_clip) / cfg.batch_size
                stats = grpo_step(models, cfg, cond.repeat(cfg.group_size), batch, adv)
                losses.append(stats.pop("policy_loss"))
                for k, v in stats.items():
                    extra.setdefault(k, []).append(v)
            rewards.append(r.float().cpu())
            shown.append(images[:4].float().cpu())
        common.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if losses else torch.tensor(0.0)
        if losses and torch.isfinite(grad_norm):
            optimizer.step()
        elif losses:
            skipped += 1
        r = torch.cat(rewards) if rewards else torch.full((1,), float("nan"))
        elapsed = time.time() - t0
        metrics = {"reward": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
                   "loss": sum(losses) / max(len(losses), 1), **{k: sum(v) / len(v) for k, v in extra.items()},
                   "grad_norm": grad_norm.item(), "skipped": skipped, "step_s": elapsed,
                   "images_per_s": len(r) / elapsed, "peak_gb": common.peak_memory_gb(d.device)}
        metrics = common.all_reduce_mean(metrics, d.device)
        log.log(step, metrics)
        history.append(metrics)
        if d.is_main and shown and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.max_steps):
            common.save_grid(torch.cat(shown), os.path.join(cfg.out_dir, "samples", f"step_{step + 1:06d}.png"))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            common.save_lora_training(ckpt_path, models.transformer, optimizer, step + 1, dataclasses.asdict(cfg))
    if d.is_main:
        common.save_lora(models.transformer, os.path.join(cfg.out_dir, "lora.safetensors"))
        common.print0(f"LoRA written to {os.path.join(cfg.out_dir, 'lora.safetensors')}")
    common.cleanup_dist()
    return history

# -----------------------------------------------------------------------------
# evaluate


def id_scores(ref_emb: torch.Tensor, gen_emb: torch.Tensor) -> tuple[list[float], list[float]]:
    """ID-Sim and ID-Conf entries of one image (reference/umo.md 6.2-6.3; paper eq. 5), as cosines in [-1, 1].

    Per reference identity: ID-Sim = its best cosine over the generated faces, 0 without a face. ID-Conf only when
    more than one face was found: min(1, (s1 - s2) / s1) from the top two cosines, 0 if s1 <= 0."""
    if len(gen_emb) == 0:
        return [0.0] * len(ref_emb), []
    sims = (ref_emb @ gen_emb.T).float()                                   # (R, F)
    top = sims.topk(min(2, sims.shape[1]), dim=1).values                   # (R, <=2)
    id_sim = top[:, 0].tolist()
    if sims.shape[1] < 2:
        return id_sim, []
    s1, s2 = top[:, 0], top[:, 1]
    conf = torch.where(s1 > 0, ((s1 - s2) / s1.clamp(min=1e-12)).clamp(max=1.0), torch.zeros_like(s1))
    return id_sim, conf.tolist()


@torch.no_grad()
def evaluate(cfg: Config, out_json: str | None = None) -> dict:
    """Generates one image per data line (seed per line) and scores ID-Sim / ID-Conf over all entries.

    Scale: x100 as XVerseBench reports (cos x 100); --eval-scale 10 gives OmniContext's 0-10 scale. Runs in one
    process (the released XVerse-style scripts fail with a single process)."""
    device = common.init_dist(cfg.device).device  # one process: no process group is created
    dtype, why = common.pick_dtype(device, cfg.dtype)
    print(f"umo evaluate on {device} | {why}")
    models = load_models(cfg, device, dtype)
    add_lora(cfg, models)
    sims, confs, per_sample = [], [], []
    for i, row in enumerate(load_rows(cfg)):
        sample = load_sample(cfg, row)
        image = generate_image(models, cfg, sample["prompt"], sample["refs"], common.step_generator(cfg.seed, i))
        s, c = id_scores(reference_embeddings(models, {**sample, "target": None}, "refs"),
                         face_embeddings(models, image)[0])
        sims += s
        confs += c
        per_sample.append({"prompt": sample["prompt"], "id_sim": s, "id_conf": c})
    scale = cfg.eval_scale
    result = {"id_sim": scale * sum(sims) / max(len(sims), 1), "id_conf": scale * sum(confs) / max(len(confs), 1),
              "id_sim_entries": len(sims), "id_conf_entries": len(confs), "scale": scale, "samples": per_sample}
    path = out_json or os.path.join(cfg.out_dir, "eval.json")
    common.save_json(path, result)
    print(f"ID-Sim {result['id_sim']:.2f} ({len(sims)} entries) | ID-Conf {result['id_conf']:.2f} "
          f"({len(confs)} entries) | written to {path}")
    return result

# -----------------------------------------------------------------------------
# inference


@torch.no_grad()
def generate_image(models: Models, cfg: Config, prompt: str, refs: list[torch.Tensor],
                   generator: torch.Generator) -> torch.Tensor:
    """UNO sampling: Euler over cfg.num_steps with distilled guidance -> (1, 3, H, W) in [-1, 1]."""
    cond = make_condition(models, [prompt], [refs], cfg.resolution, cfg.pe)
    x = sample_ode(models, cfg, cond, initial_noise(models, cfg, 1, generator), sigmas_for(models, cfg, cfg.num_steps))
    return common.vae_decode(models.vae, common.flux_unpack(x, *cond.grid))


def generate(cfg: Config, prompt: str, ref_paths: list[str], out_path: str) -> str:
    device = common.init_dist(cfg.device).device  # one process: no process group is created
    dtype, _ = common.pick_dtype(device, cfg.dtype)
    models = load_models(cfg, device, dtype)
    add_lora(cfg, models)
    if cfg.flux_dir is None:
        print("embedded default: a tiny random model draws from the toy identities; pass --flux-dir for real images")
        refs = [toy_identities(cfg.seed)[k % TOY_IDENTITIES] for k in range(max(1, len(ref_paths)))]
    else:
        refs = [prepare_reference(common.load_image(p), len(ref_paths), cfg.ref_long_side) for p in ref_paths]
    image = generate_image(models, cfg, prompt, refs, torch.Generator().manual_seed(cfg.seed))
    common.atomic_save(out_path, lambda tmp: common.tensor_to_pil(image[0]).save(tmp, format="PNG"))
    print(out_path)
    return out_path

# -----------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="UMO: multi-identity matching reward + ReReFL / Flow-GRPO on UNO-FLUX")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="run the RL loop (torchrun for several GPUs)")
    mode.add_argument("--evaluate", action="store_true", help="generate for --data and write ID-Sim / ID-Conf JSON")
    mode.add_argument("--generate", metavar="PROMPT", help="generate one image from a prompt and --ref images")
    parser.add_argument("--ref", action="append", default=[], help="reference image for --generate (repeatable)")
    parser.add_argument("--out", default=None, help="output path for --generate (PNG) or --evaluate (JSON)")
    common.add_config_args(parser, Config)
    args = parser.parse_args(argv)
    cfg = resolve_config(common.config_from_args(Config, args), common.given_fields(Config, parser, argv))
    if cfg.algorithm not in ("rerefl", "grpo"):
        parser.error(f"--algorithm must be rerefl or grpo, got {cfg.algorithm!r}")
    if args.train:
        train(cfg)
    elif args.evaluate:
        evaluate(cfg, args.out)
    else:
        generate(cfg, args.generate, args.ref, args.out or os.path.join(cfg.out_dir, "generated.png"))


if __name__ == "__main__":
    main()
