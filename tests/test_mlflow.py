"""MLflow through torchtune's own `MLFlowLogger`: the real recipe, one process on CPU, logging to a local
tracking directory; the run is read back with mlflow's client and compared with the `DiskLogger` log of
the same run."""

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny, in the dev extra)")

from conftest import logged, overrides, run_in_process  # noqa: E402

LOGGER = "torchtune.training.metric_logging.MLFlowLogger"
STEPS = 4  # 8 samples, 2 per micro-batch, 1 process, 1 epoch
RUN = ["epochs=1", "save_every_n_steps=null", "dataset.n_samples=8", "gradient_accumulation_steps=1"]
# MLflow 3 refuses its `file:` store unless this is set; and no usage telemetry from a test.
ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_mlflow_logger_records_metrics_and_config_of_the_run(assets, tmp_path, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    uri = f"file:{tmp_path / 'mlruns'}"
    run_dir, disk_dir = tmp_path / "run", tmp_path / "disk"
    # The tiny config's DiskLogger has `log_dir`, which MLFlowLogger does not take: `~` drops it.
    logger = [
        f"metric_logger._component_={LOGGER}",
        "~metric_logger.log_dir",
        f"metric_logger.tracking_uri={uri}",
        "metric_logger.experiment_name=ref-tuning-test",
        "metric_logger.run_name=${experiment}",
    ]
    for out, extra in ((run_dir, logger), (disk_dir, [])):  # the same run with the default DiskLogger
        code, text = run_in_process("train", overrides(assets, out, *RUN, *extra))
        assert code == 0, text[-3000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ref-tuning-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-demo"  # the config's `experiment`

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    # One value per optimizer step, equal to what DiskLogger wrote for the identical run.
    loss = history("loss")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1)) and all(math.isfinite(v) for _, v in loss)
    assert loss == logged(disk_dir / "logs", "loss")
    assert history("lr") == logged(disk_dir / "logs", "lr") and len(history("lr")) == STEPS
    assert [s for s, _ in history("grad_norm")] == list(range(1, STEPS + 1))
    assert history("val_loss") == logged(disk_dir / "logs", "val_loss") and history("val_loss")[0][0] == STEPS

    # log_config: the resolved config as flat params, and as a YAML artifact under output_dir's path.
    params = run.data.params
    assert params["metric_logger._component_"] == LOGGER and params["metric_logger.tracking_uri"] == uri
    assert params["batch_size"] == "2" and params["dataset.n_samples"] == "8" and params["output_dir"] == str(run_dir)
    artifact = f"{str(run_dir).lstrip('/')}/torchtune_config.yaml"
    config = OmegaConf.load(client.download_artifacts(run.info.run_id, artifact, str(tmp_path)))
    assert config.metric_logger._component_ == LOGGER and config.epochs == 1 and config.dataset.n_samples == 8
    assert Path(tmp_path / "mlruns" / experiment.experiment_id / run.info.run_id).is_dir()  # all of it under the URI
