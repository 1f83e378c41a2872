"""umo.py's face nets: checkpoint key layouts, strict loading, priors/decoding/NMS, similarity fit, warp, detect, embed.

    python -m pytest -q tests/test_umo_faces.py
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import umo as faces  # noqa: E402  (the face nets live in umo.py's reward section)

TINY_RETINA = dict(base_width=8, blocks=(1, 1, 1, 1), out_channels=16)
TINY_ARC = dict(layers=(1, 1, 1, 1), width=8)


def bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

# -----------------------------------------------------------------------------
# key layouts, written out from facexlib retinaface.py / retinaface_net.py + torchvision resnet50,
# and insightface recognition/arcface_torch/backbones/iresnet.py


def expected_retinaface():
    e = {"body.conv1.weight": (64, 3, 7, 7), **bn("body.bn1", 64)}
    c_in = 64
    for li, (n, w) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
        for j in range(n):
            p, c = f"body.layer{li + 1}.{j}", (c_in if j == 0 else 4 * w)
            e.update({f"{p}.conv1.weight": (w, c, 1, 1), **bn(f"{p}.bn1", w), f"{p}.conv2.weight": (w, w, 3, 3),
                      **bn(f"{p}.bn2", w), f"{p}.conv3.weight": (4 * w, w, 1, 1), **bn(f"{p}.bn3", 4 * w)})
            if j == 0:
                e.update({f"{p}.downsample.0.weight": (4 * w, c, 1, 1), **bn(f"{p}.downsample.1", 4 * w)})
        c_in = 4 * w
    for i, c in enumerate((512, 1024, 2048)):
        e.update({f"fpn.output{i + 1}.0.weight": (256, c, 1, 1), **bn(f"fpn.output{i + 1}.1", 256)})
    for i in (1, 2):
        e.update({f"fpn.merge{i}.0.weight": (256, 256, 3, 3), **bn(f"fpn.merge{i}.1", 256)})
    for s in ("ssh1", "ssh2", "ssh3"):
        for name, shape in (("conv3X3", (128, 256, 3, 3)), ("conv5X5_1", (64, 256, 3, 3)),
                            ("conv5X5_2", (64, 64, 3, 3)), ("conv7X7_2", (64, 64, 3, 3)),
                            ("conv7x7_3", (64, 64, 3, 3))):
            e.update({f"{s}.{name}.0.weight": shape, **bn(f"{s}.{name}.1", shape[0])})
    for head, k in (("ClassHead", 4), ("BboxHead", 8), ("LandmarkHead", 20)):
        for i in range(3):
            e.update({f"{head}.{i}.conv1x1.weight": (k, 256, 1, 1), f"{head}.{i}.conv1x1.bias": (k,)})
    return e


def expected_iresnet50():
    e = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64), "prelu.weight": (64,)}
    c_in = 64
    for li, (n, c) in enumerate([(3, 64), (4, 128), (14, 256), (3, 512)]):
        for j in range(n):
            p, ci = f"layer{li + 1}.{j}", (c_in if j == 0 else c)
            e.update({**bn(f"{p}.bn1", ci), f"{p}.conv1.weight": (c, ci, 3, 3), **bn(f"{p}.bn2", c),
                      f"{p}.prelu.weight": (c,), f"{p}.conv2.weight": (c, c, 3, 3), **bn(f"{p}.bn3", c)})
            if j == 0:
                e.update({f"{p}.downsample.0.weight": (c, ci, 1, 1), **bn(f"{p}.downsample.1", c)})
        c_in = c
    e.update({**bn("bn2", 512), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), **bn("features", 512)})
    return e


def test_retinaface_key_layout():
    with torch.device("meta"):
        model = faces.RetinaFace()
    got = shapes(model)
    assert len(got) == 456
    assert got == expected_retinaface()
    assert got["body.conv1.weight"] == (64, 3, 7, 7)
    assert got["body.layer2.0.downsample.0.weight"] == (512, 256, 1, 1)
    assert got["fpn.output3.0.weight"] == (256, 2048, 1, 1)
    assert got["ssh3.conv7x7_3.1.running_var"] == (64,)
    assert got["ClassHead.0.conv1x1.weight"] == (4, 256, 1, 1)
    assert got["BboxHead.0.conv1x1.weight"] == (8, 256, 1, 1)
    assert got["LandmarkHead.0.conv1x1.weight"] == (20, 256, 1, 1)
    # the meta-device forward checks the wiring: one prediction per prior
    loc, logits, landms = model(torch.empty(2, 3, 640, 640, device="meta"))
    assert loc.shape == (2, 16800, 4) and logits.shape == (2, 16800, 2) and landms.shape == (2, 16800, 10)


def test_iresnet50_key_layout():
    with torch.device("meta"):
        model = faces.IResNet()
    got = shapes(model)
    assert len(got) == 475
    assert got == expected_iresnet50()
    assert got["fc.weight"] == (512, 25088)
    assert got["layer3.13.prelu.weight"] == (256,)
    assert got["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert not model.features.weight.requires_grad
    assert model(torch.empty(2, 3, 112, 112, device="meta")).shape == (2, 512)

# -----------------------------------------------------------------------------
# strict loaders


@pytest.mark.parametrize("kind", ["retina", "arc"])
def test_loader_strips_module_prefix_and_roundtrips(tmp_path, kind):
    torch.manual_seed(0)
    model = faces.RetinaFace(**TINY_RETINA) if kind == "retina" else faces.IResNet(**TINY_ARC)
    sd = model.state_dict()
    path = str(tmp_path / "ckpt.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    loaded = (faces.load_retinaface(path, **TINY_RETINA) if kind == "retina" else faces.load_arcface(path, **TINY_ARC))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_loader_tolerates_missing_batch_counters(tmp_path):
    sd = {k: v for k, v in faces.IResNet(**TINY_ARC).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    faces.load_arcface(str(tmp_path / "old.pth"), **TINY_ARC)


@pytest.mark.parametrize("break_it, name", [
    (lambda sd: sd.pop("fc.bias"), "fc.bias"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(3)), "extra.weight"),
    (lambda sd: sd.__setitem__("prelu.weight", torch.zeros(9)), "prelu.weight"),
])
def test_arcface_loader_rejects_mismatch(tmp_path, break_it, name):
    sd = faces.IResNet(**TINY_ARC).state_dict()
    break_it(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        faces.load_arcface(str(tmp_path / "bad.pth"), **TINY_ARC)


def test_retinaface_loader_rejects_missing_key(tmp_path):
    sd = faces.RetinaFace(**TINY_RETINA).state_dict()
    sd.pop("LandmarkHead.2.conv1x1.bias")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"LandmarkHead\.2\.conv1x1\.bias"):
        faces.load_retinaface(str(tmp_path / "bad.pth"), **TINY_RETINA)

# -----------------------------------------------------------------------------
# priors, decoding, NMS


def naive_priors(h, w):
    """facexlib PriorBox.forward written as plain loops."""
    out = []
    for sizes, step in zip(faces.MIN_SIZES, faces.STEPS):
        for i in range(math.ceil(h / step)):
            for j in range(math.ceil(w / step)):
                for s in sizes:
                    out.append([(j + 0.5) * step / w, (i + 0.5) * step / h, s / w, s / h])
    return torch.tensor(out)


def test_prior_boxes():
    p = faces.prior_boxes(640, 640)
    assert p.shape == (16800, 4)
    assert torch.allclose(p[0], torch.tensor([4, 4, 16, 16]) / 640.0)
    assert torch.allclose(p[1], torch.tensor([4, 4, 32, 32]) / 640.0)
    assert torch.allclose(faces.prior_boxes(50, 70), naive_priors(50, 70))


def test_decode():
    priors = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    box = faces.decode_boxes(torch.zeros(1, 4), priors)
    assert torch.allclose(box, torch.tensor([[0.4, 0.2, 0.6, 0.3]]))
    # centre moves by 0.1 * prior size per unit offset; size scales by exp(0.2 * offset)
    box = faces.decode_boxes(torch.tensor([[1.0, -2.0, math.log(2) / 0.2, 0.0]]), priors)
    assert torch.allclose(box, torch.tensor([[0.52 - 0.2, 0.23 - 0.05, 0.52 + 0.2, 0.23 + 0.05]]))
    lm = faces.decode_landmarks(torch.zeros(1, 10), priors)
    assert lm.shape == (1, 5, 2) and torch.allclose(lm, torch.tensor([0.5, 0.25]).expand(1, 5, 2))
    lm = faces.decode_landmarks(torch.arange(10.0).view(1, 10), priors)
    assert torch.allclose(lm[0, 2], torch.tensor([0.5 + 4 * 0.1 * 0.2, 0.25 + 5 * 0.1 * 0.1]))


def naive_nms(boxes, scores, thresh):
    """torchvision.ops.nms semantics (what facexlib v0.3.0 calls) as a plain loop over a score-sorted list."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for k in keep:
            iw = max(0.0, min(boxes[i][2], boxes[k][2]) - max(boxes[i][0], boxes[k][0]))
            ih = max(0.0, min(boxes[i][3], boxes[k][3]) - max(boxes[i][1], boxes[k][1]))
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if iw * ih / (area(boxes[i]) + area(boxes[k]) - iw * ih) > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("thresh", [0.2, 0.4, 0.7])
def test_nms_matches_naive(thresh):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g, dtype=torch.float64) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g, dtype=torch.float64) * 40], dim=1)
    scores = torch.rand(300, generator=g, dtype=torch.float64)
    keep = faces.nms(boxes, scores, thresh).tolist()
    assert keep == naive_nms(boxes.tolist(), scores.tolist(), thresh)
    assert faces.nms(boxes[:0], scores[:0], thresh).shape == (0,)

# -----------------------------------------------------------------------------
# detection


def test_detector_input():
    img = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)           # R, G, B
    x = faces.to_detector_input(img).flatten()
    assert torch.allclose(x, torch.tensor([255.0 - 104.0, 127.5 - 117.0, 0.0 - 123.0]))  # B, G, R: mean once


def check_detections(dets, b, h, w):
    assert len(dets) == b
    for boxes, scores, points in dets:
        n = scores.shape[0]
        assert boxes.shape == (n, 4) and points.shape == (n, 5, 2)
        assert boxes.dtype == scores.dtype == points.dtype == torch.float32
        assert (scores > 0.8).all() and (scores[1:] <= scores[:-1]).all()


def test_detect_random_init():
    torch.manual_seed(0)
    model = faces.RetinaFace(**TINY_RETINA).eval()
    images = torch.rand(2, 3, 64, 80) * 2 - 1
    check_detections(model.detect(images), 2, 64, 80)
    # force every prior to be a face so thresholding, decoding and NMS all run on a full set
    for head in model.ClassHead:
        head.conv1x1.bias.data = torch.tensor([-10.0, 10.0, -10.0, 10.0])
    dets = model.detect(images)
    check_detections(dets, 2, 64, 80)
    assert all(len(d[1]) > 0 for d in dets)
    # batched forward gives the same detections as one image at a time (eval BN: no batch coupling);
    # compared as row sets because every score is ~1.0 here and tied rows may come out in either order
    def rows(d):
        r = torch.cat([d[0], d[1][:, None], d[2].flatten(1)], dim=1)
        return r[np.lexsort(r.numpy().T[::-1])]
    for b in range(2):
        assert torch.allclose(rows(dets[b]), rows(model.detect(images[b:b + 1])[0]), atol=1e-4)


def test_detect_full_size_runs():
    torch.manual_seed(0)
    model = faces.RetinaFace().eval()
    check_detections(model.detect(torch.rand(2, 3, 64, 64) * 2 - 1), 2, 64, 64)

# -----------------------------------------------------------------------------
# alignment


def umeyama_numpy(src, dst):
    """Umeyama 1991 with scale, SVD form (as skimage's _umeyama), returns the 2x3 forward matrix."""
    n, dim = src.shape
    sm, dm = src.mean(0), dst.mean(0)
    sd, dd = src - sm, dst - dm
    A = dd.T @ sd / n
    d = np.ones(dim)
    if np.linalg.det(A) < 0:
        d[-1] = -1
    U, S, V = np.linalg.svd(A)
    R = U @ np.diag(d) @ V
    scale = (S @ d) / sd.var(0).sum()
    return np.concatenate([scale * R, (dm - scale * R @ sm)[:, None]], axis=1)


def test_similarity_matches_umeyama():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(16, 5, 2)) * 30 + 100
    dst = faces.ARCFACE_TEMPLATE.numpy()
    got = faces.similarity_transform(torch.from_numpy(src), faces.ARCFACE_TEMPLATE)
    assert got.shape == (16, 2, 3) and got.dtype == torch.float64
    for i in range(16):
        np.testing.assert_allclose(got[i].numpy(), umeyama_numpy(src[i], dst), rtol=1e-9, atol=1e-9)


def test_similarity_exact_on_known_transform():
    rng = np.random.default_rng(1)
    s, th, t = 1.7, 0.6, np.array([12.0, -5.0])
    A = np.concatenate([s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]), t[:, None]], axis=1)
    src = rng.uniform(0, 200, size=(5, 2))
    dst = src @ A[:, :2].T + A[:, 2]
    got = faces.similarity_transform(torch.from_numpy(src)[None], torch.from_numpy(dst))[0]
    np.testing.assert_allclose(got.numpy(), A, atol=1e-10)


def test_arcface_template_is_shifted_96x112():
    base = torch.tensor([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                         [33.5493, 92.3655], [62.7299, 92.2041]], dtype=torch.float64)
    assert torch.allclose(faces.ARCFACE_TEMPLATE, base + torch.tensor([8.0, 0.0], dtype=torch.float64))


def naive_warp(img, A, size):
    """cv2.warpAffine semantics as a loop: crop(u, v) = bilinear(img, A^-1 (u, v)), zeros outside."""
    C, H, W = img.shape
    inv = np.linalg.inv(np.vstack([A, [0, 0, 1]]))
    out = np.zeros((C, size, size))
    for v in range(size):
        for u in range(size):
            x, y, _ = inv @ np.array([u, v, 1.0])
            x0, y0 = math.floor(x), math.floor(y)
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if 0 <= xx < W and 0 <= yy < H:
                        out[:, v, u] += wx * wy * img[:, yy, xx]
    return out


def test_warp_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64)
    c, s = 0.8 * math.cos(0.3), 0.8 * math.sin(0.3)
    A1 = torch.tensor([[c, -s, 2.5], [s, c, -3.0]], dtype=torch.float64)  # partly out of the image: tests padding
    A2 = torch.tensor([[1.3, 0.0, -4.2], [0.0, 1.3, -6.7]], dtype=torch.float64)
    idx = torch.tensor([1, 0, 1])
    crops = faces.warp_faces(images, idx, torch.stack([A1, A2, A2]), size=16)
    assert crops.shape == (3, 3, 16, 16)
    for j, (i, A) in enumerate(zip(idx.tolist(), (A1, A2, A2))):
        np.testing.assert_allclose(crops[j].numpy(), naive_warp(images[i].numpy(), A.numpy(), 16), atol=1e-10)


def test_warp_identity_and_gradcheck():
    img = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    assert torch.allclose(faces.warp_faces(img, torch.tensor([0]), eye, size=6), img[..., :6, :6])
    A = torch.tensor([[[0.9, -0.2, 0.4], [0.2, 0.9, -0.3]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: faces.warp_faces(x, torch.tensor([0, 0]), A.expand(2, 2, 3), size=5), img)

# -----------------------------------------------------------------------------
# embedding, end to end


def test_embed_gradient_reaches_image():
    torch.manual_seed(0)
    arcface = faces.IResNet(**TINY_ARC).eval()
    images = (torch.rand(1, 3, 160, 160) * 2 - 1).requires_grad_(True)
    landmarks = faces.ARCFACE_TEMPLATE[None].float() * 1.2 + 10.0  # a face at 1.2x template scale
    crops = faces.warp_faces(images, torch.tensor([0]), faces.similarity_transform(landmarks, faces.ARCFACE_TEMPLATE))
    emb = faces.embed_faces(arcface, crops)
    assert emb.shape == (1, 512) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
    emb.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
