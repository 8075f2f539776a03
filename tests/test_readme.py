"""The README's promises: its two opening commands, and its library example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    setup_and_run, setup_and_test = blocks[0].strip(), blocks[1].strip()
    assert README.index(setup_and_run) < README.index("## ")
    assert setup_and_run.endswith("python -m jobs.demo") and "pytest" in setup_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_and_test.replace("pip install -e", "pip install -q -e") in ci


def test_library_example_runs(capsys):
    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("[") >= 4  # four lists of labels came out
