"""Deployment decisions by non-inferiority (report/decide.py, recommend.R1) and sample-size planning.

The bounds themselves are checked against independent computations in test_stats.py (restricted MLE,
exact unconditional test, coverage and power by simulation); here: that the report applies them to the
right items, margins and alpha, and that its words follow the verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantstudy.report import stats
from quantstudy.config import parse_config
from quantstudy.report import write_report
from quantstudy.report.analysis import analyze
from quantstudy.report.decide import EVAL_ITEMS, plan_rows
from quantstudy.report.recommend import ranking, recommendations
from quantstudy.store import ItemRecord, ModelRecord, Store
from tests.fixtures import synthetic_study as syn

QUANT = ["gptq-c64", "gptq-c128", "awq-c64", "tuned-gptq-c64"]


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "study" / "store.sqlite")
    syn.fill(s)
    return s


def test_bounds_are_tango_on_the_flips_at_alpha_split_over_variants(store: Store) -> None:
    a = analyze(store)
    alpha = 0.05 / len(QUANT)  # four candidate variants
    for model in QUANT:
        for task, (rw, wr) in syn.FLIPS[model].items():
            (r,) = [r for r in a.noninferiority if r.other == model and r.task == task and r.kind.value == "binary"]
            n = syn.N[task]
            assert (r.n, r.alpha, r.deciding) == (n, alpha, True)
            assert r.loss == pytest.approx((rw - wr) / n)
            assert r.bound == pytest.approx(stats.tango_upper(rw, wr, n, alpha), abs=1e-12)
            assert r.margin == pytest.approx(0.01) and not r.shown
            assert r.n_needed == stats.n_noninferiority_binary((rw + wr) / n, 0.01, alpha)
            assert r.available == EVAL_ITEMS[task]
    # F1 and perplexity are assessed (bootstrap bound) but do not decide by default
    assert {r.metric for r in a.noninferiority if not r.deciding} == {"f1", "word_perplexity"}
    assert not [r for r in a.noninferiority if r.other in ("base", "tuned")]  # only quantized variants


def _big_study(s: Store, n: int, flips: dict[str, tuple[int, int]]) -> None:
    """A baseline with n arc_easy and n mmlu items (60% right), and quantized copies with stated flips."""
    base = syn.base_pattern(n, int(0.6 * n))

    def rows(task: str, right: list[bool]) -> list[ItemRecord]:
        return [ItemRecord(task, f"{task}-{i}", syn.item_hash(task, i), syn.item_hash("p", task, i), "g", "p", c, None,
                           {}) for i, c in enumerate(right)]

    s.put_model(ModelRecord("base", "baseline", "/m/base", None, {}, 540 * syn.MiB))
    s.put_items("base", rows("arc_easy", base) + rows("mmlu", base))
    for name, (rw, wr) in flips.items():
        s.put_model(ModelRecord(name, "quantized", f"/m/{name}", "base", {"method": "gptq", "bits": 4, "group_size": 64,
                                                                          "describe": name}, 160 * syn.MiB))
        right = syn.apply_flips(base, rw, wr)
        s.put_items(name, rows("arc_easy", right) + rows("mmlu", right))


def test_a_variant_that_matches_its_parent_on_enough_items_is_recommended(tmp_path: Path) -> None:
    # 2000 items per task; q-match changes 8 answers each way (true loss 0), q-loss loses 2.5 points net
    s = Store(tmp_path / "store.sqlite")
    _big_study(s, 2000, {"q-match": (8, 8), "q-loss": (60, 10)})
    a = analyze(s)
    alpha = 0.05 / 2
    match = [r for r in a.noninferiority if r.other == "q-match"]
    assert all(r.shown for r in match) and {r.task for r in match} == {"arc_easy", "mmlu"}
    assert match[0].bound == pytest.approx(stats.tango_upper(8, 8, 2000, alpha))
    assert match[0].bound < 0.01 < stats.tango_upper(60, 10, 2000, alpha)
    dep = next(r for r in recommendations(a) if r.topic == "deployment")
    assert dep.model == "q-match" and "no worse than its parent within the margin" in dep.verdict
    write_report(s, tmp_path, {"md"})
    md = (tmp_path / "report.md").read_text()
    assert "- **Deployment**: q-match (q-match): no worse than its parent" in md
    assert "| q-match | base | arc_easy acc | yes | 2000 | +0.0 pt | +0.4 pt | 1 pt | **no worse within margin** |" in md


def test_the_same_variant_on_demo_sized_n_gets_no_recommendation(tmp_path: Path) -> None:
    # the same (true loss 0) variant at n = 57, with 1 answer changed each way: the bound is ~8 points
    s = Store(tmp_path / "store.sqlite")
    _big_study(s, 57, {"q-match": (1, 1)})
    a = analyze(s)
    (r,) = [r for r in a.noninferiority if r.task == "arc_easy"]
    assert r.bound == pytest.approx(stats.tango_upper(1, 1, 57, 0.05)) and r.bound > 0.05
    dep = next(r for r in recommendations(a) if r.topic == "deployment")
    need = stats.n_noninferiority_binary(2 / 57, 0.01, 0.05)
    assert dep.model is None
    assert dep.verdict.startswith(f"no recommendation at this n: arc_easy acc: best bound {100 * r.bound:.1f} pt "
                                  f"(q-match) > margin 1 pt; would need ~{need} items (has 57 of 2376)")
    # identical answers on every item are not proof either: b = c = 0 still leaves a z^2 / (n + z^2) bound
    s2 = Store(tmp_path / "same" / "store.sqlite")
    _big_study(s2, 57, {"q-same": (0, 0)})
    (r,) = [r for r in analyze(s2).noninferiority if r.task == "mmlu"]
    z = stats.norm.ppf(0.95)
    assert r.bound == pytest.approx(z * z / (57 + z * z), abs=1e-9) and not r.shown


def test_decision_settings_come_from_the_stored_study_config(store: Store) -> None:
    cfg = dict(syn.CONFIG, decision={"margin": 2, "alpha": 0.1, "deciding": ["gsm8k", "squad_v2.f1"],
                                     "tasks": {"gsm8k": {"margin": 25}, "squad_v2": {"margin": 10,
                                                                                    "margin_kind": "relative"}}})
    store.set_meta("config", json.dumps(cfg))
    a = analyze(store)
    assert {(r.task, r.metric) for r in a.noninferiority if r.deciding} == {("gsm8k", "em"), ("squad_v2", "f1")}
    r = next(r for r in a.noninferiority if (r.other, r.task) == ("gptq-c128", "gsm8k"))
    assert (r.margin, r.alpha) == (0.25, 0.1 / 4)
    assert r.shown == (stats.tango_upper(1, 1, 30, 0.025) < 0.25) and r.shown  # 17 pt bound < 25 pt margin
    f1 = next(r for r in a.noninferiority if (r.other, r.task, r.metric) == ("gptq-c128", "squad_v2", "f1"))
    assert f1.margin == pytest.approx(0.10 * 0.5) and f1.margin_note == "10% of 50.0%"  # 10% of the parent's F1
    arc = next(r for r in a.noninferiority if (r.other, r.task) == ("gptq-c128", "arc_easy"))
    assert arc.margin == 0.02 and not arc.deciding
    # gsm8k passes for some, squad F1 for none: still no recommendation, and it says which
    dep = next(r for r in recommendations(a) if r.topic == "deployment")
    assert dep.model is None and "squad_v2 f1: best bound" in dep.verdict


def test_old_study_files_and_stores_load_with_the_defaults(store: Store) -> None:
    cfg = parse_config({"name": "old", "model": {"source": "smollm2-135m-instruct"}})
    assert (cfg.decision.margin, cfg.decision.margin_kind.value, cfg.decision.alpha, cfg.decision.deciding) == (
        1.0, "points", 0.05, None)
    assert "decision" not in syn.CONFIG  # the fixture's store predates the section
    a = analyze(store)
    assert a.decision == cfg.decision and not [w for w in a.warnings if "decision" in w]


@pytest.mark.parametrize("bad,msg", [({"margin": 0}, "decision.margin"), ({"deciding": ["arc"]}, "arc_easy"),
                                     ({"margin_kind": "pct"}, "decision.margin_kind"),
                                     ({"tasks": {"arc_easy": {"margn": 1}}}, "margn")])
def test_bad_decision_settings_name_the_field(bad: dict, msg: str) -> None:
    from quantstudy.errors import QuantStudyError

    with pytest.raises(QuantStudyError, match=msg):
        parse_config({"name": "x", "model": {"source": "smollm2-135m-instruct"}, "decision": bad})


def test_ranking_marks_which_adjacent_ranks_are_distinguishable(store: Store) -> None:
    rows = ranking(analyze(store))
    assert [r.model for r in rows[:3]] == ["tuned", "tuned-gptq-c64", "gptq-c128"]
    assert rows[0].vs_next == "not distinguishable at this n"  # a planned pair, nothing Holm-significant
    assert rows[1].vs_next == "not compared (no planned pair)"
    assert rows[-1].vs_next == ""


def test_plan_from_a_stated_discordance_and_from_a_pilot(tmp_path: Path, store: Store) -> None:
    demo = Path(__file__).resolve().parents[1] / "studies" / "smollm2-demo.yaml"
    from quantstudy.config import load_config

    cfg = load_config(demo)
    rows, note = plan_rows(cfg, None, 0.1)
    alpha = 0.05 / 3  # three variants: gptq, awq, rtn
    assert [r[0] for r in rows] == ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "squad_v2", "gsm8k",
                                    "openmathinstruct2"]  # wikitext (perplexity) does not decide
    need = stats.n_noninferiority_binary(0.1, 0.01, alpha)
    assert all(r[4] == str(need) for r in rows)
    assert next(r for r in rows if r[0] == "gsm8k")[6] == "no: the task has 1319"
    assert "0.0167" in note
    # pilot: the synthetic study's largest discordance per task (arc_easy: gptq-c64, 8 of 60)
    rows, _ = plan_rows(cfg, store.path.parent, None)
    arc = next(r for r in rows if r[0] == "arc_easy")
    assert arc[2] == f"{8 / 60:.3f}" and arc[4] == str(stats.n_noninferiority_binary(8 / 60, 0.01, alpha))
    assert next(r for r in rows if r[0] == "hellaswag")[3] == "not in the pilot"
    # a study that trains: every variant also has a trained copy, and the report splits alpha over both
    trained = cfg.model_copy(update={"train": object()})
    rows, note = plan_rows(trained, None, 0.1)
    assert "/ 6 candidate variants" in note and rows[0][4] == str(stats.n_noninferiority_binary(0.1, 0.01, 0.05 / 6))


def test_eval_split_sizes_match_the_offline_data(shared_data: Path) -> None:
    from quantstudy.config import TaskName
    from quantstudy.tasks import get_task

    for t in TaskName:
        assert len(get_task(t).eval_items(shared_data)) == EVAL_ITEMS[t.value], t.value


def test_results_json_carries_every_verdict_with_its_bound(store: Store, tmp_path: Path) -> None:
    (path,) = write_report(store, tmp_path / "out", {"json"})
    data = json.loads(path.read_text())
    assert data["decision"]["margin"] == 1.0 and data["decision"]["margin_kind"] == "points"
    rows = {(r["other"], r["task"], r["metric"]): r for r in data["noninferiority"]}
    r = rows["gptq-c64", "arc_easy", "acc"]
    assert r["bound"] == pytest.approx(stats.tango_upper(6, 2, 60, 0.0125)) and r["shown"] is False
    assert len(rows) == 4 * 6  # four variants x six metrics


def test_a_variant_missing_a_deciding_task_is_not_recommended(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.sqlite")
    _big_study(s, 2000, {"q-match": (8, 8)})
    db_items = [r for _, r in s.items(model="q-match") if r.task == "arc_easy"]
    s.put_model(ModelRecord("q-part", "quantized", "/m/q-part", "base", {"describe": "partial"}, 100 * syn.MiB))
    s.put_items("q-part", db_items)  # arc_easy only (identical answers), smaller than q-match: no mmlu at all
    a = analyze(s)
    (miss,) = [r for r in a.noninferiority if (r.other, r.task) == ("q-part", "mmlu")]
    assert miss.n == 0 and miss.deciding and not miss.shown
    dep = next(r for r in recommendations(a) if r.topic == "deployment")
    assert dep.model == "q-match"  # the smaller q-part passes arc_easy but was never scored on mmlu


def test_no_disagreement_seen_plans_a_floor(tmp_path: Path) -> None:
    from quantstudy.report.decide import needed_text

    s = Store(tmp_path / "store.sqlite")
    _big_study(s, 40, {"q-same": (0, 0)})
    (r,) = [r for r in analyze(s).noninferiority if r.task == "arc_easy"]
    # psi = 0: the planned n is the zero-discordance floor z^2 (1 - m) / m, labelled as a floor
    assert r.n_needed == stats.n_noninferiority_binary(0.0, 0.01, 0.05)
    assert needed_text(r) == f"at least ~{r.n_needed} items (no disagreement seen in 40)"
