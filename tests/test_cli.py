"""The CLI: without the server's packages `vlmserve serve` says why it cannot run (the benchmarks
still parse); `vlmserve bench latency` on a tiny model."""
import json
import sys

import pytest

from vlmserve.entrypoints import cli


def test_serve_without_the_server_packages_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "vlmserve.entrypoints.openai.api_server", None)  # import fails
    with pytest.raises(SystemExit) as e:
        cli.main(["serve"])
    assert "vlmserve serve needs the server's packages" in str(e.value.code)
    assert "api_server" in str(e.value.code)
    assert cli.build_parser().parse_args(["bench", "latency", "--random-model"]).command == "bench"


def test_bench_latency_runs_both_backends_with_separate_ttft_runs(tmp_path):
    """`vlmserve bench latency` on a tiny random LLaVA on the CPU: --num-iters-ttft TTFT runs and
    --num-iters whole generations per backend, their medians and the TTFT's spread in the JSON."""
    out = tmp_path / "lat.json"
    rc = cli.main(["bench", "latency", "--random-model", "--random-model-arch", "llava", "--num-layers", "2",
                   "--hidden-size", "64", "--head-dim", "16", "--num-heads", "4", "--num-kv-heads", "4",
                   "--intermediate-size", "128", "--vision-layers", "1", "--vision-hidden", "32",
                   "--vision-heads", "2", "--vision-intermediate", "64", "--image-size", "56",
                   "--input-len", "8", "--output-len", "4", "--backends", "vlmserve,hf", "--num-iters", "2",
                   "--num-iters-ttft", "5", "--num-iters-warmup", "1", "--output-json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["vlmserve", "hf"]
    for r in results:
        assert len(r["ttft_all_ms"]) == 5 and len(r["latency_all_s"]) == 2
        assert r["ttft_p10_ms"] <= r["ttft_ms"] <= r["ttft_p90_ms"]
        assert sorted(r["ttft_all_ms"])[2] == r["ttft_ms"]
