"""Airflow DAG ``mtcls_nightly``: score the day's corpus partition on a Ray cluster, then update drift.

For the run's logical date ``{{ ds }}`` (the day whose data interval just ended):

    score        ray job submit ... -- python -m jobs.score input=<corpus>/date={{ ds }}/ output=<scores>/date={{ ds }}/ ...
    drift        ray job submit ... -- python -m jobs.drift root=<scores>/        (after score)
    drift_alert  fails, with its own message and callback, when score exited 3  (after score)

The jobs' exit status decides what Airflow does:

===========  ================================================  ================================
exit status  meaning                                           this DAG
===========  ================================================  ================================
0            done                                              task succeeds
2            bad config or input, before any work              task fails, no retry
3            drift alert, after ``_SUCCESS`` (data complete)   score succeeds (downstream runs);
                                                               ``drift_alert`` fails, no retry
other        a failure (crash, kill, lost node, cluster down)  task fails and retries; the rerun
                                                               resumes from the committed files
===========  ================================================  ================================

Why not ``BashOperator``: it can fail a task (with its retries) or skip it on an exit code, but
not fail it without retry; that takes an ``AirflowFailException`` raised in Python. So each task
is a ``PythonOperator`` running the same commands ``ray job submit`` users type.

Why a second command after ``ray job submit``: in Ray 2.60 ``ray job submit`` waits for the job
and exits 1 for any failed job (0 for a stopped one); the entrypoint's own exit code is only kept
by the job server (``driver_exit_code``). ``deploy/ray_job_exit_code.py`` reads it once the job
has ended and exits with it. Every attempt submits under its own id,
``mtcls-<job>-<ds_nodash>-<try_number>``; a retry first waits for earlier attempts of the same
night that may still run (an Airflow worker lost mid-job leaves its Ray job running), so the new
run resumes from their committed files instead of finding the output locked (exit 2). When the
task itself is killed (timeout, marked failed) it stops its Ray job.

Set the DAG's params (Airflow UI, or edit :data:`PARAMS`): the job server address, the project
checkout on the Airflow worker (``--working-dir .`` uploads it), the corpus, scores and model
URIs, and the ``ray`` and ``python`` of an environment with ``ray[default]`` (the Ray version of
the cluster). Only core Airflow is imported (2.x, or 3.x with its standard provider).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

#: Defaults of the DAG's params (every command below reads them as ``{{ params.<name> }}``).
PARAMS = {
    "ray_address": "http://ray-head:8265",
    "project_dir": "/opt/mtcls",
    "corpus": "s3://BUCKET/corpus",
    "scores": "s3://BUCKET/scores",
    "model": "s3://BUCKET/models/mtcls-v1/",
    "ray": "ray",
    "python": "python3",
}

SCORE_ENTRYPOINT = (
    "python -m jobs.score --config jobs/configs/score/cluster.yaml"
    " input={{ params.corpus }}/date={{ ds }}/ output={{ params.scores }}/date={{ ds }}/"
    " model={{ params.model }} fail_on_drift=true progress=false"
)
DRIFT_ENTRYPOINT = "python -m jobs.drift root={{ params.scores }}/ partition_key=date format=csv"

DONE, REJECTED, ALERT, FAILED = "done", "rejected", "alert", "failed"
#: A job's exit status -> what it means to the scheduler; any other status is FAILED.
EXIT_OUTCOMES = {0: DONE, 2: REJECTED, 3: ALERT}
#: Seconds between retries: longer than the scoring job's default ``lock_timeout_s`` (120), so a
#: retry after a driver killed without releasing its lease can take the lease over.
RETRY_DELAY_S = 300

try:
    import airflow  # noqa: F401
except ImportError:  # pragma: no cover - the helpers below stay importable (the tests use them)
    airflow = None

if airflow is not None:
    try:  # Airflow 3
        from airflow.providers.standard.operators.python import PythonOperator
        from airflow.sdk import DAG
        from airflow.sdk.exceptions import AirflowException, AirflowFailException
        from airflow.timetables.interval import CronDataIntervalTimetable
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.exceptions import AirflowException, AirflowFailException
        from airflow.operators.python import PythonOperator
        from airflow.timetables.interval import CronDataIntervalTimetable
else:

    class AirflowException(Exception):
        """Stands in for Airflow's (a failure that is retried) where Airflow is not installed."""

    class AirflowFailException(AirflowException):
        """Stands in for Airflow's (a failure that is not retried) where Airflow is not installed."""


def outcome(exit_code: int) -> str:
    """What a job's exit status means: :data:`DONE`, :data:`REJECTED`, :data:`ALERT` or :data:`FAILED`."""
    return EXIT_OUTCOMES.get(exit_code, FAILED)


def submission_id(job: str, ds_nodash: str, try_number: int) -> str:
    """The Ray submission id of one attempt of one night's job, e.g. ``mtcls-score-20261122-1``."""
    return f"mtcls-{job}-{ds_nodash}-{try_number}"


def attempt_commands(params: dict[str, Any], job: str, entrypoint: str, ds_nodash: str,
                     try_number: int) -> list[list[str]]:
    """The commands of one attempt, run in the project checkout.

    1. (retries only) wait for the earlier attempts of this night's job to end;
    2. ``ray job submit --submission-id <id> --working-dir . -- <entrypoint>`` (streams the logs);
    3. ``deploy/ray_job_exit_code.py <id>``: exits with the entrypoint's exit code.
    """
    address = params["ray_address"]
    helper = [params["python"], "deploy/ray_job_exit_code.py", "--address", address]
    earlier = [submission_id(job, ds_nodash, n) for n in range(1, try_number)]
    sid = submission_id(job, ds_nodash, try_number)
    commands = [[*helper, "--wait-only", *earlier]] if earlier else []
    commands.append([params["ray"], "job", "submit", "--address", address, "--submission-id", sid,
                     "--working-dir", ".", "--", *shlex.split(entrypoint)])
    commands.append([*helper, sid])
    return commands


def _stream(command: Sequence[str], cwd: str) -> int:
    """Runs a command, its output into the task log; kills its process group if the task is interrupted."""
    log.info("$ %s", shlex.join(command))
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            log.info("%s", line.rstrip("\n"))
        return proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait()
        raise


def run_attempt(commands: Sequence[Sequence[str]], cwd: str, stop: Optional[Sequence[str]] = None) -> int:
    """Runs :func:`attempt_commands`' commands; returns the job's exit status (the last command's).

    Args:
        commands: The commands, in order.
        cwd: The project checkout.
        stop: A command stopping this attempt's Ray job, run when the task is interrupted once the
            job may have been submitted.
    """
    *before, submit, read_exit = commands
    for command in before:
        code = _stream(command, cwd)
        if code != 0:
            log.error("waiting for earlier attempts failed (exit status %d)", code)
            return code
    try:
        code = _stream(submit, cwd)
        log.info("ray job submit exited %d (it exits 1 for any failed job; the entrypoint's own "
                 "exit status follows)", code)
        return _stream(read_exit, cwd)
    except BaseException:
        if stop:
            log.warning("interrupted: stopping the Ray job")
            subprocess.run(list(stop), cwd=cwd, timeout=60, check=False)
        raise


def raise_for_exit(job: str, exit_code: int, where: str = "") -> str:
    """Maps a job's exit status onto the task's state.

    Returns:
        :data:`DONE` or :data:`ALERT` (the task succeeds; the value goes to XCom).

    Raises:
        AirflowFailException: Exit status 2: bad config or input, nothing was done; a retry
            would fail the same way.
        AirflowException: Any other non-zero status: retried (a rerun resumes).
    """
    result = outcome(exit_code)
    if result == REJECTED:
        raise AirflowFailException(
            f"mtcls {job}{where} exited 2: bad config or input (or its output is held by another live job), "
            "rejected before any work; not retried. Fix it (the job log names the key, file or holder), then clear the task.")
    if result == FAILED:
        raise AirflowException(
            f"mtcls {job}{where} failed with exit status {exit_code}; retrying resumes from the committed files.")
    if result == ALERT:
        log.warning("mtcls %s%s exited 3: drift alert; the output is complete (_SUCCESS written)", job, where)
    return result


def run_ray_job(job: str, entrypoint: str, **context: Any) -> str:
    """The task: one attempt of ``job`` on the Ray cluster, its exit status mapped by :func:`raise_for_exit`."""
    params, ti, ds_nodash = context["params"], context["ti"], context["ds_nodash"]
    commands = attempt_commands(params, job, entrypoint, ds_nodash, ti.try_number)
    sid = submission_id(job, ds_nodash, ti.try_number)
    stop = [params["ray"], "job", "stop", "--address", params["ray_address"], "--no-wait", sid]
    code = run_attempt(commands, params["project_dir"], stop)
    return raise_for_exit(job, code, f" ({sid})")


def check_drift_alert(**context: Any) -> None:
    """Fails (no retry) when the scoring task ended with exit status 3; the data itself is complete."""
    if context["ti"].xcom_pull(task_ids="score") == ALERT:
        partition = f"{context['params']['scores']}/date={context['ds']}/"
        raise AirflowFailException(
            f"drift alert: a head's prediction mix drifted past drift_threshold in {partition} "
            f"(complete: _SUCCESS written). See 'drift' in {partition}_manifest.json and the drift task's table.")


def on_drift_alert(context: dict[str, Any]) -> None:
    """The drift alert's callback: logs it. Replace with your pager, chat or e-mail hook."""
    log.error("mtcls drift alert for %s: %s", context.get("ds"), context.get("exception"))


if airflow is not None:
    with DAG(
        dag_id="mtcls_nightly",
        description="Score the day's corpus partition with mtcls on Ray, then update the drift table",
        # ds = the start of the data interval: at 02:30 UTC the run scores the day that just ended
        # (Airflow 2 and 3 alike; Airflow 3's plain cron schedules would give ds = the run's own day).
        schedule=CronDataIntervalTimetable("30 2 * * *", timezone="UTC"),
        start_date=datetime(2026, 11, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,  # the drift task rewrites one table over all partitions
        params=PARAMS,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=RETRY_DELAY_S),
                      "execution_timeout": timedelta(hours=8)},
        tags=["mtcls"],
    ) as dag:
        score = PythonOperator(task_id="score", python_callable=run_ray_job,
                               op_kwargs={"job": "score", "entrypoint": SCORE_ENTRYPOINT})
        drift = PythonOperator(task_id="drift", python_callable=run_ray_job,
                               op_kwargs={"job": "drift", "entrypoint": DRIFT_ENTRYPOINT})
        drift_alert = PythonOperator(task_id="drift_alert", python_callable=check_drift_alert, retries=0,
                                     on_failure_callback=on_drift_alert)
        score >> [drift, drift_alert]
