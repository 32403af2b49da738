"""The torch default sensealg rule re-measured on the compiled engine.

A neural-ODE sweep over problem sizes: ``u' = MLP(u)``, the MLP d -> w -> w -> d
with tanh, for state sizes d in {2, 32} and widths w in {8, 48, 300} (about
1e2, 3e3 and 1e5 parameters), u0 and the weights random with a fixed seed,
t in [0, 1], 11 save times, dopri5, rtol 1e-6, atol 1e-8, float64, p a dict of
tensors, loss ``sum(u**2)``, ``loss.backward()``. For each size every sensealg
runs on the engine (``DIFFEQKIT_TORCH_ENGINE=compiled``): ReverseThroughSolver,
CheckpointedAdjoint (the default today), InterpolatingAdjoint,
ContinuousAdjoint, and ForwardMode where u0.size + parameters <= 600.

Per variant: the first call (torch.compile's compilation) timed apart; then
interleaved rounds (one call of each per round), medians and quartiles; peak
memory on CUDA (``torch.cuda.max_memory_allocated`` over one gradient, less
what was allocated before it). Gradients are checked against
ReverseThroughSolver's (relative error reported). Each size runs in its own
process (``--one``), so sizes compile in parallel; on CPU one torch thread.

Run: python benchmarks/sensealg_engine.py [--quick] [--device cpu cuda]
     [--jobs N]
Writes benchmarks/results/sensealg_engine.md (and .json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "sensealg_engine.md"
STATES = (2, 32)
WIDTHS = (8, 48, 300)
FORWARD_MAX = 600
SENSEALGS = (
    "ReverseThroughSolver",
    "CheckpointedAdjoint",
    "InterpolatingAdjoint",
    "ContinuousAdjoint",
    "ForwardMode",
)


def one(device: str, d: int, w: int, repeat: int) -> dict[str, Any]:
    """Time every sensealg on one problem size; a dict of rows."""
    import torch

    import diffeqkit as dk

    if device == "cpu":
        torch.set_num_threads(1)
    os.environ.setdefault("DIFFEQKIT_TORCH_ENGINE", "compiled")
    f64 = torch.float64
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, dtype=f64)).to(device)

    weights = {
        "w1": rand(d, w, scale=d**-0.5),
        "b1": rand(w, scale=0.1),
        "w2": rand(w, w, scale=w**-0.5),
        "b2": rand(w, scale=0.1),
        "w3": rand(w, d, scale=w**-0.5),
        "b3": rand(d, scale=0.1),
    }
    u0 = rand(d)
    saves = torch.linspace(0.0, 1.0, 11, dtype=f64)
    nparams = sum(x.numel() for x in weights.values())

    def field(u: Any, p: Any, t: Any) -> Any:
        del t
        h = torch.tanh(u @ p["w1"] + p["b1"])
        h = torch.tanh(h @ p["w2"] + p["b2"])
        return h @ p["w3"] + p["b3"]

    stats: dict[str, Any] = {}

    def gradient(sensealg: Any) -> Any:
        def run(context: Any = contextlib.nullcontext) -> Any:
            p = {k: v.clone().requires_grad_() for k, v in weights.items()}
            y0 = u0.clone().requires_grad_()
            with context():
                sol = solve(y0, p)
            stats.update(sol.stats)
            (sol.u**2).sum().backward()
            grads = [y0.grad.reshape(-1), *(p[k].grad.reshape(-1) for k in p)]
            return torch.cat(grads)

        def solve(y0: Any, p: Any) -> Any:
            return dk.solve(
                dk.ODEProblem(field, y0, (0.0, 1.0), p),
                "dopri5",
                backend="torch",
                saveat=saves,
                rtol=1e-6,
                atol=1e-8,
                sensealg=sensealg,
            )

        return run

    def saved_mb(fn: Any) -> float:
        """MB of tensors autograd saves for the backward pass in the forward
        solve of one gradient (each storage once)."""
        seen: dict[int, int] = {}

        def pack(x: torch.Tensor) -> torch.Tensor:
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return x

        fn(lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x))
        return sum(seen.values()) / 2**20

    names = [s for s in SENSEALGS if s != "ForwardMode" or d + nparams <= FORWARD_MAX]
    variants = {name: gradient(getattr(dk, name)()) for name in names}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    for name, fn in variants.items():
        start = time.perf_counter()
        grad = fn()
        sync()
        first = time.perf_counter() - start
        if reference is None:
            reference = grad
        err = float((grad - reference).abs().max() / reference.abs().max())
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows[name] = {
            "first_s": first,
            "rel_error": err,
            "peak_mb": peak,
            "saved_mb": saved_mb(fn),
            "t": [],
        }
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync()
            rows[name]["t"].append(time.perf_counter() - start)
    for row in rows.values():
        ts = sorted(row.pop("t"))
        row["median_ms"] = 1e3 * ts[len(ts) // 2]
        row["q1_ms"], row["q3_ms"] = 1e3 * ts[len(ts) // 4], 1e3 * ts[3 * len(ts) // 4]
    return {
        "device": device,
        "states": d,
        "width": w,
        "parameters": nparams,
        "naccept": stats.get("naccept"),
        "rows": rows,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| device | states | params | steps | sensealg | median ms | quartiles ms "
        "| vs Checkpointed | saved MB | peak MB | rel. error | first call s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        base = res["rows"]["CheckpointedAdjoint"]["median_ms"]
        best = min(res["rows"], key=lambda k: res["rows"][k]["median_ms"])
        for name, r in res["rows"].items():
            peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            mark = " **best**" if name == best else ""
            lines.append(
                f"| {res['device']} | {res['states']} | {res['parameters']} | "
                f"{res['naccept']} | {name}{mark} | {r['median_ms']:.2f} | "
                f"{r['q1_ms']:.2f}-{r['q3_ms']:.2f} | {base / r['median_ms']:.2f}x | "
                f"{r['saved_mb']:.2f} | {peak} | {r['rel_error']:.1e} | "
                f"{r['first_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size")
    parser.add_argument("--device", nargs="+", default=["cpu"])
    parser.add_argument("--jobs", type=int, default=2, help="sizes at once")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--sizes", nargs="+", help="states x width, e.g. 2x8 32x48 (default: all)"
    )
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        device, d, w = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(one(device, d, w, args.repeat)))
        return
    start = time.perf_counter()
    sizes = [(2, 8)] if args.quick else [(d, w) for d in STATES for w in WIDTHS]
    if args.sizes:
        sizes = [(int(a), int(b)) for a, b in (x.split("x") for x in args.sizes)]
    jobs = [(dev, d, w) for dev in args.device for d, w in sizes]
    results: list[dict[str, Any]] = []
    running: list[tuple[Any, subprocess.Popen[str]]] = []
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    while jobs or running:
        while jobs and len(running) < args.jobs:
            job = jobs.pop(0)
            cmd = [sys.executable, __file__, "--one", *map(str, job)]
            cmd += ["--repeat", str(3 if args.quick else args.repeat)]
            running.append(
                (job, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
            )
        job, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"{job}: failed ({proc.returncode})", flush=True)
            continue
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(table(results[-1:]), flush=True)
    results.sort(key=lambda r: (r["device"], r["states"], r["parameters"]))
    import torch

    from diffeqkit._info import versions

    text = f"""# The torch default sensealg on the compiled engine: a neural-ODE sweep

(benchmarks/sensealg_engine.py; see its docstring for the problem.)

Run {time.strftime("%Y-%m-%d %H:%M:%S")}, {platform.python_version()},
{versions("torch")}, {platform.node()}, {os.cpu_count()} cores,
{"quick" if args.quick else "full"} run, {time.perf_counter() - start:.0f} s,
{args.jobs} sizes at once (CPU rows: one torch thread each);
CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}.
"vs Checkpointed" is CheckpointedAdjoint's median over the row's; "rel. error"
the largest difference from ReverseThroughSolver's gradient over its largest
entry; "first call" includes compilation. "saved MB": what autograd saved for
the backward pass during the forward solve of one gradient (each storage
once): the graph that ReverseThroughSolver keeps; the adjoints' and
CheckpointedAdjoint's checkpoints, dense output and states are held outside
autograd, and the segments CheckpointedAdjoint replays in its backward pass
are not counted. "peak MB" (CUDA only): the rise of
allocated memory over one gradient.

{table(results)}
"""
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
