"""What `dev` prints: commands a newcomer pastes into a shell as they are."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path

from workerqueue_operator.devcluster.dev import setting_warnings, usage
from workerqueue_operator.models.settings import Settings

TEXT = usage(Path("/tmp/dev-state"), 8080, temporal_address="127.0.0.1:7233", temporal_namespace="default",
             bin_dir=Path("/cache/assets"))


def command_lines() -> list[str]:
    return [line for line in TEXT.splitlines() if line.startswith("  ") and line.strip()]


def test_each_command_continues_where_it_says_so_and_parses_in_bash():
    lines = command_lines()
    for before, line in itertools.pairwise(lines):
        continued = before.endswith(" \\")
        assert continued == line.startswith("      "), (before, line)
    for line in lines:
        # A line continuation lost in the source joins two lines with the next one's indentation.
        assert not re.search(r"\S {3,}\S", line.strip()), line
    script = "\n".join(line.strip() for line in lines)
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr


def test_workflows_are_started_with_the_input_their_worker_expects():
    inputs = {match[0]: json.loads(match[1]) for match in re.findall(
        r"--workflow-id (\S+) \\\n\s+--input '([^']+)'", TEXT)}
    assert set(inputs) == {"demo-1", "demo-2", "demo-3"}
    # demo-3 is for the real worker: the protocol's AgentExecutionWorkflow input.
    assert {"execution_id", "agent_id", "organization_id", "prompt"} <= set(inputs["demo-3"])
    assert all(spec["execution_id"] == workflow_id for workflow_id, spec in inputs.items())


def test_dev_refuses_bad_settings_by_name_before_it_starts_anything(tmp_path):
    import os
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WQ_")},
           "WQ_AUTH_REVIEW_TIMEOUT_SECONDS": "inf"}
    done = subprocess.run([sys.executable, "-m", "workerqueue_operator.cli", "dev", "--state-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert "invalid setting auth_review_timeout_seconds (WQ_AUTH_REVIEW_TIMEOUT_SECONDS)" in output
    assert "Traceback" not in output and not list(tmp_path.iterdir())  # nothing started


def test_the_commands_use_the_kubectl_of_the_control_plane():
    """A kubectl on PATH may be versions older than the API server, or missing."""
    exports = [line.strip() for line in command_lines() if line.strip().startswith("export ")]
    assert exports == ["export KUBECONFIG=/tmp/dev-state/kubeconfig", "export PATH=/cache/assets:$PATH"]
    assert TEXT.index("export PATH=") < TEXT.index("kubectl get")


def test_dev_warns_of_settings_as_run_does_and_of_those_it_sets_itself():
    environ = {"WQ_TEMPORL_HOST": "typo", "WQ_TEMPORAL_HOST": "elsewhere:7233", "WQ_WORKER_BACKOFF_SECONDS": "600",
               "HOME": "/root"}
    settings = Settings.load(environ)
    lines = setting_warnings(settings, environ)
    assert lines[0] == "environment variables ignored, no such setting: WQ_TEMPORL_HOST"
    assert lines[1] == "environment variables ignored, set by dev itself: WQ_TEMPORAL_HOST"
    assert any(line.startswith("settings: worker_backoff_seconds is above") for line in lines[2:])
    assert "typo" not in "".join(lines) and "elsewhere" not in "".join(lines)  # names, never values
    assert setting_warnings(Settings(), {"HOME": "/root"}) == []
