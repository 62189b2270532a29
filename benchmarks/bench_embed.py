"""What the embedding column costs: classify, classify --embeddings and embed end to end on the same photos, same
dtype, alternated, with the model alone before and after (bench_classify's own children).

    python benchmarks/bench_embed.py [ROUNDS] [--dtype fp32|bf16] [-n 1000]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the benchmarks folder is not a package)

SCRIPT = Path(__file__).resolve().parent / "bench_classify.py"
MODES = [("classify", False, "classify"), ("classify", True, "classify --embeddings"), ("embed", False, "embed")]


def main(rounds: int, dtype: str, n: int) -> None:
    model, how = common.checkpoint(None, "classify", common.DEFAULT_PHOTOS)
    folder = common.image_folder(common.DEFAULT_PHOTOS, n)
    print(common.machine(), f"| {n} ImageNet photos, batch 32, {dtype}, default workers | {how}", flush=True)
    spec = lambda **extra: {"task": "classify", "model": model, "images": str(folder), "batch_size": 32,
                            "workers": None, "dtype": dtype, "speedups": None, **extra}
    child = lambda name, label, s: common.run_child(SCRIPT, name, label, dtype, s, 60)
    alone = [child("model", "model alone", spec(count=256))]
    rates: dict[str, list[float]] = {label: [] for _, _, label in MODES}
    for _ in range(rounds):
        for task, embeddings, label in MODES:
            out = common.CACHE / f"embed-bench-{label.replace(' ', '').replace('-', '')}"
            result = child("mv2batch", label, spec(task=task, embeddings=embeddings, out=str(out)))
            rates[label].append(result.steady)
        alone.append(child("model", "model alone", spec(count=256)))
    model_rate = sum(r.steady for r in alone) / len(alone)
    base = sum(rates["classify"]) / len(rates["classify"])
    print(f"\nmodel alone: {model_rate:.1f} img/s (runs {[round(r.steady, 1) for r in alone]})")
    rows = [[label, f"{sum(v) / len(v):.1f}", " ".join(f"{x:.1f}" for x in v), f"{100 * sum(v) / len(v) / base:.1f}%",
             f"{100 * sum(v) / len(v) / model_rate:.1f}%"] for label, v in rates.items()]
    print(common.table(["run", "img/s (mean)", "runs", "of classify", "of model alone"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rounds", nargs="?", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("-n", type=int, default=1000)
    arguments = parser.parse_args()
    main(arguments.rounds, arguments.dtype, arguments.n)
