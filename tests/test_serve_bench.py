"""`nil bench serve` end to end on a tiny index: it starts a real server, loads it and writes its files."""

import json

from click.testing import CliRunner

from cli.main import main


def test_bench_serve_writes_its_figures(tmp_path):
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(main, ["bench", "serve", "--n", "2000", "--dim", "16", "--classes", "3",
                                       "--requests", "60", "--clients", "4", "--batch", "8", "--warmup", "4",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    for key in ("requests", "errors", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "machine", "load_avg_start",
                "command", "server_cpu_ms_per_request"):
        assert r[key] is not None, key
    assert r["requests"] == 60 and r["errors"] == 0 and r["parity_mismatches"] == 0 and r["parity_checked"] > 0
    assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["index"]["kind"] == "ivfpq" and r["command"].startswith("nil bench serve --n 2000")
    md = out.with_suffix(".md").read_text()
    assert "| 60 | 0 |" in md and "p99 under 50 ms" in md
