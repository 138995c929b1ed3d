"""Fidelity against the source model (`pytest evals --reference REF`): KLD, top-1 agreement, PPL ratio and Δp of
the model's next-token distributions against the source checkpoint's (or a stored reference), over the text of
--fidelity-text or the suite's `fidelity:` section, checked against that section's thresholds."""
from __future__ import annotations

import json

import pytest

from ane_eval import fidelity

SHOWN = ("mean_kld", "top1_agreement", "ppl_ratio", "rms_dp")


def test_fidelity(ane_session, model, ane_reference):
    if ane_reference is None:
        pytest.skip("pass --reference REF (the source checkpoint, or a stored reference) to measure fidelity")
    s = ane_session
    try:
        texts = [fidelity.read_text(t) for t in s.fidelity_texts]
        plan = fidelity.plan(model, ane_reference, texts, s.fidelity_max_tokens)
        report = fidelity.run(plan, progress=False)
        rows = fidelity.check(report, s.fidelity_thresholds, show=SHOWN)
    except fidelity.FidelityError as e:
        s.failed = True
        pytest.fail(f"{e} (fidelity text: --fidelity-text FILE or the suite's fidelity: text)", pytrace=False)
    s.output_dir.mkdir(parents=True, exist_ok=True)
    (s.output_dir / "fidelity.json").write_text(json.dumps(fidelity.json_report(report), indent=2) + "\n")
    s.rows.extend(rows)
    s.kld = list(report["positions"]["kld"])  # the report's KLD histogram
    if any(r.failed for r in rows):
        s.failed = True
        from ane_eval.gate import format_table
        pytest.fail(f"fidelity did not pass:\n{fidelity.format_report(report)}\n{format_table(rows)}", pytrace=False)
