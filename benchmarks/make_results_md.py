"""Write docs/results.md from the JSON results and the narrative template."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "results_template.md"


def e(x: float) -> str:
    """``4.1e-3`` (two significant digits, no padded exponent)."""
    m, x_ = f"{x:.1e}".split("e")
    return f"{m}e{int(x_)}"


def rows(lines: list[list[Any]]) -> str:
    text = "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in lines)
    return text.replace("|  |", "| |")


def implicit_solvers(d: dict) -> dict[str, str]:
    """Our CG, hypergrad's CG / Neumann / Nystrom and time ratios at chosen budgets."""
    out, converged = [], False
    for name, ks in {"ridge": (20, 50, 100), "logreg": (20, 50), "mlp": (20, 100)}.items():
        for k in ks:
            at = [r for r in d["problems"][name]["rows"] if r["k"] == k]
            by = {r["solver"].split("(")[0]: r for r in at if r["ours"]}
            nys = next(r for r in at if "rho=0.1, column" in r["solver"])  # Nystrom(rank=k, ...)
            cg, ne, o = by["CG"], by["Neumann"], by["CG"]["ours"]
            ours = f"{o['rel_err']:.2f}" if o["rel_err"] >= 0.1 else e(o["rel_err"])
            if o["num_hvps"] < k:
                ours += f" ({o['num_hvps']}{'' if converged else ' products'}, converged)"
                converged = True
            cells = [f"{name.replace('mlp', 'MLP')}, {k}", ours, f"{cg['theirs']['rel_err']:.3g}"]
            cells += [f"{cg['theirs']['ms'] / o['ms']:.1f}x", f"{ne['ours']['rel_err']:.2g}"]
            cells.append(f"{ne['theirs']['ms'] / ne['ours']['ms']:.1f}x")
            t = nys["theirs"]
            if t is None or t["error"]:
                cells += ["rank > P: theirs crashes", ""]
            else:
                cells += [f"{nys['ours']['rel_err']:.2f}", f"{t['ms'] / nys['ours']['ms']:.1f}x"]
            out.append(cells)
    return {"implicit_table": rows(out)}


def hvp_cost(d: dict) -> dict[str, str]:
    labels = ["logistic regression, 31 params", "tanh MLP on digits, 3,466 params"]
    out, labels = [], labels + ["tanh MLP on MNIST, 269,322 params"]
    whats = ("hvp (retained graph)", "jvp(grad) fresh", "vjp(grad) fresh")
    for i, (label, res) in enumerate(zip(labels, d["results"])):
        by = {r["what"]: r for r in res["rows"]}
        cells = [label] + [f"{by[w]['gradients']:.2f}" for w in whats]
        for k in (10, 50):
            r = by[f"implicit, {k} products"]
            cells.append(f"{r['gradients']:.1f}" + (f" (floor {r['floor']})" if i else ""))
        out.append(cells)
    return {"hvp_table": rows(out), "compile_summary": compile_summary(d, labels)}


def compile_summary(d: dict, labels: list[str]) -> str:
    """One clause per model: compiled / eager time of a product and the break-even count."""
    if not d.get("compiled"):
        return "not measured in the committed run (run `hvp_cost.py --compile`)."
    parts = []
    for label, res in zip(labels, d["compiled"]):
        by = {r["what"]: r for r in res["rows"]}
        best = min((by["compiled vjp(grad)"], by["compiled jvp(grad)"]), key=lambda r: r["ms"])
        paid = best["break_even"]
        paid = f"paid back after {paid:,.0f} products" if paid else "never paid back"
        text = f"{best['vs_eager']:.2f}x the retained graph's time ({best['compile_s']:.0f} s"
        parts.append(f"{label}: {text} to compile, {paid})")
    return "; ".join(parts) + ". It is measured, not offered as an option."


HOPT = {"T1T2()": "T1T2", "IFT() (Neumann 10, alpha=lr)": "IFT (Neumann 10)"}
HOPT |= {"IFT(CG(maxiter=20))": "IFT (CG 20)"}
HOPT |= {"IFT(Nystrom(rank=10, rho=0.1, seed=0))": "IFT (Nyström 10)", "HOAG()": "HOAG"}
HOPT |= {"Unrolled()": "Unrolled", "Unrolled(truncate=5)": "Unrolled (truncate 5)"}
HOPT |= {"ForwardMode()": "ForwardMode", "DrMAD()": "DrMAD"}


def hyperoptimizer_methods(d: dict) -> dict[str, str]:
    h = d["hyperoptimizer"]
    s, out = h["summary"], []
    for key, label in HOPT.items():
        ratio = s[key]["hyper_step_ms"] / s[key]["train_step_ms"]
        out.append([label, f"{ratio:.{1 if ratio < 100 else 0}f}", f"{s[key]['val']:.4f}"])
    untuned = next(v for k, v in s.items() if k.startswith("untuned"))
    out = {"hopt_table": rows(out), "hopt_steps": str(h["steps"])}
    out["hopt_untuned"] = f"{untuned['val']:.4f}"
    return out | {"hopt_exact": f"{h['exact']['val'][h['exact_at']]:.4f}"}


def vs_optuna(d: dict) -> dict[str, str]:
    labels = {"logreg": "logistic regression, breast cancer", "mlp": "MLP on digits, per weight"}
    labels["mlp-layer"] = "MLP on digits, per layer"
    out = []
    for t in d["tasks"]:
        best = [f"{min(t['runs'][m]['val']):.4f}" for m in ("tpe", "random", "hypergradient")]
        cells = [labels[t["key"]], f"{t['n_hparams']:,}", " / ".join(best)]
        for owner in ("tpe", "random"):
            tg = t["targets"][owner]
            mine, hgr = tg["reached"][owner], tg["reached"]["hypergradient"]
            if tg["is_start"]:
                never = f"Optuna never improved on the start in {t['budget']:.0f} s"
                cells.append(never if owner == "tpe" else "")
            elif hgr is None:
                cells.append("not reached by the hypergradient")
            elif owner == "tpe":
                msg = f"{mine[0]:.1f} s / {hgr[0]:.1f} s = {mine[0] / hgr[0]:.1f}x"
                cells.append(f"{msg} (CPU {mine[1] / hgr[1]:.1f}x)")
            else:
                cells.append(f"{mine[0] / hgr[0]:.1f}x")
        out.append(cells)
    return {"optuna_table": rows(out)}


SCALE = {"gradient": "gradient of `f`", "CG": "CG (20 products)", "Neumann": "Neumann (20)"}
SCALE |= {"Nystrom": "Nyström (rank 20)", "NystromPCG": "NystromPCG (rank 10 + 10)", "T1T2": "T1T2"}
SCALE |= {"unrolled": "unrolled ({n} states)", "DrMAD": "DrMAD ({n} states)"}
SCALE |= {"unrolled ckpt": "unrolled, checkpointed ({n} states)"}
SCALE |= {"forward": "forward mode ({m} hyperparameters)"}


def scale(d: dict) -> dict[str, str]:
    res = d["results"]["params"]
    top = max(r["params"] for r in res)
    at = [r for r in res if r["params"] == top and r["ok"]]
    unit, out = next(r["cpu_seconds"] for r in at if r["config"]["method"] == "gradient"), []
    for r in at:
        n, cpu = r["info"].get("stored_states"), r["cpu_seconds"]
        label, x = SCALE[r["config"]["method"]].format(n=n, m=r["num_hparams"]), cpu / unit
        cells = [label, f"{cpu:.{3 if cpu < 0.1 else 2}f}", f"{x:.{1 if x < 10 else 0}f}"]
        out.append(cells + [f"{r['peak_mb']:.0f}", f"{r['peak_mb'] * 2**20 / (4 * top):.0f}"])
    return {"scale_table": rows(out), "scale_top": f"{top:,}"}


def mixed_precision(d: dict) -> dict[str, str]:
    labels = {"logreg decay=0.368": "logistic regression, decay 0.37"}
    labels |= {"logreg decay=0.0498": "logistic regression, decay 0.05"}
    labels |= {"mlp": "MLP on digits, {P:,} parameters"}
    out = []
    for name, pb in d["problems"].items():
        by = {(r["solver"], r["mode"]): r for r in pb["implicit"]}
        unr = {r["mode"]: r for r in pb["unrolled"]}
        logreg = name.startswith("logreg")
        for i, s in enumerate(["CG"] if logreg else ["Exact", "CG"]):
            label = labels[name].format(P=pb["setup"]["num_params"]) if i == 0 else "same"
            sname = "CG (100 iterations)" if s == "CG" and not logreg else s
            cells = [label, f"{pb['cond']:.2g}" if pb["cond"] < 100 else e(pb["cond"]), sname]
            cells += [e(by[(s, m)]["rel_err"]) for m in ("fp32", "autocast", "bf16 params")]
            out.append(cells + [e(unr["autocast"]["rel_err"]) if i == 0 else ""])
    return {"mixed_table": rows(out)}


def distributed(d: dict) -> dict[str, str]:
    picks = [("implicit", 12, 512, "float32"), ("implicit", 112, 2048, "float32")]
    picks += [("implicit", 400, 2048, "float32"), ("implicit", 112, 2048, "float64")]
    picks += [("unrolled", 112, 2048, "float32"), ("hyperopt", 112, 2048, "float32")]
    names = {"implicit": "`hg.implicit`, CG 20", "unrolled": "`hg.unrolled`, 10 SGD steps"}
    names["hyperopt"] = "`HyperOptimizer` + DDP, IFT/Neumann"
    runs = [r for r in d["results"] if "hidden" in r]  # not the all-reduce latency row
    by = {(r["kind"], r["hidden"], r["batch"], r["dtype"]): r for r in runs}
    out, last = [], None
    for key in picks:
        r = by[key]
        name = f"{names[key[0]]}, {key[3]}" if key[0] != last else f"same, {key[3]}"
        name, last = "same" if key[0] == last and key[3] == "float32" else name, key[0]
        calls = str(r["allreduce_calls"])
        calls += f" + {r['ddp_allreduce_calls']} DDP" if r["ddp_allreduce_calls"] else ""
        cells = [name, f"{r['params']:,}", f"{r['batch']:,}", f"{r['world1_median_s']:.3f}"]
        cells += [f"{r['world2_median_s']:.3f}", f"{r['speedup']:.2f}", calls]
        out.append(cells + [e(r["rel_diff_world2_vs_world1"])])
    kept = [r["background_cores_kept_rounds"] for r in d["results"] if r["kind"] != "allreduce"]
    bg = [b for k in kept for b in k]
    out = {"dist_table": rows(out), "dist_repeats": str(d["repeats"])}
    return out | {"dist_bg": f"{min(bg):.2f}-{max(bg):.2f}"}


SECTIONS = {f.__name__: f for f in (implicit_solvers, hvp_cost, hyperoptimizer_methods)}
SECTIONS |= {f.__name__: f for f in (vs_optuna, scale, mixed_precision, distributed)}


def render(results: Path) -> str:
    """The page: the template filled from ``results/<name>.json`` for every section."""
    values: dict[str, str] = {}
    for name, fn in SECTIONS.items():
        values.update(fn(json.loads((results / f"{name}.json").read_text())))
    return TEMPLATE.read_text().format_map(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "results.md")
    args = p.parse_args(argv)
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
