"""Model directories as a model cache leaves them: the safety checker skipped, fp16 weights only."""

from __future__ import annotations

import json
import shutil

import pytest

from sdserve.model import ModelError, check_model_dir, load_pipeline, weights_variant


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_model, dest)
    return dest


def test_a_skipped_safety_checker_is_fine_unless_the_service_runs_it(model_copy, make_settings):
    """The Hub lists safety_checker in model_index.json; a cache that skipped its 1.2 GB serves
    with the checker off, and turning it on names the missing directory at start-up."""
    index = json.loads((model_copy / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(make_settings(model=model_copy))
    assert loaded.pipe.safety_checker is None
    with pytest.raises(ModelError, match=r"(safety_checker|feature_extractor)/ is missing"):
        load_pipeline(make_settings(model=model_copy, safety_checker=True))
    with pytest.raises(ModelError, match=r"(safety_checker|feature_extractor)/ is missing"):
        check_model_dir(model_copy)


def test_fp16_weights_alone_load_in_full_precision(model_copy, make_settings, tiny_model):
    """A GPU node's cache fetches only the fp16 variant; the same directory must also serve on CPU
    (float32). Components without a variant keep their plain weights."""
    for component in ("unet", "vae"):
        (plain,) = (model_copy / component).glob("*.safetensors")
        plain.rename(plain.with_name(plain.name.replace(".safetensors", ".fp16.safetensors")))
    assert weights_variant(model_copy, half=False) and not weights_variant(tiny_model, half=True)
    loaded = load_pipeline(make_settings(model=model_copy))
    reference = load_pipeline(make_settings(model=tiny_model))
    a = dict(loaded.pipe.unet.named_parameters())
    b = dict(reference.pipe.unet.named_parameters())
    assert all((a[k] == b[k]).all() for k in b) and next(iter(a.values())).dtype == b[next(iter(b))].dtype
