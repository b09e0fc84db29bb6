"""Hypothesis profiles and shared fixtures for the properties suite (``pytest properties``).

Profiles, chosen by ``HYPOTHESIS_PROFILE`` (default ``dev``; CI sets ``ci``)::

    ci        derandomized, few examples, no deadline, no example database: the same
              examples on every run, the whole suite in about 10 minutes on 2 cores
    dev       random examples, a few more of them, failures remembered in .hypothesis/
    thorough  many examples, for a long run before a release

Tests scale their own example counts off the profile with :func:`examples`, so a
model-level test (seconds per example) and a store-level one (milliseconds) both
fit the profile's time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture, HealthCheck.large_base_example]

settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None, database=None,
                          suppress_health_check=SUPPRESS, print_blob=True)
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=SUPPRESS, print_blob=True)
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=SUPPRESS,
                          print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
if PROFILE not in ("ci", "dev", "thorough"):
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}: choose ci, dev or thorough")
settings.load_profile(PROFILE)

# (store-level, model-level) example counts per profile
_EXAMPLES = {"ci": (10, 4), "dev": (20, 6), "thorough": (200, 40)}


def examples(kind: str = "store", scale: float = 1.0) -> int:
    """Examples for a test of ``kind`` ('store' or 'model') under the active profile."""
    store, model = _EXAMPLES[PROFILE]
    return max(1, int(round((store if kind == "store" else model) * scale)))


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LAYER = 10


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("NEURALDB_DATA_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.fail(f"the shared data directory {path} is missing: set NEURALDB_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (float32, CPU, eval mode), loaded once per session."""
    import neuraldb

    torch.manual_seed(0)
    return neuraldb.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def templates(smollm2):
    """The context templates ``neuraldb.edit`` uses with the default EditConfig."""
    import neuraldb
    from neuraldb import EditConfig

    model, tok = smollm2
    cfg = EditConfig()
    return neuraldb.context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length,
                                      seed=cfg.context_seed)


@pytest.fixture(scope="session")
def passages(data_dir) -> list[str]:
    """LAMBADA passages (unrelated text for the model-level properties)."""
    from evals.firing.measure import load_passages

    return load_passages(data_dir=data_dir, limit=400)


@pytest.fixture(scope="session")
def calibration_queries(smollm2, data_dir) -> torch.Tensor:
    """Gated activations of generic text (SciQ support + MMLU questions) for per-key thresholds.

    The calibration text is never the evaluation text (LAMBADA and generated prompts).
    """
    from evals.firing.fire_rate import calibration_texts, gated_queries

    model, tok = smollm2
    texts = calibration_texts(data_dir, limit=int(os.environ.get("NEURALDB_CALIB_TEXTS", "400")))
    acts = [a[v].float() for _, a, v, _, _ in gated_queries(model, tok, texts, layer=LAYER, max_len=96,
                                                             batch_size=32)]
    return torch.cat(acts)


@pytest.fixture(scope="session")
def key_cache(tmp_path_factory) -> dict:
    """Per-session memo of fact keys: {(fact.id, prompt, subject, bare_weight): key}."""
    return {}


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE} (HYPOTHESIS_PROFILE)"


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
