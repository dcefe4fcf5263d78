"""Mutation scores per module from mutmut's results in mutants/ (`make mutation` prints this after `mutmut run`).

Score = killed / (killed + survived + no tests + suspicious); a timeout counts as killed (the mutant hung a
test), as mutmut itself counts it as caught. Run from the repository root.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# exit codes of mutmut 3.8 (mutmut/stats.py: status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no_tests", 33: "no_tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "killed", None: "not_checked"}  # fmt: skip


# ldm/stage.py is scored on its identity half only: its stage-log half (redirecting library loggers to
# W/logs/<stage>.log) is tested by tests/ldm/test_stage_log.py, which starts Ray and is too slow per mutant.
OUT_OF_SCOPE = {"ldm/stage.py": ("stage_log_file", "redirect_library_logs", "_LazyFileHandler", "stage_log__")}


def _function(mutant: str) -> str:
    """`ldm.stage.xǁWorkdirǁof__mutmut_3` -> `Workdirǁof`."""
    return mutant.rsplit(".", 1)[-1].removeprefix("x_").removeprefix("xǁ").rsplit("__mutmut_", 1)[0]


def in_scope(module: str, mutant: str) -> bool:
    """Whether a mutant counts towards its module's score."""
    name = _function(mutant)
    return not any(name.startswith(f) or name == f.rstrip("_") for f in OUT_OF_SCOPE.get(module, ()))


def scores(root: Path = Path("mutants")) -> dict[str, Counter]:
    """Counts by status for each mutated module, keyed by its path."""
    out: dict[str, Counter] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = str(meta.relative_to(root)).removesuffix(".meta")
        out[module] = Counter(STATUS.get(c, "suspicious") for m, c in codes.items() if in_scope(module, m))
    return out


def survivors(root: Path = Path("mutants")) -> list[str]:
    """Names of the in-scope mutants that no test killed (survived or never tested)."""
    out = []
    for meta in sorted(root.rglob("*.py.meta")):
        module = str(meta.relative_to(root)).removesuffix(".meta")
        for m, c in json.loads(meta.read_text())["exit_code_by_key"].items():
            if in_scope(module, m) and STATUS.get(c, "suspicious") in ("survived", "no_tests", "suspicious"):
                out.append(m)
    return out


def main() -> int:
    """Print one line per module (and with -v the survivors' names); exit 1 below 90% in any module."""
    table = scores()
    if not table:
        print("no mutmut results under mutants/: run `mutmut run` first", file=sys.stderr)
        return 2
    low = False
    print(f"{'module':<34} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8} {'score':>6}")
    for module, c in table.items():
        caught = c["killed"] + c["timeout"]
        judged = caught + c["survived"] + c["no_tests"] + c["suspicious"]
        score = caught / judged if judged else 1.0
        low |= score < 0.9
        print(f"{module:<34} {sum(c.values()):>7} {c['killed']:>6} {c['timeout']:>7} {c['survived']:>8} "
              f"{c['no_tests']:>8} {score:>6.1%}")  # fmt: skip
    if "-v" in sys.argv:
        print("\n".join(survivors()))
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
