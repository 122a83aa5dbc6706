"""`harness bench` measures every method on the same batch and writes the documented JSON."""

import json

import pytest

from harness.cli import main


def test_bench_writes_json_contract(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--model", "tiny-llama", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--json", str(out)]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny-llama"
    assert set(res["methods"]) == {"base", "peft-bare", "lora", "lori-d", "lori-s"}
    for m in res["methods"].values():
        assert m["step_s_median"] > 0 and m["train_tok_s"] > 0
        assert m["vs_base"] == pytest.approx(m["step_s_median"] / res["methods"]["base"]["step_s_median"])
        assert m["vs_peft_bare"] == pytest.approx(m["step_s_median"] / res["methods"]["peft-bare"]["step_s_median"])
    assert res["precision"]["base_dtype"] == "float32" and res["device_name"]
    assert "lori-s" in capsys.readouterr().out


def test_bench_rejects_unknown_method(capsys):
    assert main(["bench", "--methods", "lora,foo"]) == 2
    assert "foo" in capsys.readouterr().err


def test_bench_memory_is_measured_from_the_tensors(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                "tiny-llama",
                "--methods",
                "lora,lori-d,lori-s",
                "--steps",
                "1",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--memory",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    mem = json.loads(out.read_text())["memory"]
    keys = {"params_bytes", "grads_bytes", "optimizer_bytes", "snapshot_bytes", "total_bytes"}
    assert set(mem) == {"lora", "lori-d", "lori-s"} and all(set(m) == keys for m in mem.values())
    lora, lori_d, lori_s = mem["lora"], mem["lori-d"], mem["lori-s"]
    # Same rank and targets: the same A and B tensors; LoRA trains A and B, LoRI-D only B (AdamW: 2 moments per entry).
    assert lora["params_bytes"] == lori_d["params_bytes"]
    assert lori_d["grads_bytes"] < lora["grads_bytes"]
    extra = lori_d["optimizer_bytes"] - 2 * lori_d["grads_bytes"]  # two moments per entry + one 4-byte step per tensor
    assert 0 < extra <= 4 * 64 and extra % 4 == 0
    # LoRI-S trains one values vector per module (the mask's entries): params = B and A + the values,
    # grads = the values, AdamW = two moments of them, held = their int32 positions. No copy of B.
    nnz_bytes = lori_s["grads_bytes"]
    assert lori_s["params_bytes"] == lora["params_bytes"] + nnz_bytes
    assert 0 < nnz_bytes <= 0.11 * lori_d["grads_bytes"]  # density 0.1 of B (floor per module)
    assert 0 < lori_s["optimizer_bytes"] - 2 * nnz_bytes <= 4 * 64
    assert lora["snapshot_bytes"] == 0 and lori_s["snapshot_bytes"] == nnz_bytes  # float32 values, int32 positions
    assert lori_s["grads_bytes"] + lori_s["optimizer_bytes"] <= 0.10 * (lora["grads_bytes"] + lora["optimizer_bytes"])
    assert lori_s["total_bytes"] <= 0.35 * lora["total_bytes"]
    for m in mem.values():
        assert m["total_bytes"] == sum(v for k, v in m.items() if k != "total_bytes")


def test_bench_profile_says_where_a_step_goes(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                "tiny-llama",
                "--methods",
                "base,lora",
                "--steps",
                "1",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--profile",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    prof = json.loads(out.read_text())["profile"]
    assert set(prof) == {"base", "lora"}
    for p in prof.values():
        assert p["aten_ops"] > 0 and p["host_s"] > 0 and p["device_s"] is None  # CPU: no device time
        assert p["top_ops_self_cpu_s"]
    assert prof["lora"]["aten_ops"] > prof["base"]["aten_ops"]  # the LoRA layers add operators to every adapted module


def test_bench_stage_hooks_times_what_a_method_does_between_stages(tmp_path, capsys):
    """--stage-hooks: two stages per method, each with setup and teardown seconds, the median step, the stage's steps at
    the suite's budget, and the method's share = (setup + teardown) / the stage's estimated training time."""
    out = tmp_path / "hooks.json"
    assert (
        main(
            [
                "bench",
                "--stage-hooks",
                "smoke",
                "--model",
                "tiny-llama",
                "--methods",
                "lora,ewc",
                "--steps",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["suite"] == "smoke" and len(res["tasks"]) == 2 and set(res["methods"]) == {"lora", "ewc"}
    ewc, lora = res["methods"]["ewc"], res["methods"]["lora"]
    assert [s["stage"] for s in ewc] == [1, 2]
    assert ewc[0]["method_teardown_s"] > 0 and ewc[0]["task"] == res["tasks"][0] and ewc[1]["task"] == res["tasks"][1]
    for s in ewc + lora:
        assert s["budget_steps"] > 0 and s["step_s_median"] > 0
        assert s["method_frac"] == pytest.approx((s["method_setup_s"] + s["method_teardown_s"]) / s["train_s_est"])
    assert "method share" in capsys.readouterr().out
