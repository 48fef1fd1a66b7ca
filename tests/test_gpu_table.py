"""benchmarks/gpu_table.py only runs for real on a GPU machine; its --smoke mode runs the
same code path on the CPU here so the script cannot rot unnoticed."""

from benchmarks.gpu_table import main


def test_gpu_table_smoke(tmp_path):
    out = tmp_path / "table.md"
    text = main(["--smoke", "--out", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| loss") or
            line.startswith("| sde_step")]
    impls = {row.split("|")[4].strip() for row in rows}
    assert {"torch-eager", "torch-compile", "triton"} <= impls
    assert len(rows) == 2 * len(impls)
    assert "copy bandwidth" in text
