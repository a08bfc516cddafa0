"""Measure the hostile-input table of tests/cli/test_hostile.py and print it as Markdown.

Each case of ``CASES`` runs the real CLI once in a subprocess (inputs made in a temporary
folder by the test module's ``build_world``); the table gives the exit code, wall-clock and CPU
seconds and the line on stderr, for docs/reliability.md.

    PYTHONPATH=. python scripts/tools/hostile_table.py > table.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "cli")]

from test_hostile import CASES, build_world, run_cli


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp))
        model = str(Path("saved_models") / "tiny" / "1")
        print("| case | exit | wall s | CPU s | stderr |")
        print("| --- | --- | --- | --- | --- |")
        for name, args, out, _ in CASES:
            args = [a.format(model=model) for a in args]
            result, wall, cpu = run_cli(*args, "--out", out, cwd=world)
            line = result.stderr.decode("utf-8", "backslashreplace").strip().replace(tmp, "…")
            line = line.replace("|", "\\|")
            print(f"| {name} | {result.returncode} | {wall:.2f} | {cpu:.2f} | `{line}` |",
                  flush=True)


if __name__ == "__main__":
    main()
