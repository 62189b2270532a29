"""Speed-ups: the optimised module gives transformers' outputs on real photos, and really changed the model."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import built_loop, classify, read_rows, real_photos, run_config

from mv2batch.config import Dtype
from mv2batch.model.speedups import (
    Speedups,
    choose_speedups,
    default_speedups,
    exact_speedups,
    fold_batchnorm,
    fold_patches,
    optimize_for_inference,
    speedups_mode,
    unfold_patches,
)


def _rewritten(*args, **kwargs) -> torch.nn.Module:
    """optimize_for_inference's rewritten module."""
    return optimize_for_inference(*args, **kwargs).module


TOLERANCE = 1e-4  # probabilities; a float32 rewrite of the model should move them far less
CPU_DEFAULT = default_speedups(torch.device("cpu"), torch.float32)  # streams: this machine's threads
# What a GPU gets, run here on the CPU: BatchNorm folding, reshape patches, in-place activations, NCHW.
NO_ONEDNN = Speedups(fuse_convolutions=False, channels_last=False)
HEAD = {"classify": "MobileViTV2ForImageClassification", "segment": "MobileViTV2ForSemanticSegmentation"}


def _load(folder: Path, task: str = "classify") -> torch.nn.Module:
    import transformers

    return getattr(transformers, HEAD[task]).from_pretrained(str(folder)).eval()


def _pixels(folder: Path, count: int) -> torch.Tensor:
    """Real photos as transformers' own processor prepares them for this checkpoint."""
    from transformers import MobileViTImageProcessorPil

    processor = MobileViTImageProcessorPil.from_pretrained(str(folder))
    return processor(images=real_photos(count), return_tensors="pt")["pixel_values"]


def _probs(model: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixel_values=pixels.to(dtype)).logits.to(torch.float64).softmax(-1)


def _assert_same_topk(reference: torch.Tensor, got: torch.Tensor, k: int, tolerance: float) -> None:
    """Top-k ids equal, except where the reference's own scores tie within the tolerance (order there is noise)."""
    ref_scores, ref_ids = reference.topk(k)
    got_ids = got.topk(k).indices
    chosen_in_reference = reference.gather(1, got_ids)
    differs = got_ids != ref_ids
    assert (chosen_in_reference[differs] >= ref_scores[differs] - tolerance).all(), (ref_ids, got_ids)
    assert differs.float().mean() < 0.05, "more than near-ties changed"


def _check_classifier(folder: Path, photos: int, speedups: Speedups, tolerance: float) -> None:
    pixels = _pixels(folder, photos)
    reference = _probs(_load(folder), pixels)
    got = _probs(_rewritten(_load(folder), torch.device("cpu"), torch.float32, speedups=speedups),
                 pixels)
    assert len(set(reference.argmax(-1).tolist())) >= 3, "the checkpoint must be input-dependent"
    _assert_same_topk(reference, got, k=5, tolerance=tolerance)
    np.testing.assert_allclose(got.numpy(), reference.numpy(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("speedups", [CPU_DEFAULT, NO_ONEDNN], ids=["cpu-default", "no-onednn"])
def test_tiny_classifier_matches_transformers(tiny_model, speedups):
    _check_classifier(tiny_model, 24, speedups, TOLERANCE)


def _float32_noise(folder: Path, pixels: torch.Tensor, task: str = "classify") -> float:
    """How far transformers' own float32 output is from the same model run in float64."""
    exact = _probs(_load(folder, task).double(), pixels, torch.float64)
    return (_probs(_load(folder, task), pixels) - exact).abs().max().item()


@pytest.mark.slow
def test_full_size_classifier_matches_transformers(full_model):
    """MobileViTV2-1.0 at 256x256: within 1e-4, or within twice the rounding noise transformers itself carries.

    The random calibrated checkpoint amplifies float32 rounding: transformers' own probabilities are up to
    ~1e-4 away from the float64 result, and merely switching it to channels-last moves them by as much.
    Any non-bit-identical kernel therefore needs the tolerance that the reference itself deserves.
    """
    pixels = _pixels(full_model, 16)
    tolerance = max(TOLERANCE, 2 * _float32_noise(full_model, pixels))
    _check_classifier(full_model, 16, CPU_DEFAULT, tolerance)


def _exact_logits(folder: Path, task: str, pixels: torch.Tensor, per_call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers on the whole batch, and the exact rewrites in micro-batches of per_call images."""
    speedups = replace(exact_speedups(torch.device("cpu")), micro_batch_pixels=per_call * pixels[0, 0].numel())
    with torch.inference_mode():
        reference = _load(folder, task)(pixel_values=pixels).logits
        model = _rewritten(_load(folder, task), torch.device("cpu"), torch.float32, speedups=speedups,
                           probe_size=tuple(pixels.shape[-2:]), probe_batch=len(pixels))
        return reference, model(pixel_values=pixels).logits


def test_micro_batches_that_round_differently_here_are_dropped(tiny_model):
    """The exact set probes its micro-batches on this machine: calls of two images (which oneDNN may sum apart
    from a batch of eight) are kept only where they give transformers' bits; the output has them either way."""
    cpu, pixels = torch.device("cpu"), _pixels(tiny_model, 8)
    two_per_call = replace(exact_speedups(cpu), micro_batch_pixels=2 * pixels[0, 0].numel())
    with torch.inference_mode():
        reference = _load(tiny_model)(pixel_values=pixels).logits
        unchecked = _rewritten(_load(tiny_model), cpu, torch.float32, speedups=replace(two_per_call, keep_bits=False))
        checked = optimize_for_inference(_load(tiny_model), cpu, torch.float32, speedups=two_per_call,
                                         probe_size=(64, 64), probe_batch=len(pixels))
        assert torch.equal(checked.module(pixel_values=pixels).logits, reference)
        if not torch.equal(unchecked(pixel_values=pixels).logits, reference):  # this CPU sums them apart
            assert checked.speedups.micro_batch_pixels is None


def test_exact_rewrites_are_bit_identical_to_transformers(tiny_model, tiny_segmenter):
    """The fp32 default's rewrites (reshape patches, in-place activations, micro-batches) change no bit."""
    for folder, task in ((tiny_model, "classify"), (tiny_segmenter, "segment")):
        pixels = _pixels(tiny_model, 8) if task == "classify" else _segment_pixels(64, 8)
        reference, got = _exact_logits(folder, task, pixels, per_call=4)
        assert torch.equal(got, reference), (got - reference).abs().max()
        assert reference.std(0).mean() > 0.1  # input-dependent outputs, or equality would be vacuous


@pytest.mark.slow
def test_full_size_exact_rewrites_are_bit_identical_to_transformers(full_model):
    """MobileViTV2-1.0 at 256x256: transformers at batch 32 (the pipeline's) against 4 images per call."""
    reference, got = _exact_logits(full_model, "classify", _pixels(full_model, 32), per_call=4)
    assert torch.equal(got, reference), (got - reference).abs().max()


def test_speedups_modes():
    """--speedups / --no-speedups / the default per dtype, and what each mode applies."""
    cpu = torch.device("cpu")
    assert speedups_mode(None, torch.float32) == "exact" and speedups_mode(None, torch.bfloat16) == "all"
    assert speedups_mode(True, torch.float32) == "all" and speedups_mode(False, torch.bfloat16) == "none"
    assert choose_speedups(False, cpu, torch.float32) is None
    assert choose_speedups(True, cpu, torch.float32) == default_speedups(cpu, torch.float32)
    exact = choose_speedups(None, cpu, torch.float32)
    assert exact == exact_speedups(cpu) and exact.reshape_patches and exact.micro_batch_pixels
    assert not (exact.fold_batchnorm or exact.fuse_convolutions or exact.channels_last)
    assert exact_speedups(torch.device("cuda")).micro_batch_pixels is None
    assert exact.channels_last_prefix  # oneDNN's reorders are a CPU matter; cuDNN's layouts round differently
    assert not exact_speedups(torch.device("cuda")).channels_last_prefix
    assert not exact_speedups(cpu, compile=True).channels_last_prefix


def test_batchnorm_folding_removes_every_batchnorm(tiny_model, tiny_segmenter):
    for folder, task in ((tiny_model, "classify"), (tiny_segmenter, "segment")):
        model = _load(folder, task)
        before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        _rewritten(model, torch.device("cpu"), torch.float32)
        assert before > 0
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert fold_batchnorm(model) == 0  # nothing left to fold; a second call is harmless


def test_optimised_model_keeps_its_interface(tiny_model):
    optimized = optimize_for_inference(_load(tiny_model), torch.device("cpu"), torch.float32)
    model = optimized.module
    assert type(model).__name__ == HEAD["classify"]
    assert optimized.speedups == CPU_DEFAULT
    with torch.inference_mode():
        outputs = model(pixel_values=torch.rand(3, 3, 64, 64), output_hidden_states=True)
    assert outputs.logits.shape == (3, 10) and len(outputs.hidden_states) == 5
    assert outputs.logits.is_contiguous()  # no channels-last layout leaks out of the model


def test_defaults_per_device():
    cpu = default_speedups(torch.device("cpu"), torch.float32)
    cuda = default_speedups(torch.device("cuda"), torch.float32)
    assert cpu.fold_batchnorm and cpu.reshape_patches and cpu.channels_last
    assert cuda.fold_batchnorm and cuda.reshape_patches
    assert not cuda.channels_last and not cuda.fuse_convolutions  # no oneDNN there; channels-last hurts
    assert cpu.micro_batch_pixels and cuda.micro_batch_pixels is None  # GPUs want whole batches
    assert cpu.streams == torch.get_num_threads() and cuda.streams == 1
    compiled = default_speedups(torch.device("cpu"), torch.float32, compile=True)
    assert compiled.fold_batchnorm and not compiled.fuse_convolutions and compiled.micro_batch_pixels is None


def test_micro_batches_give_the_whole_batch_outputs(tiny_model, tiny_segmenter):
    """One image per call (64x64 pixels each) or the whole batch at once: the same outputs, hidden states too."""
    for folder, task in ((tiny_model, "classify"), (tiny_segmenter, "segment")):
        whole = _rewritten(_load(folder, task), torch.device("cpu"), torch.float32,
                                       speedups=Speedups(micro_batch_pixels=None))
        single = _rewritten(_load(folder, task), torch.device("cpu"), torch.float32,
                                        speedups=Speedups(micro_batch_pixels=64 * 64))
        pixels = torch.rand(5, 3, 64, 64)
        with torch.inference_mode():
            expected = whole(pixel_values=pixels, output_hidden_states=True)
            got = single(pixel_values=pixels, output_hidden_states=True)
            positional = single(pixels)
        assert type(got) is type(expected) and got.keys() == expected.keys()
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(positional.logits, got.logits, atol=0, rtol=0)
        assert [h.shape for h in got.hidden_states] == [h.shape for h in expected.hidden_states]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_streams_give_one_streams_outputs(tiny_model, dtype):
    """Micro-batches on two single-threaded streams: the same bits as one after the other, in order."""
    threads = torch.get_num_threads()
    one = replace(CPU_DEFAULT, micro_batch_pixels=2 * 64 * 64, streams=1)
    sequential = _rewritten(_load(tiny_model), torch.device("cpu"), dtype, speedups=one)
    parallel = _rewritten(_load(tiny_model), torch.device("cpu"), dtype,
                                      speedups=replace(one, streams=2))
    assert torch.get_num_threads() == threads  # the streams' own setting does not leak into the caller
    pixels = _pixels(tiny_model, 7).to(dtype)
    with torch.inference_mode():
        expected = sequential(pixel_values=pixels).logits
        got = parallel(pixel_values=pixels).logits
    assert torch.equal(got, expected)
    assert not got.requires_grad and got.is_inference()  # the caller's inference mode reached the streams


def test_each_stream_keeps_its_share_of_the_threads():
    """ATen sizes a thread's OpenMP team at its first parallel op from the process-wide setting, which the
    pool puts back: a stream must still run with its share, or two streams oversubscribe the cores."""
    from mv2batch.model.streams import stream_pool

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        pool = stream_pool(2)
        assert torch.get_num_threads() == 4

        def threads_after_a_parallel_op() -> int:
            torch.ones(1 << 16).add_(1).sum()
            return torch.get_num_threads()

        assert [future.result() for future in [pool.submit(threads_after_a_parallel_op) for _ in range(4)]] == [2] * 4
        pool.shutdown()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (2, 8, 43, 22), (1, 5, 7, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reshape_patches_equal_unfold_and_fold(shape, channels_last):
    """Bit-identical to transformers' unfold / fold, including the rows and columns a patch does not fill."""
    features = torch.randn(shape)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    patches, size = unfold_patches(features, (2, 2))
    expected = F.unfold(features, kernel_size=2, stride=2).reshape(shape[0], shape[1], 4, -1)
    assert size == shape[2:] and torch.equal(patches, expected)
    folded = fold_patches(patches, size, (2, 2))
    assert torch.equal(folded, F.fold(expected.reshape(shape[0], shape[1] * 4, -1), size, kernel_size=2, stride=2))


def test_bf16_runs_and_keeps_float_outputs_finite(tiny_model):
    model = _rewritten(_load(tiny_model), torch.device("cpu"), torch.bfloat16)
    probs = _probs(model, _pixels(tiny_model, 4), torch.bfloat16)
    assert probs.shape == (4, 10) and torch.isfinite(probs).all()


# ---- segmentation -------------------------------------------------------------------------------------------


def _segment_pixels(short_side: int, count: int) -> torch.Tensor:
    """Photos of one size resized as mv2batch segments them (short side = input size, no crop): odd shapes."""
    from mv2batch.loading.preprocess import PixelNorm, ResizeCrop
    from mv2batch.model.device import PixelStage

    resize = ResizeCrop(shortest_edge=short_side, crop_height=None, crop_width=None, resample=2)
    batch = torch.from_numpy(np.stack([resize(p) for p in real_photos(count, size=(500, 375))]))
    return PixelStage(PixelNorm(rescale_factor=1 / 255, flip_bgr=True), torch.device("cpu"), torch.float32)(batch)


def _masks(logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks at size and, for each pixel, the upsampled logits they came from."""
    upsampled = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return upsampled.argmax(1), upsampled


def _check_segmenter(folder: Path, pixels: torch.Tensor, speedups: Speedups, tolerance: float) -> None:
    """Per-pixel class probabilities within the tolerance; masks equal except where the reference hesitated."""
    with torch.inference_mode():
        reference = _load(folder, "segment")(pixel_values=pixels).logits
        model = _rewritten(_load(folder, "segment"), torch.device("cpu"), torch.float32,
                                       speedups=speedups)
        got = model(pixel_values=pixels).logits
    torch.testing.assert_close(got.softmax(1), reference.softmax(1), atol=tolerance, rtol=0)
    size = (375, 500)
    ref_mask, ref_up = _masks(reference, size)
    got_mask, _ = _masks(got, size)
    assert len(ref_mask.unique()) >= 3, "the checkpoint must be input-dependent"
    differs = ref_mask != got_mask
    # A pixel can only flip where the reference's two classes are closer than the logits moved (twice, at most).
    margin = ref_up.gather(1, ref_mask[:, None]) - ref_up.gather(1, got_mask[:, None])
    assert (margin[:, 0][differs] <= 2 * (got - reference).abs().max()).all()
    assert differs.float().mean() < 1e-3


@pytest.mark.parametrize("speedups", [CPU_DEFAULT, NO_ONEDNN], ids=["cpu-default", "no-onednn"])
def test_tiny_segmenter_masks_match_transformers(tiny_segmenter, speedups):
    _check_segmenter(tiny_segmenter, _segment_pixels(64, 4), speedups, TOLERANCE)


@pytest.mark.slow
def test_full_size_segmenter_masks_match_transformers(full_segmenter):
    """DeepLabV3 1.0 at 512 short side (512x682: patches that do not tile the feature maps exactly)."""
    pixels = _segment_pixels(512, 2)
    with torch.inference_mode():
        exact = _load(full_segmenter, "segment").double()(pixel_values=pixels.double()).logits.softmax(1)
        noise = (_load(full_segmenter, "segment")(pixel_values=pixels).logits.softmax(1) - exact).abs().max().item()
    _check_segmenter(full_segmenter, pixels, CPU_DEFAULT, max(1e-4, 2 * noise))


@pytest.mark.parametrize("options, mode", [({}, "exact"), ({"speedups": True}, "all"),
                                           ({"speedups": False}, "none"), ({"dtype": "bf16"}, "all")])
def test_run_records_its_speedups_among_the_fingerprint_fields(tiny_model, tmp_path, options, mode):
    """Rewrites move low-order bits, so a run resumed with other ones is another run; run.json says which."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, photo in enumerate(real_photos(2)):
        photo.save(folder / f"{i}.png")
    if "dtype" in options:
        options = {**options, "dtype": Dtype(options["dtype"])}
    classify(folder, tmp_path / "out", tiny_model, **options)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["fingerprint_fields"]["speedups"] == mode


def test_streams_keep_order_and_never_wait_on_themselves(tiny_model):
    """Items come back in order; a call from inside a stream runs in place instead of queueing on its own pool."""
    from mv2batch.model.streams import start_in_streams

    pool = optimize_for_inference(_load(tiny_model), torch.device("cpu"), torch.float32,
                                  speedups=replace(CPU_DEFAULT, streams=2)).streams
    nested = lambda item: start_in_streams(pool, lambda x: x * 10, [item, item + 1, item + 2])()
    assert start_in_streams(pool, nested, list(range(6)))() == [[10 * i, 10 * i + 10, 10 * i + 20] for i in range(6)]
    plain = optimize_for_inference(_load(tiny_model), torch.device("cpu"), torch.float32,
                                   speedups=replace(CPU_DEFAULT, streams=1))
    assert plain.streams is None and start_in_streams(plain.streams, str, [1, 2])() == ["1", "2"]


@pytest.mark.parametrize("speedups, streams", [(None, 1), (True, 2)])
def test_runner_looks_ahead_only_when_streams_run_batches_in_the_background(tiny_model, tmp_path, monkeypatch,
                                                                             speedups, streams):
    """Without streams a started batch is already computed: its rows and progress leave at once (a progress
    update that waited for the next batch would also make every measured rate look a batch faster). With
    streams the next batch is started before the current one is collected, so the streams never idle."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: streams)  # the default set's stream count
    folder = tmp_path / "images"
    folder.mkdir()
    for i, photo in enumerate(real_photos(7)):
        photo.save(folder / f"{i}.png")
    started_batches, seen = [], []
    config = run_config(folder, tmp_path / "out", tiny_model, batch_size=2, speedups=speedups)
    job, loop, shards = built_loop(config, lambda update: seen.append((update.done, len(started_batches))))
    real_loader = loop.make_loader

    def counting_loader(*args):  # a batch is started as soon as the loop takes it from the loader
        for batch in real_loader(*args):
            started_batches.append(1)
            yield batch

    loop.make_loader = counting_loader
    loop.process(shards, job.source.read)
    done_batches = [(done + 1) // 2 for done, _ in seen if done]
    started = [count for done, count in seen if done]
    assert done_batches == [1, 2, 3, 4]
    expected = done_batches if streams == 1 else [2, 3, 4, 4]  # the last batch has no successor to start
    assert started == expected


def test_runner_puts_one_micro_batch_at_a_time_through_the_pixel_stage(tiny_model, tmp_path):
    """Only a micro-batch is ever in float (a whole batch of 32 at 256x256 is 25 MB), with the same predictions."""
    from mv2batch.engines.local import LocalParts
    from mv2batch.runner.placement import place

    folder = tmp_path / "images"
    folder.mkdir()
    for i, photo in enumerate(real_photos(7)):
        photo.save(folder / f"{i}.png")
    # The all set: the exact one keeps micro-batches only where they give transformers' bits (two-image calls
    # may not: see test_micro_batches_that_round_differently_here_are_dropped).
    options = {"batch_size": 8, "speedups": True}
    classify(folder, tmp_path / "whole", tiny_model, **options)  # 64x64 inputs: the whole batch is one call
    sizes = []

    def two_image_micro_batches(job, local_rank=None):  # 64x64 inputs; each pixel-stage call's size recorded
        placement = place(job, local_rank, micro_batch_pixels=2 * 64 * 64)
        stage = placement.pixel_stage
        return replace(placement, pixel_stage=lambda pixels: sizes.append(len(pixels)) or stage(pixels))

    classify(folder, tmp_path / "micro", tiny_model, parts=LocalParts(place=two_image_micro_batches), **options)
    assert sorted(sizes) == [1, 2, 2, 2]  # in any order: the all set runs micro-batches on parallel streams
    micro, whole = read_rows(tmp_path / "micro"), read_rows(tmp_path / "whole")
    assert [row["topk_ids"] for row in micro] == [row["topk_ids"] for row in whole]
    # The tiny model's convolutions sum a batch of one image apart from a larger one (5.6e-6 here; measured).
    np.testing.assert_allclose([row["topk_scores"] for row in micro], [row["topk_scores"] for row in whole], atol=1e-5)


def _backbone_from_config(width: float) -> torch.nn.Module:
    import transformers

    from mv2batch.testing import he_init

    torch.manual_seed(0)
    config = transformers.MobileViTV2Config(width_multiplier=width, image_size=256, num_labels=10)
    model = transformers.MobileViTV2ForImageClassification(config)
    he_init(model)
    return model.eval()


def _conv_input_layouts(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, bool]:
    """For every convolution, in order: whether its input was channels-last (and not also NCHW-contiguous)."""
    seen: dict[str, bool] = {}

    def record(name: str, module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault(name, not args[0].is_contiguous())

    hooks = [conv.register_forward_pre_hook(functools.partial(record, name))
             for name, conv in model.named_modules() if isinstance(conv, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    return seen


# Which convolutions take channels-last input per width: those summing <= 64 products per output, or
# depthwise, from the stem on, up to the first block with another one (its residual would carry the layout on).
PREFIX_BY_WIDTH = {
    0.25: 1 + 3 + 6,  # every MobileNet block (8 to 32 channels)
    0.5: 1 + 3 + 3 + 0,  # layer 1's second block adds its input (64 channels) to a 128-product convolution's output
    1.0: 1 + 3 + 2,  # layer 1's first block (no residual) goes back to NCHW before its 128-channel reduce
    2.0: 1 + 2,  # layer 0's reduce sums 128 products
}


@pytest.mark.parametrize("width", sorted(PREFIX_BY_WIDTH))
def test_exact_set_runs_its_first_layers_channels_last_with_transformers_bits(width):
    pixels = _segment_pixels(256, 2)  # two photos at 341x256, NCHW as transformers gets them
    reference = _backbone_from_config(width)
    optimized = optimize_for_inference(_backbone_from_config(width), torch.device("cpu"), torch.float32,
                                       speedups=exact_speedups(torch.device("cpu")))
    model = optimized.module
    assert optimized.speedups.channels_last_prefix
    layouts = list(_conv_input_layouts(model, pixels.contiguous(memory_format=torch.channels_last)).values())
    prefix = PREFIX_BY_WIDTH[width]
    assert layouts == [True] * prefix + [False] * (len(layouts) - prefix)
    with torch.inference_mode():
        expected, got = reference(pixel_values=pixels).logits, model(pixel_values=pixels).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert expected.std(0).mean() > 0  # input-dependent, or equality would be vacuous
    # A small input (one image under 128x128) stays NCHW: ATen may run its stem outside oneDNN.
    assert not any(_conv_input_layouts(model, torch.rand(1, 3, 96, 96)).values())


def test_the_prefix_is_dropped_where_the_layouts_round_differently():
    """A CPU whose channels-last kernels round differently (simulated: the prefix nudges the pixels) keeps NCHW."""
    from mv2batch.model.channels_last import apply_channels_last_prefix, channels_last_if_large

    def rounding_elsewhere(switch, stem, args):
        (pixels, *rest) = channels_last_if_large(switch, stem, args)
        return (pixels * (1 + 1e-6) if switch.on else pixels, *rest)

    pixels = _segment_pixels(256, 2)  # two photos at 341x256, NCHW as transformers gets them
    cpu = torch.device("cpu")
    model = _rewritten(_backbone_from_config(1.0), cpu, torch.float32,
                       speedups=replace(exact_speedups(cpu), channels_last_prefix=False))
    assert not apply_channels_last_prefix(model, cpu, torch.float32, stem_hook=rounding_elsewhere)
    assert not any(_conv_input_layouts(model, pixels).values())
    with torch.inference_mode():
        assert torch.equal(model(pixel_values=pixels).logits, _backbone_from_config(1.0)(pixel_values=pixels).logits)


def test_a_model_channels_last_throughout_records_no_prefix(tiny_model):
    cpu = torch.device("cpu")
    applied = optimize_for_inference(_load(tiny_model), cpu, torch.float32, channels_last=True,
                                     speedups=exact_speedups(cpu)).speedups
    assert applied.channels_last and not applied.channels_last_prefix
