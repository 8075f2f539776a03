"""The scheduler recipes in deploy/ and the exit-status contract they rely on.

The contract: 0 done; 2 bad config or input, before any work; 3 drift alert after ``_SUCCESS``;
anything else a failure whose rerun resumes. Statuses already asserted by running the job
elsewhere, not repeated here:

- 2 for an unknown key (nothing written) and for a missing input:
  ``tests/jobs/test_score_job.py::test_bad_config_fails_at_once_naming_the_key``;
- 3 for a drift alert with ``_SUCCESS`` written:
  ``tests/jobs/test_score_job.py::test_job_scores_with_a_config_and_prints_a_summary``;
- a driver SIGKILLed mid-run, then a rerun that completes the output:
  ``tests/jobs/test_score_faults.py::test_driver_killed_mid_run_then_rerun_scores_each_row_once``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.runtime import JobAlert, run_job
from pipelines.storage import InputError

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "deploy" / "airflow" / "mtcls_nightly.py"
RAYJOB_FILE = ROOT / "deploy" / "kuberay" / "rayjob-score.yaml"
CRONJOB_FILE = ROOT / "deploy" / "kuberay" / "cronjob-score.yaml"
EXIT_HELPER = ROOT / "deploy" / "ray_job_exit_code.py"
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}
DS = "2026-11-22"


def config_keys(cls: type) -> set[str]:
    """The keys of a job's config class, a pydantic model or a dataclass."""
    fields = getattr(cls, "model_fields", None)
    if fields is not None:
        return set(fields)
    return {f.name for f in dataclasses.fields(cls) if f.init}


def config_class(job: str) -> type:
    """The config class ``jobs.<job>`` parses its arguments into (the one ``*Config`` class it imports)."""
    assert importlib.util.find_spec(f"jobs.{job}") is not None, f"no job module jobs.{job}"
    module = importlib.import_module(f"jobs.{job}")
    classes = {v for n, v in vars(module).items() if n.endswith("Config") and isinstance(v, type)}
    assert len(classes) == 1, f"jobs.{job}: expected one config class, found {classes}"
    return classes.pop()


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every ``python -m jobs.<job> ARGS`` in a command string, as (job, ARGS tokens)."""
    tokens = shlex.split(text)
    found = []
    for i, token in enumerate(tokens[:-2]):
        if Path(token).name in ("python", "python3") and tokens[i + 1] == "-m" and tokens[i + 2].startswith("jobs."):
            rest = tokens[i + 3:]
            end = next((j for j, t in enumerate(rest) if t in SHELL_SEPARATORS), len(rest))
            found.append((tokens[i + 2][len("jobs."):], rest[:end]))
    return found


def validated_config(job: str, args: list[str]):
    """Checks a recipe's job arguments as the job would, and returns the config it gets."""
    config_path, overrides, rest = None, [], iter(args)
    for token in rest:
        if token == "--config":
            config_path = ROOT / next(rest)
            assert config_path.is_file(), f"jobs.{job}: --config {config_path} does not exist"
        else:
            assert "=" in token and not token.startswith("-"), f"jobs.{job}: {token!r} is not key=value"
            overrides.append(token)
    cls = config_class(job)
    unknown = sorted({o.split("=", 1)[0].split(".")[0] for o in overrides} - config_keys(cls))
    assert not unknown, f"jobs.{job}: not keys of {cls.__name__}: {unknown}"
    return load_config(cls, config_path, overrides)


# --- Airflow -----------------------------------------------------------------------------------


def dag_module():
    """The DAG file as a module; without Airflow it defines no DAG but keeps its helpers."""
    spec = importlib.util.spec_from_file_location("mtcls_nightly_under_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dag_constants(tree: ast.Module) -> dict[str, object]:
    """The DAG file's module-level literal assignments (PARAMS, the entrypoints, ...)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def render(template: str, params: dict) -> str:
    """Renders an Airflow template as Airflow would for the run of :data:`DS` (unknown names fail)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(ds=DS, ds_nodash=DS.replace("-", ""), params=params)


def test_dag_submits_real_job_commands_for_the_runs_partition():
    tree = ast.parse(DAG_FILE.read_text())
    constants = dag_constants(tree)
    params = constants["PARAMS"]
    entrypoints = {name: value for name, value in constants.items()
                   if isinstance(value, str) and "python -m jobs." in value}
    # Each task names its job and the entrypoint constant it submits.
    tasks = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PythonOperator":
            kwargs = {k.arg: k.value for k in node.keywords}
            if "op_kwargs" in kwargs:
                op = kwargs["op_kwargs"]
                values = dict(zip((ast.literal_eval(k) for k in op.keys), op.values))
                tasks[ast.literal_eval(kwargs["task_id"])] = (ast.literal_eval(values["job"]), values["entrypoint"].id)
    assert tasks == {"score": ("score", "SCORE_ENTRYPOINT"), "drift": ("drift", "DRIFT_ENTRYPOINT")}
    configs = {}
    for task, (job, constant) in tasks.items():
        commands = job_commands(render(entrypoints[constant], params))
        assert [j for j, _ in commands] == [job], f"task {task} submits {commands}"
        configs[job] = validated_config(job, commands[0][1])
    score, drift = configs["score"], configs["drift"]
    assert score.input == f"{params['corpus']}/date={DS}/" and score.output == f"{params['scores']}/date={DS}/"
    assert score.model == params["model"]
    assert score.fail_on_drift, "without fail_on_drift the job never exits 3 and the drift alert cannot fire"
    assert not score.progress
    # The drift job reads the partitions the scoring job writes: <root>/<partition_key>=<ds>/.
    assert f"{drift.root.rstrip('/')}/{drift.partition_key}={DS}/" == score.output


def test_dag_maps_every_exit_status():
    dag = dag_module()
    assert {code: dag.outcome(code) for code in (0, 2, 3, 1, 137, 255)} == {
        0: dag.DONE, 2: dag.REJECTED, 3: dag.ALERT, 1: dag.FAILED, 137: dag.FAILED, 255: dag.FAILED}
    assert dag.raise_for_exit("score", 0) == dag.DONE
    assert dag.raise_for_exit("score", 3) == dag.ALERT  # the data is complete: the task succeeds
    with pytest.raises(dag.AirflowFailException, match="exited 2: bad config or input"):
        dag.raise_for_exit("score", 2)  # not retried
    for code in (1, 137):
        with pytest.raises(dag.AirflowException, match=f"exit status {code}; retrying resumes") as info:
            dag.raise_for_exit("score", code)
        assert not isinstance(info.value, dag.AirflowFailException), "a crash must be retried"

    class TaskInstance:
        def __init__(self, score_result):
            self.score_result = score_result

        def xcom_pull(self, task_ids):
            assert task_ids == "score"
            return self.score_result

    context = {"params": dag.PARAMS, "ds": DS}
    dag.check_drift_alert(ti=TaskInstance(dag.DONE), **context)
    with pytest.raises(dag.AirflowFailException, match=rf"drift alert: .*scores/date={DS}/ \(complete: _SUCCESS"):
        dag.check_drift_alert(ti=TaskInstance(dag.ALERT), **context)


def test_the_jobs_exit_statuses_are_the_ones_the_dag_maps():
    dag = dag_module()

    def status(exc: BaseException) -> int:
        def main():
            raise exc

        with pytest.raises(SystemExit) as info:
            run_job(main)
        return info.value.code

    assert dag.outcome(status(ConfigError("key 'x': bad"))) == dag.REJECTED
    assert dag.outcome(status(InputError("input path 'x' does not exist"))) == dag.REJECTED
    assert dag.outcome(status(JobAlert("prediction drift above 0.2 on type"))) == dag.ALERT

    def crash():
        raise RuntimeError("lost a node")

    with pytest.raises(RuntimeError):  # anything else propagates: Python exits 1, a retried failure
        run_job(crash)


def test_an_attempt_submits_with_its_own_id_and_takes_the_entrypoints_exit_status(tmp_path):
    dag = dag_module()
    params = {**dag.PARAMS, "ray": "RAY", "python": "PY"}
    entrypoint = render(dag.SCORE_ENTRYPOINT, dag.PARAMS)
    first = dag.attempt_commands(params, "score", entrypoint, "20261122", 1)
    submit = ["RAY", "job", "submit", "--address", params["ray_address"], "--submission-id", "mtcls-score-20261122-1",
              "--working-dir", ".", "--", *shlex.split(entrypoint)]
    read_exit = ["PY", "deploy/ray_job_exit_code.py", "--address", params["ray_address"], "mtcls-score-20261122-1"]
    assert first == [submit, read_exit]
    assert (ROOT / read_exit[1]).is_file()
    third = dag.attempt_commands(params, "score", entrypoint, "20261122", 3)
    assert third[0] == ["PY", "deploy/ray_job_exit_code.py", "--address", params["ray_address"], "--wait-only",
                        "mtcls-score-20261122-1", "mtcls-score-20261122-2"]
    assert third[1][6] == "mtcls-score-20261122-3" and third[2][-1] == "mtcls-score-20261122-3"
    # `ray job submit` exits 1 for any failed job; the attempt's status is the exit-code reader's.
    wait, failed_submit, exit_3 = (["sh", "-c", f"echo {n} >> {tmp_path}/ran; exit {c}"]
                                   for n, c in (("wait", 0), ("submit", 1), ("read", 3)))
    assert dag.run_attempt([wait, failed_submit, exit_3], str(tmp_path)) == 3
    assert (tmp_path / "ran").read_text().split() == ["wait", "submit", "read"]
    # Earlier attempts that cannot be waited for: nothing is submitted.
    assert dag.run_attempt([["sh", "-c", "exit 1"], failed_submit, exit_3], str(tmp_path)) == 1


def test_ray_job_exit_code_maps_job_server_states():
    spec = importlib.util.spec_from_file_location("ray_job_exit_code_under_test", EXIT_HELPER)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    from ray.job_submission import JobStatus

    assert helper.exit_code_of(JobStatus.SUCCEEDED, 0) == 0
    assert helper.exit_code_of(JobStatus.FAILED, 2) == 2
    assert helper.exit_code_of(JobStatus.FAILED, 3) == 3
    assert helper.exit_code_of(JobStatus.FAILED, 1) == 1
    assert helper.exit_code_of(JobStatus.FAILED, -9) == 137  # killed by SIGKILL, as a shell reports it
    assert helper.exit_code_of(JobStatus.FAILED, None) == 1  # the entrypoint never ran
    assert helper.exit_code_of(JobStatus.STOPPED, None) == 1
    assert helper.exit_code_of("FAILED", 3) == 3


AIRFLOW_CHECK = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("mtcls_nightly", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dag = module.dag
print(json.dumps({
    "dag_id": dag.dag_id,
    "params": {k: dag.params[k] for k in dag.params},
    "timetable": type(dag.timetable).__name__,
    "tasks": {t.task_id: {"retries": t.retries, "downstream": sorted(t.downstream_task_ids),
                          "retry_delay_s": t.retry_delay.total_seconds(),
                          "op_kwargs": {k: v for k, v in (t.op_kwargs or {}).items()}} for t in dag.tasks},
    "fail": module.AirflowFailException.__module__,
}))
"""


def test_dag_imports_in_airflow_with_its_tasks(tmp_path):
    """Runs where Airflow is importable here, or under ``$MTCLS_AIRFLOW_PYTHON`` (a venv with apache-airflow)."""
    python = sys.executable if importlib.util.find_spec("airflow") else os.environ.get("MTCLS_AIRFLOW_PYTHON")
    if not python:
        pytest.skip("apache-airflow is not installed (set MTCLS_AIRFLOW_PYTHON to a Python that has it)")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run([python, "-c", AIRFLOW_CHECK, str(DAG_FILE)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    dag = dag_module()
    assert info["dag_id"] == "mtcls_nightly" and info["params"] == dag.PARAMS
    assert info["timetable"] == "CronDataIntervalTimetable"  # ds = the day that just ended
    tasks = info["tasks"]
    assert set(tasks) == {"score", "drift", "drift_alert"}
    assert tasks["score"]["downstream"] == ["drift", "drift_alert"]
    assert tasks["score"]["op_kwargs"] == {"job": "score", "entrypoint": dag.SCORE_ENTRYPOINT}
    assert tasks["drift"]["op_kwargs"] == {"job": "drift", "entrypoint": dag.DRIFT_ENTRYPOINT}
    assert tasks["score"]["retries"] > 0 and tasks["drift"]["retries"] > 0 and tasks["drift_alert"]["retries"] == 0
    # A retry must come after a dead driver's lease can be taken over (lock_timeout_s).
    assert tasks["score"]["retry_delay_s"] > config_class("score")().lock_timeout_s
    assert info["fail"].startswith("airflow.")


# --- KubeRay -----------------------------------------------------------------------------------


def test_rayjob_runs_the_scoring_job_on_a_gpu_cluster_and_deletes_it():
    import ray

    (rayjob,) = list(yaml.safe_load_all(RAYJOB_FILE.read_text()))
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["generateName"].startswith("mtcls-score-@DATE@")
    assert rayjob["metadata"]["labels"] == {"app.kubernetes.io/name": "mtcls-score", "mtcls.io/date": "@DATE@"}
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0, "retries belong to the CronJob, which reads the exit status first"
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    def containers(pod_template):
        return pod_template["spec"]["containers"]

    head = containers(cluster["headGroupSpec"]["template"])
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head)
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(c["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1 for c in containers(g["template"]))]
    assert gpu_groups and all(g["replicas"] >= 1 for g in gpu_groups)
    images = {c["image"] for c in head} | {c["image"] for g in cluster["workerGroupSpecs"] for c in containers(g["template"])}
    assert len(images) == 1, f"head and workers must run one image: {images}"
    dockerfile = (ROOT / "deploy" / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-\S*gpu\b", dockerfile, re.M)

    commands = job_commands(spec["entrypoint"].replace("@DATE@", DS))
    assert [job for job, _ in commands] == ["score"]
    cfg = validated_config("score", commands[0][1])
    assert cfg.input.endswith(f"/date={DS}/") and cfg.output.endswith(f"/date={DS}/") and cfg.input != cfg.output
    assert cfg.fail_on_drift and not cfg.progress and cfg.num_gpus_per_actor == 1


def test_rayjob_with_its_date_filled_in_is_a_valid_manifest():
    filled = yaml.safe_load(RAYJOB_FILE.read_text().replace("@DATE@", DS))
    assert "@DATE@" not in json.dumps(filled)
    assert filled["metadata"]["labels"]["mtcls.io/date"] == DS
    name = filled["metadata"]["generateName"] + "x" * 5  # what the API server appends
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47  # KubeRay's RayJob name limit


def cronjob_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(CRONJOB_FILE.read_text())}


def test_cronjob_maps_exit_statuses_with_a_pod_failure_policy():
    docs = cronjob_documents()
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] >= 1
    fail_now = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert [(r["onExitCodes"]["containerName"], r["onExitCodes"]["operator"], sorted(r["onExitCodes"]["values"]))
            for r in fail_now] == [(container["name"], "In", [2, 3])]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    rules = docs["Role"]["rules"]
    assert any(r["apiGroups"] == ["ray.io"] and "rayjobs" in r["resources"]
               and {"get", "list", "create", "delete"} <= set(r["verbs"]) for r in rules)
    # The script comes from the ConfigMap; the RayJob template from one made of rayjob-score.yaml
    # (`kubectl create configmap mtcls-rayjob-score --from-file=deploy/kuberay/rayjob-score.yaml`).
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    script = docs["ConfigMap"]
    assert volumes["script"] == script["metadata"]["name"] and "run.sh" in script["data"]
    assert container["command"] == ["/bin/sh", f"{mounts['script']}/run.sh"]
    assert volumes["template"] == "mtcls-rayjob-score"
    assert f"--from-file=deploy/kuberay/{RAYJOB_FILE.name}" in CRONJOB_FILE.read_text()
    assert f"MTCLS_TEMPLATE:-{mounts['template']}/{RAYJOB_FILE.name}" in script["data"]["run.sh"]


FAKE_KUBECTL = r'''#!{python}
"""kubectl, as far as run.sh uses it: answers from $FAKE_STATE, records each call in $FAKE_CALLS."""
import json, os, sys
import yaml

args = sys.argv[1:]
state = json.load(open(os.environ["FAKE_STATE"]))
with open(os.environ["FAKE_CALLS"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
if args[0] == "delete":
    sys.exit(0)
if args[0] == "create":
    manifest = sys.stdin.read()
    open(os.environ["FAKE_CALLS"] + ".created.yaml", "w").write(manifest)
    print(yaml.safe_load(manifest)["metadata"]["generateName"] + "abcde", end="")
    sys.exit(0)
assert args[:2] == ["get", "rayjob"], args
if "-l" in args:
    print(" ".join(state["earlier"]), end="")
    sys.exit(0)
name, output = args[2], args[args.index("-o") + 1]
if output == "name":
    print(f"rayjob.ray.io/{{name}}")
elif output == "jsonpath={{.status.jobDeploymentStatus}}":
    polls = os.environ["FAKE_CALLS"] + f".polls.{{name}}"
    n = int(open(polls).read()) if os.path.exists(polls) else 0
    open(polls, "w").write(str(n + 1))
    print("Running" if n < 2 and name not in state["earlier"] else state["deployment"], end="")
elif output == "jsonpath={{.status.jobStatus}}":
    print(state["job_status"], end="")
elif output == "jsonpath={{.status.message}}":
    print(state["message"], end="")
else:
    sys.exit(f"fake kubectl: unexpected {{args}}")
'''


def ray_failure_message(code: int) -> str:
    """Ray 2.60's job message for a failed entrypoint (dashboard/modules/job/job_supervisor.py), with a log tail."""
    return (f"Job entrypoint command failed with exit code {code}, last available logs (truncated to 20,000 chars):\n"
            "2026-11-23 02:31:02 INFO pipelines.score.run: ...\n"
            "a child process failed with exit code 9\n")


@pytest.mark.parametrize(("job_status", "deployment", "message", "expected"), [
    ("SUCCEEDED", "Complete", "Job finished successfully.", 0),
    ("FAILED", "Failed", ray_failure_message(2), 2),
    ("FAILED", "Failed", ray_failure_message(3), 3),
    ("FAILED", "Failed", ray_failure_message(1), 1),
    ("FAILED", "Failed", "Failed to set up the runtime environment", 1),
    ("STOPPED", "Complete", "Job was intentionally stopped.", 1),
])
def test_cronjob_script_exits_with_the_scoring_jobs_status(tmp_path, job_status, deployment, message, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    earlier = ["mtcls-score-2026-11-22-old01"] if expected == 1 else []
    state = {"earlier": earlier, "job_status": job_status, "deployment": deployment, "message": message}
    (tmp_path / "state.json").write_text(json.dumps(state))
    script = tmp_path / "run.sh"
    script.write_text(cronjob_documents()["ConfigMap"]["data"]["run.sh"])
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(tmp_path / "state.json"),
           "FAKE_CALLS": str(calls), "MTCLS_TEMPLATE": str(RAYJOB_FILE), "MTCLS_POLL_S": "0"}
    if expected == 0:
        env.pop("MTCLS_DATE", None)  # the default: yesterday, UTC
        day = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%d")
    else:
        env["MTCLS_DATE"] = day = DS
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == expected, result.stdout + result.stderr
    made = yaml.safe_load((tmp_path / "calls.created.yaml").read_text())
    assert made["kind"] == "RayJob" and made["metadata"]["labels"]["mtcls.io/date"] == day
    assert f"output=s3://BUCKET/scores/date={day}/" in made["spec"]["entrypoint"]
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    created_at = next(i for i, a in enumerate(log) if a[0] == "create")
    assert any(a[:2] == ["get", "rayjob"] and "-l" in a and f"mtcls.io/date={day}" in a[a.index("-l") + 1]
               for a in log[:created_at])
    for name in earlier:  # a retry waits for this night's earlier RayJob before creating its own
        assert any(a[:3] == ["get", "rayjob", name] for a in log[:created_at])
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith({0: "done", 2: "rejected", 3: "drift alert", 1: "failed"}[expected])


# --- exit statuses, for real ---------------------------------------------------------------------


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", **extra}


def test_a_crash_exits_1_and_does_not_block_the_retry(tmp_path, tiny_model_dir):
    # The Ray cluster cannot be reached (ray.init raises, as it does when the head is down): a
    # failure the job cannot classify must read neither as 2 (the retry would be skipped) nor as 3.
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), tmp_path / "in.parquet")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import ray\n"
        "def init(*args, **kwargs):\n"
        "    raise ConnectionError('could not reach the Ray cluster (injected by the test)')\n"
        "ray.init = init\n"
    )
    pythonpath = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "jobs.score", f"input={tmp_path}/in.parquet", f"output={tmp_path}/out",
               f"model={tiny_model_dir}", "progress=false"]
    dag = dag_module()
    for attempt in ("first", "retry"):  # the retry must not find the output held by the crashed attempt
        result = subprocess.run(command, cwd=ROOT, env=job_env(PYTHONPATH=pythonpath), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 1, f"{attempt}: {result.stderr[-3000:]}"
        assert "ConnectionError: could not reach the Ray cluster" in result.stderr
        assert not re.search(r"^(error|alert): ", result.stderr, re.M), result.stderr[-3000:]
        assert dag.outcome(result.returncode) == dag.FAILED
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_drift_job_without_partitions_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "scores").mkdir()
    result = subprocess.run([sys.executable, "-m", "jobs.drift", f"root={tmp_path}/scores"], cwd=ROOT, env=job_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: scores root '{tmp_path}/scores' has no partition manifests" in result.stderr
    assert list((tmp_path / "scores").iterdir()) == []
    assert dag_module().outcome(result.returncode) == "rejected"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def job_server():
    """A real ``ray start --head`` with its job server; every port its own (other Rays may run here)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    dashboard = free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay short
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={free_port()}",
         "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_hides_the_exit_status_and_the_recipes_recover_it(tmp_path, job_server):
    """Against a real job server: ``ray job submit`` exits 1 for an entrypoint's 3; the helper and
    the CronJob script's parse of the job message both give 3."""
    address, env = job_server
    ray_cli = str(Path(sys.executable).with_name("ray"))
    sid = "mtcls-test-exit-3"
    deadline = time.time() + 180
    while True:
        submit = subprocess.run(
            [ray_cli, "job", "submit", "--address", address, "--submission-id", sid, "--",
             sys.executable, "-c", "import sys; print('alert: drifted', file=sys.stderr); sys.exit(3)"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        # The head answers (or refuses) before its job server and the node's agent are up; a refused
        # submission ran nothing.
        output = submit.stdout + submit.stderr
        if "submitted successfully" in output or time.time() > deadline:
            break
        time.sleep(3)
    output = submit.stdout + submit.stderr
    assert f"Job '{sid}' submitted successfully" in output and f"Job '{sid}' failed" in output, output[-3000:]
    assert submit.returncode == 1, output[-3000:]  # not 3

    def helper(*args):
        return subprocess.run([sys.executable, str(EXIT_HELPER), "--address", address, "--poll-s", "0.5", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    result = helper(sid)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"ray job {sid}: FAILED, entrypoint exit code 3; exit status 3" in result.stdout
    assert helper("mtcls-test-never-submitted").returncode == 1
    assert helper("--wait-only", "mtcls-test-never-submitted", sid).returncode == 0
    # KubeRay copies this message into the RayJob's status; the CronJob script reads the code from it.
    from ray.job_submission import JobSubmissionClient

    message = JobSubmissionClient(address).get_job_info(sid).message
    script = cronjob_documents()["ConfigMap"]["data"]["run.sh"]
    sed = re.search(r"sed -n '(s/.*/p)'", script)[1]
    parsed = subprocess.run(["sed", "-n", sed], input=message + "\n", capture_output=True, text=True).stdout.split()
    assert parsed[:1] == ["3"], message

