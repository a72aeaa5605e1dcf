"""Config files with get_config(), key=value overrides, and errors for unknown keys or wrong types."""
import pytest

from fa_jax import run_config, train
from fa_jax.errors import FaJaxError


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("def get_config():\n    return {'optim': {'lr': 1e-3}, 'data': {'train': 'x.txt'}}\n")
    cfg = run_config.load(str(f), train.pretrain_defaults(),
                          ["optim.lr=5e-4", "run.steps=7", "mesh.shape=[2,4,1]", "model.keep_layers=every_other",
                           "adapter.targets=['q_proj','v_proj']", "run.tensorboard=false", "optim.warmup_steps=0"])
    assert cfg.optim.lr == 5e-4 and cfg.run.steps == 7 and cfg.mesh.shape == [2, 4, 1]
    assert cfg.model.keep_layers == "every_other" and cfg.adapter.targets == ["q_proj", "v_proj"]
    assert cfg.run.tensorboard is False and cfg.data.train == "x.txt" and cfg.optim.b1 == 0.9
    assert isinstance(run_config.apply_overrides(cfg, ["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize("bad, match", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["optimizer.lr=1"], "unknown config key 'optimizer'"),
    (["run.steps=many"], "run.steps='many' should be a number"),
    (["run.resume=1"], "run.resume=1 should be a bool"),
    (["run.steps"], "expected key=value"),
])
def test_bad_overrides(bad, match):
    with pytest.raises(FaJaxError, match=match):
        run_config.load(None, train.pretrain_defaults(), bad)


def test_bad_files(tmp_path):
    with pytest.raises(FaJaxError, match="config file not found"):
        run_config.load(str(tmp_path / "none.py"), {})
    f = tmp_path / "bad.py"
    f.write_text("x = 1\n")
    with pytest.raises(FaJaxError, match="must define get_config"):
        run_config.load(str(f), {})
    f.write_text("def get_config(:\n")
    with pytest.raises(FaJaxError, match=r"bad.py:1: syntax error"):
        run_config.load(str(f), {})
    f.write_text("def get_config():\n    return {'loss': {'alhpa': 0.5}}\n")
    with pytest.raises(FaJaxError, match=f"{f}: unknown config key 'loss.alhpa'"):
        run_config.load(str(f), train.pretrain_defaults())
