#!/usr/bin/env python3
"""Benchmark sdserve against the same pipeline called directly. Prints a table, writes JSON.

CPU mode (the tiny random model; runs anywhere):
  1. the pipeline called directly, one image at a time: p50/p95 latency;
  2. the service over HTTP (a real `sdserve serve` process), one request at a time:
     p50/p95 latency and the overhead ratio service/direct at p50 (target: under 5%);
  3. 8 concurrent clients against the service (micro-batching on) vs the sequential direct
     calls: images/s and the mean batch size the service formed;
  4. 1-3 again for image to image at one strength (--strength, default 0.5): diffusers'
     img2img pipeline made with from_pipe against the service's /v1/images/edits without a mask.

GPU mode (needs a CUDA device; the default when one is present):
  The SD 1.x architecture at 512x512 with random weights (the compute is the same as real
  weights). The original design's plain usage (StableDiffusionPipeline, fp16, PNDM, 50 steps,
  one request at a time) vs the service under 8 concurrent clients at the same scheduler and
  steps: images/s and the ratio (target on an H100/H200: at least 2.5x), the UNet's share of
  the GPU's peak FLOP/s (FLOPs counted with torch's FlopCounterMode), and the same-seed check
  (alone vs. inside a batch: equal within a small tolerance on CUDA).
  Kept under 8 minutes including warm-up; `--compile` compiles one size (512x512) only.

  On a bare machine with only Python and a CUDA build of torch (no network), carry the other
  wheels: `make gpu-bundle` here, then `bash scripts/tools/gpu_checks.sh .gpu-bundle OUT` there runs this
  benchmark with the other GPU checks (docs/benchmarks.md).

Usage:
  .venv/bin/python scripts/tools/bench_service.py                      # auto: gpu if CUDA, else cpu
  .venv/bin/python scripts/tools/bench_service.py --mode cpu --requests 40 --out bench-cpu.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
# Dense fp16/bf16 tensor-core peaks (no sparsity), in TFLOP/s, by device-name substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


# ---------------------------------------------------------------------------- helpers
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def service_process(model: Path, workdir: Path, args: list[str], env_extra: dict[str, str]):
    """A real `sdserve serve` on a free loopback port; yields its base URL."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "sdserve", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--cache-dir", str(workdir / "cache"), "--log-level", "warning", *args]
    logfile = (workdir / f"service-{port}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sdserve exited with {proc.returncode}; see {logfile.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("sdserve not ready after 600s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        logfile.close()


def post_image(client, url: str, size: str, steps: int, seed: int, scheduler: str) -> dict:
    body = {
        "prompt": PROMPT,
        "size": size,
        "steps": steps,
        "seed": seed,
        "scheduler": scheduler,
        "response_format": "b64_json",
    }
    r = client.post(url + "/v1/images/generations", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def post_edit(
    client, url: str, png: bytes, size: str, steps: int, seed: int, scheduler: str, strength: float
):
    """Image to image through OpenAI's edits route (no mask: the whole image at `strength`)."""
    data = {"prompt": PROMPT, "size": size, "steps": steps, "seed": seed, "scheduler": scheduler}
    data |= {"strength": strength, "response_format": "b64_json"}
    files = {"image": ("init.png", png, "image/png")}
    r = client.post(
        url + "/v1/images/edits", data={k: str(v) for k, v in data.items()}, files=files, timeout=600
    )
    r.raise_for_status()
    return r.json()


def init_png(w: int, h: int) -> tuple[object, bytes]:
    """A smooth colour gradient as the image-to-image input: (PIL image, PNG bytes)."""
    import io

    import numpy as np
    from PIL import Image

    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    image = Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, buffer.getvalue()


def concurrent_http(
    url: str, clients: int, per_client: int, size: str, steps: int, scheduler: str, send=None
) -> dict:
    """`clients` threads, each with its own connection, sending `per_client` requests back to back
    (`send(client, seed)`; default a text-to-image request)."""
    import httpx

    send = send or (lambda client, seed: post_image(client, url, size, steps, seed, scheduler))

    def worker(c: int) -> list[float]:
        lat = []
        with httpx.Client() as client:
            for i in range(per_client):
                t = time.perf_counter()
                send(client, 1000 * c + i)
                lat.append(time.perf_counter() - t)
        return lat

    before = batch_stats(url)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        latencies = [x for lat in pool.map(worker, range(clients)) for x in lat]
    elapsed = time.perf_counter() - t0
    after = batch_stats(url)
    calls = after[1] - before[1]
    return {
        "clients": clients,
        "images": clients * per_client,
        "seconds": elapsed,
        "images_per_s": clients * per_client / elapsed,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "mean_batch_size": (after[0] - before[0]) / calls if calls else float("nan"),
        "pipeline_calls": calls,
    }


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of sdserve_batch_size from /metrics (the bench runs the service on loopback, open)."""
    import httpx

    total = count = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("sdserve_batch_size_sum "):
            total = float(line.split()[1])
        elif line.startswith("sdserve_batch_size_count "):
            count = float(line.split()[1])
    return total, count


def timed_call(pipe, w: int, h: int, steps: int, seed: int, device: str) -> float:
    """Seconds for one image from the pipeline called directly, GPU work included."""
    import torch

    t = time.perf_counter()
    pipe(
        PROMPT,
        width=w,
        height=h,
        num_inference_steps=steps,
        generator=torch.Generator(device).manual_seed(seed),
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def summary(times: list[float]) -> dict:
    return {
        "n": len(times),
        "p50_s": percentile(times, 0.5),
        "p95_s": percentile(times, 0.95),
        "mean_s": statistics.fmean(times),
    }


def machine() -> dict:
    import torch

    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------- CPU mode
def run_cpu(args, workdir: Path) -> dict:
    import httpx
    from sdserve.model import load_pipeline
    from sdserve.schedulers import resolve
    from sdserve.settings import Settings
    from sdserve.tiny import make_tiny_model

    model = Path(args.model) if args.model else make_tiny_model(workdir / "tiny-sd")
    w, h = (int(x) for x in args.size.split("x"))
    settings = Settings(
        model=model, device="cpu", torch_threads=args.torch_threads, cache_dir=workdir / "cache"
    )
    loaded = load_pipeline(settings)
    pipe = loaded.pipe
    pipe.scheduler = resolve(args.scheduler).build(loaded.scheduler_config)

    def direct(seed: int) -> float:
        return timed_call(pipe, w, h, args.steps, seed, "cpu")

    # Image to image from the same components (no second copy of the weights), as the service does.
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    init, init_bytes = init_png(w, h)

    def direct_i2i(seed: int) -> float:
        import torch

        t = time.perf_counter()
        i2i(PROMPT, image=init, strength=args.strength, num_inference_steps=args.steps,
            generator=torch.Generator("cpu").manual_seed(seed))  # fmt: skip
        return time.perf_counter() - t

    env = {"SDSERVE_TORCH_THREADS": str(args.torch_threads)}
    serve_args = ["--device", "cpu", "--warmup-sizes", args.size, "--max-batch", str(args.max_batch)]
    serve_args += ["--queue-size", "64"]
    with service_process(model, workdir, serve_args, env) as url, httpx.Client() as client:
        # Direct and service calls alternate, so that load from other work on the machine
        # falls on both sides alike (the two never run at the same time).
        log("cpu: direct pipeline and service over HTTP, alternating, sequential")
        direct(10_000)
        post_image(client, url, args.size, args.steps, 10_000, args.scheduler)
        direct_times, service_times = [], []
        for i in range(args.requests):
            direct_times.append(direct(i))
            t = time.perf_counter()
            post_image(client, url, args.size, args.steps, i, args.scheduler)
            service_times.append(time.perf_counter() - t)
        log(f"cpu: service, {args.clients} concurrent clients")
        per_client = max(1, args.concurrent_images // args.clients)
        conc = concurrent_http(url, args.clients, per_client, args.size, args.steps, args.scheduler)

        log(f"cpu: image to image at strength {args.strength}, direct and service, alternating")

        def edit(c, seed: int) -> dict:
            return post_edit(c, url, init_bytes, args.size, args.steps, seed, args.scheduler, args.strength)

        direct_i2i(10_000)
        edit(client, 10_000)
        i2i_direct, i2i_service = [], []
        for i in range(args.requests):
            i2i_direct.append(direct_i2i(i))
            t = time.perf_counter()
            edit(client, i)
            i2i_service.append(time.perf_counter() - t)
        log(f"cpu: image to image, {args.clients} concurrent clients")
        i2i_conc = concurrent_http(url, args.clients, per_client, args.size, args.steps, args.scheduler, edit)

    d, s = summary(direct_times), summary(service_times)
    di, si = summary(i2i_direct), summary(i2i_service)
    direct_ips = 1 / d["mean_s"]
    return {
        "mode": "cpu",
        "model": "tiny random SD (sdserve make-tiny-model)",
        "size": args.size,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "torch_threads": args.torch_threads,
        "direct_sequential": d,
        "service_sequential": s,
        "overhead_p50": s["p50_s"] / d["p50_s"] - 1,
        "overhead_p95": s["p95_s"] / d["p95_s"] - 1,
        "service_concurrent": conc,
        "direct_images_per_s": direct_ips,
        "throughput_ratio": conc["images_per_s"] / direct_ips,
        "img2img": {
            "strength": args.strength,
            "steps_run": int(args.steps * args.strength),
            "direct_sequential": di,
            "service_sequential": si,
            "overhead_p50": si["p50_s"] / di["p50_s"] - 1,
            "service_concurrent": i2i_conc,
            "throughput_ratio": i2i_conc["images_per_s"] * di["mean_s"],
        },
    }


def print_cpu(r: dict) -> None:
    d, s, c = r["direct_sequential"], r["service_sequential"], r["service_concurrent"]
    print(f"\nCPU, {r['model']}, {r['size']}, {r['steps']} steps, {r['scheduler']}")
    print(f"torch threads: {r['torch_threads']}")
    rows = [
        ("direct pipeline, sequential", d["p50_s"], d["p95_s"], r["direct_images_per_s"]),
        ("service over HTTP, sequential", s["p50_s"], s["p95_s"], 1 / s["mean_s"]),
        (f"service, {c['clients']} clients (batching)", c["p50_s"], c["p95_s"], c["images_per_s"]),
    ]
    print(f"{'':34}{'p50 ms':>10}{'p95 ms':>10}{'images/s':>10}")
    for label, p50, p95, ips in rows:
        print(f"{label:34}{p50 * 1e3:10.1f}{p95 * 1e3:10.1f}{ips:10.2f}")
    over50, over95 = r["overhead_p50"] * 100, r["overhead_p95"] * 100
    print(f"service overhead at p50: {over50:+.1f}% (target < 5%); at p95: {over95:+.1f}%")
    ratio, batch = r["throughput_ratio"], c["mean_batch_size"]
    print(f"throughput, {c['clients']} clients vs sequential direct: {ratio:.2f}x (mean batch {batch:.2f})")
    i = r["img2img"]
    di, si, ic = i["direct_sequential"], i["service_sequential"], i["service_concurrent"]
    print(
        f"\nimage to image (edits, no mask), strength {i['strength']}: {i['steps_run']} of {r['steps']} steps"
    )
    rows = [
        ("direct img2img pipeline, sequential", di["p50_s"], di["p95_s"], 1 / di["mean_s"]),
        ("service over HTTP, sequential", si["p50_s"], si["p95_s"], 1 / si["mean_s"]),
        (f"service, {ic['clients']} clients (batching)", ic["p50_s"], ic["p95_s"], ic["images_per_s"]),
    ]
    print(f"{'':34}{'p50 ms':>10}{'p95 ms':>10}{'images/s':>10}")
    for label, p50, p95, ips in rows:
        print(f"{label:34}{p50 * 1e3:10.1f}{p95 * 1e3:10.1f}{ips:10.2f}")
    over, ratio = i["overhead_p50"] * 100, i["throughput_ratio"]
    print(
        f"service overhead at p50: {over:+.1f}%; {ic['clients']} clients vs sequential direct: {ratio:.2f}x"
    )


# ---------------------------------------------------------------------------- GPU mode
def build_sd15_random(out: Path, device: str, dtype) -> Path:
    """The SD 1.x architecture (UNet 860M, VAE, CLIP ViT-L text encoder) with random weights,
    saved in diffusers format so the service loads it the way it loads a real model."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sdserve.tiny import generated_clip_tokenizer, save_sd1_pipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ).to(dtype)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        ).to(dtype)
        # The tokenizer's vocabulary is generated (no download); the text encoder keeps CLIP's
        # full 49408-token embedding so its size and compute match the real one.
        tokenizer = generated_clip_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).to(dtype)
    save_sd1_pipeline(out, unet, vae, text_encoder, tokenizer)
    del unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def unet_flops_per_image_step(pipe, w: int, h: int, device: str, dtype) -> float:
    """FLOPs of one UNet call for one image with classifier-free guidance (batch of 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latents = torch.randn(2, 4, h // 8, w // 8, device=device, dtype=dtype)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.unet(latents, t, encoder_hidden_states=context)
    return float(counter.get_total_flops())


def run_gpu(args, workdir: Path) -> dict:
    import base64
    import io

    import httpx
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    w, h = (int(x) for x in args.size.split("x"))
    t0 = time.perf_counter()
    model = Path(args.model) if args.model else workdir / "sd15-random"
    if not (model / "model_index.json").is_file():  # a named dir is kept for the next run
        build_sd15_random(model, device, dtype)
    log(f"gpu: model ready in {time.perf_counter() - t0:.0f}s: {model}")

    # The original design's plain usage: one pipeline, the checkpoint's PNDM, one request at a time.
    pipe = StableDiffusionPipeline.from_pretrained(
        model, dtype=dtype, safety_checker=None, local_files_only=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)

    def plain(seed: int) -> float:
        return timed_call(pipe, w, h, args.steps, seed, device)

    plain(10_000)
    plain_times = [plain(i) for i in range(args.plain_images)]
    flops = unet_flops_per_image_step(pipe, w, h, device, dtype)
    pipe = None
    if device == "cuda":
        torch.cuda.empty_cache()

    serve_args = ["--device", device, "--warmup-sizes", args.size, "--max-batch", str(args.max_batch)]
    serve_args += ["--queue-size", "256", "--default-scheduler", "PNDM", "--default-steps", str(args.steps)]
    if args.compile:
        serve_args += ["--compile"]  # warm-up compiles this one size at batch 1 and MAX_BATCH
    with service_process(model, workdir, serve_args, {}) as url:
        log(f"gpu: service, {args.clients} concurrent clients")
        per_client = max(1, args.concurrent_images // args.clients)
        conc = concurrent_http(url, args.clients, per_client, args.size, args.steps, "PNDM")
        # Same seed alone, then inside a batch: a blocker with other steps keeps the worker busy
        # while max_batch requests (seed 4242 first) queue up and then run as one batch.
        with httpx.Client(timeout=600) as client, cf.ThreadPoolExecutor(args.max_batch + 1) as pool:
            alone = post_image(client, url, args.size, args.steps, 4242, "PNDM")["data"][0]["b64_json"]
            blocker = pool.submit(post_image, client, url, args.size, args.steps * 2, 1, "PNDM")
            while client.get(url + "/sdapi/v1/progress").json()["state"]["sampling_steps"] != args.steps * 2:
                time.sleep(0.01)
            before = batch_stats(url)
            seeds = range(4242, 4242 + args.max_batch)
            futures = [pool.submit(post_image, client, url, args.size, args.steps, s, "PNDM") for s in seeds]
            batched = futures[0].result()["data"][0]["b64_json"]
            for f in [blocker, *futures[1:]]:
                f.result()
            after = batch_stats(url)
        seed_batch = (after[0] - before[0] - 1) / max(1.0, after[1] - before[1] - 1)  # without the blocker

    def px(b64: str):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64)

    seed_diff = float(np.abs(px(alone) - px(batched)).mean())
    p = summary(plain_times)
    plain_ips = 1 / p["mean_s"]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    util = conc["images_per_s"] * args.steps * flops / (peak * 1e12) if peak else None
    return {
        "mode": "gpu",
        "device": name,
        "model": "SD 1.x architecture, random weights",
        "size": args.size,
        "steps": args.steps,
        "scheduler": "PNDM",
        "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile,
        "plain_sequential": p,
        "plain_images_per_s": plain_ips,
        "service_concurrent": conc,
        "ratio": conc["images_per_s"] / plain_ips,
        "unet_tflop_per_image_step_cfg": flops / 1e12,
        "peak_tflops": peak,
        "unet_share_of_peak": util,
        "same_seed_mean_abs_diff_alone_vs_batch": seed_diff,
        "same_seed_check_mean_batch": seed_batch,
    }


def print_gpu(r: dict) -> None:
    c = r["service_concurrent"]
    print(f"\nGPU {r['device']}, {r['model']}, {r['size']}, {r['scheduler']} {r['steps']} steps")
    print(f"dtype {r['dtype']}, compile={r['compile']}")
    print(f"{'':44}{'images/s':>10}{'p50 s':>9}")
    plain = "plain StableDiffusionPipeline, 1 at a time"
    print(f"{plain:44}{r['plain_images_per_s']:10.2f}{r['plain_sequential']['p50_s']:9.2f}")
    label = f"service, {c['clients']} clients (batching)"
    print(f"{label:44}{c['images_per_s']:10.2f}{c['p50_s']:9.2f}")
    print(f"ratio: {r['ratio']:.2f}x (target >= 2.5x on H100/H200); mean batch {c['mean_batch_size']:.2f}")
    if r["unet_share_of_peak"] is not None:
        tflop, peak, share = (
            r["unet_tflop_per_image_step_cfg"],
            r["peak_tflops"],
            r["unet_share_of_peak"] * 100,
        )
        print(f"UNet: {tflop:.3f} TFLOP per image-step (CFG); {share:.1f}% of the {peak:.0f} TFLOP/s peak")
    diff, batch = r["same_seed_mean_abs_diff_alone_vs_batch"], r["same_seed_check_mean_batch"]
    print(f"same seed alone vs in a batch (mean batch {batch:.1f}): mean |diff| {diff:.3f} (0-255 scale)")


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument(
        "--model",
        help="a diffusers model dir; default: cpu the tiny model, gpu SD 1.x with random weights "
        "(gpu: built into --model DIR when DIR holds no model yet, and kept there)",
    )
    ap.add_argument("--size", help="WxH; default cpu 128x128, gpu 512x512")
    ap.add_argument("--steps", type=int, help="default cpu 20, gpu 50")
    ap.add_argument(
        "--scheduler", default="DPM++ 2M Karras", help="cpu mode (gpu mode uses PNDM as the original design)"
    )
    ap.add_argument("--requests", type=int, default=30, help="cpu: sequential requests per side")
    ap.add_argument("--strength", type=float, default=0.5, help="cpu: image to image's strength")
    ap.add_argument("--plain-images", type=int, default=12, help="gpu: images for the plain pipeline")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--concurrent-images", type=int, help="images over all clients; default cpu 32, gpu 96")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--torch-threads", type=int, default=1, help="cpu: torch threads for both sides")
    ap.add_argument("--compile", action="store_true", help="gpu: torch.compile the service's UNet (one size)")
    ap.add_argument(
        "--peak-tflops", type=float, help="gpu: dense fp16 peak of the device if not in the built-in table"
    )
    ap.add_argument(
        "--device", default="cuda", help=argparse.SUPPRESS
    )  # gpu mode on cpu: a dry run of its code paths
    ap.add_argument("--out", default="bench-service.json", help="JSON results")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.torch_threads))  # before torch starts its thread pool

    import torch

    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if mode == "gpu" and args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_service: --mode gpu needs a CUDA device (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 2
    args.size = args.size or ("512x512" if mode == "gpu" else "128x128")
    args.steps = args.steps or (50 if mode == "gpu" else 20)
    args.concurrent_images = args.concurrent_images or (96 if mode == "gpu" else 32)
    with tempfile.TemporaryDirectory(prefix="sdserve-bench-") as tmp:
        workdir = Path(tmp)
        result = run_gpu(args, workdir) if mode == "gpu" else run_cpu(args, workdir)
    result["machine"] = machine()
    (print_gpu if mode == "gpu" else print_cpu)(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
