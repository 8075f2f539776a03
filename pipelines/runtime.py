"""What every job does first: parse ``--config FILE key=value ...``, set up logging, start Ray."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence


def parse_job_args(
    argv: Optional[Sequence[str]], description: str, config_cls: Optional[type] = None
) -> tuple[Optional[str], list[str]]:
    """Splits a job's command line into the config file and ``key=value`` overrides.

    Args:
        argv: The arguments (None: ``sys.argv[1:]``).
        description: One line on what the job does, shown by ``--help``.
        config_cls: The job's config model (a :class:`pipelines.config.JobConfig`); ``--help``
            then lists each of its keys with type, default and meaning, generated from the model
            (see :func:`pipelines.config.format_config_help`).

    Returns:
        The ``--config`` path (or None) and the overrides in command-line order.
    """
    from pipelines.config import format_config_help

    parser = argparse.ArgumentParser(
        description=description,
        epilog=format_config_help(config_cls) if config_cls is not None else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys as listed below)")
    parser.add_argument("overrides", nargs="*", help="key=value or a.b=value, applied on top of --config")
    args = parser.parse_args(argv)
    return args.config, list(args.overrides)


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("MTCLS_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray() -> None:
    """Connects to the cluster (``RAY_ADDRESS``, set by ``ray job submit``) or starts a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


class JobAlert(RuntimeError):
    """The job finished its work and wrote its output, but asks its scheduler for attention (exit status 3)."""


def run_job(main: Callable[[], Any]) -> None:
    """Runs a job's ``main``; a bad config or input exits with status 2 and a one-line message, a :class:`JobAlert` with 3."""
    from pipelines.config import ConfigError
    from pipelines.storage import InputError

    try:
        main()
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except JobAlert as exc:
        print(f"alert: {exc}", file=sys.stderr)
        sys.exit(3)
