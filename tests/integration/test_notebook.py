"""notebooks/query.ipynb runs top to bottom against a real index (nbclient, a real kernel)."""

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient

from lakelens import EmbedJob, IndexJob
from lakelens.train import synth


def test_query_notebook_runs(spark, tmp_path, local_conf):
    synth.write_dataset(tmp_path / "img", 40, seed=11)
    conf = local_conf(tmp_path / "img", tmp_path / "table", f"index.table={tmp_path / 'table'}",
                      f"index.index={tmp_path / 'index'}")
    EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch()

    nb = nbformat.read(ROOT / "notebooks" / "query.ipynb", as_version=4)
    env_before = dict(os.environ)
    os.environ.update(LAKELENS_INDEX=str(tmp_path / "index"), LAKELENS_NOTEBOOK_OUT=str(tmp_path))
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "40 images" in outputs and "grid saved to" in outputs
    assert (tmp_path / "query_grid.png").stat().st_size > 10_000
