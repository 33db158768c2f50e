"""The quick soak and fault suite (benchmarks/soak.py --quick) as part of the test run:
48 requests at 4 concurrent through 2 codec workers, 2 token servers and a gateway
as processes, with a codec worker, a token server and the gateway SIGKILLed
mid-stream and restarted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)

ROOT = Path(__file__).resolve().parents[2]


def test_quick_soak_meets_every_goal(demo_models, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--models", str(demo_models.root),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
    )
    report = json.loads((tmp_path / "soak.json").read_text())
    unexpected = [o for o in report["outcomes"] if not o["expected"]]
    assert done.returncode == 0, (done.stderr[-3000:], unexpected)
    assert report["unexpected"] == 0 and not unexpected
    assert len(report["outcomes"]) == 48
    assert all(not any(figures.values()) for figures in report["left_open"].values()), report["left_open"]
    assert [f["target"] for f in report["faults"]] == ["codec_worker", "token_server", "gateway"]
    assert all(f["rejoined"] and f["others_untouched"] for f in report["faults"]), report["faults"]
    rss = json.loads((tmp_path / "rss.json").read_text())
    assert set(rss) == {"codec worker 0", "codec worker 1", "token server 0", "token server 1", "gateway"}
    assert (tmp_path / "rss.png").stat().st_size > 0
