"""attnjax's xla path against its peers on the same CPU cores, interleaved in one run.

    python -m experiments.bench.cpu peers           # about 15-20 minutes on 2 cores
    python -m experiments.bench.cpu peers --quick   # tiny sizes: a smoke test (seconds)

Peers, each where importable (the ``bench`` extra installs them): ``jax.nn.dot_product_attention``
(XLA), tokamax's ``xla_chunked``, PyTorch's ``scaled_dot_product_attention`` and compiled
``flex_attention``, NATTEN for neighborhood attention. Cases: causal (1K-16K), sliding window 256
(4K-16K), forward and forward+backward; a causal document mask (8K) and neighborhood attention
2-D 64x64 k=7 and 1-D 16K k=65, forward. B=1, H=4, D=64, float32.

For each case every implementation is compiled and warmed up first, then all are called in turn
(round-robin) and each one's median is kept, so load on a shared machine hits them alike. A
peer is left out of a case it cannot express (SDPA has no sliding-window or document mask
short of a dense ``[T, S]`` one) and of lengths past its cap (dense peers materialize ``[T, S]``
scores) or after a call slower than ``SLOW_S``. Each row records achieved GFLOP/s (the flops of
the allowed query-key pairs: 4 D per pair forward, 2.5 times that backward, FlashAttention's
count) and its fraction of the machine's peak, measured with large matmuls (JAX and PyTorch,
the better one) in the same run. Writes ``benchmarks/results/peers-cpu-<date>.json`` and a plot
per case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import numpy as np

from . import common

B, H, D = 1, 4, 64
WINDOW = 256
SLOW_S = 8.0  # a peer whose call took longer than this runs no longer lengths of that case
DENSE_MAX = 8192  # jax.nn materializes [B, H, T, S] float32 scores (and more in its backward)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # causal, sliding_window, document, na1d, na2d
    T: int
    backward: bool
    spatial: tuple[int, ...] = ()
    kernel: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} T={self.T} {'fwd+bwd' if self.backward else 'fwd'}"


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(n, 256, bwd) for n in ("causal", "sliding_window", "document") for bwd in (False, True)] + [
            Case("na2d", 64, False, (8, 8), 3), Case("na1d", 128, False, (128,), 9)]
    out = []
    for bwd in (False, True):
        out += [Case("causal", T, bwd) for T in (1024, 4096, 8192, 16384)]
        out += [Case("sliding_window", T, bwd) for T in (4096, 8192, 16384)]
    out += [Case("document", 8192, bwd) for bwd in (False, True)]
    out += [Case("na2d", 64 * 64, False, (64, 64), 7), Case("na1d", 16384, False, (16384,), 65)]
    return out


FLEX_MAX_CAUSAL = 8192  # compiling flex_attention takes about a minute per case on 2 cores


def segments(T: int) -> np.ndarray:
    """Packed documents of uneven lengths (a fixed draw): segment id per position, [T]."""
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(64, T - 64), size=max(T // 1024, 1), replace=False))
    return np.searchsorted(cuts, np.arange(T), side="right").astype(np.int32)


def pairs(case: Case) -> int:
    """How many (query, key) pairs the mask allows."""
    T = case.T
    if case.name == "causal":
        return T * (T + 1) // 2
    if case.name == "sliding_window":
        return int(np.minimum(np.arange(T) + 1, WINDOW + 1).sum())
    if case.name == "document":
        _, n = np.unique(segments(T), return_counts=True)
        return int((n * (n + 1) // 2).sum())
    return T * case.kernel ** len(case.spatial)  # neighborhood: every query sees kernel^d keys


def flops(case: Case) -> float:
    forward = 4.0 * B * H * D * pairs(case)
    return forward * (3.5 if case.backward else 1.0)


# --------------------------------------------------------------------------------------------
# Implementations: each returns a zero-argument callable that runs one call to completion, or
# None where it does not apply.


def _jax_inputs(case: Case):
    import jax

    shape = (B, *case.spatial, H, D) if case.spatial else (B, case.T, H, D)
    return [jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(0), 3)]


def _jax_runner(case: Case, f):
    import jax

    args = _jax_inputs(case)
    if case.backward:
        fn = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))
    else:
        fn = jax.jit(f)
    return lambda: jax.block_until_ready(fn(*args))


def attnjax(case: Case):
    import jax.numpy as jnp

    from attnjax import masks, ops

    if case.name in ("na1d", "na2d"):
        return _jax_runner(case, lambda q, k, v: ops.neighborhood_attention(
            q, k, v, kernel_size=case.kernel, implementation="xla"))
    mask = {"causal": lambda: masks.causal(),
            "sliding_window": lambda: masks.sliding_window(WINDOW),
            "document": lambda: masks.causal() & masks.document(jnp.asarray(segments(case.T))[None])}[case.name]()
    return _jax_runner(case, lambda q, k, v: ops.attention(q, k, v, mask=mask, implementation="xla"))


def jax_nn(case: Case):
    import jax

    if case.T > DENSE_MAX:
        return None
    kw = {"causal": dict(is_causal=True), "sliding_window": dict(is_causal=True, local_window_size=(WINDOW, 0))}
    if case.name not in kw:
        return None
    return _jax_runner(case, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla",
                                                                          **kw[case.name]))


def tokamax_chunked(case: Case):
    import tokamax

    kw = {"causal": dict(is_causal=True), "sliding_window": dict(is_causal=True, local_window_size=(WINDOW, 0))}
    if case.name not in kw:
        return None
    return _jax_runner(case, lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, implementation="xla_chunked", **kw[case.name]))


def _torch_inputs(case: Case):
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (B, H, case.T, D)  # torch's layout: heads before the sequence
    return [torch.randn(shape, generator=g, requires_grad=case.backward) for _ in range(3)]


def _torch_runner(case: Case, f):
    args = _torch_inputs(case)

    def run():
        out = f(*args)
        if case.backward:
            out.sum().backward()
            for a in args:
                a.grad = None

    if not case.backward:
        import torch

        def run_no_grad():
            with torch.no_grad():
                f(*args)

        return run_no_grad
    return run


def torch_sdpa(case: Case):
    import torch.nn.functional as F

    if case.name != "causal":
        return None  # SDPA has no sliding-window/document mask short of a dense [T, S] one
    return _torch_runner(case, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _flex_mask_mod(case: Case):
    import torch

    if case.name == "causal":
        return lambda b, h, q, k: q >= k
    if case.name == "sliding_window":
        return lambda b, h, q, k: (q >= k) & (q - k <= WINDOW)
    if case.name == "document":
        seg = torch.as_tensor(segments(case.T))
        return lambda b, h, q, k: (q >= k) & (seg[q] == seg[k])
    r = case.kernel // 2
    if case.name == "na1d":  # NATTEN's window: kernel keys, shifted inward at the edges
        n = case.spatial[0]
        start = lambda i: torch.clamp(i - r, 0, n - case.kernel)
        return lambda b, h, q, k: (k >= start(q)) & (k < start(q) + case.kernel)
    rows, cols = case.spatial
    start = lambda i, n: torch.clamp(i - r, 0, n - case.kernel)

    def na2d(b, h, q, k):
        qi, qj, ki, kj = q // cols, q % cols, k // cols, k % cols
        si, sj = start(qi, rows), start(qj, cols)
        return (ki >= si) & (ki < si + case.kernel) & (kj >= sj) & (kj < sj + case.kernel)

    return na2d


_FLEX = {}


def torch_flex(case: Case):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(_flex_mask_mod(case), None, None, case.T, case.T, device="cpu")
    return _torch_runner(case, lambda q, k, v: _FLEX["compiled"](q, k, v, block_mask=block_mask))


def natten(case: Case):
    import natten as na  # noqa: F401 - only where a CPU build is importable

    if case.name not in ("na1d", "na2d"):
        return None
    import torch

    fn = na.na1d if case.name == "na1d" else na.na2d
    shape = (B, *case.spatial, H, D)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(shape, generator=g, requires_grad=case.backward) for _ in range(3)]

    def run():
        out = fn(*args, kernel_size=case.kernel)
        if case.backward:
            out.sum().backward()

    return run


IMPLEMENTATIONS = {"attnjax": attnjax, "jax.nn": jax_nn, "tokamax xla_chunked": tokamax_chunked,
                   "torch sdpa": torch_sdpa, "torch flex (compiled)": torch_flex, "natten": natten}


def available() -> dict[str, str | None]:
    """Which implementations import here: ``None`` if available, else why not."""
    import importlib

    needs = {"jax.nn": "jax", "tokamax xla_chunked": "tokamax", "torch sdpa": "torch",
             "torch flex (compiled)": "torch.nn.attention.flex_attention", "natten": "natten", "attnjax": "attnjax"}
    out = {}
    for name, module in needs.items():
        try:
            importlib.import_module(module)
            out[name] = None
        except Exception as e:  # noqa: BLE001 - an absent or broken peer is reported, not fatal
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return out


# --------------------------------------------------------------------------------------------


def peak_gflops(quick: bool) -> dict:
    """GFLOP/s of a large float32 matmul in JAX and in PyTorch (median of 5): the machine's peak
    as far as these libraries reach it."""
    import jax

    n = 512 if quick else 4096
    out = {"n": n}
    a, b = (jax.random.normal(k, (n, n)) for k in jax.random.split(jax.random.key(1), 2))
    mm = jax.jit(lambda a, b: a @ b)
    out["jax"] = 2 * n**3 / common.time_fn(mm, a, b, repeats=5) / 1e9
    try:
        import torch

        x, y = torch.randn(n, n), torch.randn(n, n)
        torch.mm(x, y)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(x, y)
            samples.append(time.perf_counter() - start)
        out["torch"] = 2 * n**3 / statistics.median(samples) / 1e9
    except ImportError:
        pass
    out["peak"] = max(v for k, v in out.items() if k in ("jax", "torch"))
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()}


def measure(case: Case, runners: dict, repeats: int) -> dict[str, float | str]:
    """Warm up (compile) each runner, then call them in turn ``repeats`` times: median seconds."""
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for name, run in runners.items():
        try:
            run()  # compiles
            start = time.perf_counter()
            run()
            times[name] = [time.perf_counter() - start]
            if times[name][0] > SLOW_S:  # one sample is all a very slow peer gets
                errors[name + ":slow"] = ""
        except Exception as e:  # noqa: BLE001 - a peer failing on a case is recorded, not fatal
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    for _ in range(repeats - 1):
        for name, run in runners.items():
            if name in times and name + ":slow" not in errors:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out.update({name: msg for name, msg in errors.items() if not name.endswith(":slow")})
    return out


def cpu(args) -> None:
    """The entry point of ``python -m experiments.bench.cpu peers``."""
    avail = available()
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
    except ImportError:
        pass
    peak = peak_gflops(args.quick)
    print(json.dumps({"available": avail, "peak_gflops": peak}), flush=True)
    rows, slow = [], set()
    for case in cases(args.quick):
        runners = {}
        for name, make in IMPLEMENTATIONS.items():
            if avail[name] is not None or (name, case.name, case.backward) in slow:
                continue
            if name == "torch flex (compiled)" and (args.quick or case.name == "causal" and case.T > FLEX_MAX_CAUSAL):
                continue  # compiling takes about a minute a case
            runner = make(case)
            if runner is not None:
                runners[name] = runner
        results = measure(case, runners, repeats=5 if case.T <= 4096 else 3)
        for name, value in results.items():
            row = {"case": case.name, "T": case.T, "pass": "forward+backward" if case.backward else "forward",
                   "implementation": name}
            if case.spatial:
                row.update(spatial="x".join(map(str, case.spatial)), kernel=case.kernel)
            if isinstance(value, str):
                row["error"] = value
            else:
                gflops = flops(case) / value / 1e9
                row.update(seconds=round(value, 5), gflops=round(gflops, 1),
                           fraction_of_peak=round(gflops / peak["peak"], 3))
                if value > SLOW_S:
                    slow.add((name, case.name, case.backward))
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows)
    suites = {}
    for row in rows:
        suites.setdefault(row["case"], {"rows": []})["rows"].append(row)
    payload = {"config": {"B": B, "H": H, "D": D, "dtype": "float32", "window": WINDOW,
                          "flops": "4*D per allowed pair forward, 3.5x that forward+backward"},
               "available": avail, "peak_gflops": peak, "rows": rows, "suites": suites, "summary": summary}
    common.save("peers", payload, args)


def summarize(rows: list[dict]) -> dict:
    """Per case, length and pass: each peer's time over attnjax's (above 1: attnjax is faster)."""
    by = {}
    for r in rows:
        if "seconds" in r:
            by.setdefault((r["case"], r["T"], r["pass"]), {})[r["implementation"]] = r["seconds"]
    out = {}
    for (case, T, p), times in by.items():
        if "attnjax" in times:
            out[f"{case} T={T} {p}"] = {name: round(t / times["attnjax"], 2)
                                        for name, t in times.items() if name != "attnjax"}
    return out
