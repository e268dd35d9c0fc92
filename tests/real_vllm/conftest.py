"""Real-engine tests: make a skip impossible to miss.

The `real_engine` marker is registered in setup.cfg. When the prepared vLLM
cache is absent, every test here is skipped; this hook then prints a banner at
the end of the run so a green run without the real engine is never mistaken
for one that exercised it. With REAL_VLLM_REQUIRED=1 the tests fail instead.
"""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if "real_vllm" in getattr(r, "nodeid", "") or "real_vllm" in str(getattr(r, "fspath", ""))]
    if not skipped:
        return
    reason = ""
    longrepr = getattr(skipped[0], "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = longrepr[2]
    terminalreporter.write_sep("!", "REAL vLLM ENGINE TESTS SKIPPED", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} real-engine test(s) did not run. {reason}", red=True)
    terminalreporter.write_line(
        "Prepare the engine with tests/real_vllm/prepare.sh, or set REAL_VLLM_REQUIRED=1 to make this a failure.",
        red=True)
