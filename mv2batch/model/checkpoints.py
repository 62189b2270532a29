"""Model loading: resolve a hub id or local folder, check that it is a MobileViTV2 of the right head, load it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mv2batch.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import MobileViTImageProcessorPil, PreTrainedModel

DEFAULT_MODELS = {
    "classify": "apple/mobilevitv2-1.0-imagenet1k-256",
    "segment": "apple/mobilevitv2-1.0-voc-deeplabv3",
    "embed": "apple/mobilevitv2-1.0-imagenet1k-256",  # its backbone
}
HEAD_CLASSES = {
    "classify": "MobileViTV2ForImageClassification",
    "segment": "MobileViTV2ForSemanticSegmentation",
}
HEAD_NAMES = {"classify": "image-classification", "segment": "semantic-segmentation"}
BACKBONE_CLASS = "MobileViTV2Model"  # embed: any MobileViTV2 checkpoint's backbone, its head left out
WEIGHT_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors"]
LEGACY_WEIGHT_PATTERNS = ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a checkpoint's files are on disk, and which exact version they are."""

    model_id: str
    folder: Path
    revision: str  # the hub commit hash, or a content hash of a local folder
    origin: str  # "hub" or "local"


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    """A local folder as it is, or a hub id through the hub cache (offline-capable), to a folder on disk."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ResolvedModel(model_id=str(path.resolve()), folder=path.resolve(),
                             revision=_folder_hash(path), origin="local")
    if _looks_like_path(model):
        raise ModelError(f"model folder not found: {model}")
    folder = _download(model, revision)
    return ResolvedModel(model_id=model, folder=folder, revision=folder.name, origin="hub")


def _weight_files(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.safetensors"))
    return found or sorted(folder.glob("pytorch_model.bin"))


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in [folder / "config.json", *_weight_files(folder)]:
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return "local-" + digest.hexdigest()[:16]


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import errors as hub_errors

    try:
        folder = _snapshot(repo_id, revision, WEIGHT_PATTERNS)
        if not _weight_files(folder):  # older repos carry only pytorch_model.bin
            folder = _snapshot(repo_id, revision, LEGACY_WEIGHT_PATTERNS)
    except hub_errors.RepositoryNotFoundError:
        raise ModelError(f"no model {repo_id!r} on the Hugging Face hub (or it is private: log in with "
                         f"`hf auth login`)") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelError(f"model {repo_id!r} has no revision {revision!r}") from None
    except hub_errors.GatedRepoError:
        raise ModelError(f"model {repo_id!r} is gated: accept its terms on the hub and log in with "
                         f"`hf auth login`") from None
    except (hub_errors.LocalEntryNotFoundError, OSError, hub_errors.HfHubHTTPError) as exc:
        raise ModelError(
            f"cannot reach the Hugging Face hub and {repo_id!r} is not in the local cache ({_cache_dir()}): "
            f"run once with network access, or `hf download {repo_id}`, or pass --model /path/to/local/folder"
            f" [{type(exc).__name__}]"
        ) from None
    return folder


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download, without its retries when a pinned commit is already cached or the hub is unreachable.

    For a 40-hex commit, huggingface_hub lists the repo's files first and retries that request for about
    20 s before it falls back to the cache; a cached commit needs no hub at all.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors

    if revision is not None and COMMIT_HASH.fullmatch(revision):
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        except hub_errors.LocalEntryNotFoundError:
            pass
        try:
            HfApi().repo_info(repo_id, revision=revision)  # one request, no retries: fails fast when unreachable
        except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError, hub_errors.GatedRepoError):
            raise
        except Exception as exc:  # a transport error, whichever HTTP client this huggingface_hub uses
            raise hub_errors.LocalEntryNotFoundError(f"{type(exc).__name__}: {exc}") from None
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as plain JSON: no code from the checkpoint runs while we decide whether to trust it."""
    file = folder / "config.json"
    if not file.is_file():
        raise ModelError(f"{folder} has no config.json: not a transformers checkpoint")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {file}: {exc}") from None


def check_head(config: dict[str, Any], task: str, model: str) -> None:
    """Refuse another architecture, or a MobileViTV2 whose head does not match the command."""
    model_type = config.get("model_type")
    if model_type != "mobilevitv2":
        raise ModelError(
            f"{model} is a {model_type or 'unknown'} checkpoint, not MobileViTV2: mv2batch runs MobileViTV2 models only"
        )
    architectures = config.get("architectures") or []
    if task not in HEAD_CLASSES or HEAD_CLASSES[task] in architectures:
        return
    for other, head in HEAD_CLASSES.items():
        if other != task and head in architectures:
            raise ModelError(
                f"{model} is a {HEAD_NAMES[other]} checkpoint ({head}); use `mv2batch {other}`, "
                f"or pass a {HEAD_NAMES[task]} checkpoint with --model"
            )
    # No architecture recorded: load_weights' missing-weights check decides.


def label_names(config: dict[str, Any]) -> list[str]:
    """Class names by id from config.json's id2label (ids as names where it has none)."""
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    count = int(config.get("num_labels") or (max(id2label) + 1 if id2label else 0))
    return [id2label.get(i, str(i)) for i in range(count)]


def load_weights(folder: Path, task: str, model: str, embeddings: bool = False) -> torch.nn.Module:
    """The checkpoint in float32 eval mode; refused when any weight of the head is missing. embed: the backbone
    of any MobileViTV2 checkpoint; embed and classify --embeddings: a module whose output also has the pooled
    vector (embeddings.pooled_model)."""
    import transformers

    from mv2batch.model.pooled import pooled_model

    transformers.utils.logging.disable_progress_bar()
    if not _weight_files(folder):
        raise ModelError(f"{model} has no weights (model.safetensors or pytorch_model.bin) in {folder}")
    if task == "embed":
        backbone, info = _from_pretrained(transformers.MobileViTV2Model, folder, model)
        _say_dropped_head(model, info)
        _refuse_missing(model, info, "MobileViTV2 backbone")
        return pooled_model(backbone=backbone.eval()).eval()
    module, info = _from_pretrained(getattr(transformers, HEAD_CLASSES[task]), folder, model)
    _refuse_missing(model, info, f"{HEAD_NAMES[task]} head")
    return pooled_model(classification=module.eval()).eval() if embeddings else module.eval()


def _from_pretrained(cls: type[PreTrainedModel], folder: Path, model: str) -> tuple[PreTrainedModel, dict]:
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its table of unused weights: said in one line instead
    try:
        return cls.from_pretrained(str(folder), use_safetensors=bool(sorted(folder.glob("*.safetensors"))),
                                   output_loading_info=True, trust_remote_code=False)
    except Exception as exc:  # corrupt or mismatched weight files
        raise ModelError(f"cannot load {model}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _refuse_missing(model: str, info: dict, what: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{model} has no {what}: {len(missing)} weights missing (e.g. {missing[0]})")


def _say_dropped_head(model: str, info: dict) -> None:
    unused = sorted(info.get("unexpected_keys") or [])
    if unused:
        heads = sorted({key.split(".")[0] for key in unused})
        logging.getLogger("mv2batch").info(
            f"embed: {model}'s head ({', '.join(heads)}: {len(unused)} weights) is left out; the embeddings are its "
            "backbone's pooled output")


def load_processor(folder: Path, model: str) -> MobileViTImageProcessorPil:
    """The checkpoint's MobileViTImageProcessor (PIL backend), parsed by transformers itself."""
    from transformers import MobileViTImageProcessorPil

    if not (folder / "preprocessor_config.json").is_file():
        raise ModelError(f"{model} has no preprocessor_config.json: use --preprocess paper, or add one")
    # The PIL backend: the one whose pixels transformers' pipeline produces without torchvision.
    return MobileViTImageProcessorPil.from_pretrained(str(folder))
