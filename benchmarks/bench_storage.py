"""Object storage: the same photos classified from local disk and from S3 (moto's server on loopback, in its own
process) into OUT on the same store, end to end and the input alone (listing + reading every object), in turns;
then the time mv2batch takes to list 100,000 keys.

    python benchmarks/bench_storage.py -n 1000 [--keys 100000] [--repeat 2] [--images DIR]

moto is Python serving HTTP on the same 2 cores: the figures show mv2batch's listing and reading overhead
against a slow server, not S3's speed. Each run is fp32 with mv2batch's defaults; the model is the random
calibrated full-size one of the other benchmarks (the speed of a trained one is the same).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

KEY, SECRET = "bench-key", "bench-secret"


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on 127.0.0.1, in a process of its own, and its endpoint once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    sys.exit("moto's server did not start")


def classify_run(source: str, out: str, model: str, options: dict | None) -> tuple[float, int]:
    """Seconds for one end-to-end run (listing included) and the rows it wrote."""
    import mv2batch
    from mv2batch.config import RunConfig

    config = RunConfig(task="classify", source="folder", input=source, out=out, model=model, device="cpu",
                       dtype="fp32", overwrite=True, storage_options=options)
    started = time.perf_counter()
    report = mv2batch.run(config)
    return time.perf_counter() - started, report.ran_now


def input_alone(source: str, options: dict | None) -> tuple[float, float, int]:
    """Seconds to list the input and to read every image's bytes (one process, one at a time), and the count."""
    from mv2batch.inputs.sources import FolderSource
    from mv2batch.loading.decode import _read

    started = time.perf_counter()
    folder = FolderSource.open(source, options=options)
    listed = time.perf_counter() - started
    started = time.perf_counter()
    total = sum(len(_read(folder.read(index).raw)) for index in range(len(folder)))
    assert total > 0
    return listed, time.perf_counter() - started, len(folder)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (moto's server: what it took from the model's 2 cores)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def list_many(fs, endpoint_options: dict, keys: int) -> tuple[float, float, float]:
    """Seconds to create `keys` empty objects (not mv2batch's work), for s3fs's own recursive listing of them,
    and for mv2batch's listing (that listing, then filtered by extension, sorted, signed)."""
    from mv2batch.inputs.listing import list_prefix

    prefix = "bench/many"
    started = time.perf_counter()
    for start in range(0, keys, 5000):
        fs.pipe({f"{prefix}/{i // 1000:03d}/{i:06d}.jpg": b"" for i in range(start, min(keys, start + 5000))})
    created = time.perf_counter() - started
    started = time.perf_counter()
    assert len(fs.find(prefix, detail=True)) == keys
    raw = time.perf_counter() - started
    started = time.perf_counter()
    listing = list_prefix("s3://" + prefix, endpoint_options)
    listed = time.perf_counter() - started
    assert len(listing.ids) == keys, len(listing.ids)
    return created, raw, listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=common.DEFAULT_PHOTOS)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--model")
    args = parser.parse_args()

    import s3fs

    photos = common.image_folder(args.images, args.n)
    model, how = common.checkpoint(args.model, "classify", args.images)
    server, endpoint = start_moto()
    options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir("bench")
        started = time.perf_counter()
        fs.put(str(photos) + "/", "bench/photos", recursive=True)
        print(f"{common.machine()}\n{how}\nuploaded {args.n} photos to moto in {time.perf_counter() - started:.1f} s",
              flush=True)
        runs = {"local -> local": (str(photos), str(common.CACHE / "storage-out"), None),
                "s3 -> s3": ("s3://bench/photos", "s3://bench/out", options)}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        server_cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, (source, out, opts) in runs.items():
                before = cpu_seconds(server.pid)
                took, rows = classify_run(source, out, model, opts)
                assert rows == args.n, rows
                seconds[name].append(took)
                server_cpu[name].append(cpu_seconds(server.pid) - before)
                print(f"  {name}: {args.n / took:.1f} img/s, moto's server {server_cpu[name][-1]:.1f} CPU s",
                      flush=True)
        alone = {name: input_alone(source, opts) for name, (source, _, opts) in runs.items()}
        created, raw, listed = list_many(fs, options, args.keys) if args.keys else (0.0, 0.0, 0.0)
    finally:
        server.kill()
    best = {name: args.n / min(values) for name, values in seconds.items()}
    base = best["local -> local"]
    rows = [[name, f"{best[name]:.1f}", f"{best[name] / base:.0%}", ", ".join(f"{args.n / t:.1f}" for t in values),
             f"{sum(server_cpu[name]) / len(server_cpu[name]):.1f}", f"{alone[name][0]:.2f}",
             f"{alone[name][2] / alone[name][1]:.0f}"] for name, values in seconds.items()]
    print(common.table(["run", "end to end img/s (best)", "of local", "each run", "moto CPU s per run",
                        "listing s", "read alone img/s (1 thread)"], rows))
    if args.keys:
        print(f"listing {args.keys:,} keys: mv2batch {listed:.1f} s ({args.keys / listed:,.0f} keys/s), s3fs's "
              f"find alone {raw:.1f} s: mv2batch's own share {max(listed - raw, 0):.1f} s; creating them took "
              f"{created:.1f} s (moto)")
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
