"""`dasheng-pipeline evaluate`: the results name the model (its spec and sha256), and a folder that
holds another model's results is refused instead of overwritten."""

import json

from dasheng_model.pretrained import random_encoder, weights_sha256
from dasheng_pipeline import cli


def test_results_record_the_model_and_another_models_folder_is_refused(tmp_path, hear_task, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(hear_task), "--knn", "--out", str(out), "-q"]
    assert cli.main([*args, "--model", "random:tiny:3"]) == 0
    knn = json.loads((out / "knn.json").read_text())
    sha = weights_sha256("random:tiny:3", random_encoder("tiny", 3))
    assert (knn["model"], knn["model_spec"], knn["model_sha256"]) == (
        "random:tiny:3",
        "random:tiny:3",
        sha,
    )
    meta = json.loads((out / "embeddings" / "meta.json").read_text())
    assert (meta["model_spec"], meta["model_sha256"]) == ("random:tiny:3", sha)
    before = (out / "knn.json").read_bytes()
    assert cli.main([*args, "--model", "random:tiny:3"]) == 0  # the same model again: fine
    capsys.readouterr()
    for other in ("random:tiny:4", "logmel"):
        assert cli.main([*args, "--model", other]) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: {out / 'embeddings' / 'meta.json'}: the results of another model (random:tiny:3"
        )
        assert err.count("\n") == 1 and f"this model {other}" in err
    assert (out / "knn.json").read_bytes() == before
