"""Report from a store filled with known numbers: every statistic against statsmodels or a hand
count, the golden Markdown (regenerate with QS_UPDATE_GOLDEN=1), and the rules (speed-up,
retention, recommendations, read-only re-rendering). The original reports: test_report_original.py."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from quantstudy.errors import QuantStudyError
from quantstudy.report import write_report
from quantstudy.report.analysis import PairKind, analyze
from quantstudy.report.deploy import NOT_4BIT
from quantstudy.report.recommend import recommendations
from quantstudy.store import Store
from tests.fixtures import synthetic_study as syn

MiB_1 = 1024 * 1024
GOLDEN = Path(__file__).parent / "fixtures" / "golden_report.md"


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "study" / "store.sqlite")
    syn.fill(s)
    return s


def test_markdown_matches_golden(store: Store, tmp_path: Path) -> None:
    out = write_report(store, tmp_path / "study", {"md"})
    text = (tmp_path / "study" / "report.md").read_text()
    if os.environ.get("QS_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
        pytest.skip(f"golden file rewritten: {GOLDEN}")
    assert text == GOLDEN.read_text(), "report.md changed; inspect the diff, then QS_UPDATE_GOLDEN=1 pytest to accept"
    assert {p.name for p in out} >= {"report.md", "report-per_task.png", "report-flips.png",
                                     "report-accuracy_vs_size.png", "report-kl_vs_size.png", "report-train_loss.png"}


def test_scores_are_recomputed_from_items(store: Store) -> None:
    # a metric that disagrees with the items must not leak into the report
    store.put_metric("base", "eval.arc_easy.acc", 0.99, {})
    a = analyze(store)
    right = syn.correctness()
    for model, per_task in right.items():
        for task, outcomes in per_task.items():
            metric = "acc" if task in ("arc_easy", "mmlu") else "em"
            s = a.score(model, task, metric)
            k, n = sum(outcomes), len(outcomes)
            lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
            assert (s.n, s.value) == (n, k / n)
            assert (s.lo, s.hi) == pytest.approx((lo, hi), abs=1e-12)


def test_paired_tests_flips_and_holm(store: Store) -> None:
    a = analyze(store)
    right = syn.correctness()
    for model, flips in syn.FLIPS.items():
        parent = a.model(model).parent
        for task, (rw, wr) in flips.items():
            c = next(c for c in a.between(parent, model) if c.task == task and c.kind.value == "binary")
            assert (c.right_to_wrong, c.wrong_to_right) == (rw, wr)
            pa, pb = right[parent][task], right[model][task]
            table = [[sum(x and y for x, y in zip(pa, pb)), rw], [wr, sum(not x and not y for x, y in zip(pa, pb))]]
            assert c.p == pytest.approx(mcnemar(table, exact=True).pvalue, abs=1e-12)
            assert c.diff == pytest.approx((wr - rw) / len(pa))
    # one Holm family over every comparison of the report (each pair once)
    ref = multipletests([c.p for c in a.comparisons], method="holm")[1]
    assert [c.p_holm for c in a.comparisons] == pytest.approx(list(ref))
    pairs = {frozenset((c.ref, c.other)) for c in a.comparisons}
    assert len(pairs) == 8  # 5 vs parent, 1 method, 1 calibration, 1 training
    assert len(a.comparisons) == 8 * 6  # 6 metrics: 4 right/wrong + squad F1 + wikitext perplexity


def test_planned_pairs(store: Store) -> None:
    a = analyze(store)
    got = {(p.kind, p.ref, p.other) for p in a.pairs if p.kind != PairKind.parent}
    assert got == {(PairKind.method, "gptq-c64", "awq-c64"), (PairKind.calibration, "gptq-c64", "gptq-c128"),
                   (PairKind.training, "gptq-c64", "tuned-gptq-c64")}


def test_speedup_memory_and_labels(store: Store) -> None:
    a = analyze(store)
    g, awq = a.deploy_of("gptq-c64"), a.deploy_of("awq-c64")
    # packed and paired on a quiet machine: the paired ratio with its interval, no 4-bit caveat
    assert g.speedup == pytest.approx(1.90) and (g.speedup_lo, g.speedup_hi) == (1.71, 2.08)
    assert "95% CI 1.71-2.08x" in g.speedup_note and g.caveat == ""
    assert g.mem_reduction_bytes == pytest.approx(350 * syn.MiB)  # parent 1200 MiB (paired) - 850 MiB packed
    assert g.mem_reduction_pct == pytest.approx(350 / 1200 * 100)
    assert g.kl_packed == pytest.approx(0.0009)
    # packed but measured on a busy machine: no ratio, the measurement's own reason
    busy = a.deploy_of("gptq-c128")
    assert busy.speedup is None and busy.speedup_note == "not comparable: the machine was busy (load 3.6 on 2 cores)"
    # an old store's unpaired, decompressed figures: a ratio, marked unpaired and not 4-bit
    old = a.deploy_of("tuned-gptq-c64")
    assert old.speedup == pytest.approx(2.0 / 2.1) and "unpaired" in old.speedup_note
    assert old.caveat == NOT_4BIT and a.deploy_of("base").caveat == ""
    assert g.size_reduction_pct == pytest.approx(100 * (540 - 160) / 540)
    # 168 vs 60 tokens per response: no speed-up number, a warning instead
    assert awq.speedup is None and "2.8x the tokens" in awq.speedup_note
    flagged = {(h.model, h.source) for h in a.health if h.flags}
    assert flagged == {("awq-c64", "gsm8k"), ("awq-c64", "squad_v2"), ("awq-c64", "speed benchmark")}


def test_retention_wording(store: Store, tmp_path: Path) -> None:
    write_report(store, tmp_path / "study", {"md"})
    md = (tmp_path / "study" / "report.md").read_text()
    # tuned on arc_easy: 63.3/60.0 = 105.6%, not significant -> within noise; on gsm8k significant -> no hedge
    assert "| tuned | 63.3% [50.7, 74.4] | base | +3.3 pt" in md
    assert "105.6% [92, 121] within noise" in md
    row = next(line for line in md.splitlines() if line.startswith("| tuned | 70.0%"))
    assert "233.3%" in row and "within noise" not in row and "**tuned**" in row
    assert "not a 4-bit deployment figure" in md
    assert "no speed-up: generates 2.8x the tokens per response of base" in md


def test_recommendation_rules(store: Store) -> None:
    recs = {r.topic: r for r in recommendations(analyze(store))}
    # n = 30-60 per task: no variant's loss bound gets near a 1-point margin, so no deployment choice, and the
    # verdict names each deciding metric's best bound and the items it would need
    dep = recs["deployment"]
    assert dep.model is None and dep.rule.startswith("R1 (non-inferiority)")
    assert dep.verdict.startswith("no recommendation at this n: arc_easy acc: best bound 12.8 pt (gptq-c128) > "
                                  "margin 1 pt; would need ~")
    for label in ("arc_easy acc", "gsm8k em", "mmlu acc", "squad_v2 em"):
        assert f"{label}: best bound" in dep.verdict
    # tuned: better on gsm8k, worse on wikitext perplexity -> named as such, no overall preference
    assert recs["most accurate"].model == "tuned"
    assert "base better on wikitext word_perplexity; tuned better on gsm8k em" in recs["most accurate"].verdict
    assert recs["training: base vs tuned"].model is None
    assert recs["training: base vs tuned"].verdict.startswith("no preference: base better on wikitext")
    # gptq-c64 wins only wikitext perplexity vs awq-c64 and loses nothing -> preferred under R3
    assert recs["method at equal calibration: gptq-c64 vs awq-c64"].model == "gptq-c64"


def test_rerender_reads_only_and_is_identical(store: Store, tmp_path: Path) -> None:
    db = sqlite3.connect(store.path)
    before = list(db.iterdump())
    out1 = {p: p.read_bytes() for p in write_report(store, tmp_path / "study")}
    out2 = {p: p.read_bytes() for p in write_report(store, tmp_path / "study")}
    assert out1 == out2
    assert list(db.iterdump()) == before
    assert not [p for p in (tmp_path / "study").iterdir() if p.name.endswith(".tmp")]


def test_results_json_is_strict_and_complete(store: Store, tmp_path: Path) -> None:
    (path,) = write_report(store, tmp_path / "study", {"json"})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert len(data["comparisons"]) == 48
    c = next(c for c in data["comparisons"] if (c["other"], c["task"]) == ("tuned", "gsm8k"))
    assert c["significant"] is True and c["better"] == "tuned" and c["right_to_wrong"] == 0
    assert data["meta"]["config"]["name"] == "synthetic-demo"
    assert not (tmp_path / "study" / "report.md").exists()


def test_mmlu_breakdown_is_micro_average(store: Store) -> None:
    a = analyze(store)
    right = syn.correctness()["gptq-c64"]["mmlu"]
    for subject, category in syn.SUBJECTS:
        idx = [i for i in range(len(right)) if syn.SUBJECTS[i % 4][0] == subject]
        s = next(s for s in a.mmlu_subject if (s.model, s.task) == ("gptq-c64", subject))
        assert (s.n, s.value) == (len(idx), sum(right[i] for i in idx) / len(idx))
    stem = next(s for s in a.mmlu_category if (s.model, s.task) == ("gptq-c64", "stem"))
    idx = [i for i in range(len(right)) if syn.SUBJECTS[i % 4][1] == "stem"]
    assert stem.value == sum(right[i] for i in idx) / len(idx)


def test_items_with_different_content_are_not_paired(store: Store) -> None:
    rec = next(r for m, r in store.items(model="gptq-c64", task="arc_easy"))
    rec.item_hash = "different"
    store.put_items("gptq-c64", [rec])
    a = analyze(store)
    c = next(c for c in a.between("base", "gptq-c64") if c.task == "arc_easy")
    assert (c.n, c.excluded) == (59, 1)
    assert any("content hash" in w for w in a.warnings)


def test_bad_input_errors(tmp_path: Path, store: Store) -> None:
    with pytest.raises(QuantStudyError, match="--format.*pdf"):
        write_report(store, tmp_path / "x", {"md", "pdf"})
    with pytest.raises(QuantStudyError, match="holds no models"):
        write_report(Store(tmp_path / "empty" / "store.sqlite"), tmp_path / "empty")


def test_bootstrap_p_floor_warning(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # 500 resamples: p >= 1/501, and 48 comparisons * 1/501 > 0.05, so no bootstrap test can win after Holm
    from quantstudy.report import stats

    monkeypatch.setattr(stats, "BOOT_RESAMPLES", 500)
    a = analyze(store)
    assert any("cannot reach Holm significance" in w for w in a.warnings)
    assert not [c for c in a.comparisons if c.test == "paired bootstrap" and c.significant]
    assert min(c.p for c in a.comparisons if c.test == "paired bootstrap") == pytest.approx(1 / 501)


def test_models_made_under_different_versions_are_flagged():
    from quantstudy.report.analysis import version_warnings
    from quantstudy.store import ModelRecord

    recs = [ModelRecord("base", "baseline", "/b", versions={"torch": "2.13.0", "llmcompressor": "0.14.0.1"}),
            ModelRecord("q", "quantized", "/q", parent="base", versions={"torch": "2.13.0", "llmcompressor": "0.15.0"})]

    class P:  # the two fields version_warnings reads
        ref, other = "base", "q"

    (w,) = version_warnings(recs, [P()])
    assert "llmcompressor 0.14.0.1 vs 0.15.0" in w and "torch" not in w
    recs[1].versions["llmcompressor"] = "0.14.0.1"
    assert version_warnings(recs, [P()]) == []


def test_unevaluated_and_incomplete_models(store: Store) -> None:
    from quantstudy.store import ModelRecord

    # a variant quantized but never evaluated must not be recommended (it has nothing to lose)
    store.put_model(ModelRecord("rtn", "quantized", "/r", "base", {"method": "rtn", "bits": 4, "group_size": 64,
                                                                  "symmetric": True, "describe": "RTN W4 g64"}, MiB_1))
    # an evaluation killed mid-task: gptq-c128 keeps only 10 of 60 arc_easy items
    db = sqlite3.connect(store.path)
    db.execute("DELETE FROM items WHERE model='gptq-c128' AND task='arc_easy' AND item_id NOT IN "
               + "(" + ",".join(f"'arc_easy-{i}'" for i in range(10)) + ")")
    db.commit()
    a = analyze(store)
    recs = {r.topic: r for r in recommendations(a)}
    assert recs["deployment"].model != "rtn"
    assert any("not evaluated" in w and "rtn" in w for w in a.warnings)
    assert any(w.startswith("gptq-c128 has 10 of the 60 arc_easy items") for w in a.warnings)
    (c,) = [c for c in a.between("base", "gptq-c128") if c.task == "arc_easy"]
    assert c.n == 10


def test_empty_answers_count_only_where_an_answer_is_expected(store: Store) -> None:
    # awq-c64's first item of each generative task is empty; squad item 0 is unanswerable (empty is right)
    a = analyze(store)
    h = {(x.model, x.source): x for x in a.health}
    assert h["awq-c64", "gsm8k"].empty_share == pytest.approx(1 / 30)
    assert h["awq-c64", "squad_v2"].empty_share == 0.0


def test_health_flags_are_relative_to_the_parent() -> None:
    from quantstudy.report.deploy import Health, _flags

    parent = Health("base", "squad_v2", 12, 0.25, 0.50, 7.0)
    assert _flags(Health("base", "squad_v2", 12, 0.25, 0.50, 7.0), None) == [
        "25% of responses hit max_new_tokens", "50% empty responses"]  # the baseline's own pathology
    assert _flags(Health("q", "squad_v2", 12, 0.25, 0.40, 8.0), parent) == []  # inherited, not the variant's
    assert _flags(Health("q", "squad_v2", 12, 0.55, 0.40, 8.0), parent) == [
        "55% of responses hit max_new_tokens (parent 25%)"]
    # the speed benchmark stops at its own cap on purpose: only a derived model's excess is flagged
    bench = Health("base", "speed benchmark", None, 1.0, 0.0, 64.0)
    assert _flags(bench, None) == []
    assert _flags(Health("q", "speed benchmark", None, 0.3, 0.0, 60.0), Health("b", "speed benchmark", None, 0.1,
                                                                             0.0, 40.0)) == [
        "30% of responses hit max_new_tokens (parent 10%)"]


def test_tie_names_the_range_of_n() -> None:
    from quantstudy.report.recommend import _pair_text

    class C:  # the two fields _pair_text reads
        def __init__(self, n: int) -> None:
            self.n, self.better, self.label, self.kind = n, None, "x", "binary"
            self.right_to_wrong = self.wrong_to_right = 3

    assert _pair_text([C(2), C(57), C(40)], "a", "b") == "inconclusive at this n (n = 2 to 57 per metric, " \
                                                        "alpha = 0.05 after Holm)"
    assert _pair_text([C(40)], "a", "b") == "inconclusive at this n (n = 40, alpha = 0.05 after Holm)"
    # with the study's margin: the items that would show the two within it (6 of 40 discordant, 1 point)
    from quantstudy.report import stats
    from quantstudy.report.items import Kind

    c = C(40)
    c.kind = Kind.binary
    assert _pair_text([c], "a", "b", 0.01).endswith(
        f"; would need ~{stats.n_noninferiority_binary(0.15, 0.01)} items to show they are within 1 pt of each other)")


def test_run_times_table(store: Store, tmp_path: Path) -> None:
    # stage times come from the stage log, per-task times from the evaluation stage's time.eval.* metrics
    store.stage_start("k-quant", "quantize", "gptq-c64")
    store.stage_finish("k-quant", "/x", {"seconds": 83.0})
    store.stage_start("k-running", "evaluate", "gptq-c64")  # unfinished: no time is claimed for it
    store.put_metric("gptq-c64", "time.eval.arc_easy", 12.5, {"items_scored": 40})
    a = analyze(store)
    assert a.times == {"gptq-c64": {"quantize": 83.0, "evaluate": 12.5, "evaluate: arc_easy": 12.5}}
    write_report(store, tmp_path / "study", {"md", "json"})
    md = (tmp_path / "study" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| gptq-c64 |") and "83.00 s" in line)
    assert "12.50 s" in row
    assert json.loads((tmp_path / "study" / "results.json").read_text())["wall_seconds"]["gptq-c64"]["quantize"] == 83.0


def test_training_loss_span_is_a_mean_over_a_fifth_of_the_steps() -> None:
    from quantstudy.report.sections_compare import _loss_span

    curve = [(float(s), float(s)) for s in range(1, 16)]  # 15 steps, loss = step
    assert _loss_span(curve, first=True) == "2.000 (steps 1-3)"  # (1 + 2 + 3) / 3
    assert _loss_span(curve, first=False) == "14.000 (steps 13-15)"
    assert _loss_span(curve[:2], first=False) == "2.000 (step 2)"
    assert _loss_span([], first=True) == "—"
