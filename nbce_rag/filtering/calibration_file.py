"""The calibration file (``calibration.json``, ``calibration.synthetic.json``, the shipped priors).

Format ``nbce-rag/margin-threshold``, version 2 (written by every nbce-rag that has the two
decisions)::

    {"format": "nbce-rag/margin-threshold", "version": 2, "encoder_identity": "...",
     "threshold": t, "margin": m, "lower": lo, "upper": up,     # the keep rule and the band
     "rule": "keep i iff ...; supported iff s_max >= support.threshold",
     "keep":    {"threshold": t, "margin": m, "rule": ..., "ci": {...}, "stats": {"method": ...}},
     "support": {"threshold": ts, "rule": ..., "ci": {...}, "stats": {"method": ...}},
     "ci": {...}, "stats": {...}}

``keep.threshold`` / ``keep.margin`` repeat the top-level ``threshold`` / ``margin`` (which a
version-1 reader would use) and must equal them. A **version-1** file (one rule) loads
unchanged: its rule is the keep rule, and ``support.threshold`` is its threshold
(``stats.method = "single_rule"``), i.e. exactly the behaviour it was written for.

Every field is checked on load (:class:`~nbce_rag.errors.CorruptFileError` naming it) and
before saving (:class:`~nbce_rag.errors.CalibrationError`), so a file that loads is usable.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from nbce_rag.filtering.decisions import KEEP_CI_KEYS, KEEP_RULE, SUPPORT_RULE, SupportDecision

FORMAT_NAME = "nbce-rag/margin-threshold"
FORMAT_VERSION = 2

#: how far a stored threshold may lie outside [-1, 1] (float32 cosines of equal texts exceed 1
#: by rounding, and "above every score" is the next float above the highest one)
COSINE_SLACK = 1e-3
#: stats keys that report() formats as numbers
NUMERIC_STATS = ("ci_level", "margin_quantile", "margin_none_fraction", "recall_target", "precision_target",
                 "global_threshold", "k", "n_scores", "n_positives", "n_negatives", "n_queries",
                 "n_bootstrap", "n_bootstrap_used", "n_margin_spreads")
#: numbers report() reads from keep.stats / support.stats
KEEP_NUMERIC_STATS = ("recall_target", "keep_recall", "rows", "n_answerable", "n_queries")
SUPPORT_NUMERIC_STATS = ("flag_target", "supported_target", "n_in_domain", "n_off_topic")

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "COSINE_SLACK", "calibration_dict", "check_calibration_dict",
           "single_rule_support"]

Bad = Callable[[str], Exception]


def single_rule_support(threshold: float, ci: Optional[Mapping[str, Any]] = None, note: str = "") -> SupportDecision:
    """The support decision of a one-rule calibration: ``s_max >= threshold`` (what "some
    candidate passes" meant)."""
    stats: Dict[str, Any] = {"method": "single_rule"}
    if note:
        stats["note"] = note
    c = (ci or {}).get("threshold")
    return SupportDecision(threshold=float(threshold), ci={"threshold": tuple(c)} if c else {}, stats=stats)


def calibration_dict(th: Any) -> Dict[str, Any]:
    """The version-2 dict of a :class:`~nbce_rag.filtering.threshold.MarginThreshold`."""
    stats = dict(th.stats)
    keep_stats = stats.pop("keep", None) or {"method": "single_rule"}
    ci = {k: (list(v) if v is not None else None) for k, v in th.ci.items()}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "encoder_identity": th.encoder_identity,
        "threshold": th.threshold,
        "lower": th.lower,
        "upper": th.upper,
        "margin": th.margin,
        "rule": f"{KEEP_RULE}; {SUPPORT_RULE}",
        "keep": {"threshold": th.threshold, "margin": th.margin, "rule": KEEP_RULE,
                 "ci": {k: ci[k] for k in KEEP_CI_KEYS if k in ci}, "stats": keep_stats},
        "support": th.support.to_dict(),
        "ci": ci,
        "stats": stats,
    }


def _number(bad: Bad, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{key} must be a finite number (got {value!r})")
    return float(value)


def _cosine(bad: Bad, key: str, value: Any) -> float:
    x = _number(bad, key, value)
    if abs(x) > 1.0 + COSINE_SLACK:
        raise bad(f"{key} {x!r} is outside the cosine range [-1, 1]")
    return x


def _margin(bad: Bad, key: str, m: Any) -> Optional[float]:
    if m is None:
        return None
    m = _number(bad, key, m)
    if not 0.0 <= m <= 2.0 + COSINE_SLACK:
        raise bad(f"{key} {m!r} must be in [0, 2] (a difference of cosines), or null for no margin")
    return m


def _ci(bad: Bad, where: str, raw: Any) -> Dict[str, Optional[Tuple[float, float]]]:
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise bad(f"field '{where}' must be an object (got {raw!r})")
    ci: Dict[str, Optional[Tuple[float, float]]] = {}
    for k, v in raw.items():
        if v is None:
            ci[str(k)] = None
            continue
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise bad(f"{where}.{k} must be a [low, high] pair or null (got {v!r})")
        a, b = _number(bad, f"{where}.{k}[0]", v[0]), _number(bad, f"{where}.{k}[1]", v[1])
        if a > b:
            raise bad(f"{where}.{k} has low {a!r} > high {b!r}")
        ci[str(k)] = (a, b)
    return ci


def _stats(bad: Bad, where: str, raw: Any, numeric: Tuple[str, ...]) -> Dict[str, Any]:
    stats = raw if raw is not None else {}
    if not isinstance(stats, Mapping):
        raise bad(f"field '{where}' must be an object (got {stats!r})")
    for k in numeric:
        if stats.get(k) is not None or (k == "ci_level" and k in stats):
            _number(bad, f"{where}.{k}", stats[k])
    return dict(stats)


def check_calibration_dict(d: Mapping[str, Any], bad: Bad) -> Dict[str, Any]:
    """Check every field of a calibration dict (version 1 or 2); return ``MarginThreshold``
    keyword arguments (``support`` included). ``bad(message)`` makes the exception to raise
    (CorruptFileError on load, CalibrationError on save)."""
    version = d.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise bad(f"field 'version' must be an integer in [1, {FORMAT_VERSION}] (got {version!r})")
    ident = d.get("encoder_identity")
    if not isinstance(ident, str) or not ident.strip():
        raise bad(f"field 'encoder_identity' must name the encoder the scores came from (got {ident!r}); "
                  "without it the encoder check is impossible")
    for key in ("threshold", "lower", "upper"):
        if key not in d:
            raise bad(f"field {key!r} is missing")
    t, lo, up = (_cosine(bad, k, d[k]) for k in ("threshold", "lower", "upper"))
    if not lo <= t <= up:
        raise bad(f"the band is inconsistent: need lower <= threshold <= upper, got {lo!r}, {t!r}, {up!r}")
    m = _margin(bad, "margin", d.get("margin"))
    ci = _ci(bad, "ci", d.get("ci"))
    stats = _stats(bad, "stats", d.get("stats"), NUMERIC_STATS)
    for k in ("rule", "global_threshold_metrics"):
        sub = stats.get(k)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise bad(f"stats.{k} must be an object (got {sub!r})")
        for key in ("precision", "recall", "f1") if sub else ():
            _number(bad, f"stats.{k}.{key}", sub.get(key))
    if version == 1:
        support = single_rule_support(t, ci, note="version-1 calibration: one rule for both decisions")
        return dict(threshold=t, lower=lo, upper=up, margin=m, encoder_identity=ident, ci=ci, stats=stats,
                    support=support)
    keep = d.get("keep")
    if not isinstance(keep, Mapping):
        raise bad(f"field 'keep' must be an object with the keep rule (got {keep!r})")
    if "threshold" not in keep:
        raise bad("field 'keep.threshold' is missing")
    kt = _cosine(bad, "keep.threshold", keep["threshold"])
    km = _margin(bad, "keep.margin", keep.get("margin"))
    if kt != t or km != m:
        raise bad(f"keep.threshold/keep.margin ({kt!r}, {km!r}) differ from threshold/margin ({t!r}, {m!r}); "
                  "they are the same rule")
    ci.update(_ci(bad, "keep.ci", keep.get("ci")))
    kstats = _stats(bad, "keep.stats", keep.get("stats"), KEEP_NUMERIC_STATS)
    if kstats:
        stats["keep"] = kstats
    sup = d.get("support")
    if not isinstance(sup, Mapping):
        raise bad(f"field 'support' must be an object with the support rule (got {sup!r})")
    if "threshold" not in sup:
        raise bad("field 'support.threshold' is missing")
    support = SupportDecision(threshold=_cosine(bad, "support.threshold", sup["threshold"]),
                              ci=_ci(bad, "support.ci", sup.get("ci")),
                              stats=_stats(bad, "support.stats", sup.get("stats"), SUPPORT_NUMERIC_STATS))
    return dict(threshold=t, lower=lo, upper=up, margin=m, encoder_identity=ident, ci=ci, stats=stats,
                support=support)
