"""Each baseline property test fails when its property is broken (`make check-mutations`).

For every entry of MUTATIONS: a scratch git worktree of HEAD gets one source edit that breaks one defining property
(the Fisher squared after summing, N-LoRA's λ dropped, ...), the one test that guards the property runs against that
worktree, and the test must fail; the edit is undone before the next. The same tests run first on the untouched
worktree and must pass, so a failure is the mutation's. Prints one JSON line per mutation; exit 1 if any mutation
survives (its test passed with the property broken). Not collected by pytest: it edits source, and runs ~4 min.

    python tests/mutations.py [NAME_SUBSTRING ...]
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    test: str


_SDLORA_ATTACH = "            self.parts[name] = self._attach(name, B, alpha if constant is None else constant)\n"
MUTATIONS = [
    Mutation(
        "ewc: Fisher as the square of the summed gradient",
        "harness/methods/ewc.py",
        "fisher[key] += (per_example**2).sum(dim=0)",
        "fisher[key] += per_example.sum(dim=0) ** 2 / per_example.shape[0]",
        "tests/test_baselines.py::test_ewc_batched_fisher_is_the_mean_of_per_example_squared_gradients",
    ),
    Mutation(
        "nlora: lambda ignored",
        "harness/methods/nlora.py",
        "return lam * update_l1(self._pairs) if lam > 0 else None",
        "return 0.0 * update_l1(self._pairs) if lam > 0 else None",
        "tests/test_baselines.py::test_nlora_a_larger_lambda_moves_the_new_adapter_less",
    ),
    Mutation(
        "nlora: the tiles' gradient of A without the sign",
        "harness/methods/nlora.py",
        "gA.addmm_(rows.T, sign)",
        "gA.addmm_(rows.T, sign.abs())",
        "tests/test_baselines.py::test_nlora_tiled_l1_equals_the_dense_product_in_value_and_gradients",
    ),
    Mutation(
        "inflora: padded tokens in the covariance",
        "harness/methods/inflora.py",
        "masked = self._mask is not None and self._mask.shape == x.shape[:-1]",
        "masked = False",
        "tests/test_inflora_covariance.py::test_the_covariance_is_of_module_inputs_over_non_padded_tokens",
    ),
    Mutation(
        "inflora: the top-r solver's eigenvectors smallest first",
        "harness/methods/inflora.py",
        "return torch.from_numpy(vecs[:, ::-1].copy())",
        "return torch.from_numpy(vecs.copy())",
        "tests/test_baselines.py::test_inflora_top_r_solver_and_shared_inputs_give_the_full_decompositions_result",
    ),
    Mutation(
        "migu: gradient rows not masked",
        "harness/methods/migu.py",
        "W.grad.mul_(mask.to(W.grad.dtype).unsqueeze(-1))",
        "W.grad.mul_(1.0)",
        "tests/test_baselines.py::test_migu_unselected_rows_stay_on_a_first_step_but_adamw_momentum_moves_them_later",
    ),
    Mutation(
        "osf: no re-projection after the AdamW step",
        "harness/methods/osf.py",
        'layer.osf_svd_params[ADAPTER]["U_low"].copy_(U)\n            layer.osf_svd_params[ADAPTER]["V_low"].copy_(V)',
        "pass",
        "tests/test_osf.py::test_training_leaves_each_weights_part_in_its_frozen_subspace_unchanged_and_the_trained_"
        "factors_orthogonal",
    ),
    Mutation(
        "sdlora: earlier directions not normalised",
        "harness/methods/sdlora.py",
        "return 1.0 / (scaling * norm) if norm > 0 else 0.0",
        "return 1.0 / scaling if norm > 0 else 0.0",
        "tests/test_sdlora.py::test_each_module_adds_the_sum_of_alpha_times_normalised_earlier_directions_plus_the_"
        "scaled_new_adapter",
    ),
    Mutation(
        "sdlora: earlier directions left trainable",
        "harness/methods/sdlora.py",
        _SDLORA_ATTACH,
        _SDLORA_ATTACH
        + "            for _, layer in self.adapters.layers():\n"
        + "                layer.lora_B[name].parametrizations.weight.original.requires_grad_(True)\n",
        "tests/test_sdlora.py::test_only_the_new_adapter_and_every_magnitude_train_and_earlier_directions_stay_bit_"
        "identical",
    ),
    Mutation(
        "cost: the method's teardown time not recorded",
        "harness/run/sequence.py",
        '"method_teardown_s": teardown_s}',
        '"method_teardown_s": 0.0}',
        "tests/test_baselines.py::test_a_methods_own_setup_and_teardown_time_is_recorded_per_stage_and_in_total",
    ),
]


def pytest(tree: Path, tests: list[str]) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)


def check(tree: Path, m: Mutation) -> dict:
    path = tree / m.file
    src = path.read_text()
    if src.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the text to break occurs {src.count(m.old)} times in {m.file}; update MUTATIONS")
    path.write_text(src.replace(m.old, m.new))
    t0 = time.monotonic()
    try:
        out = pytest(tree, [m.test])
    finally:
        path.write_text(src)
    error = next((line for line in out.stdout.splitlines() if line.startswith("E ")), "")
    return {
        "mutation": m.name,
        "test": m.test,
        "test_failed": out.returncode == 1,
        "first_error": error[:200],
        "s": round(time.monotonic() - t0),
    }


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or any(n in m.name for n in names)]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True)
        try:
            control = pytest(tree, sorted({m.test for m in chosen}))
            if control.returncode != 0:
                print(control.stdout[-3000:], file=sys.stderr)
                raise SystemExit("the tests fail on the untouched HEAD: fix them before checking mutations")
            results = [check(tree, m) for m in chosen]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    for r in results:
        print(json.dumps(r))
    survived = [r["mutation"] for r in results if not r["test_failed"]]
    print(
        f"{len(results) - len(survived)} of {len(results)} mutations caught"
        + (f"; survived: {survived}" * bool(survived))
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
