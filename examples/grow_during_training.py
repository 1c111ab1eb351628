"""Grow a model twice during a run of geomopt-bench and plot the validation loss with the growth points.

    python examples/grow_during_training.py                  # preset small, AdamW and POET, ~3 min on 2 cores
    python examples/grow_during_training.py --preset tiny --optimizers adamw,poet,relora,dlra

The model starts at the preset's size; after 1/3 of the steps its MLP and residual widths grow, after 2/3
two layers are added (geomopt.grow.expand, optimizer state carried over). Writes grow_curve.csv and, when
matplotlib is installed, grow_curve.png with a dashed line at each growth.
"""
import argparse
import csv

from geomopt.bench import run_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--optimizers", default="adamw,poet")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="grow_curve")
    args = p.parse_args()
    width = {"tiny": (96, 48), "small": (512, 192), "60m": (2048, 768)}[args.preset]
    first, second = args.steps // 3, 2 * args.steps // 3
    rows = run_bench(["--preset", args.preset, "--optimizers", args.optimizers, "--steps", str(args.steps),
                      "--eval-every", str(max(1, args.steps // 30)), "--quiet", "--out", f"{args.out}-bench",
                      "--grow", f"{first}:mlp_width={width[0]},hidden={width[1]}",
                      "--grow", f"{second}:add_layers=1+2"])
    with open(f"{args.out}.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["optimizer", "tokens", "val_loss"])
        for r in rows:
            out.writerows([r["optimizer"], t, loss] for t, loss in r["curve"])
    for r in rows:
        for step, _, before, after in r["growth"]:
            print(f"{r['optimizer']}: grew after step {step}, val loss {before:.5f} -> {after:.5f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {args.out}.csv (pip install matplotlib for the plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], label=r["optimizer"])
    for _, tokens, _, _ in rows[0]["growth"]:
        ax.axvline(tokens, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"geomopt-bench --preset {args.preset}, grown twice (dashed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=120)
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()
