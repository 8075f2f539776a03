"""SIGKILL of a Delta scoring job at twelve moments, each followed by the next run resuming: every
input id in the table exactly once at the end, never twice in between, as deltalake reads it.

Each run is a real process (the scoring job run inline, forked from a process that imported it
once, so a run costs about a second, not a Ray start) killed by SIGKILL: six times at a chosen step of the commit protocol (a data file
written and not committed, a commit record written before its log entry, a log entry just made),
six times at a random moment while files are being written and committed. ``lock=false``: the table's log, not the lease, keeps the rows once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deltalake")
from deltalake import DeltaTable  # noqa: E402

from tests.pipelines.test_delta_sink import table_ids as delta_table_ids, write_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

#: A fork server: imports the scoring job once, then for each moment read from stdin forks a child
#: that runs the job (inline) and SIGKILLs itself at that moment, waits for it and prints its exit
#: status. The children are real processes killed by a real SIGKILL; forking spares each of them
#: the 5 s of importing torch and transformers. Moments: ``written:<n>`` after the write stage's
#: n-th batch of files is on storage, before its commit; ``record:<n>`` after the n-th commit
#: record, before its log entry; ``committed:<n>`` after the n-th log entry; ``streaming:<s>``
#: ``s`` seconds after the first file is written, wherever the job then is (writing, committing,
#: scoring); ``none:0`` not at all.
FORK_SERVER = """
import json, os, signal, sys, threading
import torch, transformers  # noqa: F401 - imported once, before any fork
from pipelines.sink import delta
from pipelines.score import ScoreConfig, run_score
import pipelines.score.run  # noqa: F401

cfg = ScoreConfig(**json.loads(sys.argv[1]))

def child(where, arg):
    calls = []

    def kill_on(n):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if where in ("written", "streaming"):
        stage = delta.DeltaSink.write_stage
        def write_stage(self, *args):
            fn, kwargs = stage(self, *args)
            def killing(*a, **k):
                if where == "streaming" and not calls:  # the first file: a timer from here
                    calls.append(1)
                    threading.Timer(float(arg), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
                out = fn(*a, **k)
                if where == "written":
                    kill_on(int(arg))
                return out
            return killing, kwargs
        delta.DeltaSink.write_stage = write_stage
    elif where in ("record", "committed"):
        name = {"record": "_write_record_file", "committed": "_commit_records"}[where]
        original = getattr(delta.DeltaSink, name)
        def patched(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if name != "_write_record_file" or "added" in args[0]:
                kill_on(int(arg))
            return result
        setattr(delta.DeltaSink, name, patched)
    manifest = run_score(cfg, inline=True)
    with open(os.environ["MTCLS_RESULT"], "w") as fh:
        json.dump({"rows_scored_this_run": manifest["rows_scored_this_run"], "status": manifest["status"]}, fh)

for line in sys.stdin:
    where, arg = line.strip().split(":")
    pid = os.fork()
    if pid == 0:
        try:
            child(where, arg)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


class Jobs:
    """The fork server, one job per :meth:`run`."""

    def __init__(self, config: dict, result: Path) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "MTCLS_RESULT": str(result),
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, json.dumps(config)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, moment: str) -> int:
        """Runs one job, killed at ``moment``; returns its exit status (``-9``: killed)."""
        self.proc.stdin.write(moment + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()[-3000:]
        return int(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def table_ids(out: Path) -> list[str]:
    """The table's ids as deltalake reads them; none before the first commit made the table."""
    return delta_table_ids(out) if (out / "_delta_log").exists() else []


def test_sigkill_at_twelve_moments_then_a_rerun_leaves_every_id_once(tmp_path, tiny_model_dir):
    ids = write_inputs(tmp_path / "in", files=12, rows=150)
    out = tmp_path / "out"
    config = dict(input=str(tmp_path / "in"), output=str(out), model=str(tiny_model_dir), output_format="delta",
                  lock=False, progress=False, precision="fp32", rows_per_file=50, block_rows=25, commit_every_files=2)
    rng = random.Random(20261208)
    moments = ["written:1", "record:1", "committed:1", "written:3", "record:2", "committed:2",
               *[f"streaming:{rng.uniform(0.0, 0.3):.3f}" for _ in range(6)]]
    jobs = Jobs(config, tmp_path / "result.json")
    kills, seen = 0, []
    for moment in moments:
        status = jobs.run(moment)
        assert status in (-signal.SIGKILL, 0), moment
        kills += status == -signal.SIGKILL
        now = table_ids(out)
        assert len(now) == len(set(now)) and set(now) <= set(ids), moment  # never a row twice, never a foreign one
        assert len(now) >= len(seen[-1] if seen else []), moment  # a kill never takes committed rows away
        seen.append(now)
        if len(now) == len(ids):
            break
    assert kills >= 10, f"only {kills} of the runs were killed: the corpus is too small for the moments"
    assert any(0 < len(s) < len(ids) for s in seen)  # the kills interrupted the job part way

    assert jobs.run("none:0") == 0
    jobs.close()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "complete" and result["rows_scored_this_run"] == len(ids) - len(seen[-1])
    got = table_ids(out)
    assert sorted(got) == sorted(ids)
    # Killed runs leave data files no version references; none of them is read.
    referenced = set(DeltaTable(str(out)).get_add_actions(flatten=True).column("path").to_pylist())
    assert referenced <= {p.name for p in out.glob("part-*.parquet")}
