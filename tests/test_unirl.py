"""unirl.py: CFG token log-probs vs a manual computation, first ratio exactly 1, the answer grader, GenEval's position
rule and checks, prompt ground truth, the painted toy decoder, learning on the toy, resume, torchrun, inference.

    python -m pytest -q tests/test_unirl.py

The embedded tiny Janus is pre-trained once in code and cached under $NANOGENRL_CACHE (default ~/.cache/nanogenrl);
the first run of this file pays for it (about a minute on 2 cores). Tests that only check wiring use
--toy-pretrain-steps 0 (a random tiny Janus, built in a second).
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
import unirl  # noqa: E402


def run(*args, timeout=600, **env):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "unirl.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny():
    """A random (not pre-trained) tiny Janus: enough for the math tests."""
    torch.backends.mkldnn.enabled = False
    model, processor = unirl.toy_model()
    return unirl.toy_models(model.eval().requires_grad_(False), processor)


# -- log-probs and ratios ---------------------------------------------------------------


def test_cfg_token_logprobs_match_a_manual_computation(tiny):
    prompts = ["a photo of a red cat", "a photo of two cups"]
    gen = torch.Generator().manual_seed(0)
    tokens, logp = unirl.sample_image_tokens(tiny, prompts, cfg_scale=3.0, temperature=0.7, generator=gen)
    lm, model = tiny.model.model.language_model, tiny.model
    for b, prompt in enumerate(prompts):
        # Each prompt alone (no padding), no KV cache: the full sequence is re-run for every image token.
        text = tiny.processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tiny.processor(text=text, generation_mode="image", return_tensors="pt")["input_ids"][0]
        assert ids[0] == tiny.bos_id and ids[-1] == tiny.boi_id
        uncond = ids.clone()
        uncond[1:-1] = tiny.pad_id  # Janus-Pro generation_inference.py: tokens[1:-1] = pad_id
        for t in range(tokens.shape[1]):
            rows = []
            for row in (ids, uncond):
                x = torch.cat([model.get_input_embeddings()(row)[None],
                               model.prepare_embeddings_for_image_generation(tokens[b:b + 1, :t])], 1)
                rows.append(model.model.generation_head(lm(inputs_embeds=x).last_hidden_state[0, -1]))
            cond, unc = rows
            guided = unc + 3.0 * (cond - unc)
            expected = torch.log_softmax(guided / 0.7, -1)[tokens[b, t]]
            torch.testing.assert_close(logp[b, t], expected, atol=2e-5, rtol=0)
    rescored = unirl.score_image_tokens(tiny, prompts, tokens, 3.0, 0.7)
    torch.testing.assert_close(rescored, logp, atol=2e-5, rtol=0)


def test_sampling_then_rescoring_gives_first_ratio_exactly_one(tiny):
    model = tiny.model
    common.inject_lora(model, ["*language_model*_proj", "*generation_head*"], rank=4)
    try:
        with torch.no_grad():
            for p in common.lora_parameters(model):
                p.normal_(std=0.05)  # adapters that change the policy, so "adapters off" is a different model
        cfg = unirl.Config(group_size=4, num_minibatches=2, cfg_scale=5.0, beta=0.1, lr=1e-3)
        metas = [unirl.make_prompt(random.Random(i), "colors", unirl.TOY_CLASSES, unirl.TOY_COLORS) for i in (1, 2)]
        batch = unirl.rollout(tiny, cfg, metas, torch.Generator().manual_seed(1))
        prompts = [m["prompt"] for m in batch.metas]
        with torch.no_grad():
            old = unirl.score_image_tokens(tiny, prompts[:4], batch.tokens[:4], 5.0, 1.0)
        for p in common.lora_parameters(model):
            p.requires_grad_(True)
        new = unirl.score_image_tokens(tiny, prompts[:4], batch.tokens[:4], 5.0, 1.0)
        assert new.requires_grad and torch.equal(new.detach(), old)  # bit for bit
        advantages = torch.randn(len(prompts))
        opt = torch.optim.AdamW(common.lora_parameters(model), lr=1e-3)
        stats = unirl.grpo_step(tiny, opt, cfg, batch, advantages)
        assert stats["ratio0"] == 1.0 and stats["skipped_updates"] == 0
        assert stats["kl"] > 0 and stats["logp_gap"] < 1e-4  # sampler (KV cache) vs re-score: last bits only
    finally:
        for name, module in list(common.lora_modules(model).items()):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base)


def test_group_advantages_and_zero_std_groups():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = unirl.group_advantages(r, 4)
    first = (r[:4] - r[:4].mean()) / (r[:4].std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv[:4], first)
    assert torch.equal(adv[4:], torch.zeros(4))


# -- reward: grader, prompts, GenEval rules ------------------------------------------------------


def meta_of(tag, **kw):
    metas = {
        "counting": {"tag": "counting", "include": [{"class": "bowl", "count": 4}],
                     "exclude": [{"class": "bowl", "count": 5}]},
        "position": {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                                    {"class": "dog", "count": 1, "position": ["right of", 0]}]},
        "color_attr": {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                                        {"class": "apple", "count": 1, "color": "black"}]},
        "colors": {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "blue"}]},
        "two_object": {"tag": "two_object", "include": [{"class": "bench", "count": 1},
                                                        {"class": "sports ball", "count": 1}]},
    }
    return {**metas[tag], **kw}


@pytest.mark.parametrize("tag, answer, expected", [
    ("counting", "Four bowls", (2, 2, True)),  # the paper's figure: +2
    ("counting", "Three bowls", (1, 2, True)),  # +1
    ("counting", "Two chairs", (0, 2, True)),  # 0
    ("counting", "There are 4 bowls.", (2, 2, True)),
    ("counting", "I cannot tell", (0, 2, False)),
    ("position", "The dog is right of the teddy bear", (3, 3, True)),
    ("position", "The teddy bear is to the left of the dog.", (3, 3, True)),  # same fact, other order
    ("position", "The dog is left of the teddy bear", (2, 3, True)),
    ("position", "A hot dog is above a bear", (0, 3, True)),  # "hot dog" is not "dog"; "bear" is not "teddy bear"
    ("color_attr", "The wine glass is purple and the apple is black", (4, 4, True)),
    ("color_attr", "The wine glass is black and the apple is purple", (2, 4, True)),
    ("color_attr", "a purple wine glass, a red apple", (3, 4, True)),
    ("colors", "blue", (1, 1, True)),
    ("colors", "The cup is red.", (0, 1, True)),
    ("colors", "", (0, 1, False)),
    ("two_object", "There is a bench and a sports ball", (2, 2, True)),
    ("two_object", "benches", (1, 2, True)),
])
def test_grader_on_hand_made_answers(tag, answer, expected):
    assert unirl.grade_answer(answer, meta_of(tag)) == expected


def test_geneval_position_rule_on_hand_made_boxes():
    rel = unirl.relative_position
    assert rel((0, 0, 10, 10), (50, 0, 60, 10)) == {"left of"}
    assert rel((50, 0, 60, 10), (0, 0, 10, 10)) == {"right of"}
    assert rel((0, 0, 10, 10), (0, 50, 10, 60)) == {"above"}
    assert rel((0, 50, 10, 60), (0, 0, 10, 10)) == {"below"}
    assert rel((0, 0, 10, 10), (40, 40, 50, 50)) == {"left of", "above"}  # a diagonal satisfies both
    assert rel((0, 0, 10, 10), (0, 0, 10, 10)) == set()  # same place
    # offset 6 in x, sizes 10 + 10: shrunk to 6 - 2 = 4, 4 / 6 = 0.67 > 0.5 -> left of
    assert rel((0, 0, 10, 10), (6, 0, 16, 10)) == {"left of"}
    # offset 5 in x and 5 in y with sizes 20 + 20: shrunk to 1 each, 1 / 7.07 < 0.5 -> nothing
    assert rel((0, 0, 20, 20), (5, 5, 25, 25)) == set()
    # mostly to the right, slightly lower: only "right of" (dy = 1 / 20.6 after the shrink)
    assert rel((40, 5, 50, 15), (20, 0, 30, 10)) == {"right of"}


def test_geneval_checks_count_exclude_colour_and_position():
    box = lambda x, y: (x, y, x + 10, y + 10)
    never = lambda cls, boxes: ["red"] * len(boxes)
    counting = meta_of("counting")
    assert unirl.geneval_correct(counting, {"bowl": [box(i * 20, 0) for i in range(4)]}, never)
    assert not unirl.geneval_correct(counting, {"bowl": [box(i * 20, 0) for i in range(3)]}, never)
    assert not unirl.geneval_correct(counting, {"bowl": [box(i * 20, 0) for i in range(5)]}, never)  # exclude
    colors = meta_of("colors")
    assert not unirl.geneval_correct(colors, {"cup": [box(0, 0)]}, never)
    assert unirl.geneval_correct(colors, {"cup": [box(0, 0)]}, lambda c, b: ["blue"] * len(b))
    position = meta_of("position")
    assert unirl.geneval_correct(position, {"teddy bear": [box(0, 0)], "dog": [box(50, 0)]}, never)
    assert not unirl.geneval_correct(position, {"teddy bear": [box(50, 0)], "dog": [box(0, 0)]}, never)
    assert not unirl.geneval_correct(position, {"dog": [box(50, 0)]}, never)  # no target group


def test_prompt_generator_ground_truth_is_consistent():
    rng = random.Random(0)
    for _ in range(50):
        for tag in unirl.TAGS:
            meta = unirl.make_prompt(rng, tag)
            points, top, parsed = unirl.grade_answer(meta["answer"], meta)
            assert parsed and points == top, (meta, points)  # the ground-truth answer earns full marks
            assert meta["question"] == unirl.QUESTIONS[tag]
            for req in meta["include"]:
                assert req["class"] in meta["prompt"] and req["class"] in unirl.COCO_CLASSES
                assert "color" not in req or f"{req['color']} {req['class']}" in meta["prompt"]
                assert not (req["class"] == "person" and "color" in req)  # GenEval: no coloured person
            if tag == "counting":
                n = meta["include"][0]["count"]
                assert 2 <= n <= 4 and meta["exclude"] == [{"class": meta["include"][0]["class"], "count": n + 1}]
                assert unirl.NUMBERS[n] in meta["prompt"]
            if tag == "position":
                rel, target = meta["include"][1]["position"]
                assert target == 0 and f" {rel} " in meta["prompt"]
    # the toy world: a rendering of the prompt passes GenEval's check and its true description earns full marks
    for _ in range(100):
        meta = unirl.make_prompt(rng, rng.choice(unirl.TAGS), unirl.TOY_CLASSES, unirl.TOY_COLORS)
        scene = unirl.toy_scene(meta, rng)
        assert unirl.toy_correct(meta, scene), (meta, scene)
        points, top, _ = unirl.grade_answer(unirl.toy_answer(scene, meta["tag"]), meta)
        assert points == top, (meta, scene, unirl.toy_answer(scene, meta["tag"]))
    assert len(unirl.COCO_CLASSES) == 80 and len(set(unirl.COCO_CLASSES)) == 80


def test_painted_toy_decoder_is_exact_and_local(tiny):
    tokens = torch.randint(0, unirl.TOY_CODES, (6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = tiny.model.decode_image_tokens(tokens)  # (B, 16, 16, 3)
    palette = [unirl.TOY_PALETTE[c][k] for k in range(4) for c in unirl.TOY_COLORS]
    palette += [unirl.TOY_GREYS[i % 4] for i in range(unirl.TOY_CODES - 16)]
    levels = torch.tensor(palette, dtype=torch.float32)[tokens].view(6, 4, 4, 3)
    expected = ((levels - 5) / 5).repeat_interleave(4, 1).repeat_interleave(4, 2)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


def test_real_scorer_runs_with_transformers_classes(tmp_path):
    """The real-weights evaluator (OWLv2 + CLIP through transformers' Auto classes) on tiny random models saved to
    disk: checks the wiring and the output format, not accuracy."""
    from PIL import Image
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer, Owlv2Config,
                              Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor)

    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    owl, clip = str(tmp_path / "owl"), str(tmp_path / "clip")
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(owl)
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tok).save_pretrained(owl)
    clip_text = {**text, "max_position_embeddings": 77}
    CLIPModel(CLIPConfig(text_config=clip_text, vision_config=vision, projection_dim=32)).save_pretrained(clip)
    CLIPProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tok).save_pretrained(clip)
    cfg = unirl.Config(detector_dir=owl, clip_dir=clip, det_threshold=-1.0)  # random weights: scores ~0, keep all
    score = unirl.load_scorer(cfg, torch.device("cpu"))
    image = Image.new("RGB", (48, 40), (200, 10, 10))
    correct, found = score(image, unirl.make_prompt(random.Random(0), "single_object"))
    assert isinstance(correct, bool) and found and set(found) <= set(unirl.COCO_CLASSES)
    for boxes in found.values():
        assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for b in boxes)
    cls = next(iter(found))  # a class the detector reports: its colour is checked by CLIP
    meta = {"tag": "colors", "include": [{"class": cls, "count": 1, "color": "red"}], "prompt": f"a red {cls}"}
    assert isinstance(score(image, meta)[0], bool)
    with pytest.raises(FileNotFoundError, match="--clip-dir"):
        unirl.load_scorer(unirl.Config(detector_dir=owl), torch.device("cpu"))
    # Grounding DINO is queried with the prompt's own classes and reports them by name
    from tiny import tiny_grounding_dino

    gdino = tiny_grounding_dino(str(tmp_path / "gdino"), words=("dog", "cat"))
    score = unirl.load_scorer(dataclasses.replace(cfg, detector_dir=gdino, det_threshold=0.0), torch.device("cpu"))
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
            "prompt": "a photo of a dog and a cat"}
    correct, found = score(image, meta)
    assert isinstance(correct, bool) and found and set(found) <= {"dog", "cat"}
    assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for boxes in found.values() for b in boxes)
    # each query's class and score against a loop over its tokens
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    det, proc = AutoModelForZeroShotObjectDetection.from_pretrained(gdino).eval(), AutoProcessor.from_pretrained(gdino)
    with torch.no_grad():
        res, labels = unirl.grounding_dino_detect(det, proc, image, ["cat", "dog"], 0.0)
        inputs = proc(text="cat. dog.", images=image, return_tensors="pt")
        probs = det(**inputs).logits[0].sigmoid()
    words = proc.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    expected = []
    for q in range(probs.shape[0]):
        best = max(((float(probs[q, i]), w) for i, w in enumerate(words) if w in ("cat", "dog")))
        expected.append(best)
    assert [(round(float(s), 5), l) for s, l in zip(res["scores"], labels)] == [(round(s, 5), w) for s, w in expected]


# -- loading errors ---------------------------------------------------------------------------------


def test_real_path_names_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        unirl.load_janus(str(tmp_path), torch.float32)
    for name in ("preprocessor_config.json", "tokenizer_config.json", "model.safetensors"):
        assert name in str(e.value)
    listed = str(e.value).split("missing: ")[1].split(" (")[0].split(", ")
    assert "config.json" not in listed and "tokenizer.json" not in listed  # present files are not listed
    with pytest.raises(FileNotFoundError, match="does not exist"):
        unirl.load_janus(str(tmp_path / "nope"), torch.float32)
    for name in ("preprocessor_config.json", "tokenizer_config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality"}))
    with pytest.raises(ValueError, match="convert_janus_weights_to_hf"):
        unirl.load_janus(str(tmp_path), torch.float32)


# -- end to end on the embedded default ------------------------------------------------------------

WIRING = ["--toy-pretrain-steps", "0", "--toy-gen-pretrain-steps", "0", "--prompts-per-rank", "1",
          "--group-size", "4"]


def test_learning_on_the_toy(tmp_path):
    """The default toy run (6 prompts x 16 images per step), shortened: the self-judged reward rises, and so does
    GenEval's rule applied to what the tokens really hold (the judge is not simply fooled)."""
    out = str(tmp_path / "run")
    run("--train", "--out-dir", out, "--max-steps", "40", "--sample-every", "1000")
    rows = metrics(out)
    mean = lambda key, part: sum(r[key] for r in part) / len(part)
    assert mean("reward", rows[-10:]) > mean("reward", rows[:10]) + 0.15, [r["reward"] for r in rows]
    assert mean("toy_geneval", rows[-10:]) > mean("toy_geneval", rows[:10]) + 0.05, [r["toy_geneval"] for r in rows]
    assert all(r["ratio0"] == 1.0 for r in rows) and all(r["groups_skipped"] == 0 for r in rows)
    assert os.path.exists(os.path.join(out, "lora.safetensors"))


def test_help_lists_every_flag_with_its_comment(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping (argparse also breaks lines after hyphens)
    with pytest.raises(SystemExit):
        unirl.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--train", "--evaluate", "--generate", "--ask"):
        assert flag in text
    comments = common._field_comments(unirl.Config)
    for field in dataclasses.fields(unirl.Config):
        assert "--" + field.name.replace("_", "-") in text
        assert comments.get(field.name) and " ".join(comments[field.name].split()) in text, field.name


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("--train", "--out-dir", a, "--max-steps", "2", *WIRING)
    run("--train", "--out-dir", a, "--max-steps", "4", "--resume", *WIRING)
    run("--train", "--out-dir", b, "--max-steps", "4", *WIRING)
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_sft_variant_runs(tmp_path):
    out = str(tmp_path / "sft")
    run("--train", "--algo", "sft", "--out-dir", out, "--max-steps", "2", *WIRING)
    rows = metrics(out)
    assert len(rows) == 2 and all(0 <= r["kept"] <= 1 for r in rows)


def test_torchrun_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "unirl.py"), "--train", "--out-dir", out, "--max-steps", "2",
                           "--device", "cpu", *WIRING], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step 1/2") == 1  # one log line per step, from rank 0 only
    for name in ("config.json", "metrics.jsonl", "lora.safetensors", "checkpoint/latest.pt", "samples/step_000001.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert len(metrics(out)) == 2
    assert len(torch.load(os.path.join(out, "checkpoint", "latest.pt"), weights_only=False)["rng"]) == 2


def test_generate_and_ask_on_the_embedded_default(tmp_path):
    from PIL import Image

    out = str(tmp_path / "gen")
    run("--generate", "a photo of a red cat", "--out-dir", out, "--group-size", "2", *WIRING[:4])
    images = sorted(os.listdir(os.path.join(out, "generate")))
    assert images == ["00.png", "01.png"]
    assert Image.open(os.path.join(out, "generate", images[0])).size == (16, 16)
    answer = run("--ask", os.path.join(out, "generate", images[0]), "What is the color of the object?", *WIRING[:4])
    assert answer.strip()
    with pytest.raises(AssertionError, match="image not found"):
        run("--ask", os.path.join(out, "missing.png"), "What?", *WIRING[:4])


def test_held_out_prompts_are_never_drawn_for_training(tmp_path):
    cfg = unirl.resolve_config(unirl.Config())
    plain = [m for step in range(30) for m in unirl.step_prompts(cfg, step, 0)]
    held = sorted({m["prompt"] for m in plain})[::2]  # half of the distinct prompts become the "test set"
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps({"tag": "x", "include": [], "prompt": p}) + "\n" for p in held))
    kept = [m for step in range(30) for m in unirl.step_prompts(dataclasses.replace(cfg, eval_prompts=str(path)),
                                                                step, 0)]
    assert len(kept) == len(plain) and not {m["prompt"] for m in kept} & set(held)
    assert [m["tag"] for m in kept] == [m["tag"] for m in plain]  # categories still in turn
    assert all(a == b for a, b in zip(plain, kept) if a["prompt"] not in held)  # the rest is untouched
