"""Bad values a new user types stop the run with one line naming the fix, before any data or model is loaded."""

from __future__ import annotations

import pytest

from flexlora.conf_store import compose, to_plain
from flexlora.config_checks import check_ranges
from flexlora.errors import FlexLoRAError


@pytest.mark.parametrize("override, message", [
    ("model.optimizer.lr=-1", "model.optimizer.lr=-1: must be a number > 0"),
    ("task.batch_size=0", "task.batch_size=0: must be >= 1"),
    ("seed=abc", "seed='abc': must be an integer"),
    ("task.max_length=0", "task.max_length=0: must be >= 3"),
    ("model.head_lr=0", "model.head_lr=0: must be null"),
    ("task.max_train_samples=0", "task.max_train_samples=0: must be null (all) or >= 1"),
])
def test_bad_values_fail_with_one_line(tmp_path, override, message):
    with pytest.raises(FlexLoRAError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        check_ranges(to_plain(compose("debug=tiny", override, output_dir=tmp_path)))
    assert "\n" not in str(info.value) and "set e.g." in str(info.value)


def test_the_shipped_presets_pass(tmp_path):
    for overrides in (("debug=tiny",), ("+experiment=minilm_glue_proxy", "task=stsb"), ("+experiment=rank_recovery",)):
        check_ranges(to_plain(compose(*overrides, output_dir=tmp_path)))
