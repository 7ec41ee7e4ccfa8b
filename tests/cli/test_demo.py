"""The demo (``make demo``): masked VGG-16 -> sparse, table, exactness, JSON result."""

import json
import subprocess
import sys

from sparse_hetconv.cli import main
from sparse_hetconv.cli.demo import format_demo, run_demo


def test_run_demo_reports_every_hetconv_layer_and_exact_outputs():
    result = run_demo(part=4, batch=2, repeats=1)
    assert len(result["layers"]) == 12, "vgg16_cifar has 12 HetConv layers"
    assert all(row["sparse_type"] == "SparseHetConv2d" for row in result["layers"])
    for row in result["layers"]:
        n_in, n_out = map(int, row["channels"].split("->"))
        assert row["masked_params"] - row["sparse_params"] == n_out * n_in // 4, row
    assert result["masked_params"] - result["sparse_params"] == sum(
        r["masked_params"] - r["sparse_params"] for r in result["layers"])
    assert result["max_abs_diff"] < 1e-4, "conversion must not change the outputs"
    assert set(result["latency_ms"]) == {"masked", "masked_channels_last", "sparse"}
    text = format_demo(result)
    assert "features.40" in text and "whole model" in text and "forward latency" in text


def test_demo_command_prints_and_saves(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--part", "8", "--batch", "1", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vgg16_cifar(part=8)" in printed and f"saved {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["model"] == "vgg16_cifar(part=8)" and len(saved["layers"]) == 12


def test_demo_bad_part_is_a_clean_error(tmp_path, capsys):
    assert main(["demo", "--part", "3", "--out", str(tmp_path / "x.json")]) == 2
    assert "in_channels (64) must be divisible by part (3)" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "sparse_hetconv", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout, done.stderr
