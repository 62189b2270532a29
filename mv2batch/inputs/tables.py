"""Opening a `datasets` input (hub id, save_to_disk folder, data files) and finding its image and label columns."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from mv2batch import storage
from mv2batch.errors import InputError
from mv2batch.inputs.sources import DatasetColumns, DatasetSource, IdCheck, Record, id_value
from mv2batch.inputs.urls import UrlLimits

if TYPE_CHECKING:
    import datasets

    Loaded = datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict
    Split = datasets.Dataset | datasets.IterableDataset  # one split, read whole or streamed

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass(frozen=True)
class DatasetSpec:
    """How the user named the dataset and its columns."""

    name: str
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool = False
    revision: str | None = None
    id_column: str | None = None
    storage_options: dict | None = None  # for data files on an object store
    urls: UrlLimits = field(default_factory=UrlLimits)  # an image URL's deadline and size cap


def is_saved_to_disk(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _load(spec: DatasetSpec) -> Loaded:
    import datasets

    if storage.is_url(spec.name):
        return _load_remote(spec)
    path = Path(spec.name).expanduser()
    if is_saved_to_disk(path):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None and path.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
            raise InputError(f"{path.name} is a tar: read WebDataset shards with `mv2batch classify webdataset`")
        if builder is None:
            raise InputError(f"unsupported data file {path.name}: give a parquet / arrow / csv / json file or a "
                             "folder")
        return datasets.load_dataset(builder, data_files=str(path), streaming=spec.streaming)
    if path.is_dir() and _holds_tars(path):  # datasets' webdataset builder would copy every image into its cache
        raise InputError(f"{path} holds tar files: read WebDataset shards with `mv2batch classify webdataset`")
    if path.is_dir():
        return datasets.load_dataset(str(path), streaming=spec.streaming)
    if spec.name.startswith((".", "/", "~")) or spec.name.count("/") > 1:
        raise InputError(f"dataset not found: {spec.name} is neither a local path nor a hub id")
    return datasets.load_dataset(spec.name, split=spec.split, revision=spec.revision, streaming=spec.streaming)


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _remote_data_files(url: str, options: dict | None) -> list[str]:
    """The data file a URL names, or the data files under a prefix (sorted, of one kind)."""
    fs = storage.filesystem(url, options)
    with storage.start_up_errors("input", url):
        if not fs.isdir(url):
            if not fs.isfile(url):
                raise InputError(f"dataset not found: {url}")
            return [url]
        keys = sorted(fs.find(url))
    if any(key.lower().endswith(TAR_SUFFIXES) for key in keys):
        raise InputError(f"{url} holds tar files: read WebDataset shards with `mv2batch classify webdataset`")
    files = [fs.unstrip_protocol(k) for k in keys if Path(k).suffix.lower() in DATA_FILE_BUILDERS
             and not any(part.startswith(".") for part in k.split("/"))]
    if not files:
        raise InputError(f"no data files (parquet, arrow, csv, json) under {url}")
    return files


def _load_remote(spec: DatasetSpec) -> Loaded:
    """Data files on an object store, read by datasets through fsspec with the run's storage options."""
    import datasets

    files = _remote_data_files(spec.name, spec.storage_options)
    name = storage.name_of(files[0])
    builders = {DATA_FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if name.lower().endswith(TAR_SUFFIXES):
        raise InputError(f"{name} is a tar: read WebDataset shards with `mv2batch classify webdataset`")
    if len(builders) != 1 or None in builders:
        raise InputError(f"unsupported data file(s) under {spec.name}: give parquet / arrow / csv / json files of "
                         "one kind")
    # A copy: datasets adds its own entries (an "hf" key) to the dict it is given.
    return datasets.load_dataset(builders.pop(), data_files=files, streaming=spec.streaming,
                                 storage_options=copy.deepcopy(spec.storage_options or {}))


def _holds_tars(folder: Path) -> bool:
    return any(p.name.lower().endswith((".tar", ".tar.gz", ".tgz")) for p in folder.iterdir() if p.is_file())


def _pick_split(loaded: Loaded, split: str | None) -> tuple[Split, str]:
    if not hasattr(loaded, "keys"):  # already a single split
        return loaded, split or str(getattr(loaded, "split", None) or "train")
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]], names[0]
    if split is None:
        raise InputError(f"the dataset has several splits ({', '.join(names)}): choose one with --split")
    if split not in names:
        raise InputError(f"no split {split!r} in the dataset (available: {', '.join(names)})")
    return loaded[split], split


def load_split(spec: DatasetSpec) -> tuple[Split, str]:
    """Load the dataset and select the split; loading failures become one-line InputErrors."""
    try:
        loaded = _load(spec)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"dataset not found: {spec.name} ({_first_line(exc)})") from None
    except (ConnectionError, OSError) as exc:
        raise InputError(
            f"cannot load dataset {spec.name}: {_first_line(exc)}. If the hub is unreachable, load it once "
            "with network access (or set HF_DATASETS_OFFLINE=1 to use the cache), or pass a local path"
        ) from None
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ValueError…) for bad names
        raise InputError(f"cannot load dataset {spec.name}: {type(exc).__name__}: {_first_line(exc)}") from None
    data, split = _pick_split(loaded, spec.split)
    if spec.streaming and hasattr(data, "to_iterable_dataset"):
        data = data.to_iterable_dataset()
    return data, split


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_columns(features: datasets.Features, image_column: str | None,
                 label_column: str | None) -> tuple[str, str | None]:
    """The image column (a datasets.Image feature, else a {bytes, path} struct, else binary) and the label column
    (a ClassLabel, or an int `label`)."""
    columns = list(features.keys())
    if image_column is not None and image_column not in columns:
        raise InputError(f"no column {image_column!r} (columns: {', '.join(columns)})")
    if label_column is not None and label_column not in columns:
        raise InputError(f"no column {label_column!r} (columns: {', '.join(columns)})")
    if image_column is None:
        image_column = _guess_image_column(features, columns)
    if label_column is None:
        label_column = _guess_label_column(features, columns)
    return image_column, label_column


AUTO_IMAGE_KINDS = ("image", "struct", "bytes")  # found without --image-column, in this order of preference


def _guess_image_column(features: datasets.Features, columns: list[str]) -> str:
    """The first datasets.Image column, else the first {bytes, path} struct, else the first binary column."""
    kinds = {column: _image_column_kind(features[column]) for column in columns}
    for wanted in AUTO_IMAGE_KINDS:
        found = [column for column in columns if kinds[column] == wanted]
        if found:
            return found[0]
    raise InputError(f"no image column found (columns: {', '.join(columns)}): name it with --image-column")


IMAGE_COLUMN_KINDS = "a datasets.Image feature, binary image bytes, a {bytes, path} struct, or strings of paths / URLs"
PEEKED_ROWS = 8


def _type_name(feature: object) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _image_column_kind(feature: object) -> str | None:
    """image | bytes | struct | strings, or None for a column that cannot hold images."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, dict) and {"bytes", "path"} >= set(feature) and "bytes" in feature:
        return "struct"
    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, datasets.Value) and dtype in ("binary", "large_binary"):
        return "bytes"
    if isinstance(feature, datasets.Value) and dtype in ("string", "large_string"):
        return "strings"
    return None


def _looks_like_a_path(value: object) -> bool:
    from mv2batch.inputs.listing import image_extensions

    if not isinstance(value, str) or not value.strip() or "\n" in value:
        return False
    return "://" in value or Path(value).suffix.lower() in image_extensions() or Path(value).is_file()


def _first_values(data: Split, column: str) -> list[Any]:  # the column's cells
    rows = data.take(PEEKED_ROWS) if hasattr(data, "take") else data.select(range(min(PEEKED_ROWS, len(data))))
    return [row[column] for row in rows]


def check_columns(data: Split, image_column: str, label_column: str | None) -> None:
    """Before any work: the image column holds images (or their paths), the label column class ids; otherwise
    one line naming the column, its type and what would do."""
    import datasets

    features = data.features
    kind = _image_column_kind(features[image_column])
    if kind is None:
        raise InputError(f"column {image_column!r} ({_type_name(features[image_column])}) holds no images: the image "
                         f"column must be {IMAGE_COLUMN_KINDS} (choose it with --image-column)")
    if kind == "strings":
        values = [v for v in _first_values(data, image_column) if v is not None]
        if values and not any(_looks_like_a_path(v) for v in values):
            raise InputError(f"column {image_column!r} holds text, not image paths or URLs (e.g. {values[0][:40]!r}):"
                             f" the image column must be {IMAGE_COLUMN_KINDS} (choose it with --image-column)")
    if label_column is None:
        return
    label = features[label_column]
    integer = isinstance(label, datasets.Value) and str(label.dtype).startswith(("int", "uint"))
    if not (isinstance(label, datasets.ClassLabel) or integer):
        raise InputError(f"column {label_column!r} ({_type_name(label)}) holds no class ids: the label column must "
                         "be a datasets.ClassLabel or integers (choose it with --label-column)")


def _guess_label_column(features: datasets.Features, columns: list[str]) -> str | None:
    import datasets

    class_labels = [c for c in columns if isinstance(features[c], datasets.ClassLabel)]
    if class_labels:
        return class_labels[0]
    for name in ("label", "labels"):
        feature = features.get(name)
        if isinstance(feature, datasets.Value) and feature.dtype.startswith("int"):
            return name
    return None


def _label_names(features: datasets.Features, label_column: str | None) -> list[str] | None:
    import datasets

    feature = features.get(label_column) if label_column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def open_dataset(spec: DatasetSpec) -> "DatasetSource | StreamingSource":
    """Open the dataset as a Source whose image column stays undecoded until a worker reads it."""
    import datasets

    data, split = load_split(spec)
    if data.features is None:
        raise InputError(f"dataset {spec.name} declares no features: name the columns with --image-column")
    image_column, label_column = find_columns(data.features, spec.image_column, spec.label_column)
    check_columns(data, image_column, label_column)
    _check_id_column(data, spec.id_column)
    # Only the columns used are read: a bad cell of another image column must not fail the row, nor cost time.
    data = data.select_columns(list(dict.fromkeys(c for c in (image_column, label_column, spec.id_column) if c)))
    data = data.cast_column(image_column, datasets.Image(decode=False))
    names = _label_names(data.features, label_column)
    description = f"dataset {spec.name} [{split}]"
    kind = StreamingSource if isinstance(data, datasets.IterableDataset) else DatasetSource
    return kind(data, split, image_column, label_column, names, description, id_column=spec.id_column,
                base=_table_folder(spec.name, spec.storage_options), options=spec.storage_options, urls=spec.urls)


def _table_folder(name: str, options: dict | None = None) -> Path | str | None:
    """Where relative image paths in a table point from: the table file's folder, or the data folder."""
    if storage.is_url(name):
        return name.rstrip("/") if storage.is_dir(name, options) else str(storage.parent_of(name.rstrip("/")))
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve().parent
    return path.resolve() if path.is_dir() else None


def _check_id_column(data: Split, id_column: str | None) -> None:
    """--id-column names a column of ids (not of images); in a table read whole, its values are there and unique
    (a stream's are checked as they come: StreamingSource.records)."""
    if id_column is None:
        return
    columns = list(data.features)
    if id_column not in columns:
        raise InputError(f"no column {id_column!r} for --id-column (columns: {', '.join(columns)})")
    if _image_column_kind(data.features[id_column]) in AUTO_IMAGE_KINDS:  # a column of paths may name its rows
        raise InputError(f"--id-column {id_column!r} holds images, not ids: name a key or file name column")
    if hasattr(data, "__len__"):
        ids = IdCheck(id_column)
        for row, value in enumerate(data.select_columns([id_column]).to_pandas()[id_column].tolist()):
            ids.see(value, row)


@dataclass
class StreamingSource(DatasetColumns):
    """A streaming dataset: its length is unknown, so it is read in order and cut into shards as it comes."""

    streamed: ClassVar[bool] = True

    def records(self) -> Iterator[Record]:
        """Undecoded records in stream order; with --id-column, each row's id checked before its record is made
        (the checks of a table read whole: inputs.sources.IdCheck)."""
        if self.id_column is None:
            yield from map(self.record, self.dataset)
            return
        ids = IdCheck(self.id_column)
        for row, values in enumerate(self.dataset):
            ids.see(id_value(values[self.id_column]), row)
            yield self.record(values)

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(f"stream\0{self.description}".encode()).hexdigest()
