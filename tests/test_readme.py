"""The README's and the guide's Python examples run as written (each in a
fresh interpreter)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = {"README.md": 4, "docs/guide.md": 3}  # each page's examples
BLOCKS = [block for page in PAGES for block in re.findall(
    r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)]


def test_the_pages_have_their_examples():
  for page, count in PAGES.items():
    assert (ROOT / page).read_text().count("```python\n") == count, page


def test_the_readme_is_a_users_page_with_its_results_early():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 420, len(lines)
  table = next(i for i, line in enumerate(lines) if line.startswith(
      "| task (target) |"))
  assert table < 150, table


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_and_learns(index):
  result = subprocess.run([sys.executable, "-c", BLOCKS[index]],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = re.findall(r"after 50 steps: ([0-9.]+)", result.stdout)
  assert losses and all(float(loss) < 0.5 for loss in losses), result.stdout
  # Blocks that run one training several ways print how far apart they end.
  for gap in re.findall(r"largest difference between the three: (\S+)",
                        result.stdout):
    assert float(gap) < 1e-4, result.stdout
