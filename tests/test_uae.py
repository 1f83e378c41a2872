"""uae.py: projector and conditioning (the demo's steps done by hand), caption log-probs re-scored vs sampled, first
ratios exactly 1 in both GRPO stages, strict loaders (UAE's llm_lora shard layout, a PEFT dit_lora folder, a real-mode
folder set built from tiny models), Unified-Bench against a naive loop, learning on the toy, resume, torchrun, CLI.

    python -m pytest -q tests/test_uae.py

The embedded toy is pre-trained once in code and cached under $NANOGENRL_CACHE (default ~/.cache/nanogenrl); the
first run of this file pays for it. Tests that only check wiring use --toy-pretrain-steps 0 --toy-caption-steps 0
(random tiny models, built in a second).
"""

import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import uae  # noqa: E402

RANDOM = ["--toy-pretrain-steps", "0", "--toy-caption-steps", "0"]
WIRING = RANDOM + ["--images-per-rank", "2", "--group-size", "2", "--num-steps", "3", "--max-caption-tokens", "4"]


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "uae.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def frozen(models):
    for m in (models.llm, models.projector, models.transformer, models.vae):
        m.eval().requires_grad_(False)
    return models


@pytest.fixture(scope="module")
def tiny():
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    return frozen(uae.toy_models())


def toy_pil(**attrs):
    base = {"size": "big", "color": "red", "background": "white"}
    return common.tensor_to_pil(uae.toy_image({**base, **attrs}))


# -- projector and conditioning ----------------------------------------------------------------


def test_projector_has_uae_dims_and_keys():
    with torch.device("meta"):
        p = uae.make_projector(2048, 4096)  # Qwen2.5-VL-3B hidden -> SD3.5 joint_attention_dim
    assert [tuple(t.shape) for t in p.state_dict().values()] == [(8192, 2048), (8192,), (4096, 8192), (4096,)]
    assert tuple("projector." + k for k in p.state_dict()) == uae.PROJECTOR_KEYS
    assert isinstance(p[1], torch.nn.GELU) and p[1].approximate == "none"
    assert abs(sum(t.numel() for t in p.parameters()) - 50.35e6) < 0.01e6  # reference/uae.md: about 50 M


def test_conditioning_follows_the_demo(tiny):
    prompt = "big red square on white"
    text = tiny.tokenizer.apply_chat_template([{"role": "generate", "content": [{"type": "text", "text": prompt}]}],
                                              chat_template=tiny.chat_template, tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>generate\n"
                    f"{prompt}<|im_end|>\n<|im_start|>assistant\n")
    # The demo by hand: pad_sequence([negative, positive]) with <|endoftext|>, mask = ne(pad), the full model with
    # output_hidden_states, hidden_states[-1], projector, chunk(2).
    neg = torch.tensor(tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(
        [{"role": "generate", "content": [{"type": "text", "text": uae.NEGATIVE_PROMPT}]}],
        chat_template=tiny.chat_template, tokenize=False, add_generation_prompt=True)))
    pos = torch.tensor(tiny.tokenizer.encode(text))
    ids = torch.nn.utils.rnn.pad_sequence([neg, pos], batch_first=True, padding_value=tiny.pad_id)
    assert len(pos) < len(neg) and (ids[1, len(pos):] == tiny.pad_id).all()  # the positive is right-padded
    with torch.no_grad():
        out = tiny.llm(input_ids=ids, attention_mask=ids.ne(tiny.pad_id), output_hidden_states=True,
                       position_ids=torch.arange(ids.shape[1]).expand(2, -1))
        expected_neg, expected_pos = tiny.projector(out.hidden_states[-1]).chunk(2)
        cond, pooled = uae.condition(tiny, [prompt])
    assert cond.shape == (2, ids.shape[1], 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(cond[:1], expected_neg, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond[1:], expected_pos, atol=1e-5, rtol=0)
    assert torch.equal(pooled[0], pooled[1]) and torch.equal(pooled[0], tiny.pooled[0])
    with torch.no_grad():  # a batch: [negative x B; positives], each row's tokens as when alone (causal, right pad)
        batch, _ = uae.condition(tiny, [prompt, "red square"])
        alone, _ = uae.condition(tiny, ["red square"])
    n = len(uae.generate_ids(tiny, "red square"))
    assert batch.shape[0] == 4 and torch.equal(batch[0], batch[1])
    torch.testing.assert_close(batch[3, :n], alone[1, :n], atol=1e-5, rtol=0)


def test_decoder_call_is_sd3_cfg(tiny):
    """velocity = u + w (c - u) from one DiT call on [x; x] with [negative; positive], timestep 1000 sigma."""
    with torch.no_grad():
        cond, pooled = uae.condition(tiny, ["small blue square"])
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        v = uae.velocity(tiny, x, 0.75, cond, pooled, 3.0)
        tf = tiny.transformer
        u = tf(hidden_states=x, timestep=torch.tensor([750.0]), encoder_hidden_states=cond[:1],
               pooled_projections=pooled[:1]).sample
        c = tf(hidden_states=x, timestep=torch.tensor([750.0]), encoder_hidden_states=cond[1:],
               pooled_projections=pooled[1:]).sample
    torch.testing.assert_close(v, u + 3.0 * (c - u), atol=1e-5, rtol=0)
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    torch.testing.assert_close(uae.sigmas_for(tiny, 10, 32), ref.sigmas.float())
    assert uae.latent_shape(tiny, 32) == (4, 16, 16)


# -- caption log-probs and ratios ------------------------------------------------------------------


def test_caption_logprobs_rescored_equal_sampled(tiny):
    """common.decode_tokens' static-cache path (the sampler) against re-scoring and a cache-free loop, with prompts
    of different lengths (a 112 px image brings 16 visual tokens, a 32 px one 4), so the shorter row is left-padded."""
    from transformers import Qwen2VLImageProcessorPil

    models = dataclasses.replace(tiny, image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56,
                                                                                max_pixels=112 * 112))
    images = [toy_pil().resize((112, 112)), toy_pil(color="blue", size="small")]
    inp = uae.caption_inputs(models, images)
    assert inp.grid.tolist() == [[1, 8, 8], [1, 4, 4]] and inp.mm.sum(1).tolist() == [16, 4]
    assert inp.mask[0].all() and not inp.mask[1, :12].any()  # row 1 is left-padded by 12
    tokens, logp = uae.sample_captions(models, inp, 6, 0.7, torch.Generator().manual_seed(3))
    valid = uae.caption_mask(models, tokens)
    assert tokens.shape[1] == int(valid.sum(1).max())  # trimmed to the longest caption
    with torch.no_grad():
        rescored = uae.caption_logprobs(models, inp, tokens, 0.7)
    torch.testing.assert_close(rescored[valid], logp[valid], atol=2e-5, rtol=0)
    assert (logp[~valid] == 0).all() and (tokens[~valid] == models.pad_id).all()
    # each row by hand: no cache, the whole sequence re-run for every token, the model's own position logic
    for i in range(2):
        row = inp.rows([i])
        keep = row.mask[0].bool()
        ids, mm = row.ids[:, keep], row.mm[:, keep]
        with torch.no_grad():
            for t in range(int(valid[i].sum())):
                logits = models.llm(input_ids=torch.cat([ids, tokens[i:i + 1, :t]], 1), pixel_values=row.pixel_values,
                                    image_grid_thw=row.grid,
                                    mm_token_type_ids=torch.cat([mm, mm.new_zeros(1, t)], 1)).logits[0, -1]
                logits[list(models.banned_ids)] = float("-inf")  # vision placeholders are never sampled
                expected = torch.log_softmax(logits / 0.7, -1)[tokens[i, t]]
                torch.testing.assert_close(logp[i, t], expected, atol=2e-5, rtol=0)


def with_random_lora(models, cfg):
    uae.add_llm_lora(models, cfg)
    uae.add_dit_lora(models, cfg)
    with torch.no_grad():
        for p in common.lora_parameters(models.lm) + common.lora_parameters(models.transformer):
            p.normal_(std=0.05)  # adapters that change the policy, so "adapters off" differs
    return models


def test_first_ratio_is_exactly_one_in_both_grpo_stages():
    torch.backends.mkldnn.enabled = False
    cfg = dataclasses.replace(uae.resolve_config(uae.Config(toy_pretrain_steps=0)), images_per_rank=2,
                              group_size=3, num_steps=4, max_caption_tokens=5, num_minibatches=2)
    models = with_random_lora(frozen(uae.toy_models()), cfg)
    embedders = uae.load_reward(cfg, torch.device("cpu"), toy=True)
    images = torch.stack([uae.toy_image(uae.toy_attributes(random.Random(i))) for i in range(2)])
    lora_before = [p.clone() for p in common.lora_parameters(models.lm)]
    batch = uae.encoder_rollout(models, cfg, embedders, images, torch.Generator().manual_seed(0))
    assert batch["rewards"].shape == (6,) and len(batch["texts"]) == 6
    adv = uae.group_advantages(batch["rewards"], 3, cfg.adv_clip)
    opt = torch.optim.AdamW(common.lora_parameters(models.lm), lr=1e-3)
    stats = uae.encoder_grpo_step(models, opt, cfg, batch, adv)
    assert stats["ratio0"] == 1.0 and stats["kl"] > 0 and stats["logp_gap"] < 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, common.lora_parameters(models.lm)))
    batch = uae.decoder_rollout(models, cfg, embedders, images, torch.Generator().manual_seed(1))
    assert batch["latents"].shape == (5, 6, 4, 16, 16) and batch["log_probs"].shape == (3, 6)
    assert batch["train_steps"] == [0, 1, 2]  # the toy's SDE window: 3 steps within the first half, here from 0
    adv = uae.group_advantages(batch["rewards"], 3, cfg.adv_clip)
    opt = torch.optim.AdamW(common.lora_parameters(models.transformer), lr=1e-3)
    stats = uae.decoder_grpo_step(models, opt, cfg, batch, adv)
    assert stats["ratio0"] == 1.0 and stats["kl"] > 0 and stats["logp_gap"] < 1e-4
    assert stats["skipped_updates"] == 0


def test_sde_window_steps():
    cfg = uae.Config(num_steps=10, timestep_fraction=0.99)
    assert uae.sde_steps(cfg, torch.Generator()) == range(9)  # Flow-GRPO: every step stochastic, 9 of 10 trained
    starts = {uae.sde_steps(dataclasses.replace(cfg, sde_window=3), torch.Generator().manual_seed(i)).start
              for i in range(40)}
    assert starts == {0, 1, 2}  # windows of 3 inside the first 5 (high-noise) steps
    models = frozen(uae.toy_models())
    cfg = dataclasses.replace(uae.resolve_config(uae.Config(toy_pretrain_steps=0)), num_steps=6, sde_window=2)
    with torch.no_grad():
        cond, pooled = uae.condition(models, ["red square"] * 2)
    noise = uae.initial_noise(models, 2, 32, torch.Generator().manual_seed(0))
    roll = uae.sde_rollout(models, cfg, cond, pooled, noise, torch.Generator().manual_seed(5))
    ode = uae.sde_rollout(models, dataclasses.replace(cfg, noise_level=0.0), cond, pooled, noise,
                          torch.Generator().manual_seed(5))
    first = roll["train_steps"][0]
    # before the window the trajectory is the ODE's, exactly; the window's steps add noise
    assert torch.equal(roll["latents"][:first + 1], ode["latents"][:first + 1])
    assert not torch.allclose(roll["latents"][first + 1], ode["latents"][first + 1])
    assert roll["log_probs"].shape == (2, 2)


def advantage_weighted_logp(models, cfg, batch, adv):
    """sum_i A_i sum_j log p(x_{j+1} | x_j) of the stored SDE transitions under the current DiT."""
    total = 0.0
    with torch.no_grad():
        for j in batch["train_steps"]:
            v = uae.velocity(models, batch["latents"][j], float(batch["sigmas"][j]), batch["cond"], batch["pooled"],
                             cfg.guidance)
            logp = common.sde_step_with_logprob(batch["latents"][j], v, float(batch["sigmas"][j]),
                                                float(batch["sigmas"][j + 1]), cfg.noise_level,
                                                prev_sample=batch["latents"][j + 1])[1]
            total += float((adv * logp).sum())
    return total


def test_decoder_update_raises_the_advantage_weighted_likelihood():
    """Stage 3's update moves the DiT towards the transitions with positive advantages (a flipped sign fails). The
    toy gives stage 3 nothing to learn (its decoder already redraws what a caption says), so this is the test
    that its Flow-GRPO step points the right way."""
    torch.backends.mkldnn.enabled = False
    cfg = dataclasses.replace(uae.resolve_config(uae.Config(toy_pretrain_steps=0)), images_per_rank=2,
                              group_size=4, num_steps=4, max_caption_tokens=4, beta_decoder=0.0)
    models = with_random_lora(frozen(uae.toy_models()), cfg)
    embedders = uae.load_reward(cfg, torch.device("cpu"), toy=True)
    images = torch.stack([uae.toy_image(uae.toy_attributes(random.Random(i))) for i in range(2)])
    batch = uae.decoder_rollout(models, cfg, embedders, images, torch.Generator().manual_seed(0))
    adv = uae.group_advantages(batch["rewards"], 4, cfg.adv_clip)
    before = advantage_weighted_logp(models, cfg, batch, adv)
    opt = torch.optim.AdamW(common.lora_parameters(models.transformer), lr=1e-4, weight_decay=0.0)
    uae.decoder_grpo_step(models, opt, cfg, batch, adv)
    assert advantage_weighted_logp(models, cfg, batch, adv) > before


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2])
    adv = uae.group_advantages(r, 3, 5.0)
    torch.testing.assert_close(adv[:3], ((r[:3] - r[:3].mean()) / (r[:3].std(unbiased=False) + 1e-4)).clamp(-5, 5))
    assert torch.equal(adv[3:], torch.zeros(3))
    assert uae.group_advantages(torch.tensor([0.0, 1e6]), 2, 5.0).abs().max() <= 5.0


# -- reward and Unified-Bench ---------------------------------------------------------------------


def test_reward_is_the_weighted_mean_of_cosines(tiny):
    embedders = uae.toy_embedders(torch.device("cpu"))
    a = torch.stack([uae.toy_image({"size": "big", "color": c, "background": "black"}) for c in ("red", "blue")])
    b = torch.stack([uae.toy_image({"size": "big", "color": "red", "background": "black"})] * 2)
    total, parts = uae.reward([(embedders[0], 1.0), (embedders[1], 3.0)], a, b)
    torch.testing.assert_close(total, (parts["clip"] + 3 * parts["dinov2"]) / 4)
    assert parts["clip"][0] > 0.9999 and parts["clip"][1] < parts["clip"][0]  # identical vs another colour
    # the tensor path reproduces the processor's PIL path (resize is the identity here; normalisation must agree)
    for e in embedders:
        pil = e.processor(images=[common.tensor_to_pil(a[1])], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(uae.tensor_pixels(e, a[1:]), pil, atol=1e-2, rtol=0)


def test_unified_bench_matches_a_naive_loop(tmp_path):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    colors = ["red", "green", "blue", "yellow"]
    for i, c in enumerate(colors):
        toy_pil(color=c).save(ref / f"{i}.jpg")
    toy_pil(color="red", size="small").save(gen / "0.jpg")  # same name
    toy_pil(color="blue").save(gen / "1.png")  # same stem
    toy_pil(color="green", background="black").save(gen / "recon_2.png")  # recon_ prefix
    (gen / "notes.txt").write_text("not an image")
    embedders = uae.toy_embedders(torch.device("cpu"))
    result = uae.unified_bench(str(ref), str(gen), embedders)
    pairs = {"0.jpg": gen / "0.jpg", "1.jpg": gen / "1.png", "2.jpg": gen / "recon_2.png"}
    averages = []
    for e in embedders:  # naive: one image at a time, processor and model separately
        sims = {}
        for name, g in pairs.items():
            feats = []
            for path in (ref / name, g):
                pixels = e.processor(images=[common.load_image(str(path))], return_tensors="pt")["pixel_values"]
                with torch.no_grad():
                    out = e.model.get_image_features(pixel_values=pixels) if e.kind == "clip" else \
                        e.model(pixel_values=pixels).last_hidden_state[:, 0]
                out = out if isinstance(out, torch.Tensor) else out.pooler_output
                feats.append(F.normalize(out, dim=-1)[0])
            sims[name] = float(feats[0] @ feats[1])
        got = result["similarities_by_model"][e.name]
        assert got["3.jpg"] is None and set(got) == {"0.jpg", "1.jpg", "2.jpg", "3.jpg"}
        for name, s in sims.items():
            assert abs(got[name] - s) < 1e-5
        stats = result["statistics_by_model"][e.name]
        assert stats["total_images"] == 4 and stats["valid_pairs"] == 3
        assert abs(stats["average_similarity"] - sum(sims.values()) / 3) < 1e-5
        assert abs(stats["min_similarity"] - min(sims.values())) < 1e-6
        assert abs(stats["max_similarity"] - max(sims.values())) < 1e-6
        averages.append(stats["average_similarity"])
    summary = result["summary"]
    assert result["model_types"] == summary["models_used"] == ["clip", "dinov2"]
    assert abs(summary["overall_average"] - sum(averages) / 2) < 1e-9
    assert abs(summary["unified_score"] - 100 * summary["overall_average"]) < 1e-9
    assert summary["best_model"][1] >= summary["worst_model"][1]


# -- strict loaders ------------------------------------------------------------------------------


def test_qwen_keys_of_uae_llm_lora_shards():
    k = uae.qwen_key
    assert k("model.base_model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == \
        "model.language_model.layers.3.self_attn.q_proj.lora_A.weight"
    assert k("model.base_model.model.layers.3.mlp.down_proj.base_layer.weight") == \
        "model.language_model.layers.3.mlp.down_proj.weight"
    assert k("model.base_model.model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert k("base_model.model.layers.0.self_attn.o_proj.lora_B.weight") == \
        "model.language_model.layers.0.self_attn.o_proj.lora_B.weight"  # a PEFT adapter file (ours)
    assert k("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert k("lm_head.weight") == "lm_head.weight" and k("projector.2.bias") == "projector.2.bias"
    assert k("model.language_model.norm.weight") == "model.language_model.norm.weight"


def uae_shards(models, folder):
    """Writes the tiny model + LoRA as UAE's llm_lora holds it: transformers-4.50 keys of `uae_model` whose `.model`
    is a PEFT model, split over 3 shards."""
    from safetensors.torch import save_file

    sd = {}
    for name, t in models.llm.state_dict().items():
        name = name.replace(".base.weight", ".base_layer.weight").replace(".base.bias", ".base_layer.bias")
        name = re.sub(r"\.lora_([AB])$", r".lora_\1.default.weight", name)
        if name.startswith("model.language_model."):
            name = "model.base_model.model." + name[len("model.language_model."):]
        elif name.startswith("model.visual."):
            name = name[len("model."):]
        sd[name] = t.clone()
    sd.update({f"projector.{k}": v for k, v in models.projector.state_dict().items()})
    keys = sorted(sd)
    os.makedirs(folder, exist_ok=True)
    for i in range(3):
        save_file({k: sd[k] for k in keys[i::3]}, os.path.join(folder, f"model-0000{i + 1}-of-00003.safetensors"))
    return sd


def test_llm_lora_loads_uae_shards_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = uae.Config(llm_lora_rank=4, llm_lora_alpha=8.0)
    source = frozen(uae.toy_models())
    uae.add_llm_lora(source, cfg)
    with torch.no_grad():
        for p in common.lora_parameters(source.lm):
            p.normal_(std=0.1)
        source.projector[0].bias.add_(1.0)
        source.llm.lm_head.weight.mul_(2.0)  # a base weight the shards carry
    folder = str(tmp_path / "llm_lora")
    sd = uae_shards(source, folder)
    assert any(".lora_A.default.weight" in k for k in sd) and any(".base_layer.weight" in k for k in sd)
    target = frozen(uae.toy_models())
    uae.add_llm_lora(target, dataclasses.replace(cfg, llm_lora=folder, llm_lora_rank=32))  # rank from the file
    for a, b in zip(common.lora_parameters(source.lm), common.lora_parameters(target.lm)):
        assert torch.equal(a, b)
    assert torch.equal(target.projector[0].bias, source.projector[0].bias)
    assert torch.equal(target.llm.lm_head.weight, source.llm.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(uae.condition(target, ["red square"])[0], uae.condition(source, ["red square"])[0])
    # a missing LoRA tensor and an unknown key are both refused, by name
    shard = os.path.join(folder, "model-00001-of-00003.safetensors")
    tensors = load_file(shard)
    dropped = next(k for k in tensors if ".lora_B.default." in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    with pytest.raises(ValueError, match="missing"):
        uae.add_llm_lora(frozen(uae.toy_models()), dataclasses.replace(cfg, llm_lora=folder))
    save_file({**tensors, "model.base_model.model.layers.0.mlp.extra.weight": torch.zeros(1)}, shard)
    with pytest.raises(ValueError, match="layers.0.mlp.extra.weight"):
        uae.add_llm_lora(frozen(uae.toy_models()), dataclasses.replace(cfg, llm_lora=folder))
    # our own export loads back (PEFT keys, rank/alpha in the metadata)
    ours = str(tmp_path / "llm_lora.safetensors")
    common.save_lora(source.lm, ours, prefix="base_model.model.")
    again = frozen(uae.toy_models())
    uae.add_llm_lora(again, uae.Config(llm_lora=ours))
    assert all(m.alpha == 8.0 and m.rank == 4 for m in common.lora_modules(again.lm).values())


def test_dit_lora_loads_a_peft_folder_strictly(tmp_path):
    from safetensors.torch import save_file

    models = frozen(uae.toy_models())
    folder = tmp_path / "dit_lora"
    folder.mkdir()
    targets = [n for n, m in models.transformer.named_modules() if isinstance(m, torch.nn.Linear)
               and n.endswith(("attn.to_q", "attn.to_v"))]
    sd = {}
    for n in targets:
        lin = models.transformer.get_submodule(n)
        sd[f"base_model.model.{n}.lora_A.weight"] = torch.randn(4, lin.in_features)
        sd[f"base_model.model.{n}.lora_B.weight"] = torch.randn(lin.out_features, 4)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2, "target_modules":
                                                            ["to_q", "to_v"]}))
    uae.add_dit_lora(models, uae.Config(dit_lora=str(folder)))
    modules = common.lora_modules(models.transformer)
    assert sorted(modules) == sorted(targets) and all(m.scale == 0.5 for m in modules.values())
    n = targets[0]
    torch.testing.assert_close(modules[n].delta_weight(), 0.5 * sd[f"base_model.model.{n}.lora_B.weight"]
                               @ sd[f"base_model.model.{n}.lora_A.weight"])
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2, "target_modules":
                                                            ["to_q", "to_v", "to_k"]}))
    with pytest.raises(ValueError, match="lacks LoRA weights"):
        uae.add_dit_lora(frozen(uae.toy_models()), uae.Config(dit_lora=str(folder)))


def real_folders(tmp_path, models):
    """UAE's folder set, written from the tiny models: llm (weights + projector keys), processor, SD3, pooled."""
    from safetensors.torch import load_file, save_file

    llm = tmp_path / "llm"
    models.llm.save_pretrained(str(llm))
    weights = str(llm / "model.safetensors")
    save_file({**load_file(weights), **{f"projector.{k}": v for k, v in models.projector.state_dict().items()}},
              weights, metadata={"format": "pt"})
    proc = tmp_path / "processor"
    models.tokenizer.save_pretrained(str(proc))
    models.image_processor.save_pretrained(str(proc))
    (proc / "chat_template.json").write_text(json.dumps({"chat_template": models.chat_template}))
    sd3 = tmp_path / "sd3"
    models.transformer.save_pretrained(str(sd3 / "transformer"))
    models.vae.save_pretrained(str(sd3 / "vae"))
    models.scheduler.save_pretrained(str(sd3 / "scheduler"))
    save_file({"pooled": models.pooled[0]}, str(tmp_path / "pooled.safetensors"))
    return uae.Config(qwen_dir=str(llm), processor_dir=str(proc), sd3_dir=str(sd3),
                      pooled=str(tmp_path / "pooled.safetensors"), device="cpu")


def test_real_mode_loads_local_folders_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    toy = frozen(uae.toy_models())
    cfg = real_folders(tmp_path, toy)
    models = uae.load_models(cfg, torch.device("cpu"), torch.float32)
    assert models.toy is None and models.stop_ids == tuple(sorted(toy.stop_ids))
    with torch.no_grad():
        torch.testing.assert_close(uae.condition(models, ["red square"])[0], uae.condition(toy, ["red square"])[0])
    inp = uae.caption_inputs(models, [toy_pil()])
    assert torch.equal(inp.ids, uae.caption_inputs(toy, [toy_pil()]).ids)
    weights = os.path.join(cfg.qwen_dir, "model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if k != "projector.2.bias"}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="projector.2.bias"):
        uae.load_models(cfg, torch.device("cpu"), torch.float32)
    with pytest.raises(FileNotFoundError, match="--sd3-dir"):
        uae.load_sd3(dataclasses.replace(cfg, sd3_dir=str(tmp_path / "nope")), torch.float32)
    with pytest.raises(FileNotFoundError, match="chat template|preprocessor_config"):
        uae.load_qwen(dataclasses.replace(cfg, processor_dir=str(tmp_path / "sd3")), torch.float32)


# -- end to end on the embedded default ---------------------------------------------------------------


def test_toy_pretraining_teaches_the_decoder_to_read_captions():
    """The embedded toy's in-code pre-training (cached) is a learning test of the decoder path: redrawn from the full
    caption, held-out images score far higher than redrawn from an empty caption or one that omits the background.
    (test_learning_on_the_toy: stage 2 on top of it.)"""
    cfg = uae.resolve_config(uae.Config(device="cpu"))
    models = uae.load_models(cfg, torch.device("cpu"), torch.float32)
    assert models.toy == "pre-trained"
    embedders = uae.load_reward(cfg, torch.device("cpu"), toy=True)
    attrs, images = uae.toy_batch(random.Random("held-out"), 24)
    noise = uae.initial_noise(models, 24, 32, torch.Generator().manual_seed(0))
    scores = {}
    for keep in ((True, True, True), (True, True, False), (False, False, False)):
        with torch.no_grad():
            cond, pooled = uae.condition(models, [uae.toy_caption(a, keep) for a in attrs])
            recon = uae.sample_images(models, cond, pooled, noise, cfg.num_steps, cfg.guidance)
        scores[keep] = float(uae.reward(embedders, images, recon)[0].mean())
    full, no_background, empty = scores.values()
    assert full > 0.9 and full > max(no_background, empty) + 0.05, scores


def test_learning_on_the_toy(tmp_path):
    """Stage 2 (GRPO on captions) on the pre-trained toy, against the same run without updates (same images, same
    noise at the first step): the reconstruction reward of the learning run pulls ahead."""
    rows = {}
    for lr in ("0", "1e-3"):
        out = str(tmp_path / f"lr{lr}")
        run("--train", "--out-dir", out, "--stages", "2", "--stage-steps", "20", "--lr-encoder", lr,
            "--sample-every", "1000", "--save-every", "1000")
        rows[lr] = metrics(out)
    late = lambda rs: sum(r["reward"] for r in rs[10:]) / len(rs[10:])
    assert late(rows["1e-3"]) > late(rows["0"]) + 0.02, {k: [round(r["reward"], 3) for r in v] for k, v in rows.items()}
    assert rows["1e-3"][0]["reward"] == rows["0"][0]["reward"]  # the same first rollout: a paired comparison
    assert all(r["ratio0"] == 1.0 and r["stage"] == 2 for r in rows["1e-3"])


def test_cold_start_lowers_its_loss_on_the_toy(tmp_path):
    """Stage 1 (the decoder learns to redraw images from the encoder's captions) against the same run without
    updates: the same images, captions and noise at every step, so each step's flow-matching loss (on images not
    yet trained on) is a paired measurement. Measured: steps 5-20 at 0.82 of the no-update run's loss."""
    losses = {}
    for lr in (0.0, 1e-3):
        out = str(tmp_path / f"lr{lr}")
        cfg = uae.resolve_config(uae.Config(stages=(1,), stage_steps=(20,), lr_cold=lr, out_dir=out, device="cpu",
                                            sample_every=1000, save_every=1000))
        uae.train(cfg)
        losses[lr] = [r["loss"] for r in metrics(out)]
    assert losses[0.0][0] == losses[1e-3][0]  # the first step's loss comes before any update
    assert sum(losses[1e-3][4:]) < 0.92 * sum(losses[0.0][4:]), losses


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    stages = ["--stages", "1", "2", "3", "--stage-steps", "1", "2", "1"]
    run("--train", "--out-dir", a, *stages[:5], "1", "1", "0", *WIRING)  # stops after step 2 (stage 2)
    run("--train", "--out-dir", a, "--resume", *stages, *WIRING)
    run("--train", "--out-dir", b, *stages, *WIRING)
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4] and [r["stage"] for r in ra] == [1, 2, 2, 3]
    for key in ("reward", "loss", "caption_len"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    for name in ("llm_lora.safetensors", "dit_lora.safetensors", "projector.safetensors", "samples/step_000001.png"):
        assert os.path.exists(os.path.join(b, name)), name


def test_torchrun_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "uae.py"), "--train", "--out-dir", out, "--stages", "2", "3",
                           "--stage-steps", "1", "1", "--device", "cpu", *WIRING], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step 1/2") == 1  # rank 0 logs
    assert len(metrics(out)) == 2
    assert len(torch.load(os.path.join(out, "checkpoint", "latest.pt"), weights_only=False)["rng"]) == 2


def test_cli_caption_generate_reconstruct_evaluate(tmp_path):
    from PIL import Image

    image = str(tmp_path / "in.png")
    toy_pil(color="green").save(image)
    out = run("--caption", image, *RANDOM)
    assert "tiny random captioner" in out and out.strip().splitlines()[-1].strip()  # the note, then the caption
    run("--generate", "big red square on white", "--out-dir", str(tmp_path), *RANDOM)
    assert Image.open(tmp_path / "generate.png").size == (32, 32)
    out = run("--reconstruct", image, "--out-dir", str(tmp_path), *RANDOM)
    assert "caption:" in out and "similarity: clip" in out
    assert Image.open(tmp_path / "reconstruct.png").size == (64, 32)
    run("--evaluate", "--out-dir", str(tmp_path), *RANDOM)
    result = json.load(open(tmp_path / "unified_bench.json"))
    assert result["statistics_by_model"]["clip"]["valid_pairs"] == 16
    with pytest.raises(AssertionError, match="image not found"):
        run("--caption", str(tmp_path / "missing.png"), *RANDOM)


def test_help_lists_every_flag_with_its_comment(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        uae.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--train", "--evaluate", "--score", "--caption", "--generate", "--reconstruct"):
        assert flag in text
    comments = common._field_comments(uae.Config)
    for field in dataclasses.fields(uae.Config):
        assert "--" + field.name.replace("_", "-") in text
        assert comments.get(field.name) and " ".join(comments[field.name].split()) in text, field.name


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="--stages"):
        uae.train(uae.Config(stages=(1, 2), stage_steps=(1,), toy_pretrain_steps=0, toy_caption_steps=0,
                             out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="prompt is empty"):
        uae.generate(frozen(uae.toy_models()), uae.resolve_config(uae.Config()), "  ", torch.Generator())
    with pytest.raises(FileNotFoundError, match="--clip-dir"):
        uae.load_reward(uae.Config(qwen_dir="x"), torch.device("cpu"), toy=False)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        uae.bench_files(str(tmp_path / "no_such_dir"))
