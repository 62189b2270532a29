"""Segmentation: masks aligned with the original image, parity with a one-image-at-a-time reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import imagenet_photo_paths, read_rows, segment, skimage_photos
from PIL import Image

from mv2batch.engines.local import LocalParts
from mv2batch.runner.placement import place
from mv2batch.tasks.masks import decode_png
from mv2batch.tasks.postprocess import upsample_argmax

RED, BLUE = (255, 0, 0), (0, 0, 255)


class ColourModel(torch.nn.Module):
    """Stands in for MobileViTV2ForSemanticSegmentation: class 1 where pixels are red, 2 where blue (stride 16)."""

    def forward(self, pixel_values):
        blue, red = pixel_values[:, 0], pixel_values[:, 2]  # the model sees BGR
        redness = (red - blue).unsqueeze(1)
        logits = torch.cat([torch.zeros_like(redness), redness, -redness], dim=1)
        return SimpleNamespace(logits=F.avg_pool2d(logits, 16))


def _two_colour_image(path: Path, width: int, height: int, split: int) -> None:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :split], array[:, split:] = RED, BLUE
    Image.fromarray(array).save(path)


def colour_weights(folder, task, model, embeddings=False) -> ColourModel:
    """checkpoints.load_weights's stand-in: ColourModel whatever the checkpoint."""
    return ColourModel()


COLOUR_MODEL = LocalParts(place=partial(place, load_weights=colour_weights))  # the rest of the placement is real


def _mask(out: Path, item_id: str) -> np.ndarray:
    row = next(r for r in read_rows(out) if r["id"] == item_id)
    return decode_png(row["mask_png"])


def test_mask_of_a_non_square_image_splits_exactly_at_the_middle_column(tiny_segmenter, tmp_path):
    _two_colour_image(tmp_path / "half.png", 300, 100, 150)
    _two_colour_image(tmp_path / "quarter.png", 400, 100, 100)
    segment(tmp_path, tmp_path / "out", tiny_segmenter, parts=COLOUR_MODEL)
    half, quarter = _mask(tmp_path / "out", "half.png"), _mask(tmp_path / "out", "quarter.png")
    assert half.shape == (100, 300) and quarter.shape == (100, 400)
    assert np.all(half[:, :150] == 1) and np.all(half[:, 150:] == 2)
    assert np.all(quarter[:, :100] == 1) and np.all(quarter[:, 100:] == 2)


def test_hf_protocol_shows_transformers_misalignment(tiny_segmenter, tmp_path):
    """transformers centre-crops, then stretches the crop's prediction over the whole image."""
    _two_colour_image(tmp_path / "quarter.png", 400, 100, 100)
    segment(tmp_path, tmp_path / "out", tiny_segmenter, preprocess="hf", parts=COLOUR_MODEL)
    quarter = _mask(tmp_path / "out", "quarter.png")
    assert quarter.shape == (100, 400)
    assert not np.all(quarter[:, :100] == 1), "the red quarter lies outside the crop and is lost"
    assert np.all(quarter == 2)


def _photo_folder(folder: Path) -> list[str]:
    folder.mkdir()
    photos = skimage_photos()
    photos["chelsea"].save(folder / "a_chelsea.png")
    photos["chelsea"].transpose(Image.Transpose.ROTATE_90).save(folder / "b_chelsea_portrait.png")
    photos["coffee"].resize(photos["chelsea"].size).save(folder / "c_coffee_same_size.png")
    photos["astronaut"].resize((123, 77)).save(folder / "d_small_odd.png")
    for path in imagenet_photo_paths(4):
        shutil.copy(path, folder / path.name)
    return sorted(p.name for p in folder.iterdir())


def _reference(model_dir: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One image at a time: resize (short side = input size), forward at batch 1, upsample, argmax."""
    from transformers import MobileViTImageProcessorPil, MobileViTV2ForSemanticSegmentation
    from transformers.image_utils import load_image

    processor = MobileViTImageProcessorPil.from_pretrained(str(model_dir))
    model = MobileViTV2ForSemanticSegmentation.from_pretrained(str(model_dir)).eval()
    image = load_image(str(path))
    pixels = processor(images=image, size={"shortest_edge": processor.crop_size["height"]}, do_center_crop=False,
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    upsampled = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
    top2 = upsampled.topk(2, dim=0).values
    return upsampled.argmax(0).numpy(), (top2[0] - top2[1]).numpy()


def _check_against_reference(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    names = _photo_folder(folder)
    segment(folder, tmp_path / "b1", model_dir, batch_size=1)
    segment(folder, tmp_path / "b16", model_dir, batch_size=16)
    rows_b1, rows_b16 = read_rows(tmp_path / "b1"), read_rows(tmp_path / "b16")
    assert [r["id"] for r in rows_b16] == names
    for row_b1, row in zip(rows_b1, rows_b16):
        mask, mask_b1 = decode_png(row["mask_png"]), decode_png(row_b1["mask_png"])
        expected, gap = _reference(model_dir, folder / row["id"])
        assert mask.shape == (row["height"], row["width"]) == expected.shape
        # Batch size 1 runs the very same operations as the reference: equal, pixel for pixel.
        assert np.array_equal(mask_b1, expected), row["id"]
        # Batched float32 convolutions round differently; only near-ties (top-2 gap < 1e-4) may flip.
        differing = mask != expected
        assert np.all(gap[differing] < 1e-4), f"{row['id']}: {differing.sum()} pixels differ beyond ties"
        assert differing.mean() < 1e-4
        assert len(row["classes"]) >= 2, "the random segmenter must be input-dependent"
        assert sum(row["class_pixels"]) == row["width"] * row["height"]
        assert row["classes"] == sorted(np.unique(mask).tolist())


def test_masks_equal_one_image_at_a_time_reference_tiny(tiny_segmenter, tmp_path):
    _check_against_reference(tiny_segmenter, tmp_path)


@pytest.mark.slow
def test_masks_equal_one_image_at_a_time_reference_full_size(full_segmenter, tmp_path):
    _check_against_reference(full_segmenter, tmp_path)


def test_hf_protocol_equals_transformers_pipeline(tiny_segmenter, tmp_path):
    from transformers import pipeline

    folder = tmp_path / "photos"
    names = _photo_folder(folder)
    segment(folder, tmp_path / "out", tiny_segmenter, preprocess="hf", batch_size=4)
    segmenter = pipeline("image-segmentation", model=str(tiny_segmenter), device="cpu")
    label2id = segmenter.model.config.label2id
    for row, name in zip(read_rows(tmp_path / "out"), names):
        expected = np.full((row["height"], row["width"]), -1)
        for segment_info in segmenter(str(folder / name), subtask="semantic"):
            expected[np.asarray(segment_info["mask"]) > 0] = label2id[segment_info["label"]]
        mask = decode_png(row["mask_png"])
        assert (mask != expected).mean() < 1e-4, name


def test_masks_and_overlays_dirs(tiny_segmenter, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    skimage_photos()["coffee"].save(folder / "sub" / "coffee.jpg")
    segment(folder, tmp_path / "out", tiny_segmenter, masks_dir=tmp_path / "masks", overlays_dir=tmp_path / "ov")
    saved = Image.open(tmp_path / "masks" / "sub" / "coffee.png")
    assert saved.mode == "P" and saved.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    assert np.array_equal(np.asarray(saved), _mask(tmp_path / "out", "sub/coffee.jpg"))
    assert Image.open(tmp_path / "ov" / "sub" / "coffee.jpg").size == (600, 400)


def test_class_by_class_upsample_argmax_equals_full_interpolate_then_argmax():
    """Small chunk_values send every case down the class-by-class path (one byte per class id up to 256
    classes, int16 above); 10**9 takes the single call. The memory it saves: test_6000x4000_photo_peak_memory."""
    torch.manual_seed(0)
    cases = [(21, 17, 23, 300, 451), (5, 4, 4, 37, 1000), (150, 8, 9, 64, 71), (300, 5, 6, 40, 33)]
    for classes, height, width, out_h, out_w in cases:
        logits = torch.randn(classes, height, width)
        logits[3] = logits[1]  # exact ties: the lower class wins, as with argmax
        expected = F.interpolate(logits[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        for chunk_values in (1, out_h * out_w * 2, 10**9):
            mask = upsample_argmax(logits, out_h, out_w, chunk_values)
            assert mask.dtype == torch.int16
            assert torch.equal(mask.long(), expected.argmax(0)), (classes, chunk_values)


def test_classes_that_cannot_win_anywhere_are_skipped_and_the_mask_is_unchanged():
    """A trained-like photo: three classes own regions, 147 others far below; a fourth class wins only between
    input pixels (the maximum of none of them), and a fifth sits 1e-6 under a winner: both must be kept."""
    from mv2batch.tasks.postprocess import candidate_classes

    torch.manual_seed(0)
    logits = torch.randn(150, 12, 16) - 20
    logits[7, :, :5], logits[42, :, 5:11], logits[99, :, 11:] = 10, 10, 10
    logits[120, 0, 0], logits[121, 0, 1], logits[130, 0, :2] = 30, 30, 16  # 130: 15 < 16 between the two
    logits[64] = torch.where(logits[99] == 10, logits[99] - 1e-6, logits[64])
    kept = candidate_classes(logits[None])
    assert {7, 42, 99, 120, 121, 130, 64} <= set(kept) and len(kept) <= 10
    for out_h, out_w in [(300, 400), (37, 1001)]:
        expected = F.interpolate(logits[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        assert 130 in expected.argmax(0).unique().tolist()
        assert torch.equal(upsample_argmax(logits, out_h, out_w, chunk_values=1).long(), expected.argmax(0))


def _peak_rss_mb(folder: Path, out: Path, model: Path) -> int:
    script = (
        "import mv2batch\n"
        "from mv2batch.config import RunConfig\n"
        f"r = mv2batch.run(RunConfig(task='segment', source='folder', input={str(folder)!r}, out={str(out)!r},"
        f" model={str(model)!r}, device='cpu', workers=0))\n"
        "assert r.n_errors == 0\n"
        # VmHWM, not ru_maxrss: the latter keeps the forked test runner's peak across exec.
        "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_6000x4000_photo_peak_memory(tiny_segmenter, tmp_path):
    """Full-resolution float32 logits alone would be 21 x 24 Mpx x 4 B = 2 GB; the whole run adds far less."""
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir(), big.mkdir()
    photo = skimage_photos()["astronaut"]
    photo.save(small / "small.jpg", quality=90)
    photo.resize((6000, 4000)).save(big / "big.jpg", quality=90)
    baseline = _peak_rss_mb(small, tmp_path / "o_small", tiny_segmenter)
    peak = _peak_rss_mb(big, tmp_path / "o_big", tiny_segmenter)
    print(f"peak RSS: {peak} MB for a 6000x4000 photo, {baseline} MB for a 512x512 one")
    assert peak - baseline < 600
    assert decode_png(read_rows(tmp_path / "o_big")[0]["mask_png"]).shape == (4000, 6000)


def test_streams_run_the_shape_groups_of_a_batch_side_by_side_with_the_same_masks(tiny_segmenter, tmp_path):
    """bf16 (all rewrites, parallel streams): a batch of 16 photos of several shapes, its groups run on the
    streams, gives batch size 1's masks bit for bit; batches now mix shapes, equal shapes next to each other."""
    from mv2batch.config import Dtype
    from mv2batch.loading.loader import grouped_batches

    folder = tmp_path / "photos"
    names = _photo_folder(folder)
    segment(folder, tmp_path / "b1", tiny_segmenter, batch_size=1, dtype=Dtype.bf16)
    segment(folder, tmp_path / "b16", tiny_segmenter, batch_size=16, dtype=Dtype.bf16)
    rows_b1, rows_b16 = read_rows(tmp_path / "b1"), read_rows(tmp_path / "b16")
    assert [r["id"] for r in rows_b16] == [r["id"] for r in rows_b1] == names
    for one, batched in zip(rows_b1, rows_b16):
        assert np.array_equal(decode_png(one["mask_png"]), decode_png(batched["mask_png"])), one["id"]
    shapes = {0: "a", 1: "b", 2: "a", 3: None, 4: "b", 5: "a"}
    assert grouped_batches(range(6), shapes.get, 4) == [[0, 2, 5, 1], [4, 3]]
