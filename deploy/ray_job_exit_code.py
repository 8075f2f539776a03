"""Waits for a Ray job and exits with its entrypoint's exit code.

    ray job submit --address A --submission-id ID --working-dir . -- python -m jobs.score ...
    python deploy/ray_job_exit_code.py --address A ID          # exit status: the entrypoint's

``ray job submit`` exits 1 for any failed job (and 0 for a stopped one), so a scheduler behind it
cannot tell exit status 2 (bad config or input) or 3 (drift alert) from a crash. The job server
keeps the entrypoint's exit code (``JobDetails.driver_exit_code``); this script reads it:

- ``SUCCEEDED``: 0;
- ``FAILED`` with an exit code: that code (a driver killed by signal N: 128 + N, as a shell says);
- ``FAILED`` without one (the entrypoint never started, for example its runtime environment
  could not be set up), ``STOPPED``, or no such job (the submission itself failed): 1.

With ``--wait-only`` it waits until each given job that exists has ended and exits 0: a
scheduler's retry uses it to let an earlier attempt of the same night finish before it submits
again (the new run then resumes from what that attempt committed, instead of finding the output
held by it).

Needs ``ray[default]`` (the job SDK), as ``ray job submit`` does.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional, Sequence

POLL_S = 5.0
#: Exit status for everything that is not the entrypoint's own code: a failure to retry.
OTHER_FAILURE = 1


def exit_code_of(status: str, driver_exit_code: Optional[int]) -> int:
    """The exit status a scheduler should see for a finished Ray job.

    Args:
        status: The job's terminal status (``SUCCEEDED``, ``FAILED`` or ``STOPPED``).
        driver_exit_code: The entrypoint's exit code as the job server recorded it (None when the
            entrypoint never ran to an exit, or was stopped).

    Returns:
        0 for a success, the entrypoint's code for a failed entrypoint (128 + N for signal N), else 1.
    """
    status = str(status).rsplit(".", 1)[-1].upper()  # JobStatus.FAILED or "FAILED"
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code is not None and driver_exit_code != 0:
        return 128 - driver_exit_code if driver_exit_code < 0 else driver_exit_code
    return OTHER_FAILURE


def _is_missing(exc: Exception) -> bool:
    return isinstance(exc, RuntimeError) and "status code 404" in str(exc)


def wait_for(client: Any, submission_id: str, poll_s: float = POLL_S) -> Optional[Any]:
    """Polls a job until it reaches a terminal status.

    Returns:
        Its ``JobDetails``, or None when the job server has no such job.
    """
    while True:
        try:
            info = client.get_job_info(submission_id)
        except RuntimeError as exc:
            if _is_missing(exc):
                return None
            raise
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Wait for a Ray job; exit with its entrypoint's exit code.")
    parser.add_argument("--address", required=True, help="job server address, e.g. http://HEAD:8265")
    parser.add_argument("--wait-only", action="store_true",
                        help="wait for every given job that exists to end, then exit 0")
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="seconds between status checks")
    parser.add_argument("submission_ids", nargs="+", metavar="SUBMISSION_ID")
    args = parser.parse_args(argv)
    if not args.wait_only and len(args.submission_ids) != 1:
        parser.error("give exactly one SUBMISSION_ID (or --wait-only)")

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    for sid in args.submission_ids:
        info = wait_for(client, sid, args.poll_s)
        if info is None:
            if args.wait_only:
                continue
            print(f"ray job {sid}: no such job on {args.address} (the submission failed); exit status {OTHER_FAILURE}")
            return OTHER_FAILURE
        code = exit_code_of(info.status, info.driver_exit_code)
        status = getattr(info.status, "value", info.status)
        print(f"ray job {sid}: {status}, entrypoint exit code {info.driver_exit_code}; exit status {code}")
        if not args.wait_only:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
