"""Command line: sdserve serve | make-tiny-model | check | hash-key | info."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from . import __version__
from .settings import Settings, point_caches_at, unknown_environment


def _settings_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        name = "SDSERVE_" + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "settings"
        lines.append(
            f"{name} (--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}): {err['msg']} (got {err.get('input')!r})"
        )
    return "invalid settings:\n  " + "\n  ".join(lines)


def _load_settings(args: argparse.Namespace, names: list[str]) -> Settings:
    unknown = unknown_environment()
    if unknown:
        print(f"sdserve: {'; '.join(unknown)}", file=sys.stderr)
        raise SystemExit(2)
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        print(f"sdserve: {_settings_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def _add_setting_options(parser: argparse.ArgumentParser, only: list[str] | None = None) -> list[str]:
    """One option per setting (--max-batch for SDSERVE_MAX_BATCH); unset options leave env/defaults alone."""
    names = []
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        env = "SDSERVE_" + name.upper()
        help_text = f"{field.description or ''} [{env}]".strip()
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            choices = None
            if typing.get_origin(field.annotation) is typing.Literal:
                choices = list(typing.get_args(field.annotation))
            parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)
        names.append(name)
    return names


def cmd_serve(args: argparse.Namespace, names: list[str]) -> int:
    from .app import StartupRefused, create_app
    from .keys import KeyFileError
    from .logs import setup_logging
    from .model import ModelError, check_model_dir, optional_components

    settings = _load_settings(args, names)
    try:
        check_model_dir(settings.model, optional_components(settings))
        app = create_app(settings)  # points the caches and forces offline mode before any HF import
    except (ModelError, StartupRefused, KeyFileError) as e:
        print(f"sdserve: {e}", file=sys.stderr)
        return 2
    from .server import build_server

    server = build_server(app, settings, log_config=setup_logging(settings.log_level, settings.log_prompts))
    engine = app.state.service.engine
    engine.on_failure = lambda message: setattr(server, "should_exit", True)
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown; with the default
    # handler that kills the process (status 143). These no-op handlers let a drained
    # shutdown end with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        server.run()
    except StartupRefused as e:  # the agent check's port (AGENT_PORT) cannot be had
        print(f"sdserve: {e}", file=sys.stderr)
        return 2
    if engine.state == "failed":
        print(f"sdserve: start-up failed: {engine.error}", file=sys.stderr)
        return 1
    if not server.started:
        print(
            f"sdserve: the HTTP server did not start on {settings.host}:{settings.port} (see the log; address in use?)",
            file=sys.stderr,
        )
        return 3
    if not engine.stop(timeout=0):
        # The worker is still inside a pipeline step it could not leave (the drain said so): end
        # now, as torch's threads would abort the interpreter's own exit (SIGABRT).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    point_caches_at(Settings().cache_dir)
    from .tiny import make_tiny_model

    out = make_tiny_model(args.dir, kind=args.kind, safety_checker=args.safety_checker)
    print(out)
    return 0


def cmd_check(args: argparse.Namespace, names: list[str]) -> int:
    settings = _load_settings(args, names)
    from .engine import Engine, GenParams
    from .schedulers import resolve

    result: dict = {"ok": False, "model": str(settings.model)}
    t0 = time.perf_counter()
    engine = Engine(settings.model_copy(update={"compile": False, "warmup_sizes": ""}))
    engine.start()
    try:
        if not engine.wait_ready(timeout=args.timeout):
            raise RuntimeError(engine.error or f"model not ready after {args.timeout}s")
        result["load_seconds"] = round(time.perf_counter() - t0, 3)
        w, h = engine.model.native_size if not args.size else tuple(int(x) for x in args.size.split("x"))
        params = GenParams(w, h, args.steps, settings.default_guidance, resolve(settings.default_scheduler))
        t = time.perf_counter()
        req = engine.submit(params, "a photograph of an astronaut riding a horse", "", [args.seed])
        image = req.future.result(timeout=args.timeout)[0].image
        result.update(
            ok=True,
            device=engine.model.device,
            dtype=str(engine.model.dtype).removeprefix("torch."),
            seconds=round(time.perf_counter() - t, 3),
            size=f"{w}x{h}",
            steps=args.steps,
            pipeline=engine.model.pipeline_class,
            model_id=engine.model.model_id,
        )
        if args.output:
            image.save(args.output)
    except Exception as e:
        result["error"] = str(e)
    finally:
        engine.drain(timeout=30)
    if args.json:
        print(json.dumps(result))
    elif result["ok"]:
        print(
            f"ok device={result['device']} dtype={result['dtype']} seconds={result['seconds']} size={result['size']} steps={result['steps']} load_seconds={result['load_seconds']}"
        )
    else:
        print(f"sdserve check: FAILED: {result['error']}", file=sys.stderr)
    return 0 if result["ok"] else 1


def cmd_hash_key(args: argparse.Namespace) -> int:
    from .keys import key_line

    key = sys.stdin.readline().strip()
    try:
        print(key_line(key, args.name))
    except ValueError as e:
        print(f"sdserve hash-key: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_info(args: argparse.Namespace, names: list[str]) -> int:
    settings = _load_settings(args, names)
    point_caches_at(settings.cache_dir)
    from .model import ModelError, check_model_dir, environment_info, optional_components

    info = environment_info()
    if settings.model is not None:
        try:
            index = check_model_dir(settings.model, optional_components(settings))
            info["model"] = {
                "path": str(settings.model.resolve()),
                "id": settings.model_id or settings.model.resolve().name,
                "revision": settings.model_revision,
                "pipeline": index.get("_class_name"),
                "diffusers_version": index.get("_diffusers_version"),
            }
        except ModelError as e:
            info["model"] = {"path": str(settings.model), "error": str(e)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0 if "error" not in info.get("model", {}) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdserve", description="Stable Diffusion text-to-image service")
    parser.add_argument("--version", action="version", version=f"sdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (every option is also an SDSERVE_* variable)")
    serve_names = _add_setting_options(serve)

    tiny = sub.add_parser(
        "make-tiny-model", help="write a tiny random pipeline in diffusers format (tests, demos)"
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--kind", choices=["sd", "sdxl"], default="sd", help="SD 1.x layout (default) or SDXL layout"
    )
    tiny.add_argument(
        "--safety-checker",
        action="store_true",
        help="add a tiny safety checker that flags every image (to see its verdict in responses)",
    )

    model_opts = [
        "model",
        "model_id",
        "model_revision",
        "device",
        "dtype",
        "safety_checker",
        "cache_dir",
        "default_scheduler",
        "default_guidance",
        "vae_tiling_pixels",
        "torch_threads",
    ]
    check = sub.add_parser(
        "check", help="load the model, generate one image, print device, dtype and seconds"
    )
    check_names = _add_setting_options(check, model_opts)
    check.add_argument("--steps", type=int, default=10)
    check.add_argument("--size", default=None, help="WxH; default the model's native size")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--timeout", type=float, default=600)
    check.add_argument("--output", type=Path, help="also save the image here")
    check.add_argument("--json", action="store_true", help="print one JSON object")

    hk = sub.add_parser("hash-key", help="read a key on stdin, print its key-file line")
    hk.add_argument("--name", default="default", help="the key's name, shown in logs and metrics")

    info = sub.add_parser("info", help="versions, devices and model identity (for the node manifest)")
    info_names = _add_setting_options(info, ["model", "model_id", "model_revision", "cache_dir"])
    info.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args, serve_names)
    if args.command == "make-tiny-model":
        return cmd_make_tiny_model(args)
    if args.command == "check":
        return cmd_check(args, check_names)
    if args.command == "hash-key":
        return cmd_hash_key(args)
    if args.command == "info":
        return cmd_info(args, info_names)
    return 2


if __name__ == "__main__":
    sys.exit(main())
