"""The README's main command, small: the demo runs end to end in the shared session."""

from lakelens.demo import run_demo
from conftest import ROOT


def test_demo_end_to_end(spark, tmp_path, capsys):
    result = run_demo(out=str(tmp_path / "demo"), n_images=40, conf_path=str(ROOT / "conf" / "local.yaml"))
    assert (result["run1"]["embedded"], result["run1"]["failed"]) == (40, 1)  # one corrupt file on purpose
    assert result["run2"]["embedded"] == 0 and result["run2"]["unchanged"] == 41
    assert (result["run3"]["new"], result["run3"]["changed"], result["run3"]["deleted"]) == (20, 1, 5)
    assert result["index"]["built"] and result["index"]["rows"] == 40 + 20 - 5
    out = capsys.readouterr().out
    assert "image -> image" in out and "nothing to do" in out
