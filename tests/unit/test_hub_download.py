"""Which files the model cache's Hub helper fetches, on real repositories' listings (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "roles" / "model_cache" / "files" / "hub_download.py"
spec = importlib.util.spec_from_file_location("hub_download", HELPER)
hub_download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub_download)

DEFAULTS = yaml.safe_load((ROOT / "roles/model_cache/defaults/main.yml").read_text())
ALLOW = DEFAULTS["model_cache_allow_patterns"]
IGNORE = ["safety_checker/*"]  # the default when the service's safety checker is off

# stable-diffusion-v1-5's layout: plain, fp16 and non-EMA weights, .bin twins, root checkpoints.
SD15 = [
    "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "README.md",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]  # fmt: skip
COMMON = [
    "feature_extractor/preprocessor_config.json", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json", "vae/config.json",
]  # fmt: skip


def test_gpu_nodes_fetch_the_fp16_weights_only() -> None:
    got = hub_download.select(SD15, ALLOW, IGNORE, "fp16")
    weights = [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert got == sorted(COMMON + weights)


def test_cpu_nodes_fetch_the_plain_weights_only() -> None:
    got = hub_download.select(SD15, ALLOW, IGNORE, "")
    weights = [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert got == sorted(COMMON + weights)


def test_the_safety_checker_comes_when_it_is_not_ignored() -> None:
    got = hub_download.select(SD15, ALLOW, [], "fp16")
    assert "safety_checker/model.fp16.safetensors" in got and "safety_checker/model.safetensors" not in got


def test_a_component_without_the_variant_keeps_its_plain_weights_and_shards_stay_whole() -> None:
    listing = [
        "model_index.json",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    got = hub_download.select(listing, ALLOW, IGNORE, "fp16")
    assert got == [
        "model_index.json",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    plain = hub_download.select(listing, ALLOW, IGNORE, "")
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in plain
    assert not [p for p in plain if "fp16" in p]
