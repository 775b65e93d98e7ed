"""Collective timeouts, with 2 processes on gloo: a slow setup survives `timeout_setup_s`, a rank that
hangs in a training step is an error after `timeout_step_s` that says so."""

import time

from tests.test_training import assets, ok, overrides, tune  # noqa: F401  (assets is a fixture)

QUICK = ["dataset_val=null", "save_every_n_steps=null", "epochs=1", "max_steps_per_epoch=3"]


def test_a_setup_slower_than_the_step_timeout_survives(assets, tmp_path):
    # Rank 0 works alone for 6 s (as on a first run's data index) while rank 1 waits in a collective.
    result = tune(overrides(assets, tmp_path / "run", *QUICK, "timeout_setup_s=120", "timeout_step_s=2"),
                  env={"REF_TUNING_FAULT": "slow_setup:6"})  # fmt: skip
    ok(result)


def test_a_hung_rank_in_a_step_fails_the_run_after_the_step_timeout_with_a_clear_message(assets, tmp_path):
    start = time.monotonic()
    result = tune(overrides(assets, tmp_path / "run", *QUICK, "timeout_step_s=2"),
                  env={"REF_TUNING_FAULT": "hang_step:2:15"})  # rank 1 stalls for 15 s in step 2
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "training step 2: a collective waited longer than timeout_step_s=2 s for another process" in text, text[-3000:]
    assert time.monotonic() - start < 120
