"""The README's API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "vipo_loss(" in b)
    exec(compile(example, "README.md", "exec"), {})
    assert "clip_frac_low" in capsys.readouterr().out
