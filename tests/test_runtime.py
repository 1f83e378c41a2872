"""Runtime helpers of common.py: config CLI, atomic save, checkpoint/resume, metric log, image io, torchrun.

    python -m pytest -q tests/test_runtime.py
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


@dataclasses.dataclass
class ToyConfig:
    # ---- model
    lora_rank: int = 64  # LoRA rank (PSR paper)
    model_dir: str | None = None  # local checkpoint folder; none = embedded default
    # ---- optimisation
    lr: float = 1e-5  # learning rate: the "# in a comment" stays whole
    use_kl: bool = True  # add the KL term
    resolutions: tuple[int, ...] = (512, 768)  # training buckets


def test_config_cli_help_types_and_round_trip(capsys):
    parser = argparse.ArgumentParser()
    common.add_config_args(parser, ToyConfig)
    help_text = parser.format_help()
    for flag, comment in [("--lora-rank", "LoRA rank (PSR paper)"), ("--model-dir", "local checkpoint folder"),
                          ("--lr", 'the "# in a comment" stays whole'), ("--no-use-kl", "add the KL term"),
                          ("--resolutions", "training buckets")]:
        assert flag in help_text and comment in help_text
    cfg = common.config_from_args(ToyConfig, parser.parse_args([]))
    assert cfg == ToyConfig()
    cfg = common.config_from_args(ToyConfig, parser.parse_args(
        ["--lora-rank", "8", "--model-dir", "/m", "--lr", "3e-4", "--no-use-kl", "--resolutions", "256"]))
    assert cfg == ToyConfig(lora_rank=8, model_dir="/m", lr=3e-4, use_kl=False, resolutions=(256,))
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-rank", "eight"])
    assert "invalid int value: 'eight'" in capsys.readouterr().err


def test_toy_settings_replace_only_fields_left_at_their_default(capsys):
    cfg = common.apply_toy_settings(ToyConfig(lr=3e-4), {"lora_rank": 8, "lr": 1e-2}, "toy")
    assert cfg == ToyConfig(lora_rank=8, lr=3e-4)  # the user's lr stays
    assert capsys.readouterr().out.strip() == "toy: lora_rank 64 -> 8"


def test_a_flag_typed_with_its_default_value_beats_the_toy_setting(capsys):
    parser = argparse.ArgumentParser()
    common.add_config_args(parser, ToyConfig)
    argv = ["--lora-rank=64", "--use-kl", "--resolutions", "512", "768"]  # every value equals the dataclass default
    given = common.given_fields(ToyConfig, parser, argv)
    assert given == {"lora_rank", "use_kl", "resolutions"}
    cfg = common.config_from_args(ToyConfig, parser.parse_args(argv))
    toy = {"lora_rank": 8, "use_kl": False, "resolutions": (16,), "lr": 1e-2}
    assert common.apply_toy_settings(cfg, toy, "toy", given) == ToyConfig(lr=1e-2)
    assert common.apply_toy_settings(cfg, toy, "toy") == ToyConfig(lora_rank=8, use_kl=False, resolutions=(16,), lr=1e-2)
    assert common.given_fields(ToyConfig, parser, []) == set()


def test_atomic_save_keeps_previous_file_when_write_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    common.atomic_save(path, lambda tmp: torch.save({"step": 1}, tmp))

    def failing_write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        common.atomic_save(path, failing_write)
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_checkpoint_restores_rng_streams_exactly(tmp_path):
    path = str(tmp_path / "checkpoint" / "latest.pt")
    common.seed_everything(123)
    common.save_checkpoint(path, {"step": 7, "weights": torch.ones(2)})
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.rand(10)  # the run goes on, then crashes
    state = common.load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["weights"], torch.ones(2))
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_unreadable_checkpoint_is_named(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="latest.pt is unreadable"):
        common.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))


def test_step_generator_is_deterministic_and_distinct():
    a = torch.randn(4, generator=common.step_generator(0, 5, 1))
    b = torch.randn(4, generator=common.step_generator(0, 5, 1))
    c = torch.randn(4, generator=common.step_generator(0, 5, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pick_dtype():
    dtype, reason = common.pick_dtype(torch.device("cpu"))
    assert dtype == torch.float32 and "CPU" in reason
    assert common.pick_dtype(torch.device("cpu"), "bf16")[0] == torch.bfloat16
    with pytest.raises(ValueError, match="fp64"):
        common.pick_dtype(torch.device("cpu"), "fp64")


def test_metric_log_line_and_jsonl(tmp_path, capsys):
    log = common.MetricLog(str(tmp_path), total_steps=4)
    log.log(0, {"reward": 0.25, "loss": -1.5, "groups_skipped": 0})
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 1/4 (25%) | reward 0.25 | loss -1.5 | groups_skipped 0 | eta ")
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "reward": 0.25, "loss": -1.5,
                                                                     "groups_skipped": 0}


# -- image io -------------------------------------------------------------------


def test_load_image_applies_exif_and_converts_to_rgb(tmp_path):
    from PIL import Image

    img = Image.new("RGBA", (40, 20), (255, 0, 0, 128))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    img.save(tmp_path / "rot.png", exif=exif)
    loaded = common.load_image(str(tmp_path / "rot.png"))
    assert loaded.mode == "RGB" and loaded.size == (20, 40)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        common.load_image(str(tmp_path / "nope.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="bad.jpg"):
        common.load_image(str(tmp_path / "bad.jpg"))


def test_resize_center_crop_and_tensor_round_trip(tmp_path):
    from PIL import Image

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 500, 3), dtype=np.uint8))
    out = common.resize_center_crop(img, long_side=320)
    assert out.size == (320, 192)  # 500x300 -> 320x192, multiples of 16
    out = common.resize_center_crop(img, size=(256, 256))
    assert out.size == (256, 256)
    t = common.pil_to_tensor(out)
    assert t.shape == (3, 256, 256) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(common.tensor_to_pil(t)), np.asarray(out))
    common.save_grid(torch.stack([t, -t, t]), str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size == (512, 512)


def test_read_jsonl_reports_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "refs": []}\n\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: missing field\(s\) \['refs'\]"):
        common.read_jsonl(str(path), required=("prompt", "refs"))
    path.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="data.jsonl:2: not valid JSON"):
        common.read_jsonl(str(path))
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert common.read_jsonl(str(path), required=("prompt",)) == [{"prompt": "a"}, {"prompt": "b"}]
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no data lines"):
        common.read_jsonl(str(path))


# -- torchrun, 2 CPU processes (gloo) ------------------------------------------------

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.environ["ROOT"])
    import common
    d = common.init_dist("cpu")
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert (d.rank, d.world_size, d.is_main) == (int(os.environ["RANK"]), 2, d.rank == 0)
    common.print0(f"hello from rank {d.rank}")  # only rank 0 prints
    print(f"worker {d.rank} alive", flush=True)
    m = common.all_reduce_mean({"reward": float(d.rank), "only_rank0": 5.0 if d.rank == 0 else float("nan")}, d.device)
    assert m == {"reward": 0.5, "only_rank0": 5.0}, m
    w = torch.nn.Parameter(torch.zeros(3))
    (w * (d.rank + 1)).sum().backward()  # rank 0 sees grad 1, rank 1 sees grad 2
    common.average_gradients([w])
    assert torch.equal(w.grad, torch.full((3,), 1.5)), w.grad
    common.seed_everything(10 + d.rank)
    path = os.path.join(os.environ["OUT"], "latest.pt")
    common.save_checkpoint(path, {"step": 3})
    expected = torch.rand(2)
    torch.rand(5)
    state = common.load_checkpoint(path)
    assert state["step"] == 3 and len(state["rng"]) == 2
    assert torch.equal(torch.rand(2), expected), "each rank gets its own RNG stream back"
    common.cleanup_dist()
""")


def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "ROOT": ROOT, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("hello from rank") == 1 and "hello from rank 0" in proc.stdout
    assert "worker 0 alive" in proc.stdout and "worker 1 alive" in proc.stdout


def test_lora_training_checkpoint_round_trip_and_nan_refusal(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    common.inject_lora(net, ["0"], rank=2)
    opt = torch.optim.AdamW(common.lora_parameters(net), lr=1e-2)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = str(tmp_path / "checkpoint" / "latest.pt")
    common.save_lora_training(path, net, opt, 5, {"lr": 1e-2})
    with torch.no_grad():
        net[0].lora_B.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite LoRA weights at step 6"):
        common.save_lora_training(path, net, opt, 6, {"lr": 1e-2})
    fresh_opt = torch.optim.AdamW(common.lora_parameters(net), lr=1e-2)
    assert common.resume_lora_training(path, net, fresh_opt) == 5  # the good checkpoint survived
    assert torch.isfinite(net[0].lora_B).all() and fresh_opt.state_dict()["state"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        common.resume_lora_training(str(tmp_path / "none.pt"), net, fresh_opt)


def test_toy_cpu_threads_pins_one_thread_unless_omp_is_set(monkeypatch, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        common.toy_cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2 and capsys.readouterr().out == ""  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        common.toy_cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 1 and "one CPU thread" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
