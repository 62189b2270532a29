"""Classify the example images with the library API (the CLI does the same: `mv2batch classify folder`).

    python examples/classify_folder.py                       # the default hub checkpoint
    python examples/classify_folder.py --model ./my-ckpt     # any MobileViTV2 classification checkpoint
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

import mv2batch
from mv2batch.config import RunConfig

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the DESIGN default)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    config = RunConfig(task="classify", source="folder", input=str(HERE / "images"), out=args.out,
                       model=args.model, overwrite=True, top_k=3)
    report = mv2batch.run(config)
    print(f"{report.n_images} images, {report.n_errors} errors -> {report.out}")
    for row in pq.read_table(args.out / "predictions", columns=["id", "topk_labels", "topk_scores"]).to_pylist():
        best = ", ".join(f"{label} ({score:.2f})" for label, score in zip(row["topk_labels"], row["topk_scores"]))
        print(f"{row['id']:28s} {best}")


if __name__ == "__main__":
    main()
