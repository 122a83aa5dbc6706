"""`harness bench` measures every method on the same batch and writes the documented JSON."""

import json

from harness.cli import main


def test_bench_writes_json_contract(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny-llama", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny-llama"
    assert set(res["methods"]) == {"base", "lora", "lori-d", "lori-s"}
    for m in res["methods"].values():
        assert m["step_s_median"] > 0 and m["train_tok_s"] > 0
    assert "lori-s" in capsys.readouterr().out


def test_bench_rejects_unknown_method(capsys):
    assert main(["bench", "--methods", "lora,foo"]) == 2
    assert "foo" in capsys.readouterr().err
