"""The CLI without the server's packages: `vlmserve serve` says why it cannot run (the benchmarks
still parse)."""
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
