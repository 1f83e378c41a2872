"""unicharacter.py: the BAGEL key layout at tiny dims, strict loading, MoT routing against a per-token reference,
cached vs uncached generation, CFG renorm, the SFT loss weighting, the reward terms, the first on-policy ratio,
learning on the toy, resume, torchrun (2 CPU processes, LoRA with gradient averaging and FSDP), the API and CLI.

    python -m pytest -q tests/test_unicharacter.py

The embedded toy (VAE fit + Unified-SFT on the synthetic character) is built once and cached under $NANOGENRL_CACHE
(default ~/.cache/nanogenrl); the first run of this file pays for it.
"""

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import unicharacter as U  # noqa: E402

TINY = U.Arch(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=50, vit_hidden=16,
              vit_intermediate=24, vit_layers=1, vit_heads=2, vit_patch=4, vit_max_side=5, vae_downsample=2,
              max_latent_size=6)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread per process is faster on shared cores


def run(*args, timeout=900):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "unicharacter.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs of the tiny models use one thread (restored after this file)."""
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


@pytest.fixture(scope="module")
def toy():
    """The random (not pre-trained) toy: enough for the math tests."""
    torch.backends.mkldnn.enabled = False
    models = U.toy_models(U.character_folder(U.Config()))
    models.model.eval().requires_grad_(False)
    return models


# -- model: key layout, loading, routing ---------------------------------------------------------------


def bagel_layout(a: U.Arch) -> dict:
    """BAGEL-7B-MoT's ema.safetensors names (ByteDance-Seed/Bagel modeling/bagel/*.py, after the ViT's conv is
    converted to a Linear and its last layer dropped) with the shapes they take at the sizes of `a`."""
    hd, h, v = a.hidden // a.heads, a.hidden, a.vit_hidden
    out = {"language_model.model.embed_tokens.weight": (a.vocab, h), "language_model.lm_head.weight": (a.vocab, h),
           "language_model.model.norm.weight": (h,), "language_model.model.norm_moe_gen.weight": (h,),
           "time_embedder.mlp.0.weight": (h, 256), "time_embedder.mlp.0.bias": (h,),
           "time_embedder.mlp.2.weight": (h, h), "time_embedder.mlp.2.bias": (h,),
           "vae2llm.weight": (h, 64), "vae2llm.bias": (h,), "llm2vae.weight": (64, h), "llm2vae.bias": (64,),
           "latent_pos_embed.pos_embed": (a.max_latent_size ** 2, h), "vit_pos_embed.pos_embed": (a.vit_max_side ** 2, h),
           "connector.fc1.weight": (h, v), "connector.fc1.bias": (h,), "connector.fc2.weight": (h, h),
           "connector.fc2.bias": (h,),
           "vit_model.vision_model.embeddings.patch_embedding.weight": (v, 3 * a.vit_patch ** 2),
           "vit_model.vision_model.embeddings.patch_embedding.bias": (v,),
           "vit_model.vision_model.embeddings.position_embedding.weight": (a.vit_max_side ** 2, v),
           "vit_model.vision_model.post_layernorm.weight": (v,), "vit_model.vision_model.post_layernorm.bias": (v,)}
    for i in range(a.layers):
        p = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            out.update({p + f"self_attn.q_proj{s}.weight": (a.heads * hd, h), p + f"self_attn.q_proj{s}.bias": (a.heads * hd,),
                        p + f"self_attn.k_proj{s}.weight": (a.kv_heads * hd, h), p + f"self_attn.k_proj{s}.bias": (a.kv_heads * hd,),
                        p + f"self_attn.v_proj{s}.weight": (a.kv_heads * hd, h), p + f"self_attn.v_proj{s}.bias": (a.kv_heads * hd,),
                        p + f"self_attn.o_proj{s}.weight": (h, a.heads * hd), p + f"self_attn.q_norm{s}.weight": (hd,),
                        p + f"self_attn.k_norm{s}.weight": (hd,), p + f"input_layernorm{s}.weight": (h,),
                        p + f"post_attention_layernorm{s}.weight": (h,)})
            m = "mlp" + s
            out.update({p + f"{m}.gate_proj.weight": (a.intermediate, h), p + f"{m}.up_proj.weight": (a.intermediate, h),
                        p + f"{m}.down_proj.weight": (h, a.intermediate)})
    for i in range(a.vit_layers):
        p = f"vit_model.vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.update({p + f"self_attn.{n}.weight": (v, v), p + f"self_attn.{n}.bias": (v,)})
        out.update({p + "layer_norm1.weight": (v,), p + "layer_norm1.bias": (v,), p + "layer_norm2.weight": (v,),
                    p + "layer_norm2.bias": (v,), p + "mlp.fc1.weight": (a.vit_intermediate, v),
                    p + "mlp.fc1.bias": (a.vit_intermediate,), p + "mlp.fc2.weight": (v, a.vit_intermediate),
                    p + "mlp.fc2.bias": (v,)})
    return out


def test_key_layout_matches_bagel_names_and_shapes():
    got = {k: tuple(v.shape) for k, v in U.Bagel(TINY).state_dict().items()}
    assert got == bagel_layout(TINY)


def write_fake_bagel(folder, a: U.Arch, sd: dict):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    llm = dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
               num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab, rms_norm_eps=1e-6,
               rope_theta=1e6)
    vit = dict(hidden_size=a.vit_hidden, intermediate_size=a.vit_intermediate, num_hidden_layers=a.vit_layers + 1,
               num_attention_heads=a.vit_heads, patch_size=a.vit_patch, image_size=a.vit_patch * a.vit_max_side)
    for name, obj in (("llm_config.json", llm), ("vit_config.json", vit)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "ema.safetensors"))


def test_strict_loader_reads_configs_and_names_bad_keys(tmp_path):
    torch.manual_seed(0)
    arch = dataclasses.replace(TINY, max_latent_size=64)  # BAGEL-7B-MoT's value, set in code (not in the configs)
    source = U.Bagel(arch)
    folder = str(tmp_path / "bagel")
    write_fake_bagel(folder, arch, source.state_dict())
    arch = U.read_arch(folder)
    assert (arch.hidden, arch.layers, arch.kv_heads, arch.vit_layers, arch.vit_max_side) == (32, 2, 2, 1, 5)
    with torch.device("meta"):
        model = U.Bagel(arch)
    U.load_bagel_weights(model, folder, None, torch.float32)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a generation-expert checkpoint over ema: loads; an unknown or mis-shaped key: named
    from safetensors.torch import save_file
    expert = {k: torch.full_like(v, 0.5) for k, v in source.state_dict().items() if "moe_gen" in k}
    save_file(expert, str(tmp_path / "gen_expert.safetensors"))
    with torch.device("meta"):
        model = U.Bagel(arch)
    U.load_bagel_weights(model, folder, str(tmp_path / "gen_expert.safetensors"), torch.float32)
    assert torch.equal(model.language_model.model.layers[1].mlp_moe_gen.up_proj.weight,
                       torch.full((48, 32), 0.5))
    assert torch.equal(model.language_model.model.layers[1].mlp.up_proj.weight,
                       source.language_model.model.layers[1].mlp.up_proj.weight)
    bad = dict(source.state_dict())
    bad.pop("language_model.model.layers.1.self_attn.q_norm_moe_gen.weight")
    bad["vit_model.vision_model.head.probe"] = torch.zeros(1, 1, 16)
    bad["llm2vae.weight"] = torch.zeros(64, 31)
    write_fake_bagel(folder, arch, bad)
    with torch.device("meta"):
        model = U.Bagel(arch)
    with pytest.raises(ValueError) as e:
        U.load_bagel_weights(model, folder, None, torch.float32)
    for part in ("q_norm_moe_gen", "missing (1)", "head.probe", "unexpected (1)", "llm2vae.weight: file (64, 31)"):
        assert part in str(e.value)


def test_real_path_names_missing_files(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        U.load_bagel(str(folder), None, torch.float32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        U.load_bagel(str(tmp_path / "nowhere"), None, torch.float32)


def naive_layer(layer, x, gen, mask, pos, theta):
    """A MoT decoder layer computed per token: both experts on every token, each token keeping its own expert's
    result (torch.where), attention written out with explicit KV-head repetition and softmax."""
    a_, b_ = gen
    is_gen = torch.zeros(x.shape[1], dtype=torch.bool)
    is_gen[a_:b_] = True
    pick = lambda und, gen_: torch.where(is_gen[None, :, None], gen_, und)
    at = layer.self_attn
    h = pick(layer.input_layernorm(x), layer.input_layernorm_moe_gen(x))
    qkv = pick(at.qkv(h, ""), at.qkv(h, "_moe_gen"))
    hd = at.head_dim
    q, k, v = qkv.split([at.heads * hd, at.kv_heads * hd, at.kv_heads * hd], -1)
    b, n = x.shape[:2]
    q, k, v = (t.view(b, n, -1, hd).transpose(1, 2) for t in (q, k, v))
    cos, sin = U.rope(pos, hd, theta, x.dtype)
    q, k = U.rotate(q, cos, sin), U.rotate(k, cos, sin)
    rep = at.heads // at.kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    x = x + pick(at.o_proj(out), at.o_proj_moe_gen(out))
    return x + pick(layer.mlp(layer.post_attention_layernorm(x)),
                    layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(x)))


def test_mot_routes_each_token_to_its_expert():
    torch.manual_seed(0)
    model = U.Bagel(TINY).eval()
    layer = model.language_model.model.layers[0]
    for p in layer.parameters():  # random norms too, so a wrong expert's norm would show
        p.data.normal_(std=0.3)
    x, pos = torch.randn(2, 9, 32), torch.arange(9).repeat(2, 1)
    valid = torch.ones(2, 9, dtype=torch.bool)
    group = torch.tensor([-1] * 4 + [0] * 5).repeat(2, 1)
    mask = U.attention_mask(valid, group)
    seen = {}
    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].shape[1]  # tokens this module saw
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in layer.named_modules() if name.endswith(("q_proj", "q_proj_moe_gen", "mlp", "mlp_moe_gen"))]
    with torch.no_grad():
        out, _ = layer(x, *U.rope(pos, 8, 1e6, x.dtype), (5, 8), None, mask)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        ref = naive_layer(layer, x, (5, 8), mask, pos, 1e6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert seen == {"self_attn.q_proj": 6, "self_attn.q_proj_moe_gen": 3, "mlp": 6, "mlp_moe_gen": 3}
    # understanding-only sequences never touch the generation expert
    with torch.no_grad():
        und, _ = model.language_model.model(x, pos, mask)
        for n, p in model.named_parameters():
            if "moe_gen" in n:
                p.add_(1.0)
        assert torch.equal(und, model.language_model.model(x, pos, mask)[0])


def test_patchify_is_bagels_channel_last_order_and_inverts():
    z = torch.randn(2, 16, 6, 4)
    tokens = U.patchify(z, 2)
    assert tokens.shape == (2, 6, 64)
    # token (row 1, col 0) holds z[:, :, 2:4, 0:2] laid out as (p, q, c): channels fastest
    torch.testing.assert_close(tokens[0, 2].view(2, 2, 16), z[0, :, 2:4, 0:2].permute(1, 2, 0))
    assert torch.equal(U.unpatchify(tokens, 3, 2, 2), z)


# -- generation ----------------------------------------------------------------------------------------


def test_cached_and_uncached_generation_give_the_same_latents(toy):
    prompts = ["Bo on a blue background on the left", "Bo on a grey background"]
    cfg = U.resolve_config(U.Config())
    noise = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    out = []
    for cached in (True, False):
        prefix = U.encode_prefix(toy, prompts, cached=cached)
        out.append(U.sample_latents(toy, prefix, noise, (4, 4), cfg, 8, (0.0, 1.0), range(1, 4),
                                    torch.Generator().manual_seed(1)))
    (a, b) = out
    assert a.x_t.shape == (2, 3, 16, 64) and a.logp.shape == (2, 3)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a.latents, noise)


def test_cfg_with_global_renorm_and_interval(toy):
    prefix = U.encode_prefix(toy, ["Bo on a green background on the right"] * 2)
    pair = prefix.cfg_pair()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        v_c = U.latent_forward(toy, prefix, x, torch.full((2,), 0.6), (4, 4)).float()
        empty = U.Prefix(prefix.emb, prefix.pos, torch.zeros_like(prefix.valid), prefix.next_pos, prefix.cache)
        v_u = U.latent_forward(toy, empty, x, torch.full((2,), 0.6), (4, 4)).float()
        v = U.guided_velocity(toy, pair, x, 0.6, (4, 4), 4.0, 0.0)
        raw = v_u + 4.0 * (v_c - v_u)
        scale = (v_c[0].norm() / raw[0].norm()).clamp(0.0, 1.0)  # per sample, over all its tokens
        torch.testing.assert_close(v[0], raw[0] * scale, atol=1e-5, rtol=1e-5)
        assert torch.all(v.flatten(1).norm(dim=1) <= v_c.flatten(1).norm(dim=1) + 1e-4)
        torch.testing.assert_close(U.guided_velocity(toy, pair, x, 0.6, (4, 4), 1.0, 0.0), v_c)
    ts = U.bagel_timesteps(15, 3.0)
    assert len(ts) == 15 and ts[0] == 1.0 and ts[-1] == 0.0
    assert abs(ts[7] - 3 * 0.5 / (1 + 2 * 0.5)) < 1e-12


def test_text_generation_matches_an_uncached_greedy_loop(toy):
    texts = U.generate_text(toy, [None, None], ["Hi", "What color is Bo?"], 6)
    model, lm = toy.model, toy.model.language_model
    for prompt, text in zip(["Hi", "What color is Bo?"], texts):
        ids = toy.text_ids(prompt) + [toy.ids["bos"]]
        out = []
        for _ in range(6):  # re-run the whole sequence for every token
            n = len(ids)
            pos = torch.arange(n)[None]
            mask = U.attention_mask(torch.ones(1, n, dtype=torch.bool), torch.full((1, n), -1))
            token = int(lm.lm_head(lm.model(model.embed(torch.tensor([ids])), pos, mask)[0][0, -1]).argmax())
            if token == toy.ids["eos"]:
                break
            out.append(token)
            ids.append(token)
        assert text == toy.tokenizer.decode(out, skip_special_tokens=True).strip()


# -- Unified-SFT -------------------------------------------------------------------------------------------


def test_sft_loss_weights_ce_and_mse_and_needs_both_kinds(toy):
    data = U.load_character(toy, U.character_folder(U.Config()), 16)
    t2i, text = data.t2i[:3], data.text[:2] + data.text[-2:]  # role-play rows and VQA rows with images
    assert text[-1][0] is not None and text[0][0] is None
    parts = []
    for ce_w, mse_w in ((0.25, 1.0), (1.0, 0.5)):
        cfg = U.Config(ce_weight=ce_w, mse_weight=mse_w)
        with torch.no_grad():
            out = U.sft_loss(toy, cfg, t2i, text, data.latent_grid, torch.Generator().manual_seed(3))
        torch.testing.assert_close(out["loss"], ce_w * out["ce"] + mse_w * out["mse"])
        parts.append(out)
    assert torch.equal(parts[0]["ce"], parts[1]["ce"]) and torch.equal(parts[0]["mse"], parts[1]["mse"])
    # CE = mean over the reply tokens (and <|im_end|>) only, checked row by row without padding
    with torch.no_grad():
        nll, count = 0.0, 0
        for pix, prompt, reply in text:
            segs = [] if pix is None else [("image", toy.model.vit_embeds(pix[None])[0])]
            segs += [("text", toy.text_ids(prompt), False), ("text", toy.text_ids(reply), True)]
            emb, pos, mask, ids, _, _, _ = U.pack(toy, [segs])
            logits = toy.model.language_model.lm_head(toy.model.language_model.model(emb, pos, mask)[0])[0]
            reply_ids = toy.text_ids(reply)[1:]  # predicted: the reply and its <|im_end|>
            n = len(reply_ids)
            nll += torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(reply_ids), reduction="sum")
            count += n
        torch.testing.assert_close(parts[0]["ce"], nll / count, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both kinds"):
        U.sft_loss(toy, U.Config(), t2i, [], data.latent_grid)


def test_sft_stage_runs_and_its_weights_load_with_checkpoint(tmp_path):
    out = str(tmp_path / "sft")
    U.main(["--train", "--stage", "sft", "--out-dir", out, "--max-steps", "3"])
    rows = metrics(out)
    assert len(rows) == 3 and all(r["ce"] > 0 and r["mse"] > 0 for r in rows)
    U.main(["--generate", "Bo on a blue background on the left", "--checkpoint", os.path.join(out, "model.safetensors"),
            "--group-size", "2", "--eval-num-timesteps", "4", "--out-dir", out])
    assert sorted(os.listdir(os.path.join(out, "generate"))) == ["00.png", "01.png"]


def test_sft_ema_is_the_decayed_average_in_bagels_layout(tmp_path):
    """One step with decay 0.5: ema.safetensors = 0.5 (weights before) + 0.5 (weights after) for every trained
    weight, the frozen position tables as they are; the keys are BAGEL's (the file loads like its ema.safetensors)."""
    from safetensors.torch import load_file

    out = str(tmp_path / "sft")
    U.main(["--train", "--stage", "sft", "--out-dir", out, "--max-steps", "1", "--ema-decay", "0.5"])
    cfg = U.resolve_config(U.Config())
    before = U.load_models(cfg, torch.device("cpu"), torch.float32).model.state_dict()
    after, ema = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(out, "ema.safetensors"))
    assert set(ema) == set(after) == set(before)
    assert {k: tuple(v.shape) for k, v in ema.items()} == bagel_layout(U.toy_arch(len(before[
        "language_model.model.embed_tokens.weight"])))
    for k in ema:
        torch.testing.assert_close(ema[k], 0.5 * before[k] + 0.5 * after[k], atol=1e-7, rtol=1e-6, msg=k)
    assert not torch.equal(after["vae2llm.weight"], before["vae2llm.weight"])
    with pytest.raises(ValueError, match="ema-decay"):
        U.check_config(U.Config(ema_decay=1.5), common.Dist(0, 0, 1, torch.device("cpu")))


# -- reward and advantages ---------------------------------------------------------------------------


def test_reward_terms_on_hand_made_values():
    qs = [dict(question="a", answer="yes", weight=1.0), dict(question="b", answer="Shiba Inu", weight=0.6),
          dict(question="c", answer="no", weight=0.6, is_negative=True)]
    assert U.vqa_score(["Yes", "shiba inu", "yes"], qs, "p") == pytest.approx(1.6 / 2.2)  # strict, lower-cased
    assert U.vqa_score(["yes, it shows Bo"], [], "p") == 1.0
    assert U.vqa_score(["no"], [], "p") == 0.0 and U.vqa_score(["maybe"], [], "p") == 0.5
    sim = torch.tensor([0.95, 0.9, 0.7, 0.5, 0.3])
    torch.testing.assert_close(U.dino_penalty(sim, 0.9, 0.5), torch.tensor([-0.1, 0.0, 0.0, 0.0, -0.4]))
    feats = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    div = U.leave_one_out_diversity(feats, 3)
    for i in range(6):
        g = i // 3 * 3
        others = [j for j in range(g, g + 3) if j != i]
        torch.testing.assert_close(div[i], sum(1 - feats[i] @ feats[j] for j in others) / 2)
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = U.group_advantages(r, 4)
    torch.testing.assert_close(adv[:4], (r[:4] - r[:4].mean()) / (r[:4].std(unbiased=False) + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))


def write_lpips_files(folder, seed=0):
    """Random LPIPS weights saved under the real files' key names: torchvision's AlexNet state dict (with a
    classifier entry, which the loader ignores) and lpips' v0.1 heads lin{i}.model.1.weight (1, C, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    alex = {}
    for k, (i, o, kk, _, _) in U.LPIPS_CONVS.items():
        alex[f"features.{k}.weight"] = torch.randn(o, i, kk, kk, generator=g) * (2 / (i * kk * kk)) ** 0.5
        alex[f"features.{k}.bias"] = torch.randn(o, generator=g) * 0.1
    alex["classifier.1.weight"] = torch.zeros(4, 4)
    lins = {f"lin{n}.model.1.weight": torch.rand(1, c[1], 1, 1, generator=g)
            for n, c in enumerate(U.LPIPS_CONVS.values())}
    paths = str(folder / "alexnet.pth"), str(folder / "alex_lin.pth")
    torch.save(alex, paths[0])
    torch.save(lins, paths[1])
    return paths


def naive_lpips(alex: dict, lins: dict, a: torch.Tensor, b: torch.Tensor) -> float:
    """LPIPS of one pair written out from the file weights: scaling layer, AlexNet with its ReLU taps, each tap
    divided by its channel norm, squared difference, 1 x 1 conv with the head, mean over positions, sum."""
    F = torch.nn.functional
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    def taps(x):
        x = (x[None] - shift) / scale
        out = []
        for k, (_, _, _, s, p) in U.LPIPS_CONVS.items():
            if k in ("3", "6"):
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = torch.relu(F.conv2d(x, alex[f"features.{k}.weight"], alex[f"features.{k}.bias"], stride=s, padding=p))
            out.append(x)
        return out
    total = 0.0
    for n, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        na = fa / (torch.sqrt((fa ** 2).sum(1, keepdim=True)) + 1e-10)
        nb = fb / (torch.sqrt((fb ** 2).sum(1, keepdim=True)) + 1e-10)
        total += float(F.conv2d((na - nb) ** 2, lins[f"lin{n}.model.1.weight"]).mean())
    return total


def test_lpips_matches_the_formula_and_loads_the_real_key_names(tmp_path):
    paths = write_lpips_files(tmp_path)
    net = U.load_lpips(*paths)
    alex, lins = (torch.load(p, weights_only=True) for p in paths)
    x = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        d = net.pairwise(x)
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(float(d[i, j]), naive_lpips(alex, lins, x[i], x[j]) if i != j else 0.0,
                                       atol=1e-5, rtol=1e-4)
    assert float(d[0, 1]) > 0
    div = U.lpips_diversity(net, x, 2)
    torch.testing.assert_close(div, torch.stack([d[0, 1], d[1, 0], d[2, 3], d[3, 2]]))
    lins.pop("lin4.model.1.weight")
    lins["lin5.model.1.weight"] = torch.zeros(1, 8, 1, 1)
    torch.save(lins, paths[1])
    with pytest.raises(ValueError, match=r"missing \(1\): lin4.model.1.weight; unexpected \(1\): lin5"):
        U.load_lpips(*paths)
    alex["features.8.weight"] = torch.zeros(256, 384, 5, 5)
    torch.save(alex, paths[0])
    with pytest.raises(ValueError, match=r"features.8.weight: file \(256, 384, 5, 5\)"):
        U.load_lpips(*paths)
    with pytest.raises(ValueError, match="at least 32 px"):
        net.pairwise(torch.zeros(2, 3, 16, 16))


def test_real_scorer_runs_with_transformers_classes(tmp_path):
    """The real reward path (BLIP-VQA, CLIP, DINOv2 through transformers, loaded from local folders) on tiny random
    models saved to disk: checks the wiring and the output format, not accuracy."""
    from PIL import Image
    from transformers import (BertTokenizer, BitImageProcessorPil, BlipConfig, BlipForQuestionAnswering,
                              BlipImageProcessorPil, BlipProcessor, CLIPConfig, CLIPImageProcessorPil, CLIPModel,
                              CLIPProcessor, CLIPTokenizer, Dinov2Config, Dinov2Model)

    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "bert.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "is",
                                                  "the", "background", "blue", "?"]))
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(small, image_size=32, patch_size=16)
    torch.manual_seed(0)
    vqa, clip, dino = (str(tmp_path / n) for n in ("vqa", "clip", "dino"))
    BlipForQuestionAnswering(BlipConfig(text_config=dict(small, vocab_size=12, max_position_embeddings=64, pad_token_id=0,
                                                          bos_token_id=2, eos_token_id=3, sep_token_id=3),
                                        vision_config=vision, projection_dim=32)).save_pretrained(vqa)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  BertTokenizer(str(tmp_path / "bert.txt"))).save_pretrained(vqa)
    CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=100, max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1), vision_config=vision,
                         projection_dim=32)).save_pretrained(clip)
    CLIPProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))).save_pretrained(clip)
    Dinov2Model(Dinov2Config(**small, image_size=32, patch_size=16)).save_pretrained(dino)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dino)
    alexnet, lin = write_lpips_files(tmp_path)
    cfg = U.Config(vqa_dir=vqa, clip_dir=clip, dino_dir=dino, lpips_alexnet=alexnet, lpips_lin=lin)
    scorer = U.Scorer(cfg, torch.device("cpu"), toy=False)
    assert scorer.lpips is not None
    images = [Image.new("RGB", (40, 40), c) for c in ((200, 10, 10), (10, 10, 200), (10, 200, 10), (90, 90, 90))]
    metas = [dict(prompt="Bo on a blue background", vqa_questions=U.toy_questions("blue", "left"))] * 2
    metas += [dict(prompt="Bo on a green background")] * 2  # no questions: the yes/no fallback
    refs = scorer.features(images[:2])
    out = U.character_reward(scorer, images, metas, refs, cfg, group_size=2)
    assert set(out) == {"reward", "r_vqa", "r_clip", "r_div", "p_dino", "dino_sim"}
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in out.values())
    assert torch.all((out["r_vqa"] >= 0) & (out["r_vqa"] <= 1)) and torch.all(out["p_dino"] <= 0)
    torch.testing.assert_close(out["reward"], 0.3 * out["r_vqa"] + 0.45 * out["r_clip"] + 0.1 * out["r_div"]
                               + 0.15 * out["p_dino"])
    pixels = torch.stack([common.pil_to_tensor(im) for im in images])
    torch.testing.assert_close(out["r_div"], U.lpips_diversity(scorer.lpips, pixels, 2))
    with pytest.raises(ValueError, match="--lpips-lin"):
        U.Scorer(U.Config(lpips_alexnet=alexnet), torch.device("cpu"), toy=True)
    with pytest.raises(FileNotFoundError, match="--dino-dir"):
        U.Scorer(U.Config(vqa_dir=vqa, clip_dir=clip), torch.device("cpu"), toy=False)


def test_toy_stand_ins_read_the_pictures():
    rng = random.Random(0)
    img = U.toy_picture("green", "right", rng)
    assert U.toy_vqa(img, "Is the background green?") == "yes"
    assert U.toy_vqa(img, "Is the background blue?") == "no"
    assert U.toy_vqa(img, "Is Bo on the right?") == "yes" and U.toy_vqa(img, "Is Bo on the left?") == "no"
    assert U.toy_clip(img, U.toy_prompt("green", "right")) > 0.9 > U.toy_clip(img, U.toy_prompt("blue", "left"))
    same = U.toy_features(U.toy_picture("green", "right", rng)) @ U.toy_features(img)
    other = U.toy_features(U.toy_picture("purple", "left", rng)) @ U.toy_features(img)
    assert same > 0.9 > other


def test_bad_configs_and_character_folders_are_named(tmp_path):
    d = common.Dist(0, 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="w-dino must be > 0"):
        U.check_config(U.Config(w_dino=-0.1), d)
    with pytest.raises(ValueError, match="needs --lora-rank"):
        U.check_config(U.Config(beta=0.04), d)
    with pytest.raises(ValueError, match="torchrun"):
        U.check_config(U.Config(fsdp=True), d)
    with pytest.raises(FileNotFoundError, match="persona.json"):
        U.read_persona(str(tmp_path))
    (tmp_path / "persona.json").write_text(json.dumps({"name": "X", "description": "d", "images": {}}))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['opening'\]"):
        U.read_persona(str(tmp_path))


# -- Character-GRPO ---------------------------------------------------------------------------------------


def test_first_on_policy_ratio_is_exactly_one(toy):
    cfg = U.resolve_config(U.Config(group_size=4, num_minibatches=2, num_timesteps=8))
    data = U.load_character(toy, U.character_folder(cfg), 16)
    scorer = U.Scorer(cfg, torch.device("cpu"), toy=True)
    params = [p for n, p in toy.model.language_model.named_parameters() if "moe_gen" in n]
    saved = {k: v.clone() for k, v in toy.model.state_dict().items()}
    try:
        for p in params:
            p.requires_grad_(True)
        batch = U.rollout(toy, scorer, cfg, data.prompts[:2], scorer.features(data.references),
                          torch.Generator().manual_seed(0))
        assert batch.traj.x_t.shape == (8, 3, 16, 64) and len(batch.images) == 8
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-3)
        stats = U.grpo_step(toy, opt, params, cfg, batch, torch.randn(8))
        assert stats["ratio0"] == 1.0 and stats["skipped_updates"] == 0
        assert stats["logp_gap"] < 1e-4  # sampler (whole batch) vs re-scoring (minibatches): last bits only
        assert stats["grad_norm"] > 0 and any(not torch.equal(a, p) for a, p in zip(before, params))
        for n, p in toy.model.named_parameters():  # everything outside the generation expert is untouched
            assert ("moe_gen" in n) or torch.equal(p, saved[n]), n
    finally:
        toy.model.requires_grad_(False)
        toy.model.load_state_dict(saved)


def test_learning_on_the_toy(tmp_path):
    """The default toy run (8 prompts x 8 images, 60 steps): the character reward rises, and so do its parts that
    read the pictures (VQA answers, CLIP-T stand-in)."""
    out = str(tmp_path / "run")
    run("--train", "--out-dir", out, "--sample-every", "1000")
    rows = metrics(out)
    mean = lambda key, part: sum(r[key] for r in part) / len(part)
    assert mean("reward", rows[-10:]) > mean("reward", rows[:10]) + 0.04, [r["reward"] for r in rows]
    assert mean("r_vqa", rows[-10:]) > mean("r_vqa", rows[:10]) + 0.05
    assert all(r["ratio0"] == 1.0 for r in rows) and all(r["groups_skipped"] == 0 for r in rows)
    assert os.path.exists(os.path.join(out, "gen_expert.safetensors"))


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    small = ("--prompts-per-rank", "2", "--group-size", "4", "--num-timesteps", "8", "--save-every", "2")
    U.main(["--train", "--out-dir", a, "--max-steps", "2", *small])
    U.main(["--train", "--out-dir", a, "--max-steps", "4", "--resume", *small])
    U.main(["--train", "--out-dir", b, "--max-steps", "4", *small])
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def torchrun(out, *args, steps=2):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "unicharacter.py"), "--train", "--out-dir", out, "--max-steps", str(steps),
                           "--device", "cpu", "--prompts-per-rank", "2", "--group-size", "4", "--num-timesteps", "8",
                           "--sft-t2i-batch", "2", "--sft-text-batch", "2", "--ema-decay", "0.5", "--save-every", "1",
                           *args], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"step {steps}/{steps}") == 1  # one log line per step, from rank 0 only
    return metrics(out)


def assert_same_weights(a, b, atol=2e-5):
    from safetensors.torch import load_file

    wa, wb = load_file(a), load_file(b)
    assert set(wa) == set(wb)
    for k in wa:
        # a SigLIP key bias shifts every score of a query alike (no RoPE there): softmax cancels it, its gradient is
        # rounding noise, and Adam with eps 1e-15 turns noise into +-lr steps of either sign
        if not (k.startswith("vit_model.") and k.endswith("k_proj.bias")):
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)
    return wa


def test_torchrun_two_cpu_processes_grpo_lora_ddp_and_fsdp_with_resume(tmp_path):
    lora = torchrun(str(tmp_path / "lora"), "--lora-rank", "4")
    assert len(lora) == 2 and all(r["ratio0"] == 1.0 for r in lora)
    assert len(torch.load(tmp_path / "lora" / "checkpoint" / "latest.pt", weights_only=False)["rng"]) == 2
    assert os.path.exists(tmp_path / "lora" / "lora.safetensors")
    # full generation expert: gradient averaging (plain) and FSDP sharding, stopped after step 1 and resumed from
    # its gathered checkpoint, give the same run (a lost optimizer state would move the weights by ~lr)
    plain = torchrun(str(tmp_path / "full"))
    fsdp = str(tmp_path / "fsdp")
    torchrun(fsdp, "--fsdp", steps=1)
    sharded = torchrun(fsdp, "--fsdp", "--resume")
    assert [r["step"] for r in sharded] == [1, 2] and sharded[0]["reward"] == plain[0]["reward"]
    for key in ("reward", "grad_norm", "loss"):
        assert [r[key] for r in sharded] == pytest.approx([r[key] for r in plain], rel=1e-4, abs=1e-6), key
    w = assert_same_weights(str(tmp_path / "full" / "gen_expert.safetensors"), os.path.join(fsdp, "gen_expert.safetensors"))
    assert all("moe_gen" in k for k in w)


def test_torchrun_unified_sft_fsdp_with_ema_and_resume(tmp_path):
    """Unified-SFT on 2 CPU processes: FSDP (decoder and ViT layers, lm_head sharded) with a resume after step 1
    matches plain gradient averaging - gradients (their norm), weights and the EMA (decay 0.5: far from both)."""
    # with the public eps 1e-15 Adam's first step is +-lr on every element, so a gradient element at rounding-noise
    # level (a different summation order under FSDP can flip its sign) would move by 2 lr: eps 1e-6 keeps that tiny
    sft = ("--stage", "sft", "--sft-adam-eps", "1e-6")
    plain = torchrun(str(tmp_path / "plain"), *sft)
    fsdp = str(tmp_path / "fsdp")
    torchrun(fsdp, *sft, "--fsdp", steps=1)
    sharded = torchrun(fsdp, *sft, "--fsdp", "--resume")
    for key in ("loss", "ce", "mse", "grad_norm"):
        assert [r[key] for r in sharded] == pytest.approx([r[key] for r in plain], rel=1e-5), key
    model = assert_same_weights(str(tmp_path / "plain" / "model.safetensors"), os.path.join(fsdp, "model.safetensors"))
    ema = assert_same_weights(str(tmp_path / "plain" / "ema.safetensors"), os.path.join(fsdp, "ema.safetensors"))
    assert set(model) == set(ema) and any(not torch.allclose(model[k], ema[k]) for k in model)


# -- inference API and CLI ----------------------------------------------------------------------------


def test_role_play_and_the_api_on_the_embedded_default(tmp_path, capsys):
    out = run("--role-play", "Hi")
    assert out.strip().splitlines()[-1].startswith("Bo: ") and len(out.strip().splitlines()[-1]) > len("Bo: ")
    cfg = U.resolve_config(U.Config(out_dir=str(tmp_path), eval_num_timesteps=4))
    models = U.load_models(cfg, torch.device("cpu"), torch.float32)
    persona = U.read_persona(U.character_folder(cfg))
    reply = U.role_play(models, cfg, persona, "Show me a picture of you", generator=torch.Generator().manual_seed(0))
    assert reply["response"] and reply["image"].size == (16, 16)
    assert U.role_play(models, cfg, persona, "Who are you?", with_image=False)["image"] is None
    image = U.generate_image(models, cfg, "Bo on a purple background on the left", 2)
    assert len(image) == 2 and image[0].size == (16, 16)
    assert isinstance(U.visual_understanding(models, cfg, image[0], "What color is the background?"), str)
    assert isinstance(U.knowledge_qa(models, cfg, "What color is Bo?"), str)
    with pytest.raises(ValueError, match="empty"):
        U.generate_image(models, cfg, " ", 1)
    with pytest.raises(AssertionError, match="image not found"):
        run("--ask", str(tmp_path / "missing.png"), "What?")


def test_role_play_with_thinking_plans_the_picture(toy, tmp_path, monkeypatch):
    """The plan's two parts go into the image prompt (BAGEL's T2I-with-thinking template); thinking rows of a
    character folder train the planning prompt; malformed rows are named."""
    persona = U.read_persona(U.character_folder(U.Config()))
    prompts = []
    texts = iter(["Woof! Here I am.", "<think>Bo likes grass</think> <gen>Bo on a green background</gen>"])
    monkeypatch.setattr(U, "generate_text", lambda models, images, ps, *a, **k: (prompts.append(ps[0]), [next(texts)])[1])
    monkeypatch.setattr(U, "generate_image", lambda models, cfg, prompt, n, generator=None: [prompt])
    out = U.role_play(toy, U.Config(), persona, "Show me a picture", with_thinking=True)
    assert out["thinking_process"] == "Bo likes grass" and out["generation_instruction"] == "Bo on a green background"
    assert "Character Response: Woof! Here I am." in prompts[1] and "<gen></gen>" in prompts[1]
    assert "Thinking Process: Bo likes grass\nGeneration Instruction: Bo on a green background\nPlease" in out["image"]
    texts = iter(["Woof!", "no plan here"])
    out = U.role_play(toy, U.Config(), persona, "Show me a picture", with_thinking=True)
    assert out["generation_instruction"] is None and "Thinking Process" not in out["image"]
    monkeypatch.undo()
    folder = tmp_path / "bo"
    import shutil
    shutil.copytree(U.character_folder(U.Config()), folder)
    row = dict(kind="thinking", user="Show me", response="Woof!", reply="<think>grass</think><gen>Bo on grass</gen>")
    with open(folder / "dialogues.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    data = U.load_character(toy, str(folder), 16)
    assert data.text[-1][1].endswith("inside <gen></gen>.") and data.text[-1][2] == row["reply"]
    with open(folder / "dialogues.jsonl", "a") as f:
        f.write(json.dumps(dict(row, reply="just words")) + "\n")
    with pytest.raises(ValueError, match=r"dialogues.jsonl:\d+: a thinking row"):
        U.load_character(toy, str(folder), 16)


def test_help_lists_every_flag_with_its_comment(capsys, monkeypatch):
    import dataclasses as dc

    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        U.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--train", "--evaluate", "--generate", "--ask", "--knowledge", "--role-play"):
        assert flag in text
    comments = common._field_comments(U.Config)
    for field in dc.fields(U.Config):
        assert "--" + field.name.replace("_", "-") in text
        assert comments.get(field.name) and " ".join(comments[field.name].split()) in text, field.name


def test_bench_section_runs_on_the_tiny_model():
    import bench

    rows = bench.bench_unicharacter(torch.device("cpu"), repeats=1, size="tiny")
    assert [r["what"].split()[0] for r in rows] == ["prefill", "flow", "GRPO", "text"]
    assert all(r["s"] > 0 for r in rows) and rows[-1]["bandwidth_tb_s"] > 0
    assert "unicharacter" in bench.SECTIONS and "bagel-7b" in bench.SIZES["unicharacter"]
    with torch.device("meta"):  # the BAGEL-7B architecture's size: 7B per expert-stack, 14B in all
        model = U.Bagel(U.BAGEL_7B)
    total = sum(p.numel() for p in model.parameters())
    gen = bench.bagel_linear_weights(model, "gen")
    assert 14.0e9 < total < 14.8e9 and gen == bench.bagel_linear_weights(model, "und")
