"""TaskReport on hand-made numbers: per-task means skip empty regions, NMI of known routings, files."""

import json
import math

import pytest
import torch

from tagmoe_lit.metrics.report import TaskReport


def test_per_task_means_skip_nan_and_all_row_covers_every_sample(tmp_path):
    report = TaskReport(["gen", "edit"])
    report.add(torch.tensor([0, 1]), {"success": torch.tensor([1.0, 0.0]), "psnr_preserved": torch.tensor([math.nan, 20.0])})
    report.add(torch.tensor([1, 1]), {"success": torch.tensor([1.0, 1.0]), "psnr_preserved": torch.tensor([30.0, 40.0])})
    summary = report.summary()
    assert summary["samples"] == {"gen": 1, "edit": 3}
    assert summary["tasks"]["edit"]["success"] == pytest.approx(2 / 3)
    assert math.isnan(summary["tasks"]["gen"]["psnr_preserved"])
    assert summary["all"]["psnr_preserved"] == pytest.approx(30.0)
    json_path, md_path = report.write(tmp_path)
    written = json.loads(json_path.read_text())
    assert written["samples"]["edit"] == 3 and written["tasks"]["gen"]["psnr_preserved"] is None  # strict JSON: null
    assert "| gen | 1 | 1.000 | – |" in md_path.read_text()


def test_routing_nmi_is_one_for_one_to_one_and_zero_for_constant_routing():
    tasks = torch.arange(4).repeat(8)
    one_to_one = torch.nn.functional.one_hot(tasks, 4).float() * 16  # every token of task t on expert t
    constant = torch.zeros(32, 4)
    constant[:, 2] = 16
    report = TaskReport(["a", "b", "c", "d"])
    report.add(tasks, {"flow": torch.zeros(32)}, [one_to_one, constant])
    routing = report.summary()["routing"]
    assert routing["layer_0"]["nmi"] == pytest.approx(1.0) and routing["layer_0"]["nmi_shuffled"] < 0.5
    assert routing["layer_1"]["nmi"] == 0.0
    assert routing["layer_0"]["task_expert_share"][1] == [0.0, 1.0, 0.0, 0.0]


def test_merge_of_rank_reports_equals_one_report_and_empty_report_says_so():
    a, b, whole = TaskReport(["x", "y"]), TaskReport(["x", "y"]), TaskReport(["x", "y"])
    a.add(torch.tensor([0]), {"m": torch.tensor([1.0])})
    b.add(torch.tensor([1]), {"m": torch.tensor([3.0])})
    whole.add(torch.tensor([0, 1]), {"m": torch.tensor([1.0, 3.0])})
    assert TaskReport.merge([a, b]).summary() == whole.summary()
    padded = TaskReport(["x", "y"])  # a distributed sampler repeats sample 0 to even out the ranks
    padded.add(torch.tensor([0, 1]), {"m": torch.tensor([1.0, 3.0])}, index_B=torch.tensor([0, 1]))
    padded.add(torch.tensor([0]), {"m": torch.tensor([1.0])}, index_B=torch.tensor([0]))
    assert padded.summary()["samples"] == {"x": 1, "y": 1}
    with pytest.raises(ValueError, match="no evaluation batch"):
        TaskReport().summary()
