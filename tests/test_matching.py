"""common.linear_assignment against scipy.optimize.linear_sum_assignment: the C++ kernel, the scipy fallback, the CUDA
kernel (on a GPU, and its source under a CPU warp emulator everywhere else).

    python -m pytest -q tests/test_matching.py
"""
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from common import assignment_backend, linear_assignment  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = pytest.mark.gpu  # the project's marker for CUDA tests
KINDS = ["uniform", "normal", "ties", "inf"]


def make(gen, B, N, M, kind):
    """B random N x M float64 problems: uniform, normal incl. negatives, integers 0..2 (many ties), or ~30% +inf."""
    if kind == "normal":
        return torch.randn(B, N, M, generator=gen, dtype=torch.float64) * 10
    if kind == "ties":
        return torch.randint(0, 3, (B, N, M), generator=gen).double()
    c = torch.rand(B, N, M, generator=gen, dtype=torch.float64)
    if kind == "inf":
        c[torch.rand(B, N, M, generator=gen) < 0.3] = float("inf")
    return c


def check(cost, maximize=False, exact=False):
    """Checks linear_assignment(cost) problem by problem against scipy; returns how many problems were compared.

    Where scipy raises, ours must raise naming the first bad index; the batch is then re-checked without that problem.
    exact=True also demands scipy's permutation (the CPU kernel replicates scipy's scan order and tie rule)."""
    a = cost.detach().cpu().double().numpy()
    ref = []
    for b, x in enumerate(a):
        try:
            ref.append(linear_sum_assignment(x, maximize=maximize))
        except ValueError as e:
            what = "is infeasible" if "infeasible" in str(e) else "contains NaN or -inf"
            with pytest.raises(ValueError, match=rf"cost\[{b}\] {what}"):
                linear_assignment(cost, maximize)
            rest = torch.cat([cost[:b], cost[b + 1 :]])
            return check(rest, maximize, exact) if len(rest) else 0
    rows, cols = linear_assignment(cost, maximize)
    B, N, M = cost.shape
    n = min(N, M)
    assert rows.shape == cols.shape == (B, n) and rows.dtype == cols.dtype == torch.int64
    assert rows.device == cols.device == cost.device
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
    assert (np.diff(rows, axis=1) > 0).all() and (rows >= 0).all() and (rows < N).all()  # sorted, distinct
    assert (np.diff(np.sort(cols, axis=1), axis=1) > 0).all() and (cols >= 0).all() and (cols < M).all()
    picked = a[np.arange(B)[:, None], rows, cols]
    assert np.isfinite(picked).all()
    want = np.array([x[r, c].sum() for x, (r, c) in zip(a, ref)])
    np.testing.assert_allclose(picked.sum(1), want, rtol=1e-9, atol=1e-9)
    if exact:
        assert all((rows[b] == r).all() and (cols[b] == c).all() for b, (r, c) in enumerate(ref))
    return B


def run_grid(device, sides, B, exact):
    gen = torch.Generator().manual_seed(0)
    total = 0
    for N in sides:
        for M in sides:
            for k, kind in enumerate(KINDS):
                cost = make(gen, B, N, M, kind).to(device)
                total += check(cost, maximize=(N + M + k) % 2 == 1, exact=exact)
    return total


def test_cpu_matches_scipy():
    assert assignment_backend("cpu") == ("cpu-kernel" if shutil.which("g++") else "scipy")
    assert run_grid("cpu", range(1, 17), B=12, exact=True) >= 10_000


def test_cpu_larger_and_strided():
    gen = torch.Generator().manual_seed(1)
    for N, M in [(40, 40), (64, 31), (31, 64), (100, 70)]:
        check(make(gen, 8, N, M, "uniform"), exact=True)
    base = make(gen, 64, 9, 6, "normal")
    check(base.transpose(1, 2), exact=True)  # non-contiguous view
    check(base.requires_grad_(True), exact=True)


def test_errors_name_first_bad_problem():
    c = torch.rand(8, 4, 6)
    c[5, 1, 2] = float("nan")
    c[6, 0] = float("inf")  # a row with no finite entry
    with pytest.raises(ValueError, match=r"cost\[5\] contains NaN or -inf"):
        linear_assignment(c)
    c[3, 2, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"cost\[3\] contains NaN or -inf"):
        linear_assignment(c)
    c = torch.rand(8, 4, 6)
    c[6, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cost\[6\] is infeasible"):
        linear_assignment(c)
    c[2, :, :5] = float("inf")  # 4 rows but only one usable column
    with pytest.raises(ValueError, match=r"cost\[2\] is infeasible"):
        linear_assignment(c)


def test_maximize_with_infinities_matches_scipy():
    c = torch.rand(16, 5, 4, dtype=torch.float64)
    c[c < 0.2] = float("-inf")  # forbidden when maximizing
    check(c, maximize=True, exact=True)
    c = torch.rand(16, 5, 4, dtype=torch.float64)
    c[9, 2, 3] = float("inf")  # becomes -inf: invalid when maximizing
    check(c, maximize=True, exact=True)
    with pytest.raises(ValueError, match=r"cost\[9\] contains NaN or -inf"):
        linear_assignment(c, maximize=True)


def test_2d_and_empty():
    x = torch.rand(5, 3)
    r, c = linear_assignment(x)
    want = linear_sum_assignment(x.double().numpy())
    assert r.shape == (3,) and r.tolist() == want[0].tolist() and c.tolist() == want[1].tolist()
    r, c = linear_assignment(x, maximize=True)
    assert c.tolist() == linear_sum_assignment(x.double().numpy(), maximize=True)[1].tolist()
    with pytest.raises(ValueError, match=r"linear_assignment: cost contains NaN"):
        linear_assignment(torch.tensor([[1.0, float("nan")]]))
    for shape, out in [((0, 3), (0,)), ((3, 0), (0,)), ((0, 0), (0,)), ((0, 4, 5), (0, 4)), ((4, 0, 5), (4, 0))]:
        r, c = linear_assignment(torch.zeros(shape))
        assert r.shape == c.shape == out and r.dtype == torch.int64
    r, c = linear_assignment(torch.tensor([[7.0]]))
    assert r.tolist() == [0] and c.tolist() == [0]
    with pytest.raises(ValueError, match="expected a real"):
        linear_assignment(torch.zeros(2, 2, 2, 2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32, torch.float16,
                                   torch.bfloat16, torch.bool])
def test_dtypes(dtype):
    gen = torch.Generator().manual_seed(2)
    c = (torch.rand(200, 6, 9, generator=gen) * 20).to(dtype)
    check(c, exact=True)
    check(c, maximize=True, exact=True)


def test_scipy_fallback_identical(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    batches = [make(gen, 100, N, M, kind) for N, M in [(6, 6), (3, 8), (8, 3)] for kind in KINDS[:3]]
    kernel = [linear_assignment(c, maximize=m) for c in batches for m in (False, True)]
    monkeypatch.setenv("NANOGENRL_NO_KERNEL", "1")
    assert assignment_backend("cpu") == "scipy"
    fallback = [linear_assignment(c, maximize=m) for c in batches for m in (False, True)]
    for (r1, c1), (r2, c2) in zip(kernel, fallback):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert run_grid("cpu", [1, 2, 5, 7], B=4, exact=True) > 0  # error messages and indices too


def test_without_compiler_falls_back_to_scipy(tmp_path):
    """A process with no g++ on PATH prints one line and still returns scipy's answer."""
    code = ("import torch; from common import linear_assignment as la, assignment_backend as ab;"
            "print(ab('cpu')); print(la(torch.tensor([[4., 1., 3.], [2., 0., 5.], [3., 2., 2.]]))[1].tolist())")
    env = dict(os.environ, PATH=str(tmp_path), NANOGENRL_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.pop("NANOGENRL_NO_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["scipy", "[1, 0, 2]"]
    notes = [line for line in proc.stderr.splitlines() if "linear_assignment" in line]
    assert len(notes) == 1 and "g++ is not on PATH" in notes[0] and "scipy" in notes[0]


@pytest.mark.skipif(common._find_nvcc() is None, reason="nvcc not found")
def test_cuda_kernel_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGENRL_CACHE", str(tmp_path))
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    lib = ctypes.CDLL(str(common._build_cuda_kernel(cap)))  # static cudart: loads without a GPU or libcudart
    assert lib.lsap_cuda and lib.lsap_cuda_error


@gpu
@needs_cuda
def test_cuda_matches_scipy():
    assert assignment_backend("cuda") == "cuda-kernel"
    n = run_grid("cuda", [1, 2, 3, 4, 5, 7, 8, 11, 16], B=40, exact=False)
    n += run_grid("cuda", [17, 31, 32], B=10, exact=False)
    assert n >= 10_000
    gen = torch.Generator().manual_seed(4)
    for N, M in [(33, 33), (64, 64), (40, 64), (64, 40), (65, 30), (100, 100)]:  # 2 slots per lane; > 64: host
        check(make(gen, 20, N, M, "uniform").cuda())
        check(make(gen, 20, N, M, "inf").cuda(), maximize=True)


@gpu
@needs_cuda
def test_cuda_dtypes_strides_streams():
    gen = torch.Generator().manual_seed(5)
    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.bool]:
        check((torch.rand(300, 7, 5, generator=gen) * 20 - 5).to(dtype).cuda(), maximize=dtype == torch.int8)
    base = make(gen, 300, 12, 7, "normal").cuda()
    check(base.transpose(1, 2))  # non-contiguous: strides are passed to the kernel
    check(base[::2, 1:, ::2])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # runs on the current stream, not the default one
        check(make(gen, 500, 16, 16, "ties").cuda())
    r, c = linear_assignment(torch.rand(6, 4, device="cuda"))
    assert r.shape == (4,) and r.is_cuda and r.tolist() == [0, 1, 2, 3]


@gpu
@needs_cuda
def test_cuda_errors():
    c = torch.rand(1000, 8, 8, device="cuda")
    c[700, 3, 3] = float("nan")
    c[900, 2] = float("inf")
    with pytest.raises(ValueError, match=r"cost\[700\] contains NaN or -inf"):
        linear_assignment(c)
    c[200, :, 1:] = float("inf")
    with pytest.raises(ValueError, match=r"cost\[200\] is infeasible"):
        linear_assignment(c)
    c = torch.rand(64, 5, 9, device="cuda")
    c[10, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cost\[10\] contains NaN or -inf"):
        linear_assignment(c, maximize=True)
    r, _ = linear_assignment(torch.rand(64, 5, 9, device="cuda"))  # state is clean after an error
    assert r.shape == (64, 5)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    torch.cuda.set_device(0)
    check(make(torch.Generator().manual_seed(6), 200, 9, 12, "ties").to("cuda:1"))
    assert torch.cuda.current_device() == 0  # the call leaves torch's current device alone


def test_cuda_kernel_logic_under_cpu_warp_emulation(tmp_path):
    """The CUDA kernel's source, run lane by lane on the CPU (tests/cuda_warp_emulation.h), agrees with scipy.

    Covers what a GPU-less CI can check: indexing, the tie rule, dual updates, augmentation, sorted output for tall
    problems, 2 columns per lane (sides 33..64), strided input, dtypes and the error slots."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    kernel = common._CUDA_SRC[: common._CUDA_SRC.index("// Resets the error slots")]  # without the runtime wrapper
    kernel = "\n".join(line for line in kernel.splitlines() if not line.startswith("#include"))
    (tmp_path / "emu.cpp").write_text(f'#include "cuda_warp_emulation.h"\n{kernel}\n'
                                      '#define EMULATION_MAIN\n#include "cuda_warp_emulation.h"\n')
    subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-I", str(HERE), str(tmp_path / "emu.cpp"),
                    "-o", str(tmp_path / "emu.so")], check=True, capture_output=True)
    lib = ctypes.CDLL(str(tmp_path / "emu.so"))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.emu_run.argtypes = [ptr, i32, i64, i32, i32, i64, i64, i64, i32, ptr, ptr]

    def emulated(cost, maximize):
        B, N, M = cost.shape
        n = min(N, M)
        out, bad = torch.empty(2 * B * n + 2, dtype=torch.int64), (i64 * 2)()
        lib.emu_run(cost.data_ptr(), common._DTYPE_CODE[cost.dtype], B, N, M, *cost.stride(), int(maximize),
                    out.data_ptr(), bad)
        return out[: B * n].view(B, n).numpy(), out[B * n: 2 * B * n].view(B, n).numpy(), (bad[0], bad[1])

    def agrees(cost, maximize=False):
        rows, cols, (invalid, infeasible) = emulated(cost, maximize)
        for b, x in enumerate(cost.double().numpy()):
            try:
                r, c = linear_sum_assignment(x, maximize=maximize)
            except ValueError as e:  # the kernel must report this problem as the first bad one, of the same kind
                first = min(i for i in (invalid, infeasible) if i >= 0)
                assert first == b and (first == infeasible) == ("infeasible" in str(e))
                return 0
            assert (np.diff(rows[b]) > 0).all() and len(set(cols[b].tolist())) == len(r)
            assert np.isclose(x[rows[b], cols[b]].sum(), x[r, c].sum(), rtol=1e-9, atol=1e-9)
        assert invalid == infeasible == -1
        return len(cost)

    gen = torch.Generator().manual_seed(7)
    count = 0
    for N in [1, 2, 3, 5, 8, 13, 16, 31, 33, 64]:
        for M in [1, 3, 8, 16, 17, 32, 40, 64]:
            B = 4 if max(N, M) <= 16 else 1
            for kind in KINDS:
                count += agrees(make(gen, B, N, M, kind), maximize=kind == "normal")
            count += agrees(make(gen, B, M, N, "uniform").transpose(1, 2))  # strided input
    c = torch.rand(8, 5, 7, generator=gen)
    c[5, 1, 2], c[3, 2, :] = float("nan"), float("inf")
    agrees(c)
    for dtype in [torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.bool]:
        count += agrees((torch.rand(4, 6, 9, generator=gen) * 20).to(dtype), maximize=True)
    assert count > 300
