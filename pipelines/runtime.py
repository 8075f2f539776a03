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


#: Set by :func:`setup_logging`; read by :func:`init_ray` and passed to Ray's workers.
VERBOSE_ENV = "MTCLS_VERBOSE"
#: Ray Data's logging config (its default, console at WARNING) for the workers to write and use.
_RAY_DATA_CONFIG_ENV = "MTCLS_RAY_DATA_LOGGING"
_RAY_DATA_LOGGING = "RAY_DATA_LOGGING_CONFIG"


def is_verbose() -> bool:
    """Whether this process shows Ray's progress bars and INFO logs (``verbose=true`` of the job)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def setup_logging(verbose: Optional[bool] = None) -> None:
    """Logging of a job's process: the project's INFO lines, and Ray's console output per ``verbose``.

    Quiet (``verbose=False``, the jobs' default): Ray Data's and Ray Train's INFO lines, progress
    bars and execution plans, transformers' progress bars and Ray's own deprecation warnings stay
    off the console. Ray's log files (``/tmp/ray/session_latest/logs``: ``ray-data*.log``,
    ``train/ray-train-sys-*.log``, the worker and core-worker logs) keep everything either way.

    Args:
        verbose: Show Ray's progress bars and INFO logs; None keeps what the process was started
            with (a Ray worker: its job's setting).
    """
    if verbose is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    logging.basicConfig(level=os.environ.get("MTCLS_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipelines.storage import RedactingFilter

    for handler in logging.getLogger().handlers:  # credentials in a URI never reach the console
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if not is_verbose():
        _quiet_python()


def init_ray(verbose: Optional[bool] = None) -> None:
    """Connects to the cluster (``RAY_ADDRESS``, set by ``ray job submit``; ``auto``: the one a
    ``ray start`` on this machine runs) or starts a local Ray.

    Logs one line: the cluster's address, CPUs and GPUs, and the dashboard. Every worker of the job
    runs :func:`worker_setup` first (quiet output unless ``verbose``).

    Args:
        verbose: Ray's INFO logs and progress bars on the console; None: as :func:`setup_logging` set it.
    """
    import ray

    if ray.is_initialized():
        return
    if verbose is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    loud = is_verbose()
    if not loud:
        _quiet_process(build=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Ray Data 2.60 lists Parquet footers with a pool of 32 actors per read, whatever the
        # cluster's size: on a laptop that is 32 worker processes started for one small read (and
        # the raylet's "worker processes have been started" warning). A local cluster gets one
        # per CPU; the variable is inherited by the cluster's processes.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(2, min(32, os.cpu_count() or 2))))
    # Without RAY_ADDRESS: a new local cluster ("local"), never the cluster that Ray's address file
    # (/tmp/ray/ray_current_cluster, left by the last `ray start` on this machine, even a dead one)
    # names. RAY_ADDRESS=auto joins that one.
    context = ray.init(address=address or "local", log_to_driver=True, logging_level=logging.INFO if loud else logging.WARNING,
                       runtime_env=_runtime_env(loud))
    data_progress(loud)
    resources = ray.cluster_resources()
    dashboard = getattr(context, "dashboard_url", None)
    logging.getLogger(__name__).info(
        "ray: %s %s, %g CPUs, %g GPUs%s", "connected to" if address else "started a local cluster at",
        ray.get_runtime_context().gcs_address, resources.get("CPU", 0), resources.get("GPU", 0),
        f", dashboard http://{dashboard}" if dashboard else "")


def data_progress(show: bool) -> None:
    """Sets Ray Data's progress reporting of this process's executions (and of the datasets it makes).

    Shown: Ray Data's defaults (bars on a terminal, logged progress otherwise). Not shown: off; but
    where a quiet job's logging config is active (:func:`init_ray`) and the output is no terminal
    (``ray job submit``, a log file), Ray Data still logs its progress, which that config keeps in
    ``ray-data.log`` and off the console, and workers log instead of drawing distributed bars.

    Args:
        show: Show Ray Data's progress on the console (``verbose`` and ``progress``).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if show:
        ctx.enable_progress_bars, ctx.use_ray_tqdm = True, True
    elif os.environ.get(_RAY_DATA_CONFIG_ENV) and not _stdout_is_tty():
        ctx.enable_progress_bars, ctx.use_ray_tqdm = True, False
    else:
        ctx.enable_progress_bars = False


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def ray_train_logging() -> Any:
    """Ray Train's ``LoggingConfig`` for the run: its INFO lines on the console only when verbose
    (its system log files keep every level either way)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` of every job: runs in each worker process before its first task.

    Pins ``RAY_ADDRESS`` to this cluster (Ray Train's placement-group cleaner otherwise fails to
    find it when two Ray instances run on one host) and, unless the job is verbose, quiets the
    console as :func:`setup_logging` does. Never raises: a failing hook would fail the worker.
    """
    try:
        import ray

        if ray.is_initialized():
            os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001
        pass
    if is_verbose():
        return
    try:
        _quiet_process(build=False)
        import ray

        # Ray Train 2.60 logs each report ("Reporting training result ...") at INFO on a logger
        # named by its file path, outside "ray.train", so its LoggingConfig cannot quiet it.
        logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                                       "context.py")).setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass


def _runtime_env(loud: bool) -> dict[str, Any]:
    """The job's runtime env: :func:`worker_setup` and what it needs (none if the submitted job has its own hook)."""
    import json

    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    if submitted.get("worker_process_setup_hook"):
        logging.getLogger(__name__).warning("the submitted job has its own worker_process_setup_hook: Ray's workers "
                                            "are not quieted (see README, \"Console output\")")
        return {}
    env = {VERBOSE_ENV: "1" if loud else "0"}
    if os.environ.get(_RAY_DATA_CONFIG_ENV):
        env[_RAY_DATA_CONFIG_ENV] = os.environ[_RAY_DATA_CONFIG_ENV]
    # Nothing to install: workers need not wait for Ray's runtime-env agent at job start.
    return {"worker_process_setup_hook": f"{__name__}.worker_setup", "env_vars": env, "config": {"eager_install": False}}


def _quiet_process(build: bool) -> None:
    """Keeps Ray's and transformers' chatter off this process's console (their log files keep it).

    Args:
        build: Build Ray Data's quiet logging config if no one passed it (the driver; a worker uses the driver's).
    """
    _quiet_python()
    _quiet_ray_data(build)
    from ray.util.debug import log_once

    # Quiet jobs turn Ray Data's progress bars off on purpose, and Ray Data warns once per process
    # that they are off: marking that warning as given keeps it off the console.
    log_once("ray_data_progress_manager_disabled")


def _quiet_python() -> None:
    """Python-level quiet: Ray's own deprecation warnings, transformers' progress bars."""
    import warnings

    # Deprecations inside Ray's own code (e.g. Ray Train passing a deprecated Ray Data option):
    # nothing a user of this project can change.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _quiet_ray_data(build: bool) -> None:
    """Points ``RAY_DATA_LOGGING_CONFIG`` at Ray Data's default config with the console handler at
    WARNING (its file handler keeps DEBUG), unless the user set their own.

    Ray Data re-reads that config whenever a worker starts on a dataset, so changing handler levels
    in place would not last; a config file does. The driver builds it from Ray Data's default and
    hands its text to the workers (:data:`_RAY_DATA_CONFIG_ENV`), which write it to their node.
    """
    import hashlib
    import tempfile

    if os.environ.get(_RAY_DATA_LOGGING) and not os.environ.get(_RAY_DATA_CONFIG_ENV):
        return  # the user's own config
    text = os.environ.get(_RAY_DATA_CONFIG_ENV)
    if not text and not build:
        return
    if not text:
        import copy

        import yaml
        from ray.data._internal import logging as data_logging

        config = copy.deepcopy(data_logging.DEFAULT_CONFIG)
        config["handlers"]["console"]["level"] = "WARNING"
        text = yaml.safe_dump(config)
        os.environ[_RAY_DATA_CONFIG_ENV] = text
    path = os.path.join(tempfile.gettempdir(), f"mtcls-ray-data-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    os.environ[_RAY_DATA_LOGGING] = path
    if "ray.data" in sys.modules:  # already configured from the default: configure again
        from ray.data._internal.logging import configure_logging

        configure_logging()


class JobAlert(RuntimeError):
    """The job finished its work and wrote its output, but asks its scheduler for attention (exit status 3)."""


def run_job(main: Callable[[], Any]) -> None:
    """Runs a job's ``main``; a bad config or input exits with status 2 and a one-line message, a :class:`JobAlert` with 3."""
    from pipelines.config import ConfigError
    from pipelines.storage import InputError, redact_text

    try:
        main()
    except (ConfigError, InputError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except JobAlert as exc:
        print(f"alert: {redact_text(str(exc))}", file=sys.stderr)
        sys.exit(3)
    finally:
        _stop_ray()


def _stop_ray() -> None:
    """Disconnects from Ray (and stops the local cluster this job started) while the interpreter is
    whole: left to ``atexit``, Ray's teardown races the interpreter's and its threads can print
    tracebacks after a healthy run."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - the job's own outcome stands
        logging.getLogger(__name__).warning("ray.shutdown() failed: %s: %s", type(exc).__name__, exc)
