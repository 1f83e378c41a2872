"""LoRA in common.py: zero init, merge, adapter-off context, PEFT/diffusers save/load, strict key checks.

    python -m pytest -q tests/test_lora.py
"""

import json
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(torch.tanh(self.to_q(x) + self.to_k(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 8)

    def forward(self, x):
        for b in self.blocks:
            x = self.head(b(x))
        return x


def make(seed=0, rank=3, alpha=6.0, targets=("to_q", "to_k")):
    torch.manual_seed(seed)
    net = Net()
    names = common.inject_lora(net, list(targets), rank=rank, alpha=alpha)
    return net, names


def randomise_b(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in common.lora_modules(net).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def test_injection_by_suffix_and_glob():
    _, names = make()
    assert names == ["blocks.0.to_q", "blocks.0.to_k", "blocks.1.to_q", "blocks.1.to_k"]
    _, names = make(targets=("blocks.1.*",))
    assert names == ["blocks.1.to_q", "blocks.1.to_k", "blocks.1.proj"]
    with pytest.raises(ValueError, match="to_v"):
        make(targets=("to_q", "to_v"))


def test_zero_init_leaves_output_unchanged_and_only_lora_trains():
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(5, 8)
    net, _ = make(seed=0)
    torch.testing.assert_close(net(x), base(x), rtol=0, atol=0)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head") or n.endswith("proj.weight") or n.endswith("proj.bias")
               for n in trainable)
    assert not any(n.endswith("to_q.base.weight") for n in trainable)


def test_lora_forward_equals_explicit_weight_update():
    net, _ = make()
    randomise_b(net)
    m = net.blocks[0].to_q
    x = torch.randn(5, 8)
    w = m.base.weight + (alpha_over_rank := 6.0 / 3) * m.lora_B @ m.lora_A
    torch.testing.assert_close(m(x), x @ w.T + m.base.bias, rtol=1e-5, atol=1e-6)
    assert alpha_over_rank == m.scale


def test_merged_equals_unmerged_and_unmerge_restores_base():
    net, _ = make()
    randomise_b(net)
    x = torch.randn(5, 8)
    before = net(x)
    w0 = net.blocks[0].to_q.base.weight.clone()
    common.merge_lora(net)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        with common.lora_disabled(net):
            pass
    common.unmerge_lora(net)
    torch.testing.assert_close(net.blocks[0].to_q.base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_disable_context_gives_base_output_and_restores():
    torch.manual_seed(0)
    base = Net()
    net, _ = make(seed=0)
    randomise_b(net)
    x = torch.randn(5, 8)
    adapted = net(x)
    assert not torch.allclose(adapted, base(x))
    with common.lora_disabled(net):
        torch.testing.assert_close(net(x), base(x), rtol=0, atol=0)
    torch.testing.assert_close(net(x), adapted)


def test_save_load_round_trip_in_diffusers_naming(tmp_path):
    net, names = make(alpha=6.0)
    randomise_b(net)
    path = str(tmp_path / "lora.safetensors")
    common.save_lora(net, path, prefix="transformer.")

    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin  # diffusers reads our keys and metadata
    sd, _, metadata = FluxLoraLoaderMixin.lora_state_dict(path, return_alphas=True, return_lora_metadata=True)
    assert set(sd) == {f"transformer.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert metadata["transformer.r"] == 3 and metadata["transformer.lora_alpha"] == 6.0
    assert sorted(metadata["transformer.target_modules"]) == sorted(names)

    fresh, _ = make(seed=5, alpha=1.0)  # different base init does not matter: compare adapters only
    common.load_lora(fresh, path, prefix="transformer.")
    for name, m in common.lora_modules(fresh).items():
        src = common.lora_modules(net)[name]
        assert torch.equal(m.lora_A, src.lora_A) and torch.equal(m.lora_B, src.lora_B)
        assert m.alpha == 6.0  # alpha comes from the file's metadata


def test_load_accepts_peft_in_memory_names():
    net, _ = make()
    randomise_b(net)
    peft_sd = {f"base_model.model.{k.replace('.weight', '.default.weight')}": v
               for k, v in common.lora_state_dict(net).items()}
    fresh, _ = make(seed=3)
    common.load_lora(fresh, peft_sd, prefix="")
    for name, m in common.lora_modules(fresh).items():
        assert torch.equal(m.lora_B, common.lora_modules(net)[name].lora_B)


def test_key_mismatch_is_refused_with_key_names(tmp_path):
    net, _ = make()
    sd = common.lora_state_dict(net)
    missing = dict(sd)
    del missing["blocks.1.to_k.lora_B.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): blocks\.1\.to_k\.lora_B\.weight"):
        common.load_lora(net, missing, prefix="")
    extra = {**sd, "blocks.0.to_v.lora_A.weight": torch.zeros(3, 8)}
    with pytest.raises(ValueError, match=r"unexpected \(1\): blocks\.0\.to_v\.lora_A\.weight"):
        common.load_lora(net, extra, prefix="")
    assert common.load_lora(net, extra, prefix="", strict=False) == ["blocks.0.to_v.lora_A.weight"]
    wrong = {**sd, "blocks.0.to_q.lora_A.weight": torch.zeros(5, 8)}
    with pytest.raises(ValueError, match=r"shape mismatch.*blocks\.0\.to_q\.lora_A\.weight: file \(5, 8\)"):
        common.load_lora(net, wrong, prefix="", strict=False)  # shapes are never negotiable
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        common.load_lora(net, str(tmp_path / "nowhere.safetensors"))


def test_mixed_ranks_are_recorded_as_patterns(tmp_path):
    torch.manual_seed(0)
    net = Net()
    common.inject_lora(net, ["to_q", "to_k"], rank=4, alpha=4)
    common.inject_lora(net, ["head"], rank=2, alpha=8)
    path = str(tmp_path / "mixed.safetensors")
    common.save_lora(net, path, prefix="")
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["r"] == 4 and meta["rank_pattern"] == {"head": 2} and meta["alpha_pattern"] == {"head": 8.0}
    common.lora_modules(net)["head"].alpha = 1.0
    common.load_lora(net, path, prefix="")
    assert common.lora_modules(net)["head"].alpha == 8.0
