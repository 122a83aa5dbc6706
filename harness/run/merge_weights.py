"""How `harness merge` sets the weight of each task adapter: the merge protocols (knob `merge_protocol`).

- paper: the LoRI paper's hand-set weights, by method and number of adapters, from the authors' scripts
  (scripts/merge_3_loras.sh, merge_4_loras.sh: `--weights` with `--combination_type cat` and `linear`):
  3 adapters LoRI-D 0.5, LoRI-S 0.4; 4 adapters LoRI-D 0.4, LoRI-S 0.3. The scripts name no weights for other
  methods; dense adapters (LoRA and the rest) take LoRI-D's, the same structure without a mask. The paper gives no
  weights for 2 adapters or more than 4, so a pair merge (merge_pairs) keeps the weight of the full merge, and other
  task counts are refused.
- tuned: every adapter at the candidate of merge_weight_grid that scores best on the validation split (chosen per
  method, seed and combination; `select` below).
- fixed: merge_weights as given (one for all, or one per task).
- equal: 1/T each (T adapters): the plain average.
Several protocols in one run share the task adapters and the single-adapter matrix; each gets its own merges, labelled
`<combination>@<protocol>` (with one protocol the label is the combination, as before protocols existed).
"""

from __future__ import annotations

from harness.config import ExperimentConfig
from harness.errors import ConfigError

PAPER_WEIGHTS: dict[str, dict[int, float]] = {"lori-d": {3: 0.5, 4: 0.4}, "lori-s": {3: 0.4, 4: 0.3}}
DENSE = "lori-d"  # whose paper weights methods without their own take


def protocols(cfg: ExperimentConfig, n_tasks: int) -> list[str]:
    """The run's protocols: merge_protocol, else tuned with a grid, fixed with merge_weights, paper for 3 or 4 tasks,
    else equal."""
    if cfg.merge_protocol:
        return list(dict.fromkeys(cfg.merge_protocol))
    if cfg.merge_weight_grid is not None or cfg.merge_weights is not None:
        return ["tuned" if cfg.merge_weight_grid is not None else "fixed"]
    return ["paper" if n_tasks in PAPER_WEIGHTS[DENSE] else "equal"]


def check(cfg: ExperimentConfig, tasks: list[str]) -> None:
    """ConfigError (exit 2, before anything is written) for a protocol this run cannot apply."""
    chosen = protocols(cfg, len(tasks))
    if "tuned" in chosen and cfg.merge_weight_grid is None:
        raise ConfigError("--merge-protocol tuned needs --merge-weight-grid (candidate weights, e.g. 0.25,0.5,0.75,1)")
    if "fixed" in chosen and cfg.merge_weights is None:
        raise ConfigError("--merge-protocol fixed needs --merge-weights (one weight, or one per task)")
    if "paper" in chosen and len(tasks) not in PAPER_WEIGHTS[DENSE]:
        raise ConfigError(
            f"--merge-protocol paper: the LoRI paper sets weights for 3 or 4 adapters, this merge has {len(tasks)} "
            f"({', '.join(tasks)}); choose tasks with --tasks, or use --merge-protocol tuned or fixed"
        )
    if cfg.merge_weights is not None and len(cfg.merge_weights) not in (1, len(tasks)):
        raise ConfigError(
            f"--merge-weights: give one weight or one per task ({len(tasks)}: {', '.join(tasks)}), got {cfg.merge_weights}"
        )


def weights_for(cfg: ExperimentConfig, method: str, n: int, protocol: str) -> list[float] | None:
    """The n adapters' weights under a protocol (tuned: None, chosen on the validation split at merge time)."""
    if protocol == "tuned":
        return None
    if protocol == "fixed":
        assert cfg.merge_weights is not None
        return list(cfg.merge_weights) * n if len(cfg.merge_weights) == 1 else list(cfg.merge_weights)[:n]
    if protocol == "equal":
        return [1.0 / n] * n
    return [PAPER_WEIGHTS.get(method, PAPER_WEIGHTS[DENSE])[n]] * n


def label(combination: str, protocol: str, all_protocols: list[str]) -> str:
    """A merge's name in summary.json, documents.json, merged.csv and the report."""
    return combination if len(all_protocols) == 1 else f"{combination}@{protocol}"


def select(grid: list[float], extend: int, score) -> dict:
    """The tuned protocol's choice: score(w) for each candidate w of the grid (the same weight for every adapter), the
    best wins (the first on a tie). A best weight at an end of the grid is pushed past it (half the lowest, twice the
    highest), up to `extend` times, until it is interior. Returns merged.json's `weight_selection`."""
    scores = {w: score(w) for w in grid}
    extended = []
    for _ in range(extend):
        chosen = max(scores, key=scores.get)
        if chosen not in (min(scores), max(scores)) or len(scores) < 2:
            break
        w = chosen / 2 if chosen == min(scores) else chosen * 2
        scores[w] = score(w)
        extended.append(w)
    chosen = max(scores, key=scores.get)
    edge = chosen in (min(scores), max(scores)) and len(scores) > 1
    return {
        "split": "validation",
        "candidates": [{"weight": w, "validation_score": v} for w, v in scores.items()],
        "chosen": chosen,
        "extended": extended,
        "at_grid_end": edge,
    }
