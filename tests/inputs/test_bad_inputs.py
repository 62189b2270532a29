"""Bad inputs: every broken image is an error row in its place, odd images are fine, bad folders are one clear error."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import classify, read_rows, segment, skimage_photos, write_odd_images
from PIL import Image
from typer.testing import CliRunner

from mv2batch.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PILLOW_HARD_LIMIT = 2 * Image.MAX_IMAGE_PIXELS  # Image.open itself refuses images above this


# ---- crafted files ---------------------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A few-byte greyscale PNG whose header declares width x height pixels (only one row of data follows)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1))
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", row) + _png_chunk(b"IEND", b"")


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _photo(name: str = "chelsea", size: tuple[int, int] = (120, 90)) -> Image.Image:
    return skimage_photos()[name].resize(size)


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (content, a word the error message must contain); names interleave with the good files."""
    jpeg = _encoded(_photo(size=(160, 120)), "JPEG")
    rng = np.random.default_rng(3)
    png = bytearray(_encoded(_noise(48, 48), "PNG"))
    png[60:-20] = rng.bytes(len(png) - 80)  # valid signature and IHDR, garbage image data
    over_limit = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5) + 1  # between Pillow's warning and its hard limit
    return {
        "b_text_saved_as.jpg": (b"this is a text file, not a JPEG\n" * 20, "identify"),
        "d_zero_bytes.png": (b"", "empty"),
        "e_truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "f_random_after_signature.png": (PNG_SIGNATURE + rng.bytes(3000), "image"),
        "f_garbled_data.png": (bytes(png), "image"),
        "g_bomb_declared_200mpx.png": (png_declaring(20000, PILLOW_HARD_LIMIT // 20000 + 1), "decompression"),
        "g_bomb_over_limit.png": (png_declaring(over_limit, over_limit), "decompression"),
    }


BAD = bad_files()
GOOD = {
    "a_photo.jpg": lambda: _photo("chelsea"),
    "c_photo.png": lambda: _photo("coffee"),
    "e_photo_between_errors.png": lambda: _photo("rocket"),
    "nested/deeper/h_photo.JPG": lambda: _photo("astronaut"),
    "z_last.webp": lambda: _photo("coffee", (90, 120)),
    "strip_1x10000.png": lambda: _noise(10000, 1, seed=1),
    "strip_10000x1.png": lambda: _noise(1, 10000, seed=2),
    **{f"cases/photo{ext}": (lambda: _photo("rocket", (80, 60))) for ext in (
        ".JPG", ".Png", ".TIFF", ".webp", ".bmp", ".gif", ".jpeg", ".tif")},
}
HIDDEN = (".hidden.jpg", ".cache/x.jpg", ".cache/deep/y.png", "cases/.also_hidden.png")
NOT_IMAGES = ("notes.txt", "cases/table.csv", "README")
ODD_MODES = ("mode_L.png", "mode_LA.png", "mode_P_transparent.png", "mode_RGBA.png", "mode_CMYK.jpg",
             "mode_I16.png", "mode_1.bmp", "anim.gif", "photo.tiff", "Upper_Case.JPG")


def _write(folder: Path, name: str, content: bytes | Image.Image) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Image.Image):
        content.save(path)
    else:
        path.write_bytes(content)


def build_mixed_folder(folder: Path) -> list[str]:
    """Good, bad, odd, hidden and non-image files; returns the ids a run must produce, in order."""
    for name, (content, _) in BAD.items():
        _write(folder, name, content)
    for name, make in GOOD.items():
        _write(folder, name, make())
    for name in HIDDEN:
        _write(folder, name, _photo())
    for name in NOT_IMAGES:
        _write(folder, name, b"not an image")
    odd = [f"odd/{name}" for name in write_odd_images(folder / "odd")]
    return sorted([*BAD, *GOOD, *odd])


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    """One run over the mixed folder, small batches so that errors fall in several batches."""
    root = tmp_path_factory.mktemp("bad-inputs")
    expected = build_mixed_folder(root / "images")
    report = classify(root / "images", root / "out", tiny_model, batch_size=4)
    rows = read_rows(root / "out")
    return {"out": root / "out", "expected": expected, "report": report, "rows": {r["id"]: r for r in rows},
            "listing": [r["id"] for r in rows]}


def _assert_error_row(row: dict, word: str) -> None:
    assert row["status"] == "error", row
    assert word.lower() in row["error"].lower(), row["error"]
    assert "\n" not in row["error"] and len(row["error"]) < 300, row["error"]
    assert row["width"] is None and row["height"] is None
    assert row["topk_ids"] is None and row["topk_labels"] is None and row["topk_scores"] is None


def _assert_ok_row(row: dict, size: tuple[int, int] | None = None) -> None:
    assert row["status"] == "ok", row["error"]
    assert row["error"] is None
    assert len(row["topk_ids"]) == 5 and 0 < row["topk_scores"][0] <= 1
    if size is not None:
        assert (row["width"], row["height"]) == size


# ---- one recorded error row per bad file -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_an_error_row(mixed, name):
    _assert_error_row(mixed["rows"][name], BAD[name][1])


@pytest.mark.parametrize("name", sorted(BAD))
def test_error_message_is_reproducible(mixed, name):
    """Outputs must be exact and reproducible: no memory addresses or temporary objects in the message."""
    error = mixed["rows"][name]["error"]
    assert not re.search(r"0x[0-9a-fA-F]{6,}|<_io\.", error), error


def test_no_row_dropped_or_replaced(mixed):
    assert mixed["listing"] == mixed["expected"]
    for row_id, row in mixed["rows"].items():
        assert Path(row["path"]).as_posix().endswith("/" + row_id)


def test_error_rows_keep_their_position_in_the_part(mixed):
    part = pq.read_table(mixed["out"] / "predictions" / "part-00000.parquet")
    ids, status = part.column("id").to_pylist(), part.column("status").to_pylist()
    assert ids == mixed["expected"]
    assert [i for i, s in zip(ids, status) if s == "error"] == sorted(BAD)


def test_rows_around_errors_are_fine(mixed):
    for row_id, row in mixed["rows"].items():
        if row_id not in BAD:
            _assert_ok_row(row)
    top1 = {tuple(mixed["rows"][name]["topk_ids"]) for name in ("a_photo.jpg", "c_photo.png", "z_last.webp")}
    assert len(top1) > 1, "predictions after an error row must belong to their own image"


def test_summary_counts_errors(mixed):
    summary = pq.read_table(mixed["out"] / "report" / "summary.parquet").to_pylist()
    assert len(summary) == 1
    assert summary[0]["n_errors"] == len(BAD) == mixed["report"].n_errors
    assert summary[0]["n_images"] == len(mixed["expected"]) == mixed["report"].n_images


# ---- odd images that must work -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ODD_MODES)
def test_odd_modes_are_ok(mixed, name):
    _assert_ok_row(mixed["rows"][f"odd/{name}"])


@pytest.mark.parametrize("name, size", [
    ("odd/tiny_1x1.png", (1, 1)), ("strip_1x10000.png", (1, 10000)), ("strip_10000x1.png", (10000, 1)),
    ("odd/strip_1x300.png", (1, 300)), ("odd/wide_500x40.webp", (500, 40)),
])
def test_extreme_sizes_are_ok(mixed, name, size):
    _assert_ok_row(mixed["rows"][name], size)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_size(mixed, orientation):
    stored = (300, 180)  # write_odd_images stores a 300x180 crop; orientations 5..8 turn it by 90 degrees
    _assert_ok_row(mixed["rows"][f"odd/exif_{orientation}.jpg"], stored if orientation < 5 else stored[::-1])


def test_decoded_pixels_equal_transformers_load_image(tmp_path):
    """Every odd mode and EXIF orientation decodes to the very pixels transformers' load_image gives."""
    from transformers.image_utils import load_image

    from mv2batch.loading.decode import decode_image

    folder = tmp_path / "odd"
    for name in write_odd_images(folder):
        ours = decode_image(folder / name).image
        theirs = load_image(str(folder / name))
        assert ours.mode == theirs.mode == "RGB", name
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name


def test_exif_rotation_changes_the_pixels_seen(mixed):
    rows = mixed["rows"]
    assert rows["odd/exif_1.jpg"]["topk_scores"] != rows["odd/exif_6.jpg"]["topk_scores"]


# ---- listing ---------------------------------------------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped(mixed):
    listed = set(mixed["listing"])
    assert not any(part.startswith(".") for row_id in listed for part in row_id.split("/"))
    assert not listed & set(HIDDEN)


def test_extensions_in_any_case_are_included(mixed):
    cases = [row_id for row_id in mixed["listing"] if row_id.startswith("cases/")]
    assert cases == sorted(name for name in GOOD if name.startswith("cases/"))


def test_ids_are_posix_paths_relative_to_the_input(mixed):
    assert "nested/deeper/h_photo.JPG" in mixed["rows"]
    assert all(not row_id.startswith("/") and "\\" not in row_id for row_id in mixed["listing"])


def test_non_image_files_are_counted_as_skipped(mixed):
    run = json.loads((mixed["out"] / "run.json").read_text())
    assert run["input"]["skipped_files"] == len(NOT_IMAGES)


def test_a_batch_of_only_bad_images(tiny_model, tmp_path):
    folder = tmp_path / "images"
    for name, content in {"a_text.jpg": b"text", "b_empty.png": b"", "c_good.png": _photo()}.items():
        _write(folder, name, content)
    report = classify(folder, tmp_path / "out", tiny_model, batch_size=2)
    rows = read_rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["error", "error", "ok"]
    assert report.n_errors == 2


# ---- the decompression-bomb limit ------------------------------------------------------------------------------


def _max_pixels_folder(folder: Path) -> Path:
    _write(folder, "modest_300x200.png", _photo(size=(300, 200)))
    _write(folder, "small_80x60.png", _photo(size=(80, 60)))
    return folder


def _check_max_pixels_rows(out: Path) -> None:
    rows = {r["id"]: r for r in read_rows(out)}
    _assert_error_row(rows["modest_300x200.png"], "max-pixels")
    assert "300x200" in rows["modest_300x200.png"]["error"]
    _assert_ok_row(rows["small_80x60.png"], (80, 60))


def test_max_pixels_option(tiny_model, tmp_path):
    report = classify(_max_pixels_folder(tmp_path / "images"), tmp_path / "out", tiny_model, max_pixels=20_000)
    _check_max_pixels_rows(tmp_path / "out")
    assert report.n_errors == 1


def test_max_pixels_cli(tiny_model, tmp_path):
    from mv2batch.cli.app import app

    args = ["classify", "folder", str(_max_pixels_folder(tmp_path / "images")), "-o", str(tmp_path / "out"),
            "--model", str(tiny_model), "--device", "cpu", "--workers", "0", "--max-pixels", "20000", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _check_max_pixels_rows(tmp_path / "out")


def test_megapixel_figures_have_the_digits_that_tell_them_apart(tiny_model, tmp_path):
    from mv2batch.loading.decode import megapixels

    assert megapixels(120_000, 100_000) == ("0.12", "0.10")
    assert megapixels(3_000_000, 1_000_000) == ("3.0", "1.0")
    folder = tmp_path / "images"
    _write(folder, "a_400x300.png", _photo(size=(400, 300)))
    classify(folder, tmp_path / "out", tiny_model, max_pixels=100_000)
    error = read_rows(tmp_path / "out")[0]["error"]
    assert "= 0.12 Mpx, over the decompression-bomb limit of 0.10 Mpx" in error, error


def test_a_full_disk_while_writing_a_mask_names_the_mask(tiny_segmenter, tmp_path):
    """/dev/full refuses every write with ENOSPC: a mask file linked to it is a disk that filled on that file."""
    from mv2batch.errors import OutputError

    folder = tmp_path / "images"
    for name in ("a.png", "b.png"):
        _write(folder, name, _photo(size=(80, 60)))
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "b.jpg").symlink_to("/dev/full")
    with pytest.raises(OutputError, match=r"disk full while writing the overlay .*overlays/b\.jpg") as raised:
        segment(folder, tmp_path / "out", tiny_segmenter, masks_dir=tmp_path / "masks",
                overlays_dir=tmp_path / "overlays")
    assert "\n" not in str(raised.value) and "predictions" not in str(raised.value)


# ---- inputs that are not a folder of images: one clear error ---------------------------------------------------


def _missing(tmp: Path) -> Path:
    return tmp / "does-not-exist"


def _a_file(tmp: Path) -> Path:
    _write(tmp, "photo.jpg", _photo())
    return tmp / "photo.jpg"


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _no_images(tmp: Path) -> Path:
    for name in ("notes.txt", "sub/data.csv", ".hidden.jpg"):
        _write(tmp / "docs", name, b"not an image")
    return tmp / "docs"


BAD_INPUTS = {"missing": (_missing, "not found"), "file": (_a_file, "not a folder"),
              "empty": (_empty, "no images"), "only-non-images": (_no_images, "no images")}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_folder_raises_input_error(tiny_model, tmp_path, case):
    make, words = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=words) as info:
        classify(path, tmp_path / "out", tiny_model)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_folder_cli_one_line(tiny_model, tmp_path, case):
    from mv2batch.cli.app import app

    make, words = BAD_INPUTS[case]
    args = ["classify", "folder", str(make(tmp_path)), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
            "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == InputError.exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mv2batch: error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_error_rows_are_the_same_with_worker_processes(mixed, tiny_model, tmp_path):
    """Decoding in DataLoader workers records the same errors, in the same places, as in-process decoding."""
    folder = tmp_path / "images"
    for name, (content, _) in BAD.items():
        _write(folder, name, content)
    for name in ("a_photo.jpg", "c_photo.png", "z_last.webp"):
        _write(folder, name, GOOD[name]())
    classify(folder, tmp_path / "out", tiny_model, workers=2, batch_size=3)
    rows = read_rows(tmp_path / "out")
    assert [r["id"] for r in rows] == sorted([*BAD, "a_photo.jpg", "c_photo.png", "z_last.webp"])
    for row in rows:
        expected = mixed["rows"][row["id"]]
        assert [row[k] for k in ("status", "width", "height")] == [expected[k] for k in ("status", "width", "height")]
        if row["status"] == "ok":  # batches differ from the module run's, so only the decisive top-1 must agree
            assert row["topk_ids"][0] == expected["topk_ids"][0]
        else:
            assert row["error"]
