"""The policy schema documents itself: the README's table is generated from the dataclass fields,
and every field a policy file may hold has its documentation there once."""

from __future__ import annotations

import dataclasses

from evals.policy import Criteria, Evaluation, Policy, Regression, policy_table_markdown, resolve_policy

from conftest import REPO


def test_readme_policy_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = policy_table_markdown()
    assert table in readme, "README.md's policy table is stale: paste evals.policy.policy_table_markdown() over it"
    section = readme[readme.index("## Releasing a store"):]
    assert section.count("| policy field |") == 1  # one table, in the release section


def test_every_policy_field_is_documented_once_in_the_table():
    table = policy_table_markdown()
    for section, cls in (("evaluation", Evaluation), ("criteria", Criteria), ("regression", Regression)):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc") and f.metadata.get("example"), f"{cls.__name__}.{f.name} has no doc"
            assert table.count(f"| `{section}.{f.name}` |") == 1
    file_fields = [f.name for f in dataclasses.fields(Policy) if f.metadata.get("file", True)]
    assert sorted(file_fields) == ["confidence", "criteria", "evaluation", "regression", "version"]
    assert all(table.count(f"| `{name}` |") == 1 for name in file_fields)


def test_packaged_policies_use_only_documented_fields():
    for name in ("default", "strict"):
        policy = resolve_policy(name)
        resolved = policy.to_dict()
        for section in ("evaluation", "criteria", "regression"):
            documented = {f.name for f in dataclasses.fields({"evaluation": Evaluation, "criteria": Criteria,
                                                               "regression": Regression}[section])}
            assert set(resolved[section] or {}) <= documented
