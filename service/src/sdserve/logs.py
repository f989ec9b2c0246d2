"""JSON logs, one object a line on stdout (journald keeps them), with the request id."""

from __future__ import annotations

import contextvars
import importlib
import json
import logging
import re
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


def _not_a_torchvision_notice(record: logging.LogRecord) -> bool:
    # transformers warns at every start that its image processors fall back to PIL without
    # torchvision; the service needs neither (no safety checker by default), so it is noise.
    return "requires torchvision (not installed)" not in record.getMessage()


def quiet_library_notices() -> None:
    """Before transformers is imported: drop its start-up notices that ask nothing of an operator."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if _not_a_torchvision_notice not in logger.filters:
        logger.addFilter(_not_a_torchvision_notice)


# diffusers warns "The following part of your input was truncated because CLIP can only handle
# sequences up to 77 tokens: <the cut-off prompt text>" (and alike for other text encoders).
_TRUNCATED_TEXT = re.compile(r"(part of your input was truncated because[^:]*):.*", re.S)
REDACTED = "[text not logged; SDSERVE_LOG_PROMPTS=true logs it]"


class RedactPrompts(logging.Filter):
    """With prompt logging off, no prompt text leaves through a library's log line either. The
    service's own lines never carry prompts unless LOG_PROMPTS is on; libraries' lines that quote
    the input are cut back to what they say about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sdserve"):
            return True
        message = record.getMessage()
        redacted = _TRUNCATED_TEXT.sub(rf"\1: {REDACTED}", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid != "-":
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", log_prompts: bool = False) -> dict:
    """Configure our loggers and return a uvicorn log_config that uses the same format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    if not log_prompts:
        handler.addFilter(RedactPrompts())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings and the ML libraries' own stderr handlers would break the one-JSON-
    # object-a-line stream; route them through the root handler instead.
    logging.captureWarnings(True)
    for lib in ("transformers", "diffusers"):
        try:
            lib_logging = importlib.import_module(f"{lib}.utils.logging")
            lib_logging.disable_default_handler()
            lib_logging.enable_propagation()
        except (ImportError, AttributeError):  # not installed, or an API change: plain stderr lines then
            pass
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}
        },
        "loggers": {
            "uvicorn": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
            # Our middleware logs each request with its id and key name; uvicorn's access log would repeat it.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
