"""pytest configuration: ``tests/`` on ``sys.path`` so that every stage's tests share ``helpers``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
