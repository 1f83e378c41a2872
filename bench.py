"""
bench.py: speed and memory, never quality (quality lives in the README's results table).

    python bench.py                          # every section that exists, on the default device
    python bench.py --section matching --device cuda

Sections:
    matching    batched linear assignment (common.linear_assignment) on B x N x M random costs: a Python loop over
                scipy (with the device->host->device transfers when the costs live on a GPU), our C++ CPU path and
                our CUDA kernel. Median ms per batch after warm-up; every total is checked against scipy's optimum.

Prints the environment, a table, then one JSON line (the last line of stdout) that scripts can parse.
Requires common.py next to it.
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import common

MATCHING_SIZES = [(b, k, k) for b in (1024, 16384) for k in (4, 8, 16, 32)] + \
                 [(b, n, m) for b in (1024, 16384) for n, m in ((8, 3), (3, 8))]

# -----------------------------------------------------------------------------
# timing


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock ms of fn() with the device synchronised at both edges of every call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        common.synchronize(device)
        t0 = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -----------------------------------------------------------------------------
# matching


def scipy_loop(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline everyone writes: copy to host, one scipy call per problem, copy back."""
    from scipy.optimize import linear_sum_assignment

    host = cost.double().cpu().numpy()
    rows, cols = zip(*(linear_sum_assignment(c) for c in host))
    return torch.from_numpy(np.stack(rows)).to(cost.device), torch.from_numpy(np.stack(cols)).to(cost.device)


def total_cost(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    batch = torch.arange(cost.shape[0], device=cost.device)[:, None]
    return cost.double()[batch, rows, cols].sum(-1)


def bench_matching(device: torch.device, sizes=MATCHING_SIZES, repeats: int = 20) -> list[dict]:
    rows = []
    for b, n, m in sizes:
        cost = torch.rand(b, n, m, generator=torch.Generator().manual_seed(b + n * 100 + m)).to(device)
        reference = total_cost(cost, *scipy_loop(cost))
        candidates = {"scipy loop": lambda c=cost: scipy_loop(c),
                      f"ours ({common.assignment_backend(torch.device('cpu'))})":
                          lambda c=cost.cpu(): common.linear_assignment(c)}
        if device.type == "cuda":
            candidates[f"ours ({common.assignment_backend(device)})"] = lambda c=cost: common.linear_assignment(c)
        for name, fn in candidates.items():
            got = total_cost(cost, *(t.to(device) for t in fn()))
            if not torch.allclose(got, reference, rtol=0, atol=1e-4):
                raise AssertionError(f"{name} is not optimal on {b}x{n}x{m}")
            reps = max(3, repeats // 4) if name == "scipy loop" else repeats
            rows.append({"section": "matching", "B": b, "N": n, "M": m, "method": name,
                         "ms": round(median_ms(fn, device, reps), 4)})
    return rows


# -----------------------------------------------------------------------------
# CLI

SECTIONS = {"matching": bench_matching}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="section(s) to run; default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row after warm-up (default: 20)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact totals in the checks
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    results = []
    for section in args.section or sorted(SECTIONS):
        rows = SECTIONS[section](device, repeats=args.repeats)
        keys = list(rows[0])
        print("\n" + " | ".join(keys))
        for r in rows:
            print(" | ".join(str(r[k]) for k in keys), flush=True)
        results += rows
    print(json.dumps({"env": env, "results": results}))


if __name__ == "__main__":
    main()
