"""Scoring of the gate variants study: exact top-2 retrieval, per-key calibration maxima, and the
figures of every gate rule for one key variant (``evaluate``), all on the same activations."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top2(q: torch.Tensor, k: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-1 score/index and top-2 score of unit queries q (P, d) against unit keys k (N, d)."""
    s1 = torch.full((q.shape[0],), -2.0, device=q.device)
    s2 = s1.clone()
    i1 = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    for qs in range(0, q.shape[0], chunk):
        qq = q[qs: qs + chunk]
        b1 = torch.full((qq.shape[0],), -2.0, device=q.device)
        b2, bi = b1.clone(), torch.zeros(qq.shape[0], dtype=torch.long, device=q.device)
        for ks in range(0, k.shape[0], chunk):
            s = qq @ k[ks: ks + chunk].T
            v, a = s.topk(min(2, s.shape[1]), dim=1)
            c1, c2 = v[:, 0], (v[:, 1] if v.shape[1] > 1 else torch.full_like(v[:, 0], -2.0))
            new1 = torch.maximum(b1, c1)
            new2 = torch.maximum(torch.minimum(b1, c1), torch.maximum(b2, c2))
            bi = torch.where(c1 > b1, a[:, 0] + ks, bi)
            b1, b2 = new1, new2
        s1[qs: qs + chunk], s2[qs: qs + chunk], i1[qs: qs + chunk] = b1, b2, bi
    return s1, i1, s2


@torch.no_grad()
def key_max(k: torch.Tensor, q: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """For each unit key, the largest cosine with any unit query: (N,)."""
    m = torch.full((k.shape[0],), -2.0, device=k.device)
    for ks in range(0, k.shape[0], chunk):
        kk = k[ks: ks + chunk]
        best = torch.full((kk.shape[0],), -2.0, device=k.device)
        for qs in range(0, q.shape[0], chunk):
            best = torch.maximum(best, (kk @ q[qs: qs + chunk].T).max(dim=1).values)
        m[ks: ks + chunk] = best
    return m


def evaluate(name: str, K: torch.Tensor, transform: tuple[torch.Tensor, torch.Tensor | None] | None,
             sets: dict[str, dict], *, gammas: Sequence[float], margins: Sequence[float], cal_fit: torch.Tensor,
             cal_check: dict[str, torch.Tensor], norm_range: tuple[float, float] | None, tok=None, worst: int = 0,
             prev_keys: torch.Tensor | None = None, multi: torch.Tensor | None = None,
             prev_ps: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Rows of figures for one key variant under every gate rule.

    ``transform`` is (mean, W or None): cosines are taken between ``(x - mean) @ W``.
    ``prev_keys`` (N, d) and ``multi`` (N,) bool (subject of two or more tokens) enable
    the previous-token rules, one per threshold in ``prev_ps``.
    """
    mean, W = transform if transform is not None else (torch.zeros(K.shape[1], device=K.device), None)
    k = _space(K, mean, W)
    pk = _space(prev_keys, mean, W) if prev_keys is not None and prev_ps else None
    res = {sname: _scores(s, k, pk, mean, W) for sname, s in list(sets.items()) + [("_check", cal_check)]}
    m_fit = key_max(k, _space(cal_fit, mean, W))
    m_small = {n: key_max(k, _space(cal_fit[:n], mean, W)) for n in (5000, 20000) if n < cal_fit.shape[0]}
    rules = gate_rules(gammas, margins, m_fit, m_small, norm_range, multi, prev_ps if pk is not None else ())
    rows = [figures(name, rule, gate_of, sets, res, cal_check) for rule, gate_of in rules]
    if worst and tok is not None:
        rows[0]["worst"] = _worst(sets["eval"], res["eval"], tok, worst)
    return rows


def _space(x: torch.Tensor, mean: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    """(P, d) -> unit rows in the variant's space ``(x - mean) @ W``."""
    y = x - mean
    return unit(y @ W if W is not None else y)


def _scores(s: dict[str, torch.Tensor], k: torch.Tensor, pk: torch.Tensor | None, mean: torch.Tensor,
            W: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-1 score and index, top-2 score and, with previous-token keys, the previous-token cosine (P,)."""
    s1, i1, s2 = top2(_space(s["acts"], mean, W), k)
    pc = (_space(s["prev"], mean, W) * pk[i1]).sum(1) if pk is not None else None
    return s1, i1, s2, pc


Rule = Callable[..., torch.Tensor]  # (s1, i1, s2, set, pc) -> (P,) bool fire


def gate_rules(gammas: Sequence[float], margins: Sequence[float], m_fit: torch.Tensor,
               m_small: dict[int, torch.Tensor], norm_range: tuple[float, float] | None,
               multi: torch.Tensor | None, prev_ps: Sequence[float]) -> list[tuple[str, Rule]]:
    """Every gate rule measured, in report order: (name, rule)."""
    rules: list[tuple[str, Rule]] = []
    for g in gammas:
        rules.append((f"gamma={g}", _above(g)))
        for mg in margins:
            thr = torch.clamp(m_fit + mg, min=g)
            rules.append((f"gamma={g} perkey+{mg}", _per_key(thr)))
            rules += [(f"gamma={g} perkey+{mg} prev>{p}", _per_key_prev(thr, p, multi)) for p in prev_ps]
        for n, m in m_small.items():
            for mg in (0.02, 0.05):
                rules.append((f"gamma={g} perkey[cal={n}]+{mg}", _per_key(torch.clamp(m + mg, min=g))))
        rules += [(f"gamma={g} top2gap>{d}", _top2_gap(g, d)) for d in (0.02, 0.05)]
        if norm_range is not None:
            rules.append((f"gamma={g} norm-in-range", _norm_in_range(g, *norm_range)))
    return rules


def _above(g: float) -> Rule:
    return lambda s1, i1, s2, s, pc: s1 > g


def _per_key(thr: torch.Tensor) -> Rule:
    return lambda s1, i1, s2, s, pc: s1 > thr[i1]


def _per_key_prev(thr: torch.Tensor, p: float, multi: torch.Tensor) -> Rule:
    def rule(s1, i1, s2, s, pc):
        exempt = ~multi.to(i1.device)[i1] | (s["pos"].to(i1.device) < 2)  # one-token subject / after the sink
        return (s1 > thr[i1]) & ((pc > p) | exempt)
    return rule


def _top2_gap(g: float, d: float) -> Rule:
    return lambda s1, i1, s2, s, pc: (s1 > g) & (s1 - s2 > d)


def _norm_in_range(g: float, lo: float, hi: float) -> Rule:
    def rule(s1, i1, s2, s, pc):
        n = s["norm"]
        return (s1 > g) & (n >= lo) & (n <= hi)
    return rule


def figures(keys: str, rule: str, gate_of: Rule, sets: dict[str, dict], res: dict[str, tuple],
            cal_check: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One row: a rule's fires on the text sets, recall on the fact sets, fires on the calibration check half."""
    row: dict[str, Any] = {"keys": keys, "rule": rule}
    for sname, s in sets.items():
        s1, i1, s2, pc = res[sname]
        fire = gate_of(s1, i1, s2, s, pc)
        owner = s.get("owner")
        if owner is None:
            row[f"{sname}_fires"] = int(fire.sum())
            row[f"{sname}_positions"] = int(fire.numel())
        elif sname.startswith("neigh"):
            row[f"{sname}_fires"] = int(fire.sum())
            row[f"{sname}_own_fires"] = int((fire & (i1 == owner)).sum())
            row[f"{sname}_positions"] = int(fire.numel())
        else:
            row.update(_recall(sname, s, fire, i1, owner))
    row["calib_check_fires"] = int(gate_of(*res["_check"][:3], cal_check, res["_check"][3]).sum())
    return row


def _recall(sname: str, s: dict, fire: torch.Tensor, i1: torch.Tensor, owner: torch.Tensor) -> dict[str, Any]:
    """Recall of a fact set's prompts: any position fires its own fact, or the subject's last token does."""
    own = fire & (i1 == owner)
    rowid = s["row"].to(fire.device)
    n_rows = int(s["n_rows"])
    subj = s["subj"].to(fire.device)

    def hits(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_rows, dtype=torch.bool, device=fire.device).index_put_((index,), values, accumulate=True)

    any_hit, subj_hit = hits(rowid, own), hits(rowid[subj], own[subj])
    has_subj = hits(rowid[subj], torch.ones_like(own[subj]))
    return {f"{sname}_recall_any": round(float(any_hit.float().mean()), 4),
            f"{sname}_recall_subject": round(float(subj_hit[has_subj].float().mean()), 4),
            f"{sname}_wrong_fires": int((fire & (i1 != owner)).sum())}


def _worst(s: dict, scores: tuple, tok, worst: int) -> list[dict[str, Any]]:
    """The ``worst`` highest top-1 scores on the evaluation text: score, key, token, position."""
    s1, i1 = scores[0], scores[1]
    top = s1.topk(min(worst, s1.numel()))
    return [{"score": round(float(v), 4), "key": int(i1[j]), "token": tok.decode([int(s["ids"][j])]),
             "pos": int(s["pos"][j])} for v, j in zip(top.values.tolist(), top.indices.tolist())]
