"""The Colab TPU notebook runs end to end on CPU (tiny demo config), as CI executes it."""

import json

import pytest

from conftest import CHEAP_COMPILE
from step_utils import ROOT

NOTEBOOK = ROOT / "notebooks" / "nas_jax_colab_tpu.ipynb"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = tmp_path / "run"
  monkeypatch.setenv("NAS_JAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("NAS_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("XLA_FLAGS", CHEAP_COMPILE)   # One CPU device: the fewest compiles.
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()

  def text(cell):
    out = []
    for o in cell.get("outputs", []):
      out.append(o.get("text", ""))
      out.extend(str(v) for v in o.get("data", {}).values())
    return "".join(out)

  outputs = [text(c) for c in nb.cells if c.cell_type == "code"]
  everything = "\n".join(outputs)
  assert "1 cpu device(s), 1 process(es)" in everything
  assert "stage 1 ended at step 4 | stage 2 ended at step 2" in everything
  evaluation = json.loads((workdir / "stage2" / "eval.json").read_text())
  assert evaluation["step"] == 2 and len(evaluation) > 3
  assert "patches replaced:" in everything
  rows = [json.loads(l) for l in open(workdir / "stage1" / "metrics.jsonl")]
  assert any("loss" in r for r in rows)
  assert "logged steps; final loss" in everything
  try:
    import matplotlib  # noqa: F401
    assert (workdir / "nva.png").stat().st_size > 0 and (workdir / "curves.png").stat().st_size > 0
  except ImportError:   # Text fallbacks.
    assert "#" in everything and "step  " in everything
