"""The compressor table's command: every registered compressor gets specs that parse, and the
run writes its table, JSON and plot, with CoreMatching's FFN report."""

import json

import pytest

from compressors import list_compressors, parse_spec
from eval import bench_compressors
from eval.bench_compressors import specs_for
from tests.server_fixtures import save_tiny_model


@pytest.mark.parametrize("name", [info.name for info in list_compressors()])
def test_every_registered_compressor_has_specs_that_parse(name):
    specs = specs_for(name)
    assert specs and all(parse_spec(text).compressor.name == name for text in specs)


def test_the_run_writes_table_json_plot_and_the_corematching_ffn_report(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "table"
    bench_compressors.main(["--model", str(model), "--count", "1", "--data-dir", str(tmp_path / "data"),
                            "--out", str(out), "--only", "random", "corematching", "--ffn-questions", "2"])
    written = json.loads(out.with_suffix(".json").read_text())
    asked = ["none", *specs_for("random"), *specs_for("corematching")]
    assert set(written["results"]) == {parse_spec(text).text for text in asked}
    assert written["results"]["random:ratio=0.25"]["visual_tokens_kept"] == 64
    ffn = {entry["spec"]: entry for entry in written["corematching_ffn"]}
    assert set(ffn) == set(specs_for("corematching"))
    beta = parse_spec("corematching").compressor.beta
    assert all(entry["decode_ffn_flop_fraction"] == pytest.approx(beta, abs=0.01) for entry in ffn.values())
    assert ffn["corematching:ratio=0.25"]["visual_tokens_after_pruning"] == 64
    assert "5.0x fewer" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
