"""Issue 34, inputs: ids that would escape --masks-dir / --overlays-dir (1, 6, and generated hostile ids over the
three input kinds), tar link members (2), a large member in a tar (7), --id-column's checks when streaming (4),
a folder name that is not UTF-8 (8), a null image cell."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import classify, read_rows, real_photos, segment
from PIL import Image

from mv2batch.errors import InputError
from mv2batch.inputs.tars import split_key
from mv2batch.tasks.masks import mask_file_name
from mv2batch.testing import write_tar


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Eight small real photos as JPEG bytes (small, so that segmenting them at their own size is quick)."""
    encoded = []
    for photo in real_photos(8):
        buffer = io.BytesIO()
        photo.resize((64, 48)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() or path.is_symlink()}


def _hostile_ids(root: Path) -> list[str]:
    """Ids a tar or a table can hold, each of which once wrote outside the masks folder or stopped the run."""
    return ["../../../escape", "a/../../../../up", str(root / "id_escape_abs"), "/", "", ".", "..", "x" * 300,
            "line\nbreak", "tab\there", "nul\x00byte", "bell\x07", "CON", "nul.txt", "aux/com1", "фото/写真",
            "emoji 🙂", "back\\..\\..\\slash", "%2E%2E/%2F", "trailing/", "a//b", "/".join(["deep" * 40] * 6),
            "e\u0301", "\u00e9", "space ", " lead"]


def test_generated_hostile_ids_give_names_inside_the_folder_distinct_and_stable():
    """The property over generated ids: relative, no `.`/`..`/empty part, no control character, bounded,
    the same in every call, and two ids never share a name (their extension aside, which the suffix replaces)."""
    rng = random.Random(34)
    pieces = ["..", ".", "", "/", "\\", "\n", "\x00", "\x1b", "\x7f", "%", "%2E", "%~", "CON", "nul", "é", "写真",
              "🙂", "\udcff", "a" * 120, " ", "~", "x.jpg", "LPT9", "\u202e", "\ud800"]
    ids = {"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)}
    ids |= set(_hostile_ids(Path("/tmp/abs")))
    named: dict[str, str] = {}
    for item in sorted(ids):
        name = mask_file_name(item, ".png")
        assert name == mask_file_name(item, ".png")
        parts = PurePosixPath(name).parts
        assert not PurePosixPath(name).is_absolute() and "\\" not in name and name.endswith(".png"), (item, name)
        assert all(part not in ("", ".", "..") for part in parts) and len(parts) == name.count("/") + 1, (item, name)
        assert not any(ord(char) < 32 or ord(char) == 127 for char in name), (item, name)
        # NAME_MAX of most file systems; S3's key limit leaves room for the folder's own prefix.
        assert all(len(part.encode()) <= 255 for part in parts) and len(name.encode()) <= 512
        stem = item.rsplit("/", 1)[-1]
        key = item[: len(item) - len(stem)] + (stem[: stem.rfind(".")] if 0 < stem.rfind(".") < len(stem) - 1
                                               else stem)
        assert named.setdefault(name, key) == key, (item, named[name], name)


def _hostile_tar(path: Path, ids: list[str], jpegs: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, item in enumerate(ids):
            info = tarfile.TarInfo(f"{item}.jpg")
            data = jpegs[i % len(jpegs)]
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _assert_nothing_outside(tmp_path: Path, before: set[Path], allowed: list[Path]) -> None:
    new = _files_under(tmp_path) - before
    outside = [p for p in new if not any(p.resolve().is_relative_to(a.resolve()) for a in allowed)]
    assert outside == [] and not (tmp_path / "id_escape_abs.png").exists()


def test_tar_members_with_dots_and_absolute_names_stay_inside_the_masks_folder(jpegs, tiny_segmenter, tmp_path):
    """Point 1: `../../../escape.jpg` in a tar wrote m/a/escape.png; an absolute name wrote where it pointed."""
    work = tmp_path / "w" / "x" / "y"
    # The ids a tar can hold: a member's name has no NUL, and its key ends at the first dot of its file name
    # (`/.jpg` has none: WebDataset passes such a member over, as the reader does).
    ids = [i for i in _hostile_ids(tmp_path) if "\x00" not in i and split_key(f"{i}.jpg") is not None
           and "." not in i.rsplit("/", 1)[-1]]
    tar = _hostile_tar(work / "hostile.tar", ids, jpegs)
    before = _files_under(tmp_path)
    masks, overlays, out = work / "m" / "a" / "b" / "masks", work / "m" / "a" / "b" / "overlays", work / "out"
    report = segment(tar, out, tiny_segmenter, source="webdataset", masks_dir=masks, overlays_dir=overlays)
    assert report.n_errors == 0 and report.n_images == len(ids)
    _assert_nothing_outside(tmp_path, before, [masks, overlays, out])
    assert len(list(masks.rglob("*.png"))) == len(list(overlays.rglob("*.jpg"))) == len(ids)


@pytest.mark.parametrize("streaming", [False, True])
def test_table_ids_of_every_kind_stay_inside_the_masks_folder(jpegs, tiny_segmenter, tmp_path, streaming):
    """Points 1 and 6: an absolute --id-column value (streaming) wrote /var/x/id.png; a 300-character id
    stopped the run ("File name too long") on every resume; a newline made a file name with a newline."""
    ids = _hostile_ids(tmp_path)
    table = pa.table({"image": [jpegs[i % len(jpegs)] for i in range(len(ids))], "key": ids})
    pq.write_table(table, tmp_path / "t.parquet")
    before = _files_under(tmp_path)
    masks, overlays, out = tmp_path / "m" / "a" / "masks", tmp_path / "m" / "a" / "ov", tmp_path / "out"
    report = segment(tmp_path / "t.parquet", out, tiny_segmenter, source="dataset", id_column="key",
                     streaming=streaming, masks_dir=masks, overlays_dir=overlays)
    assert report.n_errors == 0 and sorted(row["id"] for row in read_rows(out)) == sorted(ids)
    _assert_nothing_outside(tmp_path, before, [masks, overlays, out])
    names = sorted(p.relative_to(masks).as_posix() for p in masks.rglob("*.png"))
    assert names == sorted(mask_file_name(item, ".png") for item in ids) and len(set(names)) == len(ids)
    assert not any("\n" in name for name in names)


def test_folder_names_long_deep_and_odd_give_masks_inside_the_folder(jpegs, tiny_segmenter, tmp_path):
    folder = tmp_path / "photos"
    names = ["x" * 250 + ".jpg", "line\nbreak.jpg", "写真.jpg", "/".join(["d" * 200] * 3) + "/deep.jpg",
             "x.png", "x.jpg"]  # the last two would share x.png: the second gets its own name, said in a warning
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(jpegs[i])).save(folder / name, format="PNG" if name.endswith(".png") else "JPEG")
    masks = tmp_path / "masks"
    report = segment(folder, tmp_path / "out", tiny_segmenter, masks_dir=masks)
    assert report.n_errors == 0
    assert len(list(masks.rglob("*.png"))) == len(names) and (masks / "x.png").is_file()
    assert all(p.resolve().is_relative_to(masks) for p in masks.rglob("*"))


def _gnu_tar(folder: Path, names: list[str], tar: Path) -> Path:
    subprocess.run(["tar", "-cf", str(tar), "-C", str(folder), *names], check=True)
    return tar


def test_hard_links_read_their_target_and_a_symbolic_link_is_an_error_row(jpegs, tiny_model, tmp_path):
    """Point 2: GNU tar stores a hardlinked file's second name as a link member: a tar of a.jpg and its hard
    link b.jpg gave 1 row; 8 files gave 7 rows. Nothing in input.skipped, exit 0."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"p{i}.jpg").write_bytes(jpegs[i])
    os.link(src / "p0.jpg", src / "p6.jpg")
    os.symlink("/etc/passwd", src / "p7.jpg")
    tar = _gnu_tar(src, [f"p{i}.jpg" for i in range(8)], tmp_path / "linked.tar")
    with tarfile.open(tar) as opened:
        assert opened.getmember("p6.jpg").islnk() and opened.getmember("p7.jpg").issym()
    report = classify(tar, tmp_path / "out", tiny_model, source="webdataset")
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert report.n_images == 8 and report.n_errors == 1 and len(rows) == 8
    assert rows["linked/p6"]["status"] == "ok" and rows["linked/p6"]["sha256"] == rows["linked/p0"]["sha256"]
    symlink = rows["linked/p7"]
    assert symlink["status"] == "error" and "symbolic link to '/etc/passwd'" in symlink["error"]


def _sparse_tar(path: Path, jpeg: bytes, big: int) -> Path:
    """A tar whose sample `s` has its photo and a sidecar of `big` zero bytes, written as a hole (sparse file):
    the tar is large, the disk use is not."""
    with open(path, "wb") as handle:
        for name, size, data in (("s.jpg", len(jpeg), jpeg), ("s.bin", big, None), ("t.jpg", len(jpeg), jpeg)):
            info = tarfile.TarInfo(name)
            info.size = size
            handle.write(info.tobuf(format=tarfile.GNU_FORMAT))
            if data is None:
                handle.seek(size, os.SEEK_CUR)
            else:
                handle.write(data)
            handle.write(b"\0" * (-size % tarfile.BLOCKSIZE))
        handle.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return path


# The peak resident memory of this process alone (VmHWM: ru_maxrss keeps the forking pytest's peak across exec).
READ_AND_MEASURE = """
import re, sys
from mv2batch.inputs.tars import TarShards
rows = [(r.id, r.error, len(r.raw)) for r in TarShards.open([sys.argv[1]]).records(0)]
print(rows, int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024)
"""


def test_a_large_member_that_is_not_the_image_is_passed_over_unread(jpegs, tiny_model, tmp_path):
    """Point 7: a 1.5 GiB non-image member was read whole (about 5 GB peak). 600 MB here: the old code's peak
    is above it, the reader's stays flat."""
    tar = _sparse_tar(tmp_path / "big.tar", jpegs[0], 600 << 20)
    done = subprocess.run([sys.executable, "-c", READ_AND_MEASURE, str(tar)], capture_output=True, text=True,
                          timeout=120, check=True)
    rows, peak_mb = done.stdout.rsplit(" ", 1)
    assert rows == str([("big/s", None, len(jpegs[0])), ("big/t", None, len(jpegs[0]))]) and int(peak_mb) < 400


def test_an_image_member_over_max_image_bytes_is_an_error_row_unread(jpegs, tiny_model, tmp_path):
    small, large = min(jpegs, key=len), max(jpegs, key=len)
    tar = write_tar(tmp_path / "t.tar", [("small", {"jpg": small}), ("large", {"jpg": large, "cls": b"1" * 2_000_000})])
    classify(tar, tmp_path / "out", tiny_model, source="webdataset", max_image_bytes=len(small))
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert rows["t/small"]["status"] == "ok"
    assert "large.jpg is " in rows["t/large"]["error"] and "--max-image-bytes" in rows["t/large"]["error"]


def _id_table(path: Path, jpegs: list[bytes], keys: list) -> Path:
    pq.write_table(pa.table({"image": jpegs[: len(keys)], "key": pa.array(keys, pa.string())}), path)
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_repeated_and_null_ids_are_refused_in_one_line_streaming_or_not(jpegs, tiny_model, tmp_path, streaming):
    """Point 4: with --streaming, ids a, b, a gave two rows with id a; a null id became the id 'None'."""
    repeated = _id_table(tmp_path / "repeated.parquet", jpegs, ["a", "b", "a"])
    with pytest.raises(InputError, match=r"--id-column 'key' repeats 'a' \(again in row 2\)"):
        classify(repeated, tmp_path / "o1", tiny_model, source="dataset", id_column="key", streaming=streaming)
    null = _id_table(tmp_path / "null.parquet", jpegs, ["a", None, "c"])
    with pytest.raises(InputError, match=r"--id-column 'key' is empty in row 1"):
        classify(null, tmp_path / "o2", tiny_model, source="dataset", id_column="key", streaming=streaming)


def test_a_repeated_streamed_id_never_overwrites_the_first_ones_mask(jpegs, tiny_segmenter, tmp_path):
    """Point 4: the second `a` overwrote a.png. Now the stream stops at it, before its row or mask exists."""
    table = _id_table(tmp_path / "t.parquet", jpegs, ["a", "b", "a"])
    with pytest.raises(InputError, match="repeats 'a'"):
        segment(table, tmp_path / "out", tiny_segmenter, source="dataset", id_column="key", streaming=True,
                shard_size=1, masks_dir=tmp_path / "masks")
    rows = read_rows(tmp_path / "out")
    assert [row["id"] for row in rows] == ["a", "b"]
    with Image.open(tmp_path / "masks" / "a.png") as mask, Image.open(io.BytesIO(rows[0]["mask_png"])) as first:
        assert list(mask.getdata()) == list(first.getdata())


def test_a_file_name_that_is_not_utf8_is_a_row_with_a_printable_id(jpegs, tiny_model, tmp_path):
    """Point 8: `bad\\xff.jpg` in a folder: UnicodeEncodeError in the fingerprint, exit 1."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpegs[0])
    with open(os.path.join(os.fsencode(folder), b"bad\xff.jpg"), "wb") as handle:
        handle.write(jpegs[1])
    report = classify(folder, tmp_path / "out", tiny_model)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert report.n_errors == 0 and set(rows) == {"bad\\xff.jpg", "good.jpg"}
    assert rows["bad\\xff.jpg"]["path"] == str(folder.resolve() / "bad\\xff.jpg")
    assert rows["bad\\xff.jpg"]["status"] == "ok" and rows["bad\\xff.jpg"]["sha256"] != rows["good.jpg"]["sha256"]


def test_a_null_image_cell_says_it_is_null_not_an_empty_file(jpegs, tiny_model, tmp_path):
    pq.write_table(pa.table({"image": [jpegs[0], None], "key": ["a", "b"]}), tmp_path / "t.parquet")
    classify(tmp_path / "t.parquet", tmp_path / "out", tiny_model, source="dataset", id_column="key")
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert rows["a"]["status"] == "ok" and "null" in rows["b"]["error"] and "0 bytes" not in rows["b"]["error"]
