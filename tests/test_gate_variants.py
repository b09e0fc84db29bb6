"""`neuraldb gate-variants` (evals.firing.gate_variants): the gate variants measured on the same activations."""

import json

import torch


def test_identity_transform_is_the_plain_cosine_and_whitening_changes_it():
    from evals.firing.gate_variants import evaluate

    g = torch.Generator().manual_seed(0)
    d, n = 16, 12
    K = torch.randn(n, d, generator=g)
    acts = torch.cat([K[:4] + 0.05 * torch.randn(4, d, generator=g), torch.randn(40, d, generator=g)])
    cal = torch.randn(300, d, generator=g) * torch.linspace(0.2, 3.0, d)
    sets = {"eval": {"acts": acts, "prev": torch.randn(44, d, generator=g), "pos": torch.arange(44) + 1}}
    check = {"acts": cal[:50], "prev": cal[50:100], "pos": torch.arange(50) + 1, "norm": cal[:50].norm(dim=1)}
    kw = dict(gammas=(0.5, 0.9), margins=(0.0,), cal_fit=cal, cal_check=check, norm_range=None)
    plain = evaluate("k", K, None, sets, **kw)
    ident = evaluate("k", K, (torch.zeros(d), torch.eye(d)), sets, **kw)
    assert plain == ident
    assert plain[0]["eval_fires"] >= 4  # the four near-copies of keys fire at gamma 0.5
    lam, vec = torch.linalg.eigh(torch.cov(cal.T))
    white = evaluate("k", K, (cal.mean(0), vec @ torch.diag(lam.rsqrt()) @ vec.T), sets, **kw)
    assert white != plain


def test_study_previous_token_rule_only_removes_fires(smollm2, shared_data, tmp_path):
    """The previous-token check is an extra condition: with it, a rule never fires more nor
    recalls more than without it; the whitened variant is reported on the same activations."""
    from evals.firing.gate_variants import main

    out = tmp_path / "study.json"
    main(["--n", "24", "--eval-passages", "8", "--calib", "200", "--variants", "base", "whitened",
          "--prev", "0.3", "0.6", "--data-dir", str(shared_data), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    by = {(r["keys"], r["rule"]): r for r in rows}
    assert any("whitened" in k for k, _ in by) and any("prev>" in r for _, r in by)
    checked = 0
    for (keys, rule), r in by.items():
        if " prev>" not in rule:
            continue
        base = by[(keys, rule.split(" prev>")[0])]
        assert r["eval_fires"] <= base["eval_fires"]
        assert r["para_recall_any"] <= base["para_recall_any"]
        assert r["calib_check_fires"] <= base["calib_check_fires"]
        checked += 1
    assert checked >= 2 * 7 * 4 * 2  # variants x gammas x margins x prev thresholds
    loose, strict = by[(rows[0]["keys"], "gamma=0.5 perkey+0.0 prev>0.3")], by[(rows[0]["keys"], "gamma=0.5 perkey+0.0 prev>0.6")]
    assert strict["eval_fires"] <= loose["eval_fires"]
