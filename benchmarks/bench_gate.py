"""Decoding between passes or beside them: the fp32 default end to end with the gate trial, always gated and never
gated, against the model alone before and after each round (bench_classify's own children).

    python benchmarks/bench_gate.py [ROUNDS]      # 1000 ImageNet photos, batch 32, default workers
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the benchmarks folder is not a package)

SCRIPT = Path(__file__).resolve().parent / "bench_classify.py"
MODES = [(None, "trial"), (True, "always gated"), (False, "never gated")]


def main(rounds: int) -> None:
    model, how = common.checkpoint(None, "classify", common.DEFAULT_PHOTOS)
    folder = common.image_folder(common.DEFAULT_PHOTOS, 1000)
    print(common.machine(), flush=True)
    spec = lambda **e: {"task": "classify", "model": model, "images": str(folder), "batch_size": 32,
                        "workers": None, "dtype": "fp32", "speedups": None, **e}
    child = lambda name, label, s: common.run_child(SCRIPT, name, label, "fp32", s, 60)
    alone = [child("model", "model alone, exact", spec(count=256))]
    rows = []
    for _ in range(rounds):
        for gate, label in MODES:
            out = common.CACHE / f"share-{label.replace(' ', '-')}"
            r = child("mv2batch", f"mv2batch fp32 default, {label}", spec(out=str(out), gate=gate))
            markers = [json.loads(p.read_text()) for p in (out / "shards").glob("*.json")]
            chosen = {json.dumps({k: m["timings"].get(k) for k in ("decode_between_passes", "trial_images_per_s")})
                      for m in markers}
            rows.append((label, r.steady, chosen))
        alone.append(child("model", "model alone, exact", spec(count=256)))
    a = sum(x.steady for x in alone) / len(alone)
    print("model alone runs", [round(x.steady, 1) for x in alone])
    for label, rate, chosen in rows:
        print(f"{label:14s} {rate:6.1f} img/s  {100 * rate / a:5.1f}% of model alone  {chosen}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
