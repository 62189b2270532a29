"""Results read back a batch later, as on a GPU: the device-side counts, the deferred host copies, the runner."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
from conftest import classify, placed_with, read_rows, real_photos, segment

from mv2batch.model.device import to_host_later
from mv2batch.runner.job import describe_job
from mv2batch.tasks.postprocess import class_counts, confusion_cells, confusion_counts, present_counts, upsample_argmax
from mv2batch.tasks.segment import SegmentTask

CLASSES = 21


def _mask_and_target(seed: int) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, CLASSES, (37, 53), generator=generator).to(torch.int16)
    target = torch.randint(0, CLASSES + 3, (37, 53), generator=generator).numpy().astype(np.uint8)
    target[target >= CLASSES] = 255  # ignored pixels
    return mask, target


def test_counts_on_the_device_equal_bincount():
    mask, target = _mask_and_target(0)
    assert torch.equal(class_counts(mask, CLASSES), torch.bincount(mask.reshape(-1).long(), minlength=CLASSES))
    gt = torch.from_numpy(target).long().reshape(-1)
    valid = gt < CLASSES
    expected = torch.bincount(gt[valid] * CLASSES + mask.reshape(-1).long()[valid], minlength=CLASSES**2)
    assert torch.equal(confusion_counts(mask, target, CLASSES), expected)
    assert present_counts(torch.tensor([0, 3, 0, 5])) == ([1, 3], [3, 5])


def test_host_copies_on_the_cpu_are_the_tensors_themselves():
    tensors = [torch.arange(3), torch.ones(2)]
    assert all(a is b for a, b in zip(to_host_later(tensors)(), tensors))


def test_segment_start_gives_what_the_per_image_functions_give():
    """Masks, class counts and confusion cells from the queued form equal the direct per-image computation."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, CLASSES, 8, 12, generator=generator)
    model = lambda pixel_values: SimpleNamespace(logits=logits)  # noqa: E731
    targets = [_mask_and_target(seed)[1] for seed in (2, 3)]
    samples = [SimpleNamespace(height=37, width=53, target=target) for target in (targets[0], None, targets[1])]
    outputs = SegmentTask([str(c) for c in range(CLASSES)]).start(model, None, samples)()
    for one, sample, output in zip(logits, samples, outputs):
        mask = upsample_argmax(one, 37, 53)
        assert np.array_equal(output["mask"], mask.numpy())
        classes, pixels = np.unique(mask.numpy(), return_counts=True)
        assert output["classes"] == classes.tolist() and output["class_pixels"] == pixels.tolist()
        expected = confusion_cells(mask, sample.target, CLASSES) if sample.target is not None else None
        assert output["confusion"] == expected
    assert outputs[0]["confusion"] and outputs[1]["confusion"] is None


QUEUED = placed_with(lambda placement: replace(placement, queued=True))
DIRECT = placed_with(lambda placement: replace(placement, queued=False))


class LoggedStarts:
    """The job's task, logging each batch's start and the moment its results are read; the rest is the task's."""

    def __init__(self, task, log: list):
        self.real, self.log = task, log

    def __getattr__(self, name):
        return getattr(self.real, name)

    def start(self, model, pixels, samples):
        number = sum(1 for event in self.log if event[0] == "start")
        self.log.append(("start", number))
        outputs = self.real.start(model, pixels, samples)
        return lambda: self.log.append(("read", number)) or outputs()


def queued_like_a_gpu(log: list):
    """LocalParts with which the runner reads each batch's results only after starting the next one, as it does on
    CUDA; the log shows the order in which batches were started and read."""

    def logged_job(config):
        job = describe_job(config)
        return replace(job, task=LoggedStarts(job.task, log))

    return replace(QUEUED, describe=logged_job)


def test_queued_batches_are_read_one_behind_with_the_same_rows(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, photo in enumerate(real_photos(5)):
        photo.save(folder / f"{i}.png")
    log = []
    classify(folder, tmp_path / "queued", tiny_model, batch_size=2, parts=queued_like_a_gpu(log))
    assert log == [("start", 0), ("start", 1), ("read", 0), ("start", 2), ("read", 1), ("read", 2)]
    classify(folder, tmp_path / "direct", tiny_model, batch_size=2, parts=DIRECT)
    assert read_rows(tmp_path / "queued") == read_rows(tmp_path / "direct")


def test_queued_segmentation_gives_the_same_rows(tmp_path, tiny_segmenter):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, photo in enumerate(real_photos(5)):
        photo.save(folder / f"{i}.png")
    segment(folder, tmp_path / "direct", tiny_segmenter, batch_size=2)
    segment(folder, tmp_path / "queued", tiny_segmenter, batch_size=2, parts=QUEUED)
    assert read_rows(tmp_path / "queued") == read_rows(tmp_path / "direct")
