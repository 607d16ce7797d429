"""benchmarks/hierarchical_recall.py's parts at tiny size: the recall task, one long case in-process (memory, load,
accuracy fields), the load gate of --record and its refusals. The full run belongs to
`python -m benchmarks.hierarchical_recall`."""
import contextlib
import io
import json

import pytest
import torch

from benchmarks import hierarchical_recall as hr


def test_the_task_queries_every_pair_and_labels_only_the_values():
    ids, labels = hr.recall_batch(3, 256, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (3, 256)
    for row, label in zip(ids, labels):
        queried = (label != -100).nonzero().flatten()
        assert queried.numel() == hr.NUM_PAIRS
        for pos in queried.tolist():
            key, value = int(row[pos - 1]), int(row[pos])
            assert row[pos - 2] == hr.QUERY and label[pos] == value
            first = (row[:128] == key).nonzero().flatten()  # the pair sits in the first half
            assert first.numel() == 1 and row[first + 1] == value


@pytest.mark.parametrize("name", ["hierarchical", "hierarchical_selected"])
def test_a_long_case_reports_its_memory_load_and_accuracy(name, tmp_path, one_thread):
    weights = tmp_path / f"{name}.pt"
    torch.save(hr.build(name).state_dict(), weights)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert hr.main(["--case", name, "256", "--weights", str(weights), "--case-steps", "1",
                        "--case-eval", "1"]) == 0
    case = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert case["tokens_per_s"] > 0 and case["peak_rss_bytes"] > 0 and 0 <= case["other_load"] <= 1
    assert 0 <= case["accuracy"] <= 1 and case["eval_targets"] == hr.NUM_PAIRS


def test_the_arms_have_equal_parameter_counts_but_the_gates():
    counts = {name: hr.num_parameters(hr.build(name)) for name in hr.TRAINED}
    assert counts["hierarchical"] == counts["flat_sdpa"] == counts["hierarchical_selected"] - hr.gate_parameters()
    assert hr.gate_parameters() == 262  # 64 x 4 + 4 (the selection gate) + 2 (the stage gates), as the docstring says
    assert hr.build("hierarchical_selected").config.selected_blocks == 4


def test_the_load_gate_sees_every_timed_part_that_ran():
    results = {"train": {"hierarchical": {"other_load": 0.02}, "flat_sdpa": {"other_load": 0.4}},
               "long": {"flat_eager": {"8192": {"status": "not run"}, "1024": {"status": "ok", "other_load": 0.0}}}}
    assert hr.other_loads(results) == {"train hierarchical": 0.02, "train flat_sdpa": 0.4, "flat_eager T=1024": 0.0}


@pytest.mark.parametrize("argv, message", [(["--quick", "--record"], "drop --quick"), (["--threads", "0"], ">= 1")])
def test_bad_options_are_parser_errors(argv, message, capsys, one_thread):
    with pytest.raises(SystemExit) as exit_info:
        hr.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
