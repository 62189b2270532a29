"""`classify dataset`: save_to_disk folders, parquet files, imagefolder layouts, columns, splits, streaming, workers."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error, classify, cli, deadline, one_line_error, read_rows, skimage_photos

from mv2batch.errors import InputError

CLASSES = ["cat", "coffee", "rocket"]
LABELS = [0, 1, 2, 0, 2, 1]  # the gold label of each photo file, in file order
SIZES = [(200, 150), (130, 180), (160, 160), (240, 120), (110, 170), (170, 110)]
DATASET_OPTIONS = {"source": "dataset", "batch_size": 4}
FAST_S = 10  # a dataset that cannot be reached must be reported within this many seconds


# ---- helpers ------------------------------------------------------------------------------------------------


def cells(files: list[Path]) -> list[dict]:
    """datasets.Image cells holding the files' encoded bytes (what save_to_disk and parquet store)."""
    return [{"bytes": f.read_bytes(), "path": f.name} for f in files]


def make_dataset(columns: dict[str, list], features: dict):
    import datasets

    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def image_dataset(files: list[Path], labels: list[int], image: str = "image", label: str = "label"):
    """One Image column and one ClassLabel column."""
    import datasets

    return make_dataset({image: cells(files), label: labels},
                        {image: datasets.Image(), label: datasets.ClassLabel(names=CLASSES)})


def classify_dataset(name: Path | str, out: Path, model: Path, **options):
    return classify(Path(name), out, model, **{**DATASET_OPTIONS, **options})


def rows_in_order(out: Path) -> list[dict]:
    """The rows of a dataset run in dataset order (ids are split/index, which sort wrongly as strings)."""
    return sorted(read_rows(out), key=lambda row: (row["id"].split("/")[0], int(row["id"].split("/")[1])))


def assert_same_predictions(rows: list[dict], reference: list[dict]) -> None:
    """Row by row: same status, same top-k ids, scores within 1e-6."""
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        assert (row["status"], row["topk_ids"], row["topk_labels"]) == (ref["status"], ref["topk_ids"],
                                                                         ref["topk_labels"]), (row, ref)
        if row["status"] == "ok":
            assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(row["topk_scores"], ref["topk_scores"]))


def assert_dataset_rows(rows: list[dict], split: str, labels: list[int]) -> None:
    assert [r["id"] for r in rows] == [f"{split}/{i}" for i in range(len(labels))]
    assert [r["label"] for r in rows] == labels
    assert all(r["status"] == "ok" and len(r["topk_ids"]) == 5 and len(r["topk_scores"]) == 5 for r in rows)


def folder_rows(folder: Path, out: Path, model: Path, batch_size: int = DATASET_OPTIONS["batch_size"]) -> list[dict]:
    """`classify folder` over the same files, in sorted order."""
    classify(folder, out, model, batch_size=batch_size)
    return read_rows(out)


def cli_classify_dataset(name: Path | str, out: Path, model: Path, *extra: str):
    return cli("classify", "dataset", str(name), "-o", str(out), "--model", str(model), "--device", "cpu",
               "--workers", "0", "--quiet", *extra)


def input_error(call, *fragments: str) -> str:
    return one_line_error(InputError, call, *fragments)


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """No network, and datasets' cache under tmp_path (the constants are read at import, so patch them too)."""
    import datasets
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """Six small photo files (JPEG and PNG crops, odd sizes, spread-out predictions), named in dataset order."""
    folder = tmp_path_factory.mktemp("photos")
    photos = list(skimage_photos().values())
    files = []
    for i, size in enumerate(SIZES):
        photo = photos[i % len(photos)]
        box = (30 * i, 20 * i, 30 * i + photo.width * 2 // 3, 20 * i + photo.height * 2 // 3)
        file = folder / f"img_{i}.{'png' if i % 2 else 'jpg'}"
        photo.crop(box).resize(size).save(file)
        files.append(file)
    return files


@pytest.fixture(scope="module")
def folder_reference(photo_files, tiny_model, tmp_path_factory) -> list[dict]:
    """`classify folder` over the photo files: what every dataset run must reproduce."""
    return folder_rows(photo_files[0].parent, tmp_path_factory.mktemp("folder-run") / "out", tiny_model)


@pytest.fixture(scope="module")
def saved_dataset(photo_files, tmp_path_factory) -> Path:
    """A save_to_disk DatasetDict: train = all six photos, test = the first three."""
    import datasets

    full = image_dataset(photo_files, LABELS)
    folder = tmp_path_factory.mktemp("saved") / "dataset"
    datasets.DatasetDict({"train": full, "test": full.select(range(3))}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def parquet_file(photo_files, tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("parquet") / "data.parquet"
    image_dataset(photo_files, LABELS).to_parquet(str(file))
    return file


# ---- sources ------------------------------------------------------------------------------------------------


def test_saved_dataset_with_several_splits_needs_split(saved_dataset, tiny_model, tmp_path):
    input_error(lambda: classify_dataset(saved_dataset, tmp_path / "out", tiny_model), "train", "test", "--split")
    assert_one_line_error(cli_classify_dataset(saved_dataset, tmp_path / "cli", tiny_model), "--split", "train, test")


def test_unknown_split_lists_the_splits(saved_dataset, tiny_model, tmp_path):
    input_error(lambda: classify_dataset(saved_dataset, tmp_path / "out", tiny_model, split="validation"),
                "validation", "train", "test")


@pytest.mark.parametrize("split, count", [("train", 6), ("test", 3)])
def test_saved_dataset_split(saved_dataset, folder_reference, tiny_model, tmp_path, split, count):
    classify_dataset(saved_dataset, tmp_path / "out", tiny_model, split=split)
    rows = rows_in_order(tmp_path / "out")
    assert_dataset_rows(rows, split, LABELS[:count])
    if count == len(folder_reference):  # the same batches as the folder run: identical results
        assert_same_predictions(rows, folder_reference)
    else:
        assert [r["topk_ids"] for r in rows] == [r["topk_ids"] for r in folder_reference[:count]]


def test_parquet_file(parquet_file, folder_reference, tiny_model, tmp_path):
    classify_dataset(parquet_file, tmp_path / "out", tiny_model)
    rows = rows_in_order(tmp_path / "out")
    assert_dataset_rows(rows, "train", LABELS)
    assert_same_predictions(rows, folder_reference)


def test_imagefolder_layout(photo_files, tiny_model, tmp_path):
    """Class subfolders: labels from the folder names, predictions as `classify folder` over the same tree."""
    root = tmp_path / "imagefolder"
    for file, label in zip(photo_files, LABELS):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, root / CLASSES[label] / file.name)
    classify_dataset(root, tmp_path / "out", tiny_model, batch_size=1)
    rows = rows_in_order(tmp_path / "out")
    reference = {Path(r["path"]).relative_to(root).as_posix(): r
                 for r in folder_rows(root, tmp_path / "folder", tiny_model, batch_size=1)}
    assert [r["id"] for r in rows] == [f"train/{i}" for i in range(len(rows))]
    relative = [Path(r["path"]).relative_to(root).as_posix() for r in rows]
    assert sorted(relative) == sorted(reference)
    assert [r["label"] for r in rows] == [CLASSES.index(p.split("/")[0]) for p in relative]
    assert_same_predictions(rows, [reference[p] for p in relative])


# ---- columns ------------------------------------------------------------------------------------------------


def _custom_columns(files: list[Path]):
    """Image and label columns with unusual names, and a distracting text column first."""
    import datasets

    return make_dataset(
        {"caption": [f.stem for f in files], "picture": cells(files), "category": LABELS},
        {"caption": datasets.Value("string"), "picture": datasets.Image(),
         "category": datasets.ClassLabel(names=CLASSES)})


def _two_of_each(files: list[Path]):
    """Two image columns (the first one blank) and two label columns: only the options pick the right ones."""
    import datasets
    from PIL import Image

    blank = files[0].parent / "blank.png"
    if not blank.exists():
        Image.new("RGB", (40, 40), (128, 128, 128)).save(blank)
    return make_dataset(
        {"thumb": cells([blank] * len(files)), "photo": cells(files), "coarse": [0] * len(files), "fine": LABELS},
        {"thumb": datasets.Image(), "photo": datasets.Image(), "coarse": datasets.ClassLabel(names=["all"]),
         "fine": datasets.ClassLabel(names=CLASSES)})


def _save(dataset, folder: Path) -> Path:
    dataset.save_to_disk(str(folder))
    return folder


def test_custom_column_names_are_found_from_features(photo_files, folder_reference, tiny_model, tmp_path):
    data = _save(_custom_columns(photo_files), tmp_path / "data")
    classify_dataset(data, tmp_path / "out", tiny_model)
    rows = rows_in_order(tmp_path / "out")
    assert_dataset_rows(rows, "train", LABELS)
    assert_same_predictions(rows, folder_reference)


def test_column_options_override_detection(photo_files, folder_reference, tiny_model, tmp_path):
    data = _save(_two_of_each(photo_files), tmp_path / "data")
    classify_dataset(data, tmp_path / "out", tiny_model, image_column="photo", label_column="fine")
    rows = rows_in_order(tmp_path / "out")
    assert_dataset_rows(rows, "train", LABELS)
    assert_same_predictions(rows, folder_reference)
    classify_dataset(data, tmp_path / "default", tiny_model)  # detection alone takes the first of each
    default = read_rows(tmp_path / "default")
    assert len({tuple(r["topk_ids"]) for r in default}) == 1  # every row saw the same blank thumbnail
    assert [r["label"] for r in default] == [0] * len(LABELS)


@pytest.mark.parametrize("option", ["image_column", "label_column"])
def test_missing_named_column_lists_columns(saved_dataset, tiny_model, tmp_path, option):
    input_error(lambda: classify_dataset(saved_dataset, tmp_path / "out", tiny_model, split="test",
                                         **{option: "nope"}), "'nope'", "image", "label")
    flag = "--" + option.replace("_", "-")
    assert_one_line_error(cli_classify_dataset(saved_dataset, tmp_path / "cli", tiny_model, "--split", "test",
                                               flag, "nope"), "'nope'", "image, label")


def test_no_image_column(tiny_model, tmp_path):
    import datasets

    data = _save(make_dataset({"text": ["a", "b"], "label": [0, 1]},
                              {"text": datasets.Value("string"), "label": datasets.Value("int64")}), tmp_path / "data")
    input_error(lambda: classify_dataset(data, tmp_path / "out", tiny_model), "no image column", "--image-column",
                "text, label")
    assert_one_line_error(cli_classify_dataset(data, tmp_path / "cli", tiny_model), "no image column")


def _columns_of_every_kind(files: list[Path]):
    """The photos with a caption (text), a string label, an int count and an int label."""
    import datasets

    return make_dataset(
        {"photo": cells(files), "caption": [f"a photo of {f.stem}" for f in files],
         "kind": [CLASSES[label] for label in LABELS], "count": list(range(len(files))), "label": LABELS},
        {"photo": datasets.Image(), "caption": datasets.Value("string"), "kind": datasets.Value("string"),
         "count": datasets.Value("int64"), "label": datasets.Value("int64")})


@pytest.mark.parametrize("options, column, words", [
    ({"label_column": "kind"}, "kind", ("string", "ClassLabel or integers", "--label-column")),
    ({"image_column": "count"}, "count", ("int64", "holds no images", "--image-column")),
    ({"image_column": "caption"}, "caption", ("holds text", "a photo of", "--image-column")),
], ids=["string-label", "int-image", "caption-image"])
def test_a_wrong_column_is_one_line_before_any_work(photo_files, tiny_model, tmp_path, options, column, words):
    data = _save(_columns_of_every_kind(photo_files), tmp_path / "data")
    input_error(lambda: classify_dataset(data, tmp_path / "out", tiny_model, **options), repr(column), *words)
    assert not (tmp_path / "out").exists()  # refused before OUT was touched
    flags = [part for name, value in options.items() for part in ("--" + name.replace("_", "-"), value)]
    assert_one_line_error(cli_classify_dataset(data, tmp_path / "cli", tiny_model, *flags), repr(column))


def test_a_string_column_of_paths_is_an_image_column(photo_files, folder_reference, tiny_model, tmp_path):
    import datasets

    data = _save(make_dataset({"file": [str(f) for f in photo_files], "label": LABELS},
                              {"file": datasets.Value("string"), "label": datasets.Value("int64")}), tmp_path / "data")
    classify_dataset(data, tmp_path / "out", tiny_model, image_column="file")
    assert_same_predictions(rows_in_order(tmp_path / "out"), folder_reference)


def test_a_bad_cell_of_an_unused_image_column_is_never_read(photo_files, folder_reference, tiny_model, tmp_path):
    """Two Image columns: only the chosen one is read and decoded, so a corrupt cell of the other costs nothing."""
    import datasets

    broken = [{"bytes": b"not an image at all", "path": "broken.png"}] * len(photo_files)
    data = _save(make_dataset({"photo": cells(photo_files), "thumbnail": broken, "label": LABELS},
                              {"photo": datasets.Image(), "thumbnail": datasets.Image(),
                               "label": datasets.ClassLabel(names=CLASSES)}), tmp_path / "data")
    classify_dataset(data, tmp_path / "out", tiny_model, image_column="photo")
    rows = rows_in_order(tmp_path / "out")
    assert all(row["status"] == "ok" for row in rows)
    assert_same_predictions(rows, folder_reference)


# ---- bad cells, streaming, workers ----------------------------------------------------------------------------


def test_corrupt_image_cell_is_an_error_row(photo_files, tiny_model, tmp_path):
    """A corrupt cell is an error row in its place; the other rows are exactly what a folder run gives."""
    folder = tmp_path / "photos"
    folder.mkdir()
    files = [Path(shutil.copy(f, folder / f.name)) for f in photo_files]
    files[2].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    data = _save(image_dataset(files, LABELS), tmp_path / "data")
    classify_dataset(data, tmp_path / "out", tiny_model)
    rows = rows_in_order(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert rows[2]["error"] and rows[2]["topk_ids"] is None and rows[2]["label"] == LABELS[2]
    assert_same_predictions(rows, folder_rows(folder, tmp_path / "folder", tiny_model))


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_streaming_gives_the_same_rows(kind, parquet_file, saved_dataset, tiny_model, tmp_path):
    name, split = (parquet_file, None) if kind == "parquet" else (saved_dataset, "train")
    classify_dataset(name, tmp_path / "plain", tiny_model, split=split)
    classify_dataset(name, tmp_path / "stream", tiny_model, split=split, streaming=True)
    assert rows_in_order(tmp_path / "stream") == rows_in_order(tmp_path / "plain")


def test_streaming_through_the_cli(parquet_file, folder_reference, tiny_model, tmp_path):
    result = cli_classify_dataset(parquet_file, tmp_path / "out", tiny_model, "--streaming", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    rows = rows_in_order(tmp_path / "out")
    assert_dataset_rows(rows, "train", LABELS)
    assert_same_predictions(rows, folder_reference)


def test_workers_decode_the_same(saved_dataset, tiny_model, tmp_path):
    classify_dataset(saved_dataset, tmp_path / "inline", tiny_model, split="train", workers=0)
    classify_dataset(saved_dataset, tmp_path / "workers", tiny_model, split="train", workers=2)
    assert rows_in_order(tmp_path / "workers") == rows_in_order(tmp_path / "inline")


# ---- datasets that cannot be found --------------------------------------------------------------------------


def test_nonexistent_local_path(tiny_model, tmp_path):
    missing = tmp_path / "no" / "such" / "dataset"
    input_error(lambda: classify_dataset(missing, tmp_path / "out", tiny_model), "not found", str(missing))
    assert_one_line_error(cli_classify_dataset(missing, tmp_path / "cli", tiny_model), "not found")


def test_hub_dataset_offline(tiny_model, tmp_path):
    with deadline(FAST_S):
        input_error(lambda: classify_dataset("someone/not-cached-dataset", tmp_path / "out", tiny_model),
                    "someone/not-cached-dataset")
        result = cli_classify_dataset("someone/not-cached-dataset", tmp_path / "cli", tiny_model)
    assert_one_line_error(result, "someone/not-cached-dataset")
    assert result.exit_code == InputError.exit_code
