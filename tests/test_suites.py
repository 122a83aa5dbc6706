"""Task suites: generators, data hygiene, loading/validation, lm-eval wiring, hub-suite loaders."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub from these tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from harness.config import ExperimentConfig  # noqa: E402
from harness.errors import (  # noqa: E402
    ConfigError,  # noqa: E402
    HarnessError,
    SuiteError,
)
from harness.methods import LR_FAMILIES  # noqa: E402
from harness.run.suite_knobs import check_lr_families  # noqa: E402
from harness.suites import _Subsample, format_to_jinja, list_suites, load_suite, suites_dir, validate_suite  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "task_suites"
HUB_FIXTURES = Path(__file__).resolve().parent / "data" / "hub_schema"
LOCAL_SUITES = ["default", "smoke", "mc4", "smoke15"]
HUB_SUITES = ["olora-standard", "olora-long"]


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("suite", LOCAL_SUITES)
def test_generator_reproduces_committed_files(suite, tmp_path):
    gen = SUITES / suite / "generate.py"
    for run in ("a", "b"):
        subprocess.run([sys.executable, str(gen), "--out", str(tmp_path / run)], check=True, capture_output=True)
    committed = sorted(p.name for p in (SUITES / suite / "data").glob("*.jsonl"))
    assert committed, f"no committed data for {suite}"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == committed
    for name in committed:
        a, b, c = tmp_path / "a" / name, tmp_path / "b" / name, SUITES / suite / "data" / name
        assert filecmp.cmp(a, b, shallow=False), f"{suite}/{name}: two runs differ"
        assert filecmp.cmp(a, c, shallow=False), f"{suite}/{name}: committed file is stale (run generate.py)"
        assert c.stat().st_size < 200_000


def test_smoke15_configs_are_what_its_generator_writes(tmp_path):
    """suite.yaml and the 15 lm-eval YAMLs come from generate.py's one task table."""
    subprocess.run(
        [
            sys.executable,
            str(SUITES / "smoke15" / "generate.py"),
            "--out",
            str(tmp_path / "data"),
            "--configs",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == sorted(p.name for p in (SUITES / "smoke15").glob("*.yaml")) and len(written) == 16
    for name in written:
        assert filecmp.cmp(tmp_path / name, SUITES / "smoke15" / name, shallow=False), f"smoke15/{name} is stale"


def test_smoke15_is_fifteen_small_tasks_of_both_kinds_in_one_order():
    s = load_suite("smoke15")
    assert len(s.tasks) == 15 and len(s.orders) == 1 and sorted(s.orders[0]) == sorted(s.task_names)
    kinds = [t.kind for t in s.tasks]
    assert kinds.count("multiple_choice") == 10 and kinds.count("generate") == 5
    label_sets = [tuple(t.choices) for t in s.tasks if t.kind == "multiple_choice"]
    assert len(set(label_sets)) == len(label_sets), "every multiple-choice task has its own label words"
    assert len({t.prompt for t in s.tasks}) == 15
    for t in s.tasks:
        size = sum(
            (SUITES / "smoke15" / "data" / f"{t.name}.{split}.jsonl").stat().st_size for split in ("train", "test")
        )
        assert size < 5_000, f"{t.name}: {size} bytes"


# ----------------------------------------------------------------------------- data hygiene
@pytest.mark.parametrize("suite", LOCAL_SUITES)
def test_train_and_test_are_disjoint_and_sized(suite):
    s = load_suite(suite)
    for t in s.tasks:
        train = {e["prompt"] for e in t.train_examples()}
        test = {t.render(r)["prompt"] for r in t.test_records()}
        held_out = t.validation.size if t.validation else 0  # sizes.train counts the validation split carved from it
        assert len(train) == t.sizes.train - held_out, f"{t.name}: duplicate train prompts"
        assert len(test) == t.sizes.test, f"{t.name}: duplicate test prompts"
        assert not train & test, f"{t.name}: {len(train & test)} test prompts also in train"


def test_default_suite_shape():
    s = load_suite("default")
    assert len(s.tasks) >= 4
    assert {t.kind for t in s.tasks} == {"multiple_choice", "generate"}
    label_sets = [tuple(t.choices) for t in s.tasks if t.kind == "multiple_choice"]
    assert len(set(label_sets)) == len(label_sets) >= 2
    for t in s.tasks:
        for ex in t.train_examples():
            assert ex["prompt"] and ex["completion"].startswith(" ")
            if t.kind == "generate":
                assert ex["completion"].endswith("\n"), "generate targets end with the stop string"
    assert s.orders[0] and all(sorted(o) == sorted(s.task_names) for o in s.orders)
    b = s.task("facts").budget_for(s)
    assert b.epochs == 2 and b.batch_size == 8 and b.lr["lori-s"] == pytest.approx(10 * b.lr["lora"])


def test_train_examples_limit_is_seeded():
    t = load_suite("default").task("stars")
    a, b, c = t.train_examples(limit=20, seed=1), t.train_examples(limit=20, seed=1), t.train_examples(limit=20, seed=2)
    assert a == b and a != c and len(a) == 20
    assert t.train_examples()[0] == {
        "prompt": t.render(t.train_records()[0])["prompt"],
        "completion": t.render(t.train_records()[0])["completion"],
    }


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("suite", LOCAL_SUITES + HUB_SUITES)
def test_every_suite_loads(suite):
    s = load_suite(suite)
    assert s.name == suite and s.path == SUITES / suite and s.tasks and s.orders
    for order in s.orders:
        assert all(n in s.task_names for n in order)
    cfgs = s.lm_eval_task_configs()
    assert set(cfgs) == set(s.task_names)
    for name, cfg in cfgs.items():
        assert cfg["task"] == f"{suite}__{name}"
        assert "," in s.task(name).metric_key


@pytest.mark.parametrize("suite", LOCAL_SUITES)
def test_local_suites_fully_validate(suite):
    s = validate_suite(suite)
    assert s.validation_notes == []


@pytest.mark.parametrize("suite", HUB_SUITES)
def test_hub_suites_validate_without_hub_and_say_what_was_skipped(suite):
    s = validate_suite(suite)
    assert s.validation_notes and all("not downloaded" in n for n in s.validation_notes)


def test_load_by_path_and_env_override(tmp_path, monkeypatch):
    assert load_suite(str(SUITES / "smoke")).name == "smoke"
    assert load_suite(SUITES / "smoke" / "suite.yaml").name == "smoke"
    shutil.copytree(SUITES / "smoke", tmp_path / "mysuites" / "smoke")
    monkeypatch.setenv("HARNESS_SUITES_DIR", str(tmp_path / "mysuites"))
    assert suites_dir() == (tmp_path / "mysuites").resolve()
    assert load_suite("smoke").path == (tmp_path / "mysuites" / "smoke").resolve()
    with pytest.raises(SuiteError, match="not a suite name"):
        load_suite("default")  # not in the overriding folder


def test_list_suites():
    rows = {r["name"]: r for r in list_suites()}
    assert set(LOCAL_SUITES + HUB_SUITES) <= set(rows)
    assert rows["default"]["n_tasks"] >= 4 and rows["olora-standard"]["n_orders"] == 3
    assert rows["olora-long"]["n_tasks"] == 15 and rows["olora-long"]["hub"] is True
    assert rows["smoke"]["train_sizes"] == {"parity": 64, "weather": 64, "copy": 64}
    assert "error" not in rows["default"]


def test_metric_keys():
    s = load_suite("default")
    assert s.task("stars").metric_key == "acc,none"
    assert s.task("facts").metric_key == "exact_match,strip"


def test_budget_gives_an_lr_for_every_method(smoke_copy):
    cfg = ExperimentConfig()
    rates = lambda s, task: {f: cfg.lr_for(f, s.task(task).budget_for(s).lr) for f in LR_FAMILIES}  # noqa: E731
    s = load_suite("olora-standard")  # its suite.yaml names no lr: every family at its default
    assert rates(s, "agnews") == LR_FAMILIES == {"lora": 1e-3, "lori-d": 1e-3, "lori-s": 1e-2}
    _edit(
        smoke_copy,
        lambda d: (d["budget"].update(lr={"lora": 5e-3}), d["tasks"][0].update(budget={"lr": {"lori-s": 7e-2}})),
    )
    s = load_suite(smoke_copy)
    assert rates(s, "weather") == {"lora": 5e-3, "lori-d": 1e-3, "lori-s": 1e-2}
    # a task's lr replaces the suite's mapping: the families it leaves out get their defaults
    assert rates(s, "parity") == {"lora": 1e-3, "lori-d": 1e-3, "lori-s": 7e-2}


def test_a_budget_lr_for_no_family_is_refused_naming_the_key(smoke_copy):
    _edit(smoke_copy, lambda d: d["tasks"][1].update(budget={"lr": {"lori_s": 7e-2}}))
    with pytest.raises(
        ConfigError,
        match=r"suite.yaml: tasks\[1\].budget.lr: 'lori_s' is no learning-rate family "
        r"\(families: lora, lori-d, lori-s",
    ):
        check_lr_families(load_suite(smoke_copy))


# ----------------------------------------------------------------------------- lm-eval wiring
def _build(cfg):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load([cfg])["tasks"][cfg["task"]]


def _score_with_fake_model(task, doc_index, fake_resp):
    """Run lm-eval's own request/filter/score path for one document with made-up model outputs.
    fake_resp(instance) -> the raw response lm-eval's model would return for that request."""
    task.build_all_requests(limit=doc_index + 1, rank=0, world_size=1)
    for inst in task.instances:
        inst.resps = [fake_resp(inst)]
    task.apply_filters()
    insts = [i for i in task.instances if i.doc_id == doc_index]
    key = next(iter(insts[0].filtered_resps))
    insts.sort(key=lambda i: i.idx)
    return task.process_results(insts[0].doc, [i.filtered_resps[key] for i in insts])


@pytest.mark.parametrize("suite", LOCAL_SUITES)
def test_lm_eval_tasks_score_right_and_wrong_answers(suite):
    s = load_suite(suite)
    for name, cfg in s.lm_eval_task_configs().items():
        spec = s.task(name)
        task = _build(cfg)
        metric = spec.metric_key.split(",")[0]
        doc = task.test_docs()[1]
        want = spec.render(spec.test_records()[1])  # the file's record, as training renders it
        assert task.doc_to_text(doc) == want["prompt"]
        if spec.kind == "generate":  # exact text, e.g. no date parsing by pyarrow ("1966-02-12 00:00:00")
            assert task.doc_to_target(doc) == want["completion"].strip()
        if spec.kind == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = choices.index(want["completion"])
            wrong = (gold + 1) % len(choices)
            for pick, expected in ((gold, 1.0), (wrong, 0.0)):
                res = _score_with_fake_model(
                    task, 1, lambda inst, p=pick: (-0.1 if inst.idx == p else -5.0, inst.idx == p)
                )
                assert res[metric] == expected, (name, pick, res)
        else:
            # the model's raw generation: leading space, cut at the stop string by the model wrapper
            right = want["completion"].rstrip("\n")
            for text, expected in ((right, 1.0), (" Nowhere", 0.0), (right + " and more", 0.0)):
                res = _score_with_fake_model(task, 1, lambda inst, t=text: t)
                assert res[metric] == expected, (name, text, res)


def test_lm_eval_simple_evaluate_with_config_dicts():
    """The evaluator's route: simple_evaluate(tasks=[config dicts]) with a TaskManager without defaults."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    s = load_suite("smoke")
    cfgs = s.lm_eval_task_configs()
    truth = {}
    for name in s.task_names:
        spec = s.task(name)
        for r in spec.test_records():
            e = spec.render(r)
            truth[e["prompt"]] = e["completion"]

    class Oracle(LM):  # answers every request correctly
        def loglikelihood(self, requests):
            return [(0.0 if truth[r.args[0]] == r.args[1] else -9.0, truth[r.args[0]] == r.args[1]) for r in requests]

        def generate_until(self, requests):
            return [truth[r.args[0]].split("\n")[0] for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    out = lm_eval.simple_evaluate(
        model=Oracle(),
        tasks=[cfgs[n] for n in s.task_names],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
        limit=8,
    )
    for name in s.task_names:
        assert out["results"][f"smoke__{name}"][s.task(name).metric_key] == 1.0


def test_jinja_translation_keeps_literal_braces():
    from lm_eval.utils import apply_template

    tpl = "A {{{{x}}}} {x} and {y} {{% y %}}"  # renders: A {{x}} 1 and 2 {% y %}
    jinja = format_to_jinja(tpl, {"y": "col_y"})
    assert apply_template(jinja, {"x": "1", "col_y": "2"}) == tpl.format(x="1", y="2")


# ----------------------------------------------------------------------------- hub suites offline
@pytest.mark.parametrize("suite", HUB_SUITES)
def test_hub_suites_on_local_files_of_the_same_schema(suite, monkeypatch):
    s = validate_suite(suite, data_overrides=HUB_FIXTURES)
    assert s.validation_notes == []  # everything, lm-eval tasks included, was checked
    monkeypatch.setenv("HARNESS_DATA_OVERRIDES", str(HUB_FIXTURES))
    s_env = load_suite(suite)
    for t in s.tasks:
        ex = t.train_examples()
        assert [e["completion"] for e in ex] == [" " + c for c in t.choices]  # fixture row i has label i
        assert s_env.task(t.name).train_examples() == ex
        cfg = t.lm_eval_config()
        assert cfg["dataset_path"] == "json" and "process_docs" not in cfg


def test_hub_label_encodings_and_columns():
    s = load_suite("olora-long", data_overrides=HUB_FIXTURES)
    assert s.task("dbpedia").train_examples()[1]["completion"] == " Educational Institution"
    yahoo = s.task("yahoo").train_examples()[4]
    assert yahoo["completion"] == " Computers & Internet" and yahoo["prompt"].startswith("Question: ")
    assert s.task("cb").train_examples()[2]["completion"] == " neutral"
    assert s.task("mnli").train_examples()[2]["completion"] == " contradiction"
    assert s.task("rte").train_examples()[0]["completion"] == " entailment"
    assert s.task("copa").train_examples()[1]["prompt"].endswith("B: It sang.\nAnswer:")
    assert "Candidate answer: A dog." in s.task("multirc").train_examples()[0]["prompt"]


def test_hub_config_without_override_is_a_hub_dataset_sampled_per_class():
    cfg = load_suite("olora-standard").lm_eval_task_configs()["yahoo"]
    assert cfg["dataset_path"] == "fancyzhx/yahoo_answers_topics"
    assert "{{ question_title }}" in cfg["doc_to_text"] and "topic" in cfg["doc_to_target"]
    assert isinstance(cfg["process_docs"], _Subsample)


def test_subsample_per_class():
    import datasets

    ds = datasets.Dataset.from_dict({"label": [0] * 10 + [1] * 3, "x": list(range(13))})
    out = _Subsample(None, per_class=2)(ds)
    assert sorted(out["label"]) == [0, 0, 1, 1]
    assert _Subsample(None, per_class=2)(ds)["x"] == out["x"]  # seeded
    assert len(_Subsample(5)(ds)) == 5


def test_hub_train_without_hub_is_a_clear_suite_error(monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_OVERRIDES", raising=False)
    t = load_suite("olora-standard").task("agnews")
    with pytest.raises(SuiteError, match="HARNESS_DATA_OVERRIDES"):
        t.train_examples()


# ----------------------------------------------------------------------------- validation errors
@pytest.fixture
def smoke_copy(tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(SUITES / "smoke", dst)
    return dst


def _edit(folder: Path, fn):
    f = folder / "suite.yaml"
    data = yaml.safe_load(f.read_text())
    fn(data)
    f.write_text(yaml.safe_dump(data, sort_keys=False))


def test_missing_data_file(smoke_copy):
    _edit(smoke_copy, lambda d: d["tasks"][2]["train"].update(path="data/x.jsonl"))
    with pytest.raises(SuiteError) as e:
        validate_suite(smoke_copy)
    msg = str(e.value)
    assert "suite.yaml: tasks[2].train.path" in msg and "data/x.jsonl does not exist" in msg


def test_unknown_task_in_order(smoke_copy):
    _edit(smoke_copy, lambda d: d["orders"].append(["parity", "nope"]))
    with pytest.raises(SuiteError, match=r"suite\.yaml: orders\[2\]\[1\]: unknown task 'nope'"):
        load_suite(smoke_copy)


def test_label_not_in_choices(smoke_copy):
    f = smoke_copy / "data" / "weather.train.jsonl"
    lines = f.read_text().splitlines()
    lines[3] = '{"temp": 99, "label": "purple"}'
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(SuiteError) as e:
        validate_suite(smoke_copy)
    msg = str(e.value)
    assert "tasks[1].train" in msg and "weather.train.jsonl" in msg and "example 3" in msg and "'purple'" in msg


def test_all_problems_reported_at_once(smoke_copy):
    (smoke_copy / "data" / "copy.test.jsonl").unlink()
    f = smoke_copy / "data" / "parity.train.jsonl"
    f.write_text(f.read_text().replace('"label": 1}', '"label": 7}', 1))
    with pytest.raises(SuiteError) as e:
        validate_suite(smoke_copy)
    msg = str(e.value)
    assert "copy.yaml: dataset_kwargs.data_files" in msg and "copy.test.jsonl does not exist" in msg
    assert "tasks[0].train" in msg and "label 7: index out of range" in msg
    assert msg.startswith("suite smoke: 2 problem(s)")


def test_schema_errors_name_file_and_key(smoke_copy):
    _edit(smoke_copy, lambda d: d["tasks"][1].update(kind="regression"))
    with pytest.raises(SuiteError, match=r"suite\.yaml: tasks\[1\]\.kind: "):
        load_suite(smoke_copy)


def test_train_test_overlap_and_prompt_mismatch_are_caught(smoke_copy):
    shutil.copy(smoke_copy / "data" / "copy.train.jsonl", smoke_copy / "data" / "copy.test.jsonl")
    cfg = yaml.safe_load((smoke_copy / "parity.yaml").read_text())
    cfg["doc_to_text"] = "Number {{number}}\nParity:"  # differs from the suite prompt
    (smoke_copy / "parity.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SuiteError) as e:
        validate_suite(smoke_copy)
    msg = str(e.value)
    assert "train and test share 64 prompt(s)" in msg and "sizes.test" in msg
    assert "parity.yaml: test document 0: lm-eval renders" in msg


def test_suite_error_is_a_harness_error():
    with pytest.raises(HarnessError):
        load_suite("no-such-suite")


def test_lm_eval_renders_each_document_as_before_with_each_template_compiled_once(monkeypatch):
    """harness.suites.lm_eval_configs.task_manager keeps lm-eval's compiled Jinja templates (lm-eval compiles one per
    document and field): the prompts, targets and choices are the uncached rendering's, from one compile a template."""
    import jinja2
    from lm_eval import utils

    from harness.suites.lm_eval_configs import task_manager

    suite = load_suite("default")
    cfgs = [suite.task(t).lm_eval_config() for t in ("stars", "dates")]
    tasks = task_manager().load(cfgs)["tasks"]
    compiles = []
    real = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda src: compiles.append(src) or real(src))
    fresh = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    n = 0
    for cfg in cfgs:
        task = tasks[cfg["task"]]
        for doc in task.test_docs():
            n += 1
            assert task.doc_to_text(doc) == fresh.from_string(cfg["doc_to_text"]).render(**doc)
            target = task.doc_to_target(doc)
            assert str(target) == fresh.from_string(cfg["doc_to_target"]).render(**doc)
            if "doc_to_choice" in cfg and isinstance(cfg["doc_to_choice"], str):
                assert task.doc_to_choice(doc) == eval(fresh.from_string(cfg["doc_to_choice"]).render(**doc))  # noqa: S307
    assert n == 200
    templates = {
        c[k] for c in cfgs for k in ("doc_to_text", "doc_to_target", "doc_to_choice") if isinstance(c.get(k), str)
    }
    assert len(compiles) <= len(templates), (
        f"{len(compiles)} compiles for {len(templates)} templates over {n} documents"
    )
