"""The training stage's loss-curve figure (pipeline/training/curve.py), drawn in the report."""

import json

import pytest
from PIL import Image

from dasheng_pipeline.common.provenance import stamp
from dasheng_pipeline.training import curve


def test_the_loss_curve_is_a_png_with_provenance(tmp_path):
    st = stamp({"plots": 1}, 0)
    metrics_csv = tmp_path / "metrics.csv"
    metrics_csv.write_text(
        "epoch,step,train_loss,val_loss\n"
        + "".join(
            f"{s // 10},{s},{1.0 / (1 + s):.4f},{'' if s % 10 else f'{1.1 / (1 + s):.4f}'}\n"
            for s in range(50)
        )
    )
    curve.loss_curve(metrics_csv, tmp_path / "l.png", st)
    img = Image.open(tmp_path / "l.png")
    assert img.format == "PNG" and img.size[0] > 300
    assert json.loads(img.info["Description"])["provenance"]["config_hash"] == st["config_hash"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected columns 'step' or 'epoch' and 'train_loss'"):
        curve.loss_curve(bad, tmp_path / "x.png", st)
