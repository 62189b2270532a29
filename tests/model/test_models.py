"""Models: hub ids via the local hub cache, revisions, an unreachable hub, wrong heads, labels, weights, remote code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, classify, cli, deadline, one_line_error, read_rows, skimage_photos

from mv2batch.errors import ModelError
from mv2batch.model import checkpoints

REPO_ID = "tiny-org/mobilevitv2-tiny"
COMMIT = hashlib.sha1(b"commit one").hexdigest()
OTHER_COMMIT = hashlib.sha1(b"commit two").hexdigest()
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
FAST_S = 5  # an unreachable hub must be reported within this many seconds
TINY = {"width_multiplier": 0.25, "n_attn_blocks": [1, 1, 1], "base_attn_unit_dims": [32, 48, 64], "image_size": 64}


# ---- helpers ------------------------------------------------------------------------------------------------


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cache_snapshot(cache: Path, repo_id: str, source: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay out source's files as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/<ref>."""
    repo = repo_folder(cache, repo_id)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    """Set (or, with None, delete) top-level keys of a JSON file."""
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def save_model(model, folder: Path, tiny_model: Path) -> Path:
    """save_pretrained, plus tiny_model's preprocessor so that only the model itself is wrong."""
    model.save_pretrained(folder)
    shutil.copy(tiny_model / "preprocessor_config.json", folder / "preprocessor_config.json")
    return folder


def cli_classify(images: Path, out: Path, model: str, *extra: str):
    return cli("classify", "folder", str(images), "-o", str(out), "--model", model, "--device", "cpu",
               "--workers", "0", "--quiet", *extra)


def model_error(call, *fragments: str) -> str:
    return one_line_error(ModelError, call, *fragments)


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three small photos."""
    folder = tmp_path_factory.mktemp("images")
    for name, photo in list(skimage_photos().items())[:3]:
        photo.resize((120, 96)).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under tmp_path (HF_HOME), as huggingface_hub sees it after import."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


@pytest.fixture
def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1, also in the constants huggingface_hub read at import."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable(monkeypatch) -> None:
    """Offline mode off, and the hub endpoint a closed local port."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)


@pytest.fixture(params=["offline", "unreachable"])
def no_hub(request) -> str:
    """The hub cannot be used: either offline mode, or a refused connection."""
    request.getfixturevalue(request.param)
    return request.param


# ---- hub ids through the local cache --------------------------------------------------------------------------


def test_hub_id_resolves_from_the_local_cache(hub_cache, offline, tiny_model):
    snapshot = cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    resolved = checkpoints.resolve_model(REPO_ID)
    assert resolved.folder.resolve() == snapshot.resolve()
    assert (resolved.revision, resolved.origin, resolved.model_id) == (COMMIT, "hub", REPO_ID)


def test_hub_id_runs_and_records_the_commit(hub_cache, offline, tiny_model, images, tmp_path):
    cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    classify(images, tmp_path / "out", REPO_ID)
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run_json["model"]["id"], run_json["model"]["revision"]) == (REPO_ID, COMMIT)
    classify(images, tmp_path / "local", tiny_model)
    assert _predictions(tmp_path / "out") == _predictions(tmp_path / "local")


def test_hub_id_through_the_cli(hub_cache, offline, tiny_model, images, tmp_path):
    cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    result = cli_classify(images, tmp_path / "out", REPO_ID)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["model"]["revision"] == COMMIT
    assert len(read_rows(tmp_path / "out")) == 3


def test_revision_selects_that_snapshot(hub_cache, offline, tiny_model, tmp_path):
    cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    other = cache_snapshot(hub_cache, REPO_ID, tiny_model, OTHER_COMMIT, ref=None)
    resolved = checkpoints.resolve_model(REPO_ID, OTHER_COMMIT)
    assert resolved.folder.resolve() == other.resolve()
    assert resolved.revision == OTHER_COMMIT
    assert checkpoints.resolve_model(REPO_ID).revision == COMMIT  # main still points at the first


def test_revision_through_run_json(hub_cache, offline, tiny_model, images, tmp_path):
    cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    cache_snapshot(hub_cache, REPO_ID, tiny_model, OTHER_COMMIT, ref=None)
    result = cli_classify(images, tmp_path / "out", REPO_ID, "--revision", OTHER_COMMIT)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["model"]["revision"] == OTHER_COMMIT


@pytest.mark.parametrize("revision", [OTHER_COMMIT, "v2.0"])
def test_unknown_revision_with_nothing_cached(hub_cache, no_hub, tiny_model, revision):
    cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    with deadline(FAST_S):
        model_error(lambda: checkpoints.resolve_model(REPO_ID, revision), REPO_ID)


def test_cached_commit_resolves_fast_when_the_hub_is_unreachable(hub_cache, unreachable, tiny_model):
    """A pinned commit is immutable: when it is cached, a dead network must not cost retries."""
    snapshot = cache_snapshot(hub_cache, REPO_ID, tiny_model, OTHER_COMMIT, ref=None)
    with deadline(FAST_S):
        resolved = checkpoints.resolve_model(REPO_ID, OTHER_COMMIT)
    assert resolved.folder.resolve() == snapshot.resolve()


def test_cached_main_resolves_when_the_hub_is_unreachable(hub_cache, unreachable, tiny_model):
    snapshot = cache_snapshot(hub_cache, REPO_ID, tiny_model, COMMIT)
    with deadline(FAST_S):
        resolved = checkpoints.resolve_model(REPO_ID)
    assert (resolved.folder.resolve(), resolved.revision) == (snapshot.resolve(), COMMIT)


# ---- the hub cannot be reached and nothing is cached ---------------------------------------------------------


def test_unreachable_hub_nothing_cached(hub_cache, no_hub):
    started = time.perf_counter()
    with deadline(FAST_S):
        message = model_error(lambda: checkpoints.resolve_model("someone/not-cached"), "'someone/not-cached'",
                              "--model")
    assert "reach" in message and "cache" in message
    assert time.perf_counter() - started < FAST_S


def test_unreachable_hub_through_the_cli(hub_cache, no_hub, images, tmp_path):
    with deadline(FAST_S):
        result = cli_classify(images, tmp_path / "out", "someone/not-cached")
    assert_one_line_error(result, "someone/not-cached", "--model", "reach")
    assert result.exit_code == ModelError.exit_code


# ---- refused checkpoints -------------------------------------------------------------------------------------


def _segmentation(folder: Path, tiny_model: Path) -> Path:
    from transformers import MobileViTV2Config, MobileViTV2ForSemanticSegmentation

    config = MobileViTV2Config(**TINY, aspp_out_channels=32, num_labels=5)
    return save_model(MobileViTV2ForSemanticSegmentation(config), folder, tiny_model)


def _mobilevit_v1(folder: Path, tiny_model: Path) -> Path:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    config = MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                             num_labels=5)
    return save_model(MobileViTForImageClassification(config), folder, tiny_model)


def _resnet(folder: Path, tiny_model: Path) -> Path:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return save_model(ResNetForImageClassification(config), folder, tiny_model)


def _backbone(folder: Path, tiny_model: Path, architectures=None) -> Path:
    """A MobileViTV2Model (no classifier) whose config.json does not say so."""
    from transformers import MobileViTV2Config, MobileViTV2Model

    save_model(MobileViTV2Model(MobileViTV2Config(**TINY)), folder, tiny_model)
    edit_json(folder / "config.json", architectures=architectures)
    return folder


def _backbone_named(folder: Path, tiny_model: Path) -> Path:
    return _backbone(folder, tiny_model, architectures=["MobileViTV2Model"])


def _missing(folder: Path, tiny_model: Path) -> Path:
    return folder / "does-not-exist"


REFUSED = {
    "segmentation": (_segmentation, ["segmentation", "`mv2batch segment`"]),
    "mobilevit-v1": (_mobilevit_v1, ["mobilevit ", "not MobileViTV2"]),
    "resnet": (_resnet, ["resnet", "not MobileViTV2"]),
    "backbone-no-architectures": (_backbone, ["image-classification head", "missing"]),
    "backbone-named": (_backbone_named, ["image-classification head", "missing"]),
    "missing-folder": (_missing, ["model folder not found"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_wrong_checkpoints_are_refused(case, tiny_model, images, tmp_path):
    build, fragments = REFUSED[case]
    model = build(tmp_path / "model", tiny_model)
    model_error(lambda: classify(images, tmp_path / "out", model), *fragments)
    result = cli_classify(images, tmp_path / "cli-out", str(model))
    assert_one_line_error(result, *fragments)
    assert result.exit_code == ModelError.exit_code


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "a/b/c"])
def test_missing_model_paths(name):
    model_error(lambda: checkpoints.resolve_model(name), "model folder not found", name)


def test_refused_model_leaves_the_output_reusable(tiny_model, images, tmp_path):
    """A model refused only when its weights load must not leave a run.json that blocks the corrected command."""
    backbone = _backbone(tmp_path / "backbone", tiny_model)
    model_error(lambda: classify(images, tmp_path / "out", backbone), "head")
    classify(images, tmp_path / "out", tiny_model)
    assert len(read_rows(tmp_path / "out")) == 3


# ---- labels and weight files ---------------------------------------------------------------------------------


def _predictions(out: Path) -> list[tuple]:
    return [(r["id"], r["topk_ids"], [round(s, 6) for s in r["topk_scores"]]) for r in read_rows(out)]


def test_label_names_come_from_id2label(tiny_model, images, tmp_path):
    names = [f"animal number {i}" for i in range(10)]
    model = copy_model(tiny_model, tmp_path / "model")
    edit_json(model / "config.json", id2label={str(i): n for i, n in enumerate(names)},
              label2id={n: i for i, n in enumerate(names)})
    classify(images, tmp_path / "out", model, top_k=3)
    rows = read_rows(tmp_path / "out")
    assert rows and all(r["topk_labels"] == [names[i] for i in r["topk_ids"]] for r in rows)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["model"]["labels"] == names


def test_safetensors_preferred_over_a_bin(tiny_model, images, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    (model / "pytorch_model.bin").write_bytes(b"not a pickle: loading this would fail")
    assert checkpoints.resolve_model(str(model)).revision == checkpoints.resolve_model(str(tiny_model)).revision
    classify(images, tmp_path / "out", model)
    classify(images, tmp_path / "ref", tiny_model)
    assert _predictions(tmp_path / "out") == _predictions(tmp_path / "ref")


def test_legacy_bin_only_checkpoint_loads(tiny_model, images, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = copy_model(tiny_model, tmp_path / "model")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    classify(images, tmp_path / "out", model)
    classify(images, tmp_path / "ref", tiny_model)
    assert _predictions(tmp_path / "out") == _predictions(tmp_path / "ref")


def test_no_weights_is_refused(tiny_model, images, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    (model / "model.safetensors").unlink()
    model_error(lambda: classify(images, tmp_path / "out", model), "no weights")


def test_corrupt_weights_are_refused(tiny_model, images, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    model_error(lambda: classify(images, tmp_path / "out", model), "cannot load")


# ---- never trust remote code ---------------------------------------------------------------------------------


EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import MobileViTV2Config as EvilConfig, MobileViTV2ForImageClassification as EvilModel
from transformers import MobileViTImageProcessorPil as EvilProcessor
"""


def _with_remote_code(tiny_model: Path, folder: Path, marker: Path, **config_changes) -> Path:
    model = copy_model(tiny_model, folder)
    (model / "evil_code.py").write_text(EVIL_CODE.format(marker=str(marker)))
    auto_map = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForImageClassification": "evil_code.EvilModel"}
    edit_json(model / "config.json", auto_map=auto_map, **config_changes)
    edit_json(model / "preprocessor_config.json", auto_map={"AutoImageProcessor": "evil_code.EvilProcessor"})
    return model


def test_auto_map_is_ignored(tiny_model, images, tmp_path):
    marker = tmp_path / "custom-code-ran"
    model = _with_remote_code(tiny_model, tmp_path / "model", marker)
    classify(images, tmp_path / "out", model)
    assert not marker.exists()
    assert len(read_rows(tmp_path / "out")) == 3


def test_custom_architecture_is_refused_without_running_it(tiny_model, images, tmp_path):
    marker = tmp_path / "custom-code-ran"
    model = _with_remote_code(tiny_model, tmp_path / "model", marker, model_type="evil-net",
                              architectures=["EvilModel"])
    model_error(lambda: classify(images, tmp_path / "out", model), "not MobileViTV2")
    assert not marker.exists()
