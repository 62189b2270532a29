"""The CLI: help with examples, the files a run writes (README "Output"), exit codes, resumption and refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import typer
from conftest import read_rows, skimage_photos
from typer.testing import CliRunner

from mv2batch.cli.app import STRICT_EXIT, app
from mv2batch.errors import ConfigError, OutputError

DEFAULT_MODEL = "apple/mobilevitv2-1.0-imagenet1k-256"
PREDICTION_TYPES = {
    "id": pa.string(), "path": pa.string(), "shard": pa.int32(), "width": pa.int32(), "height": pa.int32(),
    "status": pa.string(), "error": pa.string(), "sha256": pa.string(), "topk_ids": pa.list_(pa.int32()),
    "topk_labels": pa.list_(pa.string()), "topk_scores": pa.list_(pa.float32()), "label": pa.int32(),
}
SUMMARY_COLUMNS = {"task", "dataset", "model", "n_images", "n_errors", "images_per_s"}


# ---- helpers ---------------------------------------------------------------------------------------------------


def invoke(*args: object, env: dict | None = None):
    """Run the CLI in-process; whatever happens, no traceback reaches the user."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def classify(folder: Path, out: Path, model: Path, *options: object):
    """`mv2batch classify folder` on the CPU with in-process loading."""
    return invoke("classify", "folder", folder, "-o", out, "--model", model, "--device", "cpu", "--workers", "0",
                  *options)


def assert_one_line_error(result, code: int, *words: str) -> str:
    """The command failed with `code` and one line on stderr that names every word."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mv2batch: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _save(folder: Path, name: str, image) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)


def write_photos(folder: Path, count: int) -> list[str]:
    """`count` small real photos (crops of scikit-image's samples at a few sizes); returns their ids."""
    photos = list(skimage_photos().values())
    names = []
    for i in range(count):
        photo = photos[i % len(photos)]
        crop = photo.crop((i * 7, i * 5, photo.width // 2 + i * 7, photo.height // 2 + i * 5))
        names.append(f"photo_{i:02d}.{('jpg', 'png')[i % 2]}")
        _save(folder, names[-1], crop.resize((96 + 8 * i, 80)))
    return names


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Input folders: eight good photos; and three photos with one broken file."""
    root = tmp_path_factory.mktemp("cli-inputs")
    write_photos(root / "photos", 8)
    write_photos(root / "with_error", 3)
    (root / "with_error" / "broken.jpg").write_bytes(b"not a jpeg")
    return {"photos": root / "photos", "with_error": root / "with_error"}


@pytest.fixture(scope="module")
def done_run(inputs, tiny_model, tmp_path_factory) -> Path:
    """OUT of one complete default run over the eight photos."""
    out = tmp_path_factory.mktemp("cli-run") / "out"
    assert classify(inputs["photos"], out, tiny_model, "--quiet").exit_code == 0
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# ---- help ------------------------------------------------------------------------------------------------------


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group of the app, as argument paths."""
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _command_paths(sub, (*path, name))
    return found


COMMAND_PATHS = _command_paths(typer.main.get_command(app))


def test_every_command_is_covered():
    assert {("classify", "folder"), ("classify", "dataset"), ("report",), ("models",)} <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "mv2batch")
def test_help_has_an_example(path):
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout, result.stdout


COMMON = ("--out -o --model --revision --device --dtype --batch-size --workers --compile --no-compile --speedups "
          "--no-speedups --limit --shard-size --preprocess --resume --overwrite --retry-errors --max-pixels --engine "
          "--quiet -q --strict --storage-options --decode --max-image-bytes")
DATASET = "--split --streaming --image-column --label-column --id-column --url-timeout"
TARS = " ".join(option for option in COMMON.split() if option not in ("--limit", "--shard-size"))
# Every run command's options: as they were before the CLI was rewritten in Typer's Annotated style (e4371ad),
# and those added since (--id-column, --image-ext, the webdataset commands, --storage-options, --decode, the
# embedding options and the embed commands, --max-image-bytes and --url-timeout).
EMBEDDING = "--embedding-dtype --normalize"
OPTIONS_BEFORE = {
    ("classify", "folder"): f"INPUT --top-k --embeddings {EMBEDDING} {COMMON}",
    ("classify", "dataset"): f"INPUT {DATASET} --top-k --embeddings {EMBEDDING} {COMMON}",
    ("segment", "folder"): f"INPUT --masks-dir --overlays-dir {COMMON}",
    ("segment", "dataset"): f"INPUT {DATASET} --masks-dir --overlays-dir {COMMON}",
    ("eval", "imagenet-val"): f"INPUT --labels --real-labels --image-ext --embeddings {EMBEDDING} {DATASET} {COMMON}",
    ("classify", "webdataset"): f"INPUT --image-ext --top-k --embeddings {EMBEDDING} {TARS}",
    ("embed", "folder"): f"INPUT {EMBEDDING} {COMMON}",
    ("embed", "dataset"): f"INPUT {DATASET} {EMBEDDING} {COMMON}",
    ("embed", "webdataset"): f"INPUT --image-ext {EMBEDDING} {TARS}",
    ("segment", "webdataset"): f"INPUT --image-ext --masks-dir --overlays-dir {TARS}",
    ("eval", "voc"): f"INPUT --split {COMMON}",
    ("eval", "ade20k"): f"INPUT --split {COMMON}",
}
PANELS = ("Input", "Model and precision", "Speed", "Output and resume")


def _options_of(path: tuple[str, ...]) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    names = set()
    for param in command.params:
        names |= {*param.opts, *param.secondary_opts} if param.param_type_name == "option" else {param.name.upper()}
    return names - {"--help"}


@pytest.mark.parametrize("path", sorted(OPTIONS_BEFORE), ids=" ".join)
def test_each_command_keeps_its_options_and_groups_them_in_panels(path):
    assert _options_of(path) == set(OPTIONS_BEFORE[path].split())
    shown = invoke(*path, "--help", env={"COLUMNS": "200"}).stdout
    for option in OPTIONS_BEFORE[path].split()[1:]:
        assert f" {option} " in shown or f" {option}\n" in shown, option
    for panel in PANELS:
        assert f"─ {panel} ─" in shown, panel


@pytest.mark.slow
def test_a_log_gets_a_progress_line_every_few_seconds(tmp_path, tiny_model):
    """stderr to a file (a Slurm or CI log): plain lines at intervals with done / total, rate, errors and ETA,
    no live bar."""
    write_photos(tmp_path / "photos", 24)
    log = tmp_path / "stderr.log"
    env = {**os.environ, "MV2BATCH_LOG_INTERVAL": "0.05"}  # the run lasts about a second on a fast CPU
    slow = ["--batch-size", "1", "--no-speedups", "--workers", "0"]  # one image per pass: a run of a few seconds
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-m", "mv2batch", "classify", "folder", str(tmp_path / "photos"), "-o",
                        str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu", *slow],
                       stderr=stderr, stdout=subprocess.DEVNULL, env=env, timeout=300, check=True)
    lines = [line for line in log.read_text().splitlines() if line.startswith("mv2batch: classify ")]
    assert len(lines) >= 2, log.read_text()
    done = [int(line.split()[2].split("/")[0]) for line in lines]
    assert done == sorted(done) and done[-1] == 24 and lines[-1].split()[2] == "24/24"
    assert all("img/s" in line and "errors" in line and "elapsed" in line for line in lines)
    assert "ETA" in lines[0]
    assert "\r" not in log.read_text() and "━" not in log.read_text()  # no live bar in a log


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "mv2batch", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "classify" in result.stdout and "report" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# ---- what a run writes -----------------------------------------------------------------------------------------


def test_run_writes_the_output_tree(done_run):
    for name in ("run.json", "predictions/part-00000.parquet", "shards/00000.json", "report/summary.parquet"):
        assert (done_run / name).is_file(), name
    assert not list((done_run / "predictions").glob(".*")), "no temporary file is left behind"


def test_prediction_columns_and_types(done_run):
    schema = pq.read_schema(done_run / "predictions" / "part-00000.parquet")
    assert {name: schema.field(name).type for name in schema.names} == PREDICTION_TYPES


def test_prediction_values(done_run, tiny_model, inputs):
    id2label = json.loads((tiny_model / "config.json").read_text())["id2label"]
    rows = read_rows(done_run)
    assert [r["id"] for r in rows] == sorted(p.name for p in inputs["photos"].iterdir())
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None and row["label"] is None and row["shard"] == 0
        assert Path(row["path"]) == (inputs["photos"] / row["id"]).resolve()
        assert row["topk_labels"] == [id2label[str(i)] for i in row["topk_ids"]]
        assert len(row["topk_ids"]) == 5 and row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert 0 < sum(row["topk_scores"]) <= 1 + 1e-5


def test_parquet_metadata_names_the_run(done_run, tiny_model):
    run = json.loads((done_run / "run.json").read_text())
    meta = {k.decode(): json.loads(v) for k, v in
            pq.read_schema(done_run / "predictions" / "part-00000.parquet").metadata.items()
            if k.startswith(b"mv2batch.")}
    assert meta["mv2batch.model"] == run["model"]["id"] == str(tiny_model.resolve())
    assert meta["mv2batch.revision"] == run["model"]["revision"] and meta["mv2batch.revision"]
    assert meta["mv2batch.preprocessing"] == run["preprocessing"] and meta["mv2batch.preprocessing"]
    assert {"mv2batch", "torch", "transformers", "pyarrow"} <= set(meta["mv2batch.versions"])
    assert meta["mv2batch.fingerprint"] == run["fingerprint"]


def test_run_json_and_marker(done_run):
    run = json.loads((done_run / "run.json").read_text())
    assert run["plan"]["n_items"] == 8 and run["plan"]["n_shards"] == 1
    assert run["options"]["top_k"] == 5 and run["versions"]["python"]
    marker = json.loads((done_run / "shards" / "00000.json").read_text())
    assert marker["rows"] == 8 and marker["errors"] == 0 and marker["fingerprint"] == run["fingerprint"]


def test_summary_parquet(done_run):
    summary = pq.read_table(done_run / "report" / "summary.parquet").to_pylist()
    assert len(summary) == 1 and SUMMARY_COLUMNS <= set(summary[0])
    assert summary[0]["n_images"] == 8 and summary[0]["n_errors"] == 0 and summary[0]["task"] == "classify"


# ---- options ---------------------------------------------------------------------------------------------------


def test_top_k(inputs, tiny_model, tmp_path):
    assert classify(inputs["photos"], tmp_path / "out", tiny_model, "--top-k", "3", "-q").exit_code == 0
    for row in read_rows(tmp_path / "out"):
        assert len(row["topk_ids"]) == len(row["topk_labels"]) == len(row["topk_scores"]) == 3


def test_strict_fails_when_an_image_failed(inputs, tiny_model, tmp_path):
    result = classify(inputs["with_error"], tmp_path / "out", tiny_model, "--strict", "-q")
    assert_one_line_error(result, STRICT_EXIT, "1 image(s) failed")
    rows = read_rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["error", "ok", "ok", "ok"]  # broken.jpg sorts first


def test_strict_passes_when_all_images_ok(inputs, tiny_model, tmp_path):
    assert classify(inputs["photos"], tmp_path / "out", tiny_model, "--strict", "-q").exit_code == 0


def test_without_strict_errors_exit_zero(inputs, tiny_model, tmp_path):
    assert classify(inputs["with_error"], tmp_path / "out", tiny_model, "-q").exit_code == 0


def test_quiet_prints_nothing(inputs, tiny_model, tmp_path):
    quiet = classify(inputs["photos"], tmp_path / "quiet", tiny_model, "--quiet")
    loud = classify(inputs["photos"], tmp_path / "loud", tiny_model)
    assert quiet.exit_code == loud.exit_code == 0
    assert quiet.stdout == "" and quiet.stderr == ""
    assert "errors" in loud.output  # so the quiet check is not vacuous


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--top-k", "0"), ("--shard-size", "0"), ("--limit", "0"), ("--max-pixels", "0"),
    ("--workers", "-1"),
])
def test_bad_option_value_is_one_line(inputs, tiny_model, tmp_path, option, value):
    result = classify(inputs["photos"], tmp_path / "out", tiny_model, option, value)
    assert_one_line_error(result, ConfigError.exit_code, option)
    assert not (tmp_path / "out").exists(), "nothing is written before the options are valid"


@pytest.mark.parametrize("option, value", [("--batch-size", "many"), ("--dtype", "fp8"), ("--device", None)])
def test_unparsable_option_is_a_usage_error(inputs, tiny_model, tmp_path, option, value):
    result = classify(inputs["photos"], tmp_path / "out", tiny_model, *[a for a in (option, value) if a])
    assert result.exit_code == 2 and option in result.output, result.output


# ---- resumption and refusals -----------------------------------------------------------------------------------


def _copy_run(done_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(done_run, out)
    return out


def test_rerun_same_command_resumes(inputs, tiny_model, done_run, tmp_path):
    out = _copy_run(done_run, tmp_path)
    before = _mtimes(out / "predictions")
    assert classify(inputs["photos"], out, tiny_model, "-q").exit_code == 0
    assert _mtimes(out / "predictions") == before, "a committed shard is not written again"
    ids = [r["id"] for r in read_rows(out)]
    assert len(ids) == len(set(ids)) == 8


def test_resume_option_continues(inputs, tiny_model, done_run, tmp_path):
    out = _copy_run(done_run, tmp_path)
    assert classify(inputs["photos"], out, tiny_model, "--resume", "-q").exit_code == 0
    assert len(read_rows(out)) == 8


@pytest.mark.parametrize("change, field", [
    (("--top-k", "3"), "top_k"), (("--shard-size", "4"), "shard_size"), (("--limit", "5"), "limit"),
    ("other-model", "model"), (("--max-pixels", "100000"), "max_pixels"),
], ids=["top-k", "shard-size", "limit", "model", "max-pixels"])
def test_different_run_is_refused_then_overwritten(inputs, tiny_model, done_run, tmp_path, change, field):
    out = _copy_run(done_run, tmp_path)
    model = tiny_model
    if change == "other-model":
        model, change = shutil.copytree(tiny_model, tmp_path / "other-model"), ()
    run_json = (out / "run.json").read_text()
    refused = classify(inputs["photos"], out, model, *change, "-q")
    assert_one_line_error(refused, OutputError.exit_code, field, "--overwrite")
    assert (out / "run.json").read_text() == run_json, "a refused run changes nothing"
    assert classify(inputs["photos"], out, model, *change, "--overwrite", "-q").exit_code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"] != json.loads(run_json)["fingerprint"]
    ids = [r["id"] for r in read_rows(out)]
    assert len(ids) == len(set(ids)) == run["plan"]["n_items"]


def test_other_content_in_out_is_refused(inputs, tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_one_line_error(classify(inputs["photos"], tmp_path / "out", tiny_model), OutputError.exit_code,
                          "not empty")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_resume_with_empty_out_is_refused(inputs, tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    result = classify(inputs["photos"], tmp_path / "out", tiny_model, "--resume")
    assert_one_line_error(result, OutputError.exit_code, "nothing to resume")


def test_resume_and_overwrite_together_are_refused(inputs, tiny_model, done_run, tmp_path):
    out = _copy_run(done_run, tmp_path)
    result = classify(inputs["photos"], out, tiny_model, "--resume", "--overwrite")
    assert_one_line_error(result, ConfigError.exit_code, "--resume", "--overwrite")
    assert len(read_rows(out)) == 8


# ---- report and models -----------------------------------------------------------------------------------------


def test_report_prints_the_summary(done_run):
    result = invoke("report", done_run)
    assert result.exit_code == 0, result.output
    assert "images" in result.stdout and "8" in result.stdout and "1/1" in result.stdout


def test_report_without_a_run_is_one_line(tmp_path):
    assert_one_line_error(invoke("report", tmp_path), OutputError.exit_code, "no mv2batch run")


def test_report_of_a_missing_folder_is_one_line(tmp_path):
    assert_one_line_error(invoke("report", tmp_path / "nowhere"), OutputError.exit_code)


def test_models_lists_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke("models")
    assert result.exit_code == 0, result.output
    assert DEFAULT_MODEL in result.stdout


def _fake_hub_cache(hub: Path, repo_id: str, commit: str) -> None:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


def test_models_shows_cached_revisions(tmp_path):
    """A fresh process, so that HF_HOME really decides which cache is scanned."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hf" / "hub", "apple/mobilevitv2-0.5-imagenet1k-256", commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "mv2batch", "models"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert DEFAULT_MODEL in result.stdout
    line = next(x for x in result.stdout.splitlines() if "mobilevitv2-0.5-imagenet1k" in x)
    assert commit[:10] in line, result.stdout


# ---- shards ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(inputs, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-sharded") / "out"
    assert classify(inputs["photos"], out, tiny_model, "--shard-size", "3", "--batch-size", "2", "-q").exit_code == 0
    return out


def test_shards_have_parts_and_markers(sharded_run):
    parts = sorted(p.name for p in (sharded_run / "predictions").iterdir())
    assert parts == [f"part-{i:05d}.parquet" for i in range(3)]
    rows = [json.loads((sharded_run / "shards" / f"{i:05d}.json").read_text())["rows"] for i in range(3)]
    assert rows == [3, 3, 2]
    for shard, count in enumerate(rows):
        table = pq.read_table(sharded_run / "predictions" / f"part-{shard:05d}.parquet")
        assert table.num_rows == count and set(table.column("shard").to_pylist()) == {shard}


def test_predictions_read_as_one_dataset(sharded_run, inputs):
    table = ds.dataset(sharded_run / "predictions", format="parquet").to_table()
    ids = sorted(table.column("id").to_pylist())
    assert ids == sorted(p.name for p in inputs["photos"].iterdir())
    assert pq.read_table(sharded_run / "predictions").num_rows == 8


def test_crashed_shard_is_redone_and_its_temporary_removed(sharded_run, inputs, tiny_model, tmp_path):
    out = _copy_run(sharded_run, tmp_path)
    (out / "shards" / "00001.json").unlink()
    (out / "predictions" / "part-00001.parquet").unlink()
    (out / "predictions" / ".part-00001.parquet.tmp").write_bytes(b"half a parquet file")
    kept = {name: t for name, t in _mtimes(out / "predictions").items() if not name.startswith(".")}
    result = classify(inputs["photos"], out, tiny_model, "--shard-size", "3", "--batch-size", "2", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "predictions" / ".part-00001.parquet.tmp").exists()
    assert {n: t for n, t in _mtimes(out / "predictions").items() if n in kept} == kept
    assert (out / "shards" / "00001.json").is_file()
    ids = [r["id"] for r in read_rows(out)]
    assert len(ids) == len(set(ids)) == 8
    assert read_rows(out) == read_rows(sharded_run)


def test_the_readme_names_every_option_that_makes_a_different_run():
    """docs/bad-inputs-and-resuming.md's "Resuming" lists what goes into the fingerprint: every RunConfig field
    declared with _outputs() (those a command takes as an option) by its option's name, so a user knows what a
    resume may change."""
    import dataclasses

    from mv2batch.config import RunConfig

    options = {}
    for path in COMMAND_PATHS:
        command = typer.main.get_command(app)
        for name in path:
            command = command.commands[name]
        options.update({param.name: param.opts[0] for param in command.params if param.param_type_name == "option"})
    page = (Path(__file__).parents[2] / "docs" / "bad-inputs-and-resuming.md").read_text()
    resuming = page[page.index("## Resuming"):]  # the page's last section
    declared = [f.name for f in dataclasses.fields(RunConfig)
                if f.metadata.get("changes_outputs") and f.name in options]
    assert len(declared) >= 20  # the test reads the fields it should
    assert [options[name] for name in declared if f"`{options[name]}`" not in resuming] == []


def test_the_summary_prints_paths_and_class_names_as_they_are_never_as_markup():
    """A folder named `[/bold]` once raised rich's MarkupError after the shard was committed (and again from
    `mv2batch report`); `Trip [paris]` was shown as `Trip`. User text is printed as plain text."""
    from rich.console import Console

    from mv2batch.cli.progress import print_report
    from mv2batch.report.tables import Report

    per_class = [{"class_id": 0, "class_name": "[red]cat[/red]", "support": 1, "top1_acc": 0.0, "top5_acc": 1.0}]
    report = Report(task="classify", out=Path("/data/Trip [paris]/out"), dataset="/data/[/bold]/photos",
                    model="m [b]", n_images=1, n_errors=0, images_per_s=None, complete=True, per_class=per_class)
    console = Console(record=True, width=200)
    print_report(report, console)
    shown = console.export_text()
    assert "/data/[/bold]/photos" in shown and "/data/Trip [paris]/out" in shown
    assert "[red]cat[/red]" in shown and "m [b]" in shown
