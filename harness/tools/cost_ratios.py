"""`make cost-ratios`: the before/after cost of InfLoRA, EWC and N-LoRA, measured in one run by the same code.

The code before the cost changes (`--before`, default 525380e~1) is extracted with `git archive` under
`<out>/before/`; this checkout is "after". Both sides run the same measurements, interleaved (before, then after, per
method), each in its own process with that side's package first on PYTHONPATH:
- harness/tools/stage_hooks_bench.py (copied into the old tree): InfLoRA's and EWC's stage setup + teardown on the
  suite's first two tasks, and their share of the stage's training time at the suite's budget;
- `harness bench --methods inclora,nlora`: N-LoRA's training step against IncLoRA's.
Writes `<out>/ratios.json` (and each side's raw JSON) and prints the table (docs/baselines.md quotes it).

    python -m harness.tools.cost_ratios [--before REV] [--model smollm2-135m] [--suite default] [--out results/cost-ratios]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOOKS = (
    "import json, sys; from harness.config import ExperimentConfig; "
    "from harness.tools.stage_hooks_bench import run_stage_hooks; "
    "cfg = ExperimentConfig(model=sys.argv[1], suite=sys.argv[2], methods=[sys.argv[3]]); "
    "json.dump(run_stage_hooks(cfg, methods=(sys.argv[3],), suite_name=sys.argv[2], steps=int(sys.argv[4])), "
    "open(sys.argv[5], 'w'), indent=1)"
)


def _extract(rev: str, dest: Path) -> None:
    """The package as it was at `rev`, plus today's stage-hooks timer (the old code has no such mode)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "harness"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    shutil.copy(
        ROOT / "harness" / "tools" / "stage_hooks_bench.py", dest / "harness" / "tools" / "stage_hooks_bench.py"
    )


def _run(tree: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, *args], check=True, env=env, cwd=str(ROOT))
    return json.loads(out.read_text())


def _hooks_s(res: dict, method: str) -> float:
    return sum(s["method_setup_s"] + s["method_teardown_s"] for s in res["methods"][method])


def measure(before: str, model: str, suite: str, out: Path, steps: int = 3) -> dict:
    trees = {"before": out / "before", "after": ROOT}
    _extract(before, trees["before"])
    raw: dict = {side: {} for side in trees}
    for method in ("inflora", "ewc"):
        for side, tree in trees.items():
            path = out / f"{side}-{method}.json"
            raw[side][method] = _run(tree, ["-c", HOOKS, model, suite, method, str(steps), str(path)], path)
    for side, tree in trees.items():
        path = out / f"{side}-bench.json"
        raw[side]["bench"] = _run(
            tree,
            [
                "-m",
                "harness.cli",
                "bench",
                "--model",
                model,
                "--methods",
                "inclora,nlora",
                "--steps",
                "10",
                "--json",
                str(path),
            ],
            path,
        )
    ratios: dict = {
        "before": before,
        "model": model,
        "suite": suite,
        "device": raw["after"]["bench"].get("device_name"),
    }
    for method in ("inflora", "ewc"):
        b, a = _hooks_s(raw["before"][method], method), _hooks_s(raw["after"][method], method)
        ratios[method] = {
            "method_s_before": b,
            "method_s_after": a,
            "speedup": b / a if a > 0 else None,
            "share_of_stage_before": max(s["method_frac"] for s in raw["before"][method]["methods"][method]),
            "share_of_stage_after": max(s["method_frac"] for s in raw["after"][method]["methods"][method]),
        }
    for side in trees:
        rows = raw[side]["bench"]["methods"]
        ratios[f"nlora_vs_inclora_{side}"] = rows["nlora"]["step_s_median"] / rows["inclora"]["step_s_median"]
    (out / "ratios.json").write_text(json.dumps(ratios, indent=1))
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="525380e~1", help="git revision before the cost changes [default: 525380e~1]")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--suite", default="default")
    p.add_argument("--out", default="results/cost-ratios")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = measure(a.before, a.model, a.suite, out)
    for m in ("inflora", "ewc"):
        print(
            f"{m}: setup+teardown over 2 stages {r[m]['method_s_before']:.1f} s -> {r[m]['method_s_after']:.1f} s "
            f"({r[m]['speedup']:.1f}x); largest share of a stage's training {100 * r[m]['share_of_stage_before']:.0f}% -> "
            f"{100 * r[m]['share_of_stage_after']:.0f}%"
        )
    print(f"N-LoRA step / IncLoRA step: {r['nlora_vs_inclora_before']:.2f}x -> {r['nlora_vs_inclora_after']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
