"""Accuracy and cost of the first-order product mode against double backward, on the zoo."""

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import harness as H
import hypergradient as hg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import zoo_models as Z  # noqa: E402

NAME, TITLE = "product_modes", "First-order products against double backward (model zoo)"
MODES = ("double_math", "first_order")
MODELS = (*Z.NAMES[:3], "transformer_gelu", *Z.NAMES[3:])
#: A first-order product that met a kink (a ReLU switching inside the step) raises
#: ``hg.NonSmoothLossError``: the zoo's ReLU transformer in float32 (it was 6.7x off).
REFUSED = "refused (kink)"


def zoo(name: str, width: int, n: int, dtype: torch.dtype) -> Any:
    """A zoo model cast to ``dtype`` (float64 weights drawn first: same values in both)."""
    z = Z.make(name.replace("_gelu", ""), False, n=n, width=width)
    if name.endswith("_gelu"):
        z.module[0].activation = torch.nn.functional.gelu
        z.module[0].activation_relu_or_gelu = 2
    z.module.to(dtype)
    z.X, z.Xv = (x.to(dtype) if x.is_floating_point() else x for x in (z.X, z.Xv))
    z.buffers = {k: b.to(dtype) if b.is_floating_point() else b for k, b in z.buffers.items()}
    return z


def operator(z: Any, mode: str) -> hg.HessianOperator:
    h = {k: v.to(next(z.module.parameters()).dtype) for k, v in z.hparams0().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        return hg.HessianOperator(z.inner, z.params0(), h, mode=mode)


def accuracy(name: str, width: int, n: int) -> list[dict[str, Any]]:
    ref = operator(zoo(name, width, n, torch.float64), "double_math")
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(ref.size, generator=g, dtype=torch.float64) for _ in range(4)]
    expected = [(ref.matvec(v), ref.mixed(v)[0]) for v in vs]
    rows = []
    for dtype in (torch.float64, torch.float32):
        for mode in MODES:
            row: dict[str, Any] = {"dtype": str(dtype)[6:], "mode": mode}
            op, ws = operator(zoo(name, width, n, dtype), mode), [v.to(dtype) for v in vs]
            try:  # first-order products across a ReLU's switch raise NonSmoothLossError
                hvp = max(H.relative_error(op.matvec(w), hv) for w, (hv, _) in zip(ws, expected))
                mix = max(H.relative_error(op.mixed(w)[0], m) for w, (_, m) in zip(ws, expected))
                row |= {"hvp_error": hvp, "mixed_error": mix}
                u = unrolled(name, width, n, dtype, mode)
                u64 = unrolled(name, width, n, torch.float64, "double_math").double()
                row["unrolled_error"] = H.relative_error(u, u64)
            except hg.NonSmoothLossError:
                row |= dict.fromkeys(("hvp_error", "mixed_error", "unrolled_error"), REFUSED)
            rows.append(row)
    return rows


def unrolled(name: str, width: int, n: int, dtype: torch.dtype, hvp: str) -> torch.Tensor:
    """A 5-step hypergradient (SGD, lr 0.1, momentum 0.9) with the products ``hvp``."""
    z = zoo(name, width, n, dtype)
    h = {k: v.to(dtype) for k, v in z.hparams0().items()}
    opt = hg.optim.sgd(lr=0.1, momentum=0.9)
    return hg.unrolled(z.inner, z.outer, z.params0(), h, 5, opt, hvp=hvp)["decay"]


def memory_child(name: str, width: int, n: int, mode: str) -> float:
    """Peak RSS increase (MB) of building the operator and taking 3 products."""
    z = zoo(name, width, n, torch.float32)
    v = torch.randn(sum(p.numel() for p in z.params0().values()))

    def call() -> None:
        op = operator(z, mode)
        for _ in range(3):
            op.matvec(v)

    call()  # warm-up: allocator pools and kernels, not the measured peak
    return H.peak_memory(call)[3]


def cost(name: str, width: int, n: int, rounds: int, memory: bool) -> list[dict[str, Any]]:
    z = zoo(name, width, n, torch.float32)
    p = {k: v.requires_grad_(True) for k, v in z.params0().items()}
    h, ops = {k: v.float() for k, v in z.hparams0().items()}, {m: operator(z, m) for m in MODES}
    v = torch.randn(ops["first_order"].size)
    cases = [H.Case("gradient", lambda s: torch.autograd.grad(z.inner(p, h), list(p.values())))]
    modes = []
    for m in MODES:  # a first-order product that meets a kink raises: that mode is refused
        with contextlib.suppress(hg.NonSmoothLossError):
            ops[m].matvec(v)
            modes.append(m)
    for m in modes:
        cases.append(H.Case(f"build {m}", lambda s, m=m: operator(z, m)))
        cases.append(H.Case(f"product {m}", lambda s, m=m: ops[m].matvec(v)))
    timing = {t.key: t.ms for t in H.interleave(cases, rounds)}
    rows = [{"mode": m, "product_ms": REFUSED} for m in MODES if m not in modes]
    for m in modes:
        mb = H.isolated(memory_child, name, width, n, m) if memory else None
        row = {"mode": m, "gradient_ms": timing["gradient"], "build_ms": timing[f"build {m}"]}
        row |= {"product_ms": timing[f"product {m}"], "peak_mb": mb}
        rows.append(row | {"gradients_per_product": row["product_ms"] / row["gradient_ms"]})
    return sorted(rows, key=lambda r: MODES.index(r["mode"]))


def render(d: dict[str, Any]) -> list[str]:
    acc = "model|dtype|mode|hvp_error:.1e|mixed_error:.1e|unrolled_error:.1e"
    cst = "model|mode|gradient_ms:.2f|build_ms:.2f|product_ms:.2f|gradients_per_product:.2f"
    acc_rows, cst_rows = (
        [{"model": r["model"], **x} for r in d["results"] for x in r[k]]
        for k in ("accuracy", "cost")
    )
    return [
        "## Accuracy (relative error against float64 double backward; worst of 4 directions)\n\n"
        + H.dict_table(acc_rows, acc),
        "## Cost (float32; ms medians of interleaved rounds; peak RSS increase of build + 3 "
        "products, fresh process)\n\n" + H.dict_table(cst_rows, cst + "|peak_mb:.1f"),
    ]


def plot(data: dict[str, Any], out: Path) -> Path:
    """Relative error of H v per model, dtype and mode."""
    res, keys = data["results"], [(d, m) for d in ("float64", "float32") for m in MODES]
    err = [{(a["dtype"], a["mode"]): a["hvp_error"] for a in r["accuracy"]} for r in res]
    value = lambda x: max(x, 1e-17) if isinstance(x, float) else float("nan")  # noqa: E731
    bars = {f"{m} {d}": [value(e[d, m]) for e in err] for d, m in keys}
    axes = {"yscale": "log", "ylabel": "relative error of H v", "title": TITLE}
    panel = {"bars": bars, "ticks": [r["model"] for r in res], "set": axes}
    return H.figure(out / f"{NAME}.png", [panel], 1, (8, 4))


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    n, rounds, results = (16, 3, []) if args.quick else (256, 15, [])
    for name in ("mlp", "transformer") if args.quick else MODELS:
        H.log(f"{name} (width {args.width})")
        size = sum(p.numel() for p in zoo(name, args.width, 2, torch.float64).params0().values())
        r = {"model": f"{name} ({size:,} params)", "accuracy": accuracy(name, args.width, n)}
        results.append(r | {"cost": cost(name, args.width, n, rounds, memory=not args.quick)})
    return {"results": results, "notes": [f"width {args.width}, {n} examples"]}


OPTIONS = [H.option("--width", 1, 16, type=int, help="hidden sizes times w")]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
