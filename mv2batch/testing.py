"""Random MobileViTV2 checkpoints whose outputs are decisive and input-dependent, for tests, demos and benchmarks.

transformers' default initialisation makes the activations vanish: every image then gets the same flat
scores and any comparison passes vacuously. These checkpoints use He-initialised convolutions, BatchNorm
statistics calibrated on real photos, and a classifier scaled until top-1 probabilities look trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import MobileViTImageProcessorPil

TINY = {"width_multiplier": 0.25, "n_attn_blocks": [1, 1, 1], "base_attn_unit_dims": [32, 48, 64], "image_size": 64}
SIZES = {
    ("classify", "tiny"): (TINY, 72, 64),
    ("classify", "full"): ({"width_multiplier": 1.0, "image_size": 256}, 288, 256),
    ("segment", "tiny"): ({**TINY, "aspp_out_channels": 32}, 72, 64),
    ("segment", "full"): ({"width_multiplier": 1.0, "image_size": 512}, 544, 512),
}
HEADS = {"classify": "MobileViTV2ForImageClassification", "segment": "MobileViTV2ForSemanticSegmentation"}


def _processor(shortest_edge: int, crop: int, resample: int) -> MobileViTImageProcessorPil:
    from transformers import MobileViTImageProcessorPil

    return MobileViTImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop},
                                      resample=resample, do_flip_channel_order=True)


def he_init(model: torch.nn.Module) -> None:
    """Kaiming-normal convolutions and linear layers, zero biases: activations that neither vanish nor explode."""
    import torch

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def _calibrate_batchnorm(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    """Running statistics = the statistics of the calibration batch, layer by layer."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the batch's statistics exactly
    model.train()
    with torch.no_grad():
        model(pixel_values=pixels)
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1


def _last_layer(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "classifier"):
        return model.classifier
    return model.segmentation_head.classifier.convolution


def _scale_classifier(model: torch.nn.Module, pixels: torch.Tensor, target_median_top1: float) -> None:
    """Scale the last layer until the median top-1 probability on the calibration photos reaches the target."""
    import torch

    layer = _last_layer(model)
    captured = []
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        model(pixel_values=pixels)  # the backbone runs once; only the last layer runs in the search
        hook.remove()
        features = captured[0]
        base_w, base_b = layer.weight.clone(), layer.bias.clone()
        low, high = 0.01, 1000.0
        for _ in range(40):
            scale = (low * high) ** 0.5
            layer.weight.copy_(base_w * scale)
            layer.bias.copy_(base_b * scale)
            top1 = layer(features).softmax(1).max(1).values.median().item()
            low, high = (scale, high) if top1 < target_median_top1 else (low, scale)


def make_checkpoint(folder: str | Path, photos: Sequence[Image.Image], size: str = "tiny", num_labels: int = 10,
                    seed: int = 0, resample: int = 2, target_median_top1: float = 0.7,
                    task: str = "classify", width: float | None = None) -> Path:
    """Save a random, calibrated MobileViTV2 classifier or DeepLabV3 segmenter (+ preprocessor) to folder.

    width: another width multiplier than the size's (0.5 ... 2.0, as Apple's checkpoints), same input sizes.
    """
    import torch
    import transformers

    overrides, shortest_edge, crop = SIZES[(task, size)]
    if width is not None:
        overrides = {**overrides, "width_multiplier": width}
    torch.manual_seed(seed)
    config = transformers.MobileViTV2Config(
        num_labels=num_labels, id2label={i: f"class_{i:04d}" for i in range(num_labels)},
        label2id={f"class_{i:04d}": i for i in range(num_labels)}, **overrides)
    model = getattr(transformers, HEADS[task])(config)
    he_init(model)
    processor = _processor(shortest_edge, crop, resample)
    pixels = processor(images=list(photos), return_tensors="pt")["pixel_values"]
    _calibrate_batchnorm(model, pixels)
    _scale_classifier(model, pixels, target_median_top1)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar shard: each sample's members `<key>.<ext>` one after another, in the order given."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return Path(path)
