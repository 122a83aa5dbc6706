"""Published numbers from committed evidence: collecting it, the tables it gives, and `harness plan-seeds`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_report import doc_report  # noqa: F401  (a fixture: 2 methods x 3 seeds with documents.json)

from harness.analysis import over_seeds as OS
from harness.cli import main
from harness.errors import HarnessError
from harness.tools import tables
from harness.tools.evidence import collect, read_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def results(doc_report, tmp_path):  # noqa: F811
    """A private copy of the fixture's results folder (experiment "docs")."""
    return Path(shutil.copytree(doc_report.parent.parent.parent, tmp_path / "results"))


def test_the_published_tables_are_what_the_committed_evidence_gives():
    files = [ROOT / f for f in tables.FILES]
    assert tables.stale(files=files, root=ROOT / "results" / "evidence") == [], (
        "README.md's or docs' generated tables differ from results/evidence/: run `make tables` and commit the result"
    )


def test_collected_evidence_reads_back_as_the_same_runs_and_gives_a_table(results, tmp_path):
    root = tmp_path / "evidence"
    written = collect(results / "docs", "t", root)
    assert len(written) == 6 and all((w / "documents.json").is_file() for w in written)
    by_method = read_table(root / "t")
    assert sorted(by_method) == ["lora", "lori-s"] and [r.seed for r in by_method["lora"]] == ["0", "1", "2"]
    assert all(r.unit.scores is not None and not r.notes for r in by_method["lora"])  # documents recompute R
    block = tables.pair_block(tables.PairTable("x", "lori-s", "lora", (("s", "t"),)), root)
    assert (
        "| s | LoRI-S | 3 |" in block and "| s | LoRA | 3 |" in block and "- s, ACC (3 seeds): LoRI-S − LoRA" in block
    )
    t = OS.seed_test([r.unit for r in by_method["lori-s"]], [r.unit for r in by_method["lora"]], "ACC")
    assert f"{t.difference:+.3f}".replace("-", "−") in block
    text = "intro\n<!-- evidence:x -->\nold numbers\n<!-- /evidence:x -->\nend\n"
    assert tables.rewrite(text, {"x": block}) == f"intro\n<!-- evidence:x -->\n{block}<!-- /evidence:x -->\nend\n"


def test_the_all_methods_table_tests_each_method_against_the_lead_and_names_the_missing_cells(results, tmp_path):
    from harness.tools.methods_table import MethodsTable, methods_block

    root = tmp_path / "evidence"
    collect(results / "docs", "t", root)
    table = MethodsTable("m", "lori-s", (("s", "t"), ("other", "none")), ("lori-s", "lora", "ewc"))
    block = methods_block(table, root)
    by_method = read_table(root / "t")
    t = OS.seed_test([r.unit for r in by_method["lori-s"]], [r.unit for r in by_method["lora"]], "ACC")
    row = next(line for line in block.splitlines() if line.startswith("| s | LoRA | 3 |"))
    assert f"{t.difference:+.3f}".replace("-", "−") in row and ("decided" in row)  # one comparison: Holm p = p
    assert "| other | no evidence yet |" in block
    assert (
        "- Missing (fewer than 3 seeds at today's defaults): s: ewc 0/3; other: lori-s 0/3, lora 0/3, ewc 0/3." in block
    )


def test_a_table_never_pools_runs_made_at_other_settings(results, tmp_path):
    root = tmp_path / "evidence"
    collect(results / "docs" / "lora" / "seed-0", "t", root)
    other = results / "docs" / "lori-s" / "seed-1"
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "model": "tiny-llama"}))
    with pytest.raises(HarnessError, match="settings differ from table 't'.s in model"):
        collect(results / "docs", "t", root)
    assert [p.parent.name for p in (root / "t").rglob("summary.json")] == ["seed-0"]  # nothing half-written
    # A knob the older config.yaml does not name ran at its default: such runs pair with newer ones.
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "gradient_checkpointing": False}))
    assert len(collect(results / "docs", "t", root)) == 6
    # A method's section is written only when that method ran in the experiment: runs without it pair with runs
    # that have it (LoRA launched alone has no `lori` section) ...
    for seed in ("0", "1", "2"):
        path = results / "docs" / "lori-s" / f"seed-{seed}" / "config.yaml"
        c = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**c, "gradient_checkpointing": False, "lori": {"mask_density": 0.1}}))
    assert len(collect(results / "docs", "t", root)) == 6
    # ... but runs that have it must agree, whichever run the table holds first.
    path = results / "docs" / "lori-s" / "seed-2" / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "lori": {"mask_density": 0.5}}))
    with pytest.raises(HarnessError, match="settings differ from table 't'.s in lori;"):
        collect(results / "docs", "t", root)
    # A sequence's config also holds the sections of the experiment's other methods; they are not its settings (an
    # EWC row does not depend on `inflora`): lori-s runs that differ only in `ewc` pool.
    for seed, lam in (("0", 5.0), ("1", 5.0), ("2", 7.0)):
        path = results / "docs" / "lori-s" / f"seed-{seed}" / "config.yaml"
        c = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**c, "lori": {"mask_density": 0.1}, "ewc": {"lambda": lam}}))
    assert len(collect(results / "docs", "t", root)) == 6


def test_one_table_s_evidence_pools_into_another_at_the_same_settings(results, tmp_path):
    root = tmp_path / "evidence"
    collect(results / "docs" / "lora", "headline", root)
    collect(results / "docs" / "lori-s", "all", root)
    written = collect(root / "headline", "all", root)  # the headline's LoRA seeds join the all-methods table
    assert sorted(w.relative_to(root).as_posix() for w in written) == [f"all/lora/seed-{s}" for s in "012"]
    for w in written:
        for name in ("summary.json", "matrix.json", "documents.json", "config.yaml"):
            assert (w / name).read_bytes() == (results / "docs" / "lora" / w.name / name).read_bytes()
    assert sorted(read_table(root / "all")) == ["lora", "lori-s"]
    cfg = root / "headline" / "lora" / "seed-0" / "config.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "rank": 32}))
    with pytest.raises(HarnessError, match="settings differ from table 'all'.s in rank"):
        collect(root / "headline", "all", root)


def test_plan_seeds_answers_from_the_runs_that_exist(results, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(["plan-seeds", "docs", "--methods", "lori-s,lora", "--results-dir", str(results), "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "LoRI-S − LoRA, paired t over the seeds both ran" in printed and "seeds needed" in printed
    rows = {r["metric"]: r for r in json.loads(out.read_text())["metrics"]}
    acc = rows["ACC"]
    assert acc["n_pairs"] == 3 and acc["detectable_difference"] > 0 and set(acc["detectable_at"]) == {"5", "10", "20"}
    doc_var = acc["document_se"] ** 2
    assert acc["detectable_at"]["10"] < acc["detectable_at"]["5"]  # more seeds detect smaller differences
    if acc["seeds_needed"] is not None:
        n = acc["seeds_needed"]
        assert OS.power(acc["difference"], n, acc["sd"], doc_var) >= 0.8


def test_plan_seeds_refuses_fewer_than_2_seeds_per_method(results, capsys):
    for seed in ("1", "2"):
        shutil.rmtree(results / "docs" / "lora" / f"seed-{seed}")
    assert main(["plan-seeds", "docs", "--methods", "lori-s,lora", "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "at least 2 finished seeds of each method; lora has 1 (0)" in err
    assert main(["plan-seeds", "docs", "--methods", "lori-s,olora", "--results-dir", str(results)]) == 2
    assert "no finished sequence of olora" in capsys.readouterr().err
