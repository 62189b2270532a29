"""Parity: mv2batch classify folder gives transformers.pipeline's top-k ids and scores on the same files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import classify, imagenet_photo_paths, read_rows, skimage_photos, write_odd_images


def _input_folder(folder: Path) -> list[str]:
    names = write_odd_images(folder)
    for name, photo in skimage_photos().items():
        photo.save(folder / f"skimage_{name}.png")
        names.append(f"skimage_{name}.png")
    for path in imagenet_photo_paths(6):
        shutil.copy(path, folder / path.name)
        names.append(path.name)
    return sorted(names)


def _pipeline_topk(model: Path, paths: list[Path], k: int, batch_size: int) -> list[tuple[list[int], list[float]]]:
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(model), device="cpu")
    label2id = classifier.model.config.label2id
    outputs = classifier([str(p) for p in paths], top_k=k, batch_size=batch_size)
    return [([label2id[p["label"]] for p in predictions], [p["score"] for p in predictions]) for predictions in outputs]


def _check_parity(model: Path, tmp_path: Path, batch_size: int, atol: float = 1e-5, **options) -> None:
    """Same files, same batch composition: the pipeline batches with the same batch size, in the same order.

    float32 results depend slightly on the batch a convolution sees (about 1e-5 in probability on these
    checkpoints, in transformers as much as here), so each batch size is compared with its own.
    """
    folder = tmp_path / "images"
    names = _input_folder(folder)
    classify(folder, tmp_path / "out", model, batch_size=batch_size, **options)
    rows = read_rows(tmp_path / "out")
    assert [r["id"] for r in rows] == names
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    expected = _pipeline_topk(model, [folder / n for n in names], k=5, batch_size=batch_size)

    # The checkpoint must be decisive and input-dependent, or parity would hold vacuously.
    top1 = [r["topk_ids"][0] for r in rows]
    assert len(set(top1)) >= 4, top1
    assert np.median([r["topk_scores"][0] for r in rows]) > 0.4

    for row, (ids, scores) in zip(rows, expected):
        assert row["topk_ids"] == ids, row["id"]
        np.testing.assert_allclose(row["topk_scores"], scores, atol=atol, rtol=0, err_msg=row["id"])


@pytest.mark.parametrize("batch_size", [1, 8])
def test_parity_with_pipeline_tiny_checkpoint(tiny_model, tmp_path, batch_size):
    _check_parity(tiny_model, tmp_path, batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 16])
def test_parity_with_pipeline_full_size_checkpoint(full_model, tmp_path, batch_size):
    _check_parity(full_model, tmp_path, batch_size)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_speedups_stay_within_1e4_of_pipeline(tiny_model, tmp_path, batch_size):
    """--speedups (folded BatchNorm, fused convolutions, channels-last) in fp32: same ids, scores within 1e-4."""
    _check_parity(tiny_model, tmp_path, batch_size, atol=1e-4, speedups=True)
