"""User ops from a plugin module that a spec names: the CLI, a child process and a fresh export all know them."""

import os
import subprocess
import sys

import yaml

from keras_darts.runtime.cli import compile_and_search_main, main
from tests.conftest import tiny_spec_document

PLUGIN = '''
import keras
from keras_darts.compiler import register_op
from keras_darts.compiler.ops import FactorizedReduce


@keras.saving.register_keras_serializable(package="plugin_ops")
class PointwiseConv(keras.layers.Layer):
    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{self.name}__conv")

    def call(self, x, training=None):
        return self.conv(keras.ops.relu(x))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


register_op("pointwise_conv", lambda c, s, a, n: PointwiseConv(c, name=n) if s == 1 else FactorizedReduce(c, s, a, name=n))
'''


def child_env():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    return env


def test_a_spec_naming_a_plugin_uses_its_op_in_the_cli_in_a_child_process_and_in_a_fresh_export(tmp_path, capsys, isolated_registries):
    (tmp_path / "plugin_ops.py").write_text(PLUGIN)
    document = tiny_spec_document(operations=["none", "skip_connect", "pointwise_conv"])
    document["plugins"] = ["plugin_ops"]
    document["search"].update(epochs=1, order="first", steps_per_epoch=3, diagnostics={"hessian_eigenvalue": False})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(document))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A fresh CLI process started in another folder: the plugin is found beside the spec.
    validate = subprocess.run([sys.executable, "-m", "keras_darts.runtime.cli", "validate", str(spec)],
                              cwd=elsewhere, env=child_env(), capture_output=True, text=True)
    assert validate.returncode == 0, validate.stderr
    assert "operations: none, skip_connect, pointwise_conv" in validate.stdout
    # keras-darts estimate measures in a child process, which imports the plugin too.
    assert main(["estimate", str(spec), "--steps", "1", "--orders", "first"]) == 0
    assert "first order:" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert compile_and_search_main([str(spec), "--run-dir", str(run_dir), "--no-progress"]) == 0
    derived = yaml.safe_load((run_dir / "derived.yaml").read_text())
    assert derived["plugins"] == ["plugin_ops"]
    # A fresh process reloads model.keras (which holds PointwiseConv layers) to export it again.
    export = subprocess.run([sys.executable, "-m", "keras_darts.runtime.cli", "export", str(run_dir)],
                            cwd=elsewhere, env=child_env(), capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    assert f"saved_model: {run_dir / 'export' / 'saved_model'} (" in export.stdout
    model = (run_dir / "retrain" / "model.keras")
    assert model.exists()
