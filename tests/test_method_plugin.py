"""A method from one new module, outside the package, with no edit elsewhere: its own learning-rate family, its own
knob section and its own stage file, registered through $HARNESS_METHODS and run end to end by the real CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

TOY = '''
"""A toy continual method: LoRA whose stage file records each stage's adapter norm, at its own learning rate."""
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from harness.methods import Method, register


class ToyKnobs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: float = Field(0.5, ge=0, description="A number the stage file carries.")


@register
class Toy(Method):
    name = "toy"
    display = "Toy"
    summary = "LoRA with a stage file of adapter norms (a test's method)."
    source = "tests/test_method_plugin.py"
    lr_method = "toy"
    lr_default = 3e-3
    knobs = ToyKnobs
    section = "toy"

    def save_stage(self, folder):
        super().save_stage(folder)
        norm = torch.stack([p.detach().float().norm() for p in self.trainable().values()]).sum()
        save_file({"norm": norm.reshape(1), "note": torch.tensor([self.cfg.toy.note])}, str(folder / "toy.safetensors"))

    def restore_stage(self, t, folder):
        self.restored = load_file(str(folder / "toy.safetensors"))
'''


PLAN = """
import sys
from harness.config_loading import load_config
from harness.run.planning import plan
from harness.suites import load_suite
cfg = load_config(None, {"suite": sys.argv[1], "model": "tiny-llama", "methods": ["toy", "lora"], "lr_toy": "7e-3"})
for spec in plan(cfg, load_suite(sys.argv[1])):
    print(spec.method, spec.stages[0].budget["lr"])
"""


def harness(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    (tmp / "toy_method.py").write_text(TOY)
    suite = tmp / "smoke"
    shutil.copytree(ROOT / "task_suites" / "smoke", suite)
    data = yaml.safe_load((suite / "suite.yaml").read_text())
    data["budget"]["lr"] = {**data["budget"].get("lr", {}), "toy": 5e-3}  # a suite recommends a rate for the new family
    (suite / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "HARNESS_METHODS": "toy_method", "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}"}
    return tmp, suite, env


def test_the_new_method_is_listed_with_its_own_learning_rate_flag(plugin):
    tmp, _, env = plugin
    out = harness("methods", cwd=tmp, env=env)
    assert out.returncode == 0, out.stderr
    assert "toy" in out.stdout and "--lr-toy" in out.stdout
    helped = harness("run", "--help", cwd=tmp, env=env)
    assert "--lr-toy" in helped.stdout and "--toy-note" in helped.stdout


def test_the_new_method_runs_end_to_end_with_its_family_rate_and_stage_files(plugin):
    tmp, suite, env = plugin
    common = [
        "run",
        "--suite",
        str(suite),
        "--model",
        "tiny-llama",
        "--methods",
        "toy,lora",
        "--tasks",
        "parity,weather",
        "--seeds",
        "0",
        "--max-steps",
        "2",
        "--eval-limit",
        "4",
        "--no-progress",
        "--no-report",
        "--toy-note",
        "0.25",
    ]
    out = harness(*common, "--results-dir", str(tmp / "r"), "--experiment", "x", cwd=tmp, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    seq = tmp / "r" / "x" / "toy" / "seed-0"
    assert json.loads((seq / "summary.json").read_text())["complete"]
    for stage in ("1-parity", "2-weather"):
        folder = seq / "stages" / stage
        assert json.loads((folder / "train.json").read_text())["budget"]["lr"] == 5e-3  # the suite's rate for toy
        saved = load_file(str(folder / "toy.safetensors"))
        assert saved["note"].item() == 0.25 and saved["norm"].item() > 0
        assert "toy.safetensors" in json.loads((folder / "stage.json").read_text())["sha256"]
    lora = tmp / "r" / "x" / "lora" / "seed-0" / "stages" / "1-parity" / "train.json"
    assert json.loads(lora.read_text())["budget"]["lr"] != 5e-3  # the other family keeps its own rate
    config = yaml.safe_load((seq / "config.yaml").read_text())
    assert config["toy"] == {"note": 0.25}
    verified = harness("verify", str(seq), cwd=tmp, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the family's own flag wins over the suite's rate (planned in a process that registered the module)
    planned = subprocess.run(
        [sys.executable, "-c", PLAN, str(suite)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert planned.stdout.split() == ["toy", "0.007", "lora", "0.001"]


def test_a_module_that_cannot_be_imported_says_what_to_do(plugin):
    tmp, _, env = plugin
    out = harness("methods", cwd=tmp, env={**env, "HARNESS_METHODS": "no_such_module"})
    assert out.returncode == 2 and "HARNESS_METHODS names 'no_such_module'" in out.stderr
    assert "Traceback" not in out.stderr
