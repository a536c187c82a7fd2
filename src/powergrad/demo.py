"""The demo: digits, alpha = 1 against alpha = 0.25; per-epoch tables, a comparison, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import extra

with extra("train"):  # the demo trains (and [train] brings [plot] with it)
    from .plots import plot_compare
    from .workflows import train

from .rundir import curves_path

__all__ = ["run_demo"]


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None) -> dict[float, dict]:
    """Train the built-in ``digits`` recipe twice and print how they compare."""
    out = Path(out)
    results = {}
    for alpha in (1.0, 0.25):
        print(f"\n== digits, alpha = {alpha:g} " + "=" * 50, flush=True)
        overrides: dict[str, Any] = {"alpha": alpha, **({"epochs": epochs} if epochs else {})}
        results[alpha] = train("digits", out=out / f"alpha{alpha:g}", overwrite=True, **overrides)
    print("\n== comparison: final epoch; 'best' is the best test accuracy of any epoch")
    print(
        f"{'alpha':>6} {'train loss':>11} {'train acc':>10} {'test loss':>10} {'test acc':>9} "
        f"{'gap':>7} {'best':>7} {'logit norm':>11}"
    )
    for alpha, r in results.items():
        f = r.final
        print(
            f"{alpha:>6g} {f['train_loss']:>11.4f} {f['train_acc']:>10.4f} {f['test_loss']:>10.4f} "
            f"{f['test_acc']:>9.4f} {f['gap']:>+7.4f} {r.best['test_acc']:>7.4f} "
            f"{f.get('logit_norm') or float('nan'):>11.2f}"
        )
    png = plot_compare({f"alpha {a:g}": out / f"alpha{a:g}" for a in results}, out / "compare.png")
    print(f"\ncurves: {png} and {curves_path(out / 'alpha*')}")
    return {a: r.final for a, r in results.items()}
