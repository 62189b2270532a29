"""Segmentation: per-pixel classes at each photo's own size, mask and overlay files, mIoU against ground truth."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import pyarrow as pa

from mv2batch.loading.decode import decode_image, probe_size
from mv2batch.loading.loader import grouped_batches
from mv2batch.loading.preprocess import Preprocessing, ResizeCrop, hf_preprocessing
from mv2batch.model.device import to_host_later
from mv2batch.out.safe_names import MaskNames
from mv2batch.storage import RemoteFile
from mv2batch.tasks.metrics import SegmentCounts, segmentation_metrics
from mv2batch.tasks.postprocess import class_counts, confusion_counts, present_counts, upsample_argmax

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import MobileViTImageProcessorPil

    from mv2batch.inputs.sources import Record
    from mv2batch.loading.loader import Sample

REMOTE_PROBES = 16  # image headers on an object store read at once, for segmentation's shape grouping


@dataclass
class MaskFiles:
    """Where optional mask and overlay files go, and how to re-read a photo for its overlay."""

    masks_dir: Path | str | None = None  # a folder, or an object-store prefix
    overlays_dir: Path | str | None = None
    read: Callable | None = None  # (index, path) -> the encoded photo, for overlays
    num_classes: int = 0
    max_pixels: int = 0
    storage_options: dict | None = None  # for folders on an object store
    written: list = field(default_factory=list)
    names: MaskNames = field(default_factory=MaskNames)  # the file names given: two ids never write one file


class SegmentTask:
    """Per-pixel classes at the original size: upsample + argmax on the device, PNG encoding in the writer."""

    name: ClassVar[str] = "segment"
    default_protocol: ClassVar[str] = "paper"
    fields = [
        pa.field("mask_png", pa.binary()),
        pa.field("classes", pa.list_(pa.int32())),
        pa.field("class_pixels", pa.list_(pa.int64())),
    ]
    reorder_rows: ClassVar[bool] = True  # batches group images by shape, so rows arrive out of order

    def __init__(self, labels: list[str], files: MaskFiles | None = None, ground_truth: bool = False):
        self.labels = labels
        self.files = files or MaskFiles()
        self.ground_truth = ground_truth  # eval voc / ade20k: each row's own mIoU (the report's worst images)
        if ground_truth:
            self.fields = [*SegmentTask.fields, pa.field("miou", pa.float32())]

    def preprocessing(self, protocol: str, processor: Callable[[], MobileViTImageProcessorPil], model: str
                      ) -> Preprocessing:
        chosen = hf_preprocessing(processor())
        if protocol == "hf":
            return chosen
        # Apple's protocol: the short side becomes the model's input size; no crop, no padding.
        input_size = chosen.resize_crop.crop_height or chosen.resize_crop.shortest_edge
        resize = ResizeCrop(shortest_edge=input_size, crop_height=None, crop_width=None,
                            resample=chosen.resize_crop.resample)
        return Preprocessing(protocol="paper", resize_crop=resize, norm=chosen.norm)

    def batches(self, indices: Sequence[int], read: Callable[[int], Record], resize_crop: ResizeCrop,
                size: int) -> list[list[int]]:
        def shape_of(index: int) -> tuple | None:
            probed = probe_size(read(index).raw)
            return _resized_shape(resize_crop, probed) if probed else None

        if indices and isinstance(read(indices[0]).raw, RemoteFile):
            # Each header is a request to the store: asked one at a time, a shard of 1,000 objects would wait
            # 1,000 round trips before its first batch.
            with ThreadPoolExecutor(REMOTE_PROBES) as pool:
                shapes = dict(zip(indices, pool.map(shape_of, indices)))
            return grouped_batches(indices, shapes.__getitem__, size)
        return grouped_batches(indices, shape_of, size)

    def reading(self, photo: Callable) -> None:
        """How the writer thread re-reads a photo for its overlay: (index, path) -> encoded image."""
        self.files.read = photo

    def start(self, model: torch.nn.Module, pixels: torch.Tensor, samples: list[Sample]) -> Callable[[], list[dict]]:
        """Queue the model, the masks and their counts on the device; the result waits for them and gives one
        dict per image. Nothing here reads from the device, so a GPU can be given the next batch first."""
        logits = model(pixel_values=pixels).logits
        classes = logits.shape[1]
        masks, counts, confusions = [], [], []
        for one, sample in zip(logits, samples):
            masks.append(upsample_argmax(one, sample.height, sample.width))
            counts.append(class_counts(masks[-1], classes))
            if sample.target is not None:
                confusions.append(confusion_counts(masks[-1], sample.target, classes))
        ready = to_host_later(masks + counts + confusions)

        def outputs() -> list[dict]:
            host = ready()
            n = len(samples)
            host_confusions = iter(host[2 * n :])  # one per image with a target, in order
            results = []
            for mask, mask_counts, sample in zip(host[:n], host[n : 2 * n], samples):
                present, present_pixels = present_counts(mask_counts)
                confusion = dict(zip(*present_counts(next(host_confusions)))) if sample.target is not None else None
                # The host copy of a GPU mask is pinned memory, too scarce to wait in the writer's queue.
                array = mask.numpy().copy() if mask.is_pinned() else mask.numpy()
                results.append({"mask": array, "classes": present, "class_pixels": present_pixels,
                                "confusion": confusion,
                                "miou": image_miou(confusion, classes) if confusion is not None else None})
            return results

        return outputs

    def row(self, sample: Sample, output: dict | None) -> dict:
        if output is None:
            row = {"mask_png": None, "classes": None, "class_pixels": None, "miou": None}
        else:
            row = {"mask_png": output["mask"], "classes": output["classes"], "class_pixels": output["class_pixels"],
                   "miou": output["miou"]}
        if not self.ground_truth:
            row.pop("miou")
        return row

    def new_counts(self) -> SegmentCounts:
        return SegmentCounts()

    def count(self, counts: SegmentCounts, sample: Sample, output: dict) -> None:
        counts.add(output["classes"], output["class_pixels"], output["confusion"])

    counts_from_json = staticmethod(SegmentCounts.from_json)

    def summarize(self, counts: SegmentCounts) -> tuple[dict, list[dict]]:
        """mIoU and per-class IoU with ground truth; without, how many images and pixels each class got."""
        if counts.confusion:
            metrics, per_class = segmentation_metrics(counts.confusion_matrix(len(self.labels)))
            for row in per_class:
                row["class_name"] = self.labels[row["class_id"]]
            return metrics, per_class
        per_class = [
            {"class_id": c, "class_name": self.labels[c] if c < len(self.labels) else str(c),
             "images": counts.images[c], "pred_pixels": counts.pixels.get(c, 0)}
            for c in sorted(counts.images, key=lambda c: (-counts.images[c], c))
        ]
        return {}, per_class

    def prepare_columns(self, columns: dict[str, list]) -> None:
        """In the writer thread: masks to PNG bytes, and the optional mask / overlay files."""
        from mv2batch.tasks.masks import encode_png

        for position, mask in enumerate(columns["mask_png"]):
            if mask is None:
                continue
            self._save_files(columns["id"][position], columns["_index"][position], columns["path"][position], mask)
            columns["mask_png"][position] = encode_png(mask)

    def _save_files(self, item_id: str, index: int, photo_path: str | None, mask: np.ndarray) -> None:
        from mv2batch import storage
        from mv2batch.out.rundir import output_errors
        from mv2batch.tasks.masks import overlay_jpeg, palette_png

        if self.files.masks_dir is not None:
            path = storage.join(self.files.masks_dir, self.files.names.name(item_id, ".png"))
            with output_errors(f"the mask {path}"):
                storage.write_bytes(path, palette_png(mask, self.files.num_classes), self.files.storage_options)
        if self.files.overlays_dir is not None and self.files.read is not None:
            photo = decode_image(self.files.read(index, photo_path), self.files.max_pixels).image
            path = storage.join(self.files.overlays_dir, self.files.names.name(item_id, ".jpg"))
            with output_errors(f"the overlay {path}"):
                storage.write_bytes(path, overlay_jpeg(photo, mask), self.files.storage_options)


def image_miou(confusion: dict[int, int], num_classes: int) -> float | None:
    """One image's mIoU from its confusion cells (gt * num_classes + pred -> pixels, void left out), over the
    classes in its ground truth or its mask: the run's mIoU rule on one image."""
    hits, gt, pred = {}, {}, {}
    for cell, pixels in confusion.items():
        truth, predicted = divmod(int(cell), num_classes)
        gt[truth] = gt.get(truth, 0) + pixels
        pred[predicted] = pred.get(predicted, 0) + pixels
        if truth == predicted:
            hits[truth] = pixels
    present = set(gt) | set(pred)
    if not present:
        return None
    return sum(hits.get(c, 0) / (gt.get(c, 0) + pred.get(c, 0) - hits.get(c, 0)) for c in present) / len(present)


def _resized_shape(resize_crop: ResizeCrop, size: tuple[int, int]) -> tuple[int, int]:
    if resize_crop.crop_height is not None:
        return resize_crop.crop_width, resize_crop.crop_height
    return resize_crop.output_size(*size)
