"""train.profile_steps: a trace of the chosen steps in <workdir>/profile; bad values named."""

import pytest

from mmjax.config import ConfigError
from mmjax.train import loop, profiling, toy


@pytest.mark.slow
def test_profile_steps_write_a_trace(tmp_path):
  config = toy.toy_config(steps=4, checkpoint_every=100, profile_steps="2,3")
  config.mesh.shape.update(dict(data=-1, fsdp=1, tensor=1))
  loop.run_train(config, str(tmp_path))
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((tmp_path / "profile").rglob("*.trace.json.gz"))  # Perfetto's file


def test_profile_steps_parse_and_reject():
  assert profiling.parse_steps("") is None
  assert profiling.parse_steps("3,5") == (3, 5)
  assert profiling.parse_steps("4") == (4, 4)
  assert profiling.parse_steps((2, 6)) == (2, 6)
  for bad in ("5,3", "0,2", "a,b", "1,2,3"):
    with pytest.raises(ConfigError, match="train.profile_steps"):
      profiling.parse_steps(bad)
