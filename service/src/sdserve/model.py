"""Loading a text-to-image pipeline from a local directory (the only way sdserve loads one)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import Settings, point_caches_at

log = logging.getLogger("sdserve.model")


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message says which file or setting to fix."""


@dataclass
class LoadedModel:
    pipe: Any
    device: str
    dtype: Any
    model_id: str
    revision: str
    path: Path
    native_size: tuple[int, int]
    pipeline_class: str
    scheduler_config: Any = None  # as loaded; every call builds its own scheduler from it


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "SDSERVE_DEVICE=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)"
        )
    return setting


def resolve_dtype(setting: str, device: str):
    import torch

    if setting == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    if device == "cpu" and setting == "float16":
        raise ModelError("SDSERVE_DTYPE=float16 is not supported on CPU; use float32 or bfloat16")
    return getattr(torch, setting)


def optional_components(settings: Settings) -> tuple[str, ...]:
    """Components the pipeline runs without: with the safety checker off, a model cache may skip it."""
    return () if settings.safety_checker else ("safety_checker", "feature_extractor")


def check_model_dir(path: Path | None, optional: tuple[str, ...] = ()) -> dict:
    """Cheap checks before the expensive load, so the common mistakes get a plain message."""
    if path is None:
        raise ModelError("no model: set SDSERVE_MODEL (or --model) to a directory in diffusers format")
    if not path.is_dir():
        raise ModelError(f"SDSERVE_MODEL={path}: not a directory")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"SDSERVE_MODEL={path}: no model_index.json; is this a diffusers-format model directory?"
        )
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{index}: unreadable or not JSON ({e})") from e
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ModelError(f"{index}: no _class_name; not a diffusers pipeline index")
    for component, spec in data.items():
        if component.startswith("_") or not isinstance(spec, list) or spec == [None, None]:
            continue
        if not (path / component).is_dir() and component not in optional:
            raise ModelError(f"SDSERVE_MODEL={path}: component directory {component}/ is missing")
    return data


def weights_variant(model: Path, half: bool) -> bool:
    """Load the fp16 variant: in half precision when the UNet has it, and in any precision when it
    is all the UNet has (a model cache that fetched only the variant). diffusers then takes each
    component's fp16 weights where present and its plain ones elsewhere."""
    unet = [p.name for p in (model / "unet").glob("*.safetensors")]
    fp16 = [n for n in unet if ".fp16." in n or ".fp16-" in n]
    return bool(fp16) and (half or len(fp16) == len(unet))


def load_pipeline(settings: Settings) -> LoadedModel:
    point_caches_at(settings.cache_dir)
    index = check_model_dir(settings.model, optional_components(settings))
    import diffusers.utils.logging
    import huggingface_hub.constants
    import torch
    import transformers.utils.logging
    from diffusers import AutoPipelineForText2Image

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    # The env var is read at import; set the constant too in case something imported it earlier.
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    has_checker = isinstance(index.get("safety_checker"), list) and index["safety_checker"] != [None, None]
    if settings.safety_checker and not has_checker:
        raise ModelError(
            f"SDSERVE_SAFETY_CHECKER=true but the model at {settings.model} has no safety_checker component"
        )
    if "safety_checker" in index and not settings.safety_checker:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if weights_variant(settings.model, half=dtype == torch.float16):
        kwargs["variant"] = "fp16"
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(str(settings.model), **kwargs)
    except Exception as e:  # diffusers raises many types; all mean the same to an operator
        raise ModelError(f"cannot load the model at {settings.model}: {type(e).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if device == "cuda":
        # torch 2 uses SDPA by default (AttnProcessor2_0); channels_last speeds up the convolutions.
        pipe.unet.to(memory_format=torch.channels_last)
        if settings.compile:
            # No CUDA graphs: batch sizes vary, and graphs would be recorded per shape.
            pipe.unet = torch.compile(pipe.unet, mode=settings.compile_mode, fullgraph=False)
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = pipe.unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    native = (sample * scale, sample * scale)
    model_id = settings.model_id or settings.model.resolve().name
    log.info(
        "model loaded",
        extra={"model": model_id, "pipeline": type(pipe).__name__, "device": device, "dtype": str(dtype)},
    )
    return LoadedModel(
        pipe,
        device,
        dtype,
        model_id,
        settings.model_revision,
        settings.model,
        native,
        type(pipe).__name__,
        dict(pipe.scheduler.config),
    )


def environment_info() -> dict:
    """Versions and devices, for `sdserve info` and the node manifest."""
    import diffusers
    import torch
    import transformers

    from . import __version__

    packages = {
        dist.metadata["Name"].lower().replace("_", "-"): dist.version
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }
    info = {
        "sdserve": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        # Every distribution in the release's venv: what a rebuilt node must match exactly.
        "packages": dict(sorted(packages.items())),
    }
    return info
