"""Folder listing: regular files only, each real directory once, outputs under the input left out, and whatever is
left out said on one warning line and recorded in run.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_rows, real_photos, segment

from mv2batch.inputs.listing import (
    NO_DECODER,
    NOT_IMAGES,
    NOT_REGULAR,
    OPTIONAL_FORMATS,
    REPEATED,
    UNREADABLE,
    image_extensions,
    list_folder,
)


def _photos(folder: Path, names: list[str]) -> None:
    for name, photo in zip(names, real_photos(len(names))):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        photo.save(folder / name)


def _cli(folder: Path, out: Path, model: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mv2batch", "classify", "folder", str(folder), "-o", str(out),
                           "--model", str(model), "--device", "cpu", "--workers", "0", "--quiet", *extra],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_fifo_named_like_a_photo_is_skipped_not_opened(tmp_path, tiny_model):
    folder = tmp_path / "in"
    _photos(folder, ["a.jpg", "b.png"])
    os.mkfifo(folder / "y.jpg")  # opening it to read would block until someone writes: the run would hang
    result = _cli(folder, tmp_path / "out", tiny_model, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [row["id"] for row in read_rows(tmp_path / "out")] == ["a.jpg", "b.png"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["input"]["skipped"] == {NOT_REGULAR: 1}
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mv2batch: warning:")]
    assert len(warnings) == 1 and "FIFO" in warnings[0] and "y.jpg" in warnings[0], result.stderr


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    folder = tmp_path / "in"
    _photos(folder, ["top.jpg", "sub/a.jpg", "sub/deeper/b.png"])
    (folder / "sub" / "loop").symlink_to("..")  # sub/loop/sub/loop/... forever, were links followed blindly
    (folder / "alias").symlink_to("sub")  # the same directory under a second name: walked once
    listing = list_folder(folder)
    assert listing.ids == ["alias/a.jpg", "alias/deeper/b.png", "top.jpg"]  # the first name in sorted order
    assert listing.skipped == {REPEATED: 2}
    assert "reached again" in listing.warning(folder)


def test_every_kind_left_out_is_counted_and_said(tmp_path, tiny_model, caplog):
    folder = tmp_path / "in"
    _photos(folder, ["a.jpg", "sub/b.webp"])
    (folder / "notes.txt").write_text("not a photo")
    (folder / "sub" / "data.csv").write_text("1,2")
    no_decoder = [e for e in OPTIONAL_FORMATS if e not in image_extensions()]
    for extension in OPTIONAL_FORMATS:
        (folder / f"phone{extension}").write_bytes(b"\0\0\0\x18ftypheic")  # listed where a decoder is
    os.mkfifo(folder / "pipe.png")
    listing = list_folder(folder)
    expected = {NOT_IMAGES: 2, NOT_REGULAR: 1, **({NO_DECODER: len(no_decoder)} if no_decoder else {})}
    assert listing.skipped == expected
    assert sorted(listing.ids) == sorted(["a.jpg", "sub/b.webp"] +
                                         [f"phone{e}" for e in OPTIONAL_FORMATS if e not in no_decoder])
    line = listing.warning(folder)
    for kind, count in expected.items():
        assert f"{count} {kind}" in line, line
    assert all(f"phone{e}" in line for e in no_decoder), line
    assert "\n" not in line


def test_an_unreadable_directory_is_counted_and_said(tmp_path):
    folder = tmp_path / "in"
    _photos(folder, ["a.jpg", "locked/b.jpg", "locked/c.jpg"])

    def scan(directory):
        if Path(directory).name == "locked":
            raise PermissionError(13, "Permission denied", str(directory))
        return os.scandir(directory)

    listing = list_folder(folder, scan=scan)
    assert listing.ids == ["a.jpg"] and listing.skipped == {UNREADABLE: 1}
    assert f"1 {UNREADABLE} (locked)" in listing.warning(folder)


def test_masks_written_under_the_input_are_not_inputs_of_the_next_run(tmp_path, tiny_segmenter):
    folder = tmp_path / "in"
    _photos(folder, [f"{i}.jpg" for i in range(4)])
    options = {"masks_dir": folder / "masks", "overlays_dir": folder / "overlays", "batch_size": 2}
    segment(folder, tmp_path / "out", tiny_segmenter, **options)
    assert len(list((folder / "masks").iterdir())) == 4 and len(list((folder / "overlays").iterdir())) == 4
    report = segment(folder, tmp_path / "out", tiny_segmenter, **options)  # the same command again: the same run
    assert report.ran_now == 0 and report.complete
    assert [row["id"] for row in read_rows(tmp_path / "out")] == [f"{i}.jpg" for i in range(4)]


@pytest.mark.parametrize("change", ["masks_dir", "overlays_dir"])
def test_a_resume_with_other_mask_files_is_refused_naming_the_field(tmp_path, tiny_segmenter, change):
    from mv2batch.errors import OutputError

    folder = tmp_path / "in"
    _photos(folder, ["a.jpg", "b.jpg"])
    segment(folder, tmp_path / "out", tiny_segmenter, masks_dir=tmp_path / "masks")
    with pytest.raises(OutputError, match=change):
        segment(folder, tmp_path / "out", tiny_segmenter, **{"masks_dir": tmp_path / "masks", change: tmp_path / "x"})
