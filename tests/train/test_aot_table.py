"""mmjax aot --table: rows compiled one process each, failures as cells, markdown and JSON."""

import json

import pytest

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.errors import UserError
from mmjax.train import aot_table

TOY = """from mmjax.train import toy


def get_config(arg=None):
  config = toy.toy_config(batch_size=16)
  config.toy.update(embed=128, mlp=256)
  if arg == "huge":  # [4096, 1024, 8192] fp32 activations: 128 GiB, more than a v5e chip has
    config.train.batch_size = 4096
    config.toy.update(dict(vocab=4096, embed=256, mlp=8192, length=1024))
  return config
"""


def test_rows_cover_the_models_of_the_issue_and_their_configs_load():
  names = {row.name for row in aot_table.ROWS}
  assert len(names) == len(aot_table.ROWS) == 24
  for kind in ("v5p", "v6e"):
    for size in ("B", "L", "XL"):
      assert {f"4m-{size}-128-{kind}", f"4m-{size}-256-{kind}"} <= names
    for size in ("1B", "7B"):
      assert {f"decoder-{size}-{s}-{kind}" for s in ("dense", "mot", "moma")} <= names
  for row in aot_table.ROWS:
    overrides = [f"--config.{o}" for o in row.overrides]
    config = mmconfig.load(str(aot_table.CHECKOUT / row.config.split(":")[0])
                           + ":" + row.config.split(":", 1)[1], overrides)
    if row.name.startswith("decoder"):
      assert config.model.max_length == 4096
    else:
      budget = int(row.name.split("-")[2])
      assert config.model.num_input_tokens == config.model.num_target_tokens == budget


def test_select_rows_by_pattern():
  assert [r.name for r in aot_table.select("7B-dense")] == ["decoder-7B-dense-v5p",
                                                            "decoder-7B-dense-v6e"]
  with pytest.raises(UserError, match="matches no row"):
    aot_table.select("no-such-row")


def test_the_table_compiles_each_row_in_a_process_and_a_failure_is_a_cell(tmp_path, monkeypatch,
                                                                          capsys):
  config = tmp_path / "toy.py"
  config.write_text(TOY)
  rows = (aot_table.Row("toy", "toy MLP", f"{config}:small", "v5e:2x2", ("train.steps=5",)),
          aot_table.Row("huge", "toy MLP, huge batch", f"{config}:huge", "v5e:2x2", ()),
          aot_table.Row("later", "not compiled in this run", f"{config}:small", "v5e:2x2", ()))
  monkeypatch.setattr(aot_table, "ROWS", rows)
  out = tmp_path / "table"
  code = cli.main(["aot", f"--table={out}", "--rows=toy|huge", "--row-timeout=300"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["rows_run"] == 2 and summary["rows_failed"] == 1

  records = {r["row"]: r for r in json.loads((out / "aot_table.json").read_text())}
  toy = records["toy"]["result"]
  assert toy["compiled"] and toy["fits"] and toy["mesh"]["data"] == 4
  assert toy["roofline_step_s"] == max(toy["roofline_compute_s"], toy["roofline_memory_s"]) > 0
  assert toy["splash_kernels"] == {}  # no attention in the toy model
  assert records["toy"]["command"].startswith(f"mmjax aot --config={config}:small")
  assert "does not fit v5e:2x2" in records["huge"]["result"]["error"]
  assert records["later"]["result"] is None

  lines = (out / "aot_table.md").read_text().splitlines()
  assert lines[0].startswith("| model | slice |") and len(lines) == 2 + len(rows)
  assert {line.count("|") for line in lines} == {len(aot_table.HEADER) + 1}
  toy_cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert toy_cells[:3] == ["toy MLP", "v5e:2x2", "data 4; 4/chip"]
  assert "/ 16.0 (" in toy_cells[5] and toy_cells[8] == "no"
  assert "exit status 2: the train step does not fit v5e:2x2" in lines[3]
  assert "not run" in lines[4]

  # Resuming skips the row that compiled and retries the one that failed.
  error = (out / "rows" / "huge" / "error.txt").read_text()
  calls = []
  monkeypatch.setattr(aot_table, "_run_row", lambda row, folder, timeout_s: calls.append(row.name)
                      or {"error": "again"})
  assert cli.main(["aot", f"--table={out}", "--rows=toy|huge", "--resume"]) == 0
  assert calls == ["huge"]
  (out / "rows" / "huge" / "error.txt").write_text(error)

  # Re-rendering without compiling keeps every row's result.
  assert cli.main(["aot", f"--table={out}", "--render-only"]) == 0
  assert (out / "aot_table.md").read_text().splitlines() == lines


def test_table_and_single_compile_arguments_exclude_each_other(tmp_path, capsys):
  assert cli.main(["aot", f"--table={tmp_path}", "--topology=v5e:2x2"]) == 2
  assert cli.main(["aot", "--config=configs/fourm/4m.py:B"]) == 2
  err = capsys.readouterr().err
  assert "drop --config, --config.* and --topology" in err and "give --config and --topology" in err
