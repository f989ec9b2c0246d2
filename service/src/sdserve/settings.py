"""Service settings: every one is an `SDSERVE_*` environment variable and a `serve` option."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .logs import quiet_library_notices


def default_cache_dir() -> Path:
    """systemd's CacheDirectory= if set, else a per-user dir under the temp dir; never $HOME
    (read-only under ProtectSystem=strict / ProtectHome)."""
    systemd = os.environ.get("CACHE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    return Path(tempfile.gettempdir()) / f"sdserve-cache-{os.getuid()}"


_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def parse_size(text: str) -> tuple[int, int]:
    """ "WxH" in ASCII digits (str.isdigit and int() would take fullwidth or Arabic-Indic ones)."""
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        raise ValueError(f"size must look like 512x512, got {text!r}")
    return int(m[1]), int(m[2])


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", extra="forbid", validate_default=True)

    # Model
    model: Path | None = Field(None, description="Directory of the model in diffusers format (local only).")
    model_id: str = Field(
        "", description="Model name reported by the APIs; defaults to the directory's name."
    )
    model_revision: str = Field("", description="Model revision reported by `info` and /sdapi/v1/sd-models.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    safety_checker: bool = Field(
        False, description="Load and run the model's safety checker (the model must ship one)."
    )
    compile: bool = Field(
        False, description="torch.compile the UNet (CUDA only); warm-up compiles every WARMUP_SIZES entry."
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode: default compiles in about a minute; max-autotune-no-cudagraphs "
        "benchmarks kernels for each shape (many minutes per size, sometimes faster).",
    )
    warmup_sizes: str = Field(
        "", description='Comma-separated "WxH" sizes to warm up; empty: the model\'s native size.'
    )
    warmup_steps: int = Field(2, ge=1, le=50, description="Steps per warm-up generation.")
    vae_tiling_pixels: int = Field(
        1024 * 1024, ge=0, description="Decode with VAE tiling above this many pixels per image (0: never)."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="CPU threads for torch (0: torch's default, one per core). 1 helps tiny models on busy CPUs.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Caches (HF, torch inductor, triton...); default $CACHE_DIRECTORY or a temp dir.",
    )

    # Network
    host: str = Field(
        "127.0.0.1", description="Listen address. Without API keys only a loopback address is allowed."
    )
    port: int = Field(7860, ge=0, le=65535)
    agent_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port on HOST for HAProxy's agent check: one line a connection, `up 100%`, `up 0%` "
        "(draining, or the queue full) or `down` (not ready); 0: off.",
    )
    api_keys_file: Path | None = Field(
        None, description="File of key hashes, `sha256:<hex> <name>` a line; re-read on SIGHUP."
    )
    metrics_public: bool = Field(False, description="Serve /metrics without a key.")
    read_timeout_s: float = Field(
        30,
        gt=0,
        le=3600,
        description="A client must send a request's headers, and then its body, within this long; "
        "a slower one is disconnected (headers) or answered 408 (body).",
    )
    idle_timeout_s: float = Field(
        5, gt=0, le=3600, description="An idle keep-alive connection is closed after this long."
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or networks of proxies whose X-Forwarded-Proto and "
        "X-Forwarded-Host build url results when PUBLIC_URL is unset; others' headers are ignored.",
    )

    # Engine
    max_batch: int = Field(8, ge=1, le=64, description="Most images one pipeline call generates.")
    max_images: int = Field(
        16, ge=1, le=256, description="Most images one request may ask for (n, batch_size x n_iter)."
    )
    queue_size: int = Field(32, ge=1, description="Requests waiting beyond this answer 429.")
    batch_wait_ms: float = Field(
        0,
        ge=0,
        le=10_000,
        description="Wait this long for batch-mates before starting a batch; 0: start at once.",
    )
    batch_rejoin_ms: float = Field(
        100,
        ge=0,
        le=10_000,
        description=(
            "Right after a batch of several requests, wait up to this long for as many to come back "
            "before starting the next (keeps closed-loop clients in full batches); a lone request "
            "after idle never waits. 0: off."
        ),
    )
    request_timeout_s: float = Field(
        300, gt=0, description="A synchronous request waiting longer answers 504."
    )
    job_ttl_s: float = Field(3600, gt=0, description="Finished async jobs are kept this long.")
    drain_timeout_s: float = Field(
        120,
        gt=0,
        description="On SIGTERM, time to finish queued work before failing the rest; systemd's TimeoutStopSec must be longer.",
    )
    max_jobs: int = Field(
        1000, ge=1, description="Most async jobs kept at once (queued, running or finished)."
    )
    max_jobs_per_key: int = Field(
        0,
        ge=0,
        description="Most async jobs one API key may hold while the key file holds several keys "
        "(0: half of MAX_JOBS), so that one key cannot take every slot.",
    )
    max_queued_per_key: int = Field(
        0,
        ge=0,
        description="Most requests one API key may have waiting while the key file holds several keys "
        "(0: half of QUEUE_SIZE), so that one key cannot fill the queue.",
    )

    # Limits
    max_side: int = Field(2048, ge=64, description="Largest width or height.")
    max_pixels: int = Field(
        4 * 1024 * 1024, ge=64 * 64, description="Pixel budget of one request: images x width x height."
    )
    max_steps: int = Field(150, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Larger request bodies answer 413.")
    max_image_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Larger bodies of the routes that carry images (img2img, edits, png-info) answer 413.",
    )
    default_steps: int = Field(25, ge=1)
    default_scheduler: str = Field(
        "DPM++ 2M Karras", description="Sampler and schedule type for requests that name none."
    )
    default_guidance: float = Field(7.0, ge=0)

    # Output and logs
    output_dir: Path | None = Field(
        None,
        description="Where images are written for response_format=url and save_images; unset: url is refused.",
    )
    output_retention_s: float = Field(
        0,
        ge=0,
        description="Images in OUTPUT_DIR older than this are deleted and their URLs answer 404 "
        "(OpenAI's image URLs last an hour); 0 keeps them.",
    )
    public_url: str = Field(
        "", description="Base URL used in image URLs; default the request's own base URL."
    )
    log_prompts: bool = Field(False, description="Log prompts (off: prompts never reach the logs).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    setting_hints: str = Field(
        "",
        description="What sets each setting where a deploy tool manages them, as setting=name pairs "
        "(output_dir=sd_service_image_retention_minutes,max_jobs=...). Messages that name a setting "
        "name that too; the service only quotes it.",
    )

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            w, h = parse_size(part)
            if w % 8 or h % 8 or w < 64 or h < 64:
                raise ValueError(
                    f"warm-up size {part!r}: width and height must be multiples of 8, at least 64"
                )
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy {part!r}: not an IP address or network") from None
        return v

    @field_validator("setting_hints")
    @classmethod
    def _hints(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            setting, sep, name = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"setting hint {part!r}: expected setting=name")
            if setting.strip() not in cls.model_fields:
                raise ValueError(f"setting hint {part!r}: {setting.strip()!r} is no setting")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("host must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        if self.agent_port and self.agent_port == self.port:
            raise ValueError(f"agent_port ({self.agent_port}) is the HTTP port; give it a port of its own")
        if self.max_pixels < 64 * 64:
            raise ValueError("max_pixels must allow one 64x64 image")
        if self.max_jobs_per_key > self.max_jobs:
            raise ValueError(
                f"max_jobs_per_key ({self.max_jobs_per_key}) is above max_jobs ({self.max_jobs})"
            )
        if self.max_queued_per_key > self.queue_size:
            raise ValueError(
                f"max_queued_per_key ({self.max_queued_per_key}) is above queue_size ({self.queue_size})"
            )
        return self

    def name(self, setting: str) -> str:
        """How a message names `setting`: its variable, and what the deployment sets it with where the
        deployment said (SDSERVE_OUTPUT_DIR, set by sd_service_image_retention_minutes)."""
        hints = dict(
            (k.strip(), v.strip())
            for k, _, v in (p.partition("=") for p in self.setting_hints.split(",") if p.strip())
        )
        variable = f"SDSERVE_{setting.upper()}"
        return f"{variable}, set by {hints[setting]}" if setting in hints else variable

    def per_key_limits(self) -> tuple[int, int]:
        """(queued requests, jobs) one key may hold when several keys share the service."""
        return (
            self.max_queued_per_key or max(1, -(-self.queue_size // 2)),
            self.max_jobs_per_key or max(1, -(-self.max_jobs // 2)),
        )

    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [
            ipaddress.ip_network(p.strip(), strict=False)
            for p in self.trusted_proxies.split(",")
            if p.strip()
        ]

    def warmup_size_list(self) -> list[tuple[int, int]]:
        return [parse_size(p) for p in self.warmup_sizes.split(",") if p.strip()]

    def host_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """SDSERVE_* variables that name no setting, each with the closest setting if one is near.
    pydantic-settings ignores them, so a typo (SDSERVE_MAX_BACTH) would silently do nothing."""
    known = [f"SDSERVE_{name.upper()}" for name in Settings.model_fields]
    problems = []
    for key in sorted(k for k in (os.environ if environ is None else environ) if k.startswith("SDSERVE_")):
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            problems.append(f"{key} is not a setting" + (f" (did you mean {near[0]}?)" if near else ""))
    return problems


def point_caches_at(cache_dir: Path) -> None:
    """Point every library that wants a cache at `cache_dir`, and force Hugging Face offline.

    Must run before diffusers/transformers/huggingface_hub are imported: they read these at import.
    Variables already set by the operator win.
    """
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    defaults = {
        "HF_HOME": cache_dir / "huggingface",
        "TORCHINDUCTOR_CACHE_DIR": cache_dir / "torchinductor",
        "TRITON_CACHE_DIR": cache_dir / "triton",
        "TRITON_HOME": cache_dir / "triton-home",
        "TORCH_HOME": cache_dir / "torch",
        "MPLCONFIGDIR": cache_dir / "matplotlib",
        "NUMBA_CACHE_DIR": cache_dir / "numba",
        "XDG_CACHE_HOME": cache_dir / "xdg",
        "CUDA_CACHE_PATH": cache_dir / "nv",
    }
    for name, path in defaults.items():
        os.environ.setdefault(name, str(path))
    # A missing model must be an error at start-up, never a download.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_notices()
