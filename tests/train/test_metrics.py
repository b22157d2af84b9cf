"""The training progress line in a log: one plain line per log_every steps, messages between."""

import io

from mmjax.train.metrics import MetricsWriter, read_jsonl


def test_progress_lines_and_messages_in_a_log(tmp_path):
  log = io.StringIO()
  writer = MetricsWriter(str(tmp_path), total_steps=5, log_every=2, stream=log)
  for step in range(1, 6):
    writer.write(step, {"loss": 1.0 / step})
    writer.progress(step, {"loss": 1.0 / step, "lr": 0.1})
    if step == 3:
      writer.message("mmjax: a note")
  writer.close()
  text = log.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert [line.split(" [")[0] for line in lines] == [
      "train: 2/5 step", "mmjax: a note", "train: 4/5 step", "train: 5/5 step"]
  assert lines[0].endswith("loss=0.5 lr=0.1") and lines[3].endswith("loss=0.2 lr=0.1")
  assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5]
