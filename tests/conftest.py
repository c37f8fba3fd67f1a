import sys
from pathlib import Path

# Let tests import their helpers (tests/scenes.py) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
