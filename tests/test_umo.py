"""umo.py: MIMR against a naive loop, XLabs LoRA conversion, UNO position ids, ReReFL's single gradient step,
ID-Sim/ID-Conf edge cases, GRPO on-policy ratio, the train loop (resume, torchrun) and inference on the toy.

    python -m pytest -q tests/test_umo.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import umo  # noqa: E402


def toy_cfg(**overrides) -> umo.Config:
    cfg = umo.Config(**umo.TOY_SETTINGS)
    return umo.dataclasses.replace(cfg, **overrides)


@pytest.fixture(scope="module")
def toy_models():
    cfg = toy_cfg()
    models = umo.load_models(cfg, torch.device("cpu"), torch.float32)
    umo.add_lora(cfg, models)
    return cfg, models


# -- MIMR --------------------------------------------------------------------------


def naive_mimr(ref, gen):
    """bytedance/UMO score_grad for one image, written as a loop over cells."""
    if len(ref) == 0 or len(gen) == 0:
        return 0.0
    sim = (ref @ gen.T).double().numpy()
    rows, cols = linear_sum_assignment(-sim)
    matched = set(zip(rows.tolist(), cols.tolist()))
    total = sum(sim[i, j] * (1 if (i, j) in matched else -1) for i in range(len(ref)) for j in range(len(gen)))
    return total / (len(ref) * len(gen))


def test_mimr_matches_naive_loop_including_rectangles_and_no_face():
    g = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)  # noqa: E731
    shapes = [(2, 2), (3, 2), (2, 3), (1, 4), (4, 1), (3, 3), (2, 0), (0, 2), (2, 2), (3, 2)]
    refs, gens = [unit(r) for r, _ in shapes], [unit(f) for _, f in shapes]
    got = umo.mimr(refs, gens)
    want = torch.tensor([naive_mimr(r, f) for r, f in zip(refs, gens)], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[6] == 0 and got[7] == 0


def test_mimr_single_identity_is_cosine_and_gradient_is_finite():
    ref = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    gen = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1).requires_grad_(True)
    empty = torch.zeros(0, 8, requires_grad=True)
    r = umo.mimr([ref, ref], [gen, empty])
    assert r[0].item() == pytest.approx((ref @ gen.T).item())  # k = 1: MIMR is SIR, the plain cosine
    r.sum().backward()
    assert torch.isfinite(gen.grad).all()


# -- XLabs LoRA ----------------------------------------------------------------------------


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=[2, 2, 4], guidance_embeds=True)


def xlabs_state_dict(inner=16, mlp=64, rank=4):
    """The documented UNO/UMO key layout (reference/umo.md 5.1) at tiny width: down (r, in), up (out, r)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sd = {}
    for lora in ("qkv_lora1", "qkv_lora2"):
        sd[f"double_blocks.0.processor.{lora}.down.weight"] = r(rank, inner)
        sd[f"double_blocks.0.processor.{lora}.up.weight"] = r(3 * inner, rank)
    for lora in ("proj_lora1", "proj_lora2"):
        sd[f"double_blocks.0.processor.{lora}.down.weight"] = r(rank, inner)
        sd[f"double_blocks.0.processor.{lora}.up.weight"] = r(inner, rank)
    sd["single_blocks.0.processor.qkv_lora.down.weight"] = r(rank, inner)
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = r(3 * inner, rank)
    sd["single_blocks.0.processor.proj_lora.down.weight"] = r(rank, inner + mlp)  # linear2 input: attn ++ mlp
    sd["single_blocks.0.processor.proj_lora.up.weight"] = r(inner, rank)
    return sd


def flux_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(1, 4, 16, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                img_ids=umo.position_ids((2, 2), []), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([4.0]),
                return_dict=False)


def test_xlabs_conversion_equals_applying_the_xlabs_update_to_fused_weights(tmp_path):
    from safetensors.torch import save_file

    xl = xlabs_state_dict()
    # direct XLabs math: W_fused += up @ down, where diffusers' fused qkv = [to_q; to_k; to_v] rows
    direct = tiny_flux()
    with torch.no_grad():
        blocks = {"double_blocks.0": direct.transformer_blocks[0], "single_blocks.0": direct.single_transformer_blocks[0]}
        for lora, q, k, v in [("double_blocks.0.processor.qkv_lora1", "to_q", "to_k", "to_v"),
                              ("double_blocks.0.processor.qkv_lora2", "add_q_proj", "add_k_proj", "add_v_proj"),
                              ("single_blocks.0.processor.qkv_lora", "to_q", "to_k", "to_v")]:
            attn = blocks[lora.rsplit(".processor", 1)[0]].attn
            delta = xl[f"{lora}.up.weight"] @ xl[f"{lora}.down.weight"]
            for name, piece in zip((q, k, v), delta.chunk(3)):
                getattr(attn, name).weight += piece
        for lora, module in [("double_blocks.0.processor.proj_lora1", direct.transformer_blocks[0].attn.to_out[0]),
                             ("double_blocks.0.processor.proj_lora2", direct.transformer_blocks[0].attn.to_add_out),
                             ("single_blocks.0.processor.proj_lora", direct.single_transformer_blocks[0].proj_out)]:
            module.weight += xl[f"{lora}.up.weight"] @ xl[f"{lora}.down.weight"]
    path = str(tmp_path / "UMO_UNO.safetensors")
    save_file(xl, path)
    converted = tiny_flux()
    models = umo.Models(converted, *[None] * 7, max_text_len=0)
    umo.add_lora(umo.Config(lora=path, grad_checkpointing=False), models)
    assert common.lora_modules(converted)["transformer_blocks.0.attn.to_q"].scale == 1.0  # XLabs: no alpha
    with torch.no_grad():
        torch.testing.assert_close(converted(**flux_inputs())[0], direct(**flux_inputs())[0], rtol=1e-4, atol=1e-5)


def test_xlabs_loader_names_bad_and_missing_keys(tmp_path):
    from safetensors.torch import save_file

    xl = xlabs_state_dict()
    bad = {**xl, "double_blocks.0.processor.qkv_lora3.down.weight": torch.zeros(4, 16)}
    with pytest.raises(ValueError, match="qkv_lora3"):
        umo.xlabs_to_peft(bad)
    missing = {k: v for k, v in xl.items() if "proj_lora2" not in k}
    save_file(missing, str(tmp_path / "partial.safetensors"))
    models = umo.Models(tiny_flux(), *[None] * 7, max_text_len=0)
    with pytest.raises(ValueError, match=r"missing \(2\): transformer_blocks\.0\.attn\.to_add_out\.lora_A"):
        umo.add_lora(umo.Config(lora=str(tmp_path / "partial.safetensors"), grad_checkpointing=False), models)


# -- UNO conditioning ---------------------------------------------------------------------


@pytest.mark.parametrize("pe,first,second", [("d", (2, 3), (4, 5)), ("h", (2, 0), (4, 0)), ("w", (0, 3), (0, 5)),
                                             ("o", (0, 0), (0, 0))])
def test_position_ids_per_pe(pe, first, second):
    ids = umo.position_ids((2, 3), [(2, 2), (1, 3)], pe)
    assert ids.shape == (6 + 4 + 3, 3) and (ids[:, 0] == 0).all()
    target = ids[:6].view(2, 3, 3)
    assert target[..., 1].tolist() == [[0, 0, 0], [1, 1, 1]] and target[..., 2].tolist() == [[0, 1, 2]] * 2
    ref1, ref2 = ids[6:10], ids[10:]
    assert tuple(ref1[0, 1:].int().tolist()) == first and tuple(ref1[-1, 1:].int().tolist()) == (first[0] + 1,
                                                                                                  first[1] + 1)
    assert tuple(ref2[0, 1:].int().tolist()) == second  # offsets accumulate past the first reference
    with pytest.raises(ValueError, match="pe must be"):
        umo.position_ids((2, 2), [], "x")


def test_velocity_ignores_reference_outputs_but_uses_references(toy_models):
    cfg, models = toy_models
    rows = umo.toy_dataset(0)
    cond = umo.make_condition(models, [rows[0]["prompt"]], [rows[0]["refs"]], cfg.resolution, cfg.pe)
    other = umo.make_condition(models, [rows[0]["prompt"]], [rows[5]["refs"]], cfg.resolution, cfg.pe)
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        v, v_other = (umo.velocity(models, x, torch.tensor([0.5]), c, 1.0) for c in (cond, other))
    assert v.shape == x.shape and not torch.allclose(v, v_other)


# -- training steps -----------------------------------------------------------------------


def test_rerefl_takes_exactly_one_step_with_gradient(toy_models):
    cfg, models = toy_models
    cfg = umo.dataclasses.replace(cfg, pretrain_weight=0.0)
    row = umo.toy_dataset(0)[0]
    cond = umo.make_condition(models, [row["prompt"]], [row["refs"]], cfg.resolution, cfg.pe)
    grad_calls = []
    hook = models.transformer.register_forward_hook(lambda *_: grad_calls.append(torch.is_grad_enabled()))
    try:
        loss, metrics = umo.rerefl_step(models, cfg, cond, [umo.reference_embeddings(models, row, "refs")], None,
                                        torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert sum(grad_calls) == 1 and len(grad_calls) == metrics["grad_step"] + 1
    assert cfg.num_steps - cfg.grad_window <= metrics["grad_step"] < cfg.num_steps
    loss.backward()
    grads = [p.grad for p in common.lora_parameters(models.transformer) if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    models.transformer.zero_grad(set_to_none=True)


def test_grpo_first_ratio_is_exactly_one(toy_models):
    cfg, models = toy_models
    row = umo.toy_dataset(0)[1]
    cond = umo.make_condition(models, [row["prompt"]], [row["refs"]], cfg.resolution, cfg.pe).repeat(cfg.group_size)
    batch = umo.rollout(models, cfg, cond, torch.Generator().manual_seed(0))
    r = umo.reward(models, batch["images"], [umo.reference_embeddings(models, row, "refs")] * cfg.group_size)
    adv = umo.group_advantages(r, cfg.group_size, cfg.adv_clip)
    stats = umo.grpo_step(models, cfg, cond, batch, adv)
    assert stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0
    models.transformer.zero_grad(set_to_none=True)


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = umo.group_advantages(r, 3, 5.0)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.2247, 0.0, 1.2247]), rtol=1e-4, atol=1e-4)
    assert torch.equal(adv[3:], torch.zeros(3))  # a zero-std group teaches nothing


# -- evaluation -----------------------------------------------------------------------------


def test_id_scores_edge_cases():
    e = torch.eye(3)
    assert umo.id_scores(e[:2], torch.zeros(0, 3)) == ([0.0, 0.0], [])  # no face: ID-Sim 0, no ID-Conf entry
    sim, conf = umo.id_scores(e[:2], e[:1])
    assert sim == [1.0, 0.0] and conf == []  # one face: ID-Conf is skipped
    faces = torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.8, 0.0]])
    sim, conf = umo.id_scores(e[:2], faces)
    assert sim == pytest.approx([0.8, 0.8]) and conf == pytest.approx([0.25, 0.25])  # (0.8 - 0.6) / 0.8
    sim, conf = umo.id_scores(torch.tensor([[-1.0, 0.0, 0.0]]), faces)
    assert conf == [0.0]  # s1 <= 0
    sim, conf = umo.id_scores(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
    assert conf == [1.0]  # clipped at 1


# -- loops and commands --------------------------------------------------------------------------


def run_umo(*args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "umo.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    straight = umo.train(toy_cfg(max_steps=4, out_dir=str(tmp_path / "a"), save_every=2))
    umo.train(toy_cfg(max_steps=2, out_dir=str(tmp_path / "b"), save_every=2))
    resumed = umo.train(toy_cfg(max_steps=4, out_dir=str(tmp_path / "b"), save_every=2, resume=True))
    assert [m["reward"] for m in straight[2:]] == [m["reward"] for m in resumed]
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for name in ("config.json", "lora.safetensors", "checkpoint/latest.pt", "samples/step_000004.png"):
        assert (tmp_path / "b" / name).exists(), name


def test_rerefl_learns_the_toy_identities(tmp_path):
    """The toy's base model draws faces but ignores whose (see umo._pretrained_toy); ReReFL with MIMR (lambda = 1)
    must make it draw the referenced identities: the training reward and both evaluation metrics rise."""
    history = umo.train(toy_cfg(max_steps=300, out_dir=str(tmp_path / "run")))
    rewards = [m["reward"] for m in history]
    first, last = np.mean(rewards[:50]), np.mean(rewards[-50:])
    assert last > first + 0.05, (first, last)  # the true targets score 0.22
    base = umo.evaluate(toy_cfg(), str(tmp_path / "base.json"))
    trained = umo.evaluate(toy_cfg(lora=str(tmp_path / "run" / "lora.safetensors")), str(tmp_path / "trained.json"))
    assert trained["id_sim"] > base["id_sim"] + 5 and trained["id_conf"] > base["id_conf"] + 10, (base, trained)


def test_grpo_loop_runs(tmp_path):
    history = umo.train(toy_cfg(algorithm="grpo", max_steps=2, batch_size=1, out_dir=str(tmp_path)))
    assert len(history) == 2 and all(np.isfinite(m["reward"]) for m in history)


def test_torchrun_two_cpu_processes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "umo.py"), "--train", "--max-steps", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step 2/2") == 1  # one log line per step, from rank 0 only
    assert (tmp_path / "lora.safetensors").exists()


def test_generate_and_evaluate_on_the_embedded_default(tmp_path):
    out = run_umo("--generate", "a photo of person id0 and person id1", "--out", str(tmp_path / "x.png"))
    assert out.strip().endswith(str(tmp_path / "x.png")) and (tmp_path / "x.png").exists()
    run_umo("--evaluate", "--out", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["id_sim_entries"] == 2 * len(umo.toy_dataset(0)) and result["scale"] == 100.0
    assert result["id_conf_entries"] == result["id_sim_entries"]  # the slot detector finds two faces in each


def test_help_lists_every_flag():
    out = run_umo("--help")
    for f in umo.dataclasses.fields(umo.Config):
        assert "--" + f.name.replace("_", "-") in out


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="FLUX.1-dev folder not found: .*nowhere"):
        umo.load_models(umo.Config(flux_dir=str(tmp_path / "nowhere")), torch.device("cpu"), torch.float32)
    (tmp_path / "flux").mkdir()
    with pytest.raises(FileNotFoundError, match="component 'transformer/'"):
        umo.load_models(umo.Config(flux_dir=str(tmp_path / "flux")), torch.device("cpu"), torch.float32)
