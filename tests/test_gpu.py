"""The real gpu-evals path on CUDA (SmolLM2, a few facts): reported as skipped, not passed, without a GPU.

Run on a CUDA machine with ``python -m pytest tests -m gpu`` (or ``tox -e gpu-evals`` for the full job).
"""

from __future__ import annotations

import json

import pytest
import torch

from neuraldb.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


def test_gpu_evals_edits_evaluates_and_gates_on_cuda(tmp_path, shared_data, capsys):
    out = tmp_path / "gpu-evals"
    rc = main(["gpu-evals", "--model", "smollm2-135m", "--device", "cuda", "--dtype", "bfloat16", "--n", "24",
               "--zsre-n", "24", "--general-tasks", "sciq", "--general-limit", "16", "--data-dir", str(shared_data),
               "--output-dir", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc in (0, 1), printed  # the gate decided (1: the strict policy's criteria, e.g. min_cases 1000)
    cf = json.loads((out / "report.json").read_text())
    zsre = json.loads((out / "zsre" / "report.json").read_text())
    assert cf["dataset"]["kind"] == "counterfact" and 0 < cf["dataset"]["n_cases"] <= 24
    assert zsre["dataset"]["kind"] == "zsre" and 0 < zsre["dataset"]["n_cases"] <= 24
    assert cf["config"]["settings"]["values"]["layer"] == 10  # SmolLM2: no row, the family fraction
    assert cf["metrics"]["efficacy"]["post"]["mean"] > cf["metrics"]["efficacy"]["pre"]["mean"]
    assert "sciq" in json.dumps(cf.get("general", {}))
    assert (out / "gate.json").is_file() and "neuraldb gate --report" in printed
