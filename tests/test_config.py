"""Study config: list expansion, readable names, and errors that name field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantstudy.config import load_config, parse_config
from quantstudy.config.variants import expand_variants
from quantstudy.errors import QuantStudyError

BASE = {"name": "s", "model": {"source": "smollm2-135m-instruct"}}


def cfg(**kw):
    return parse_config({**BASE, **kw})


def test_lists_expand_to_cross_product_with_readable_names():
    c = cfg(quantize=[{"method": ["gptq", "awq"], "group_size": 128, "calibration": {"samples": [215, 512]}}])
    names = [v.name for v in expand_variants(c)]
    assert names == ["gptq-w4g128-c215", "gptq-w4g128-c512", "awq-w4g128-c215", "awq-w4g128-c512"]
    assert [v.calibration.samples for v in expand_variants(c)] == [215, 512, 215, 512]


def test_per_entry_calibration_source_in_generated_names_only():
    wiki = {"source": "wikitext", "samples": 32}
    c = cfg(quantize=[{"method": "gptq", "group_size": 64, "calibration": wiki},
                      {"method": "gptq", "group_size": 64, "calibration": wiki, "name": "gptq-wiki"}])
    assert [v.name for v in expand_variants(c)] == ["gptq-w4g64-c32-wikitext", "gptq-wiki"]


def test_rtn_needs_no_calibration_and_is_not_duplicated_over_sample_counts():
    c = cfg(calibration={"samples": [64, 128]}, quantize=[{"method": ["rtn", "gptq"], "group_size": [64, "channel"],
                                                          "symmetric": [True, False]}])
    vs = expand_variants(c)
    rtn = [v for v in vs if v.method.value == "rtn"]
    assert {v.name for v in rtn} == {"rtn-w4g64", "rtn-w4g64-asym", "rtn-w4ch", "rtn-w4ch-asym"}
    assert all(v.calibration is None for v in rtn)
    assert len(vs) == 4 + 2 * 2 * 2


@pytest.mark.parametrize("data, needle", [
    ({**BASE, "quantise": []}, "quantise: unknown field. Fix: did you mean `quantize`?"),
    ({**BASE, "quantize": [{"method": "gtpq"}]}, "did you mean 'gptq'"),
    ({**BASE, "quantize": [{"method": "gptq", "bits": 5}]}, "weight bits must be 3, 4 or 8"),
    ({**BASE, "quantize": [{"method": "gptq", "group_size": 100}]}, "group_size must be 32, 64, 128 or 'channel'"),
    ({**BASE, "calibration": {"samples": 0}}, "calibration.samples"),
    ({**BASE, "calibration": {"source": "jsonl"}}, "needs `path:`"),
    ({"name": "s"}, "model: required field is missing"),
    ({**BASE, "model": {"source": "x", "trust_remote_code": "maybe"}}, "model.trust_remote_code"),
    ({**BASE, "evaluate": {"tasks": ["arc_easy"], "limt": 5}}, "evaluate.limt: unknown field. Fix: did you mean `limit`?"),
    ({**BASE, "seed": "abc"}, "seed"),
])
def test_errors_name_field_value_and_fix(data, needle):
    with pytest.raises(QuantStudyError) as e:
        parse_config(data)
    assert needle in str(e.value)
    assert "Fix:" in str(e.value)


def test_duplicate_variants_are_refused():
    with pytest.raises(QuantStudyError, match="same variant"):
        expand_variants(cfg(quantize=[{"method": "gptq"}, {"method": "gptq"}]))


def test_yaml_cannot_construct_python_objects(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\nmodel: {source: x}\n")
    with pytest.raises(QuantStudyError, match="not valid YAML"):
        load_config(p)


def test_config_roundtrips_through_yaml(tmp_path):
    c = cfg(quantize=[{"method": "gptq", "group_size": 64}])
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(c.model_dump(mode="json")))
    assert load_config(p) == c


def test_readme_study_file_is_valid() -> None:
    # the README's annotated study file must stay a valid config (a renamed field fails here)
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    cfg = parse_config(yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1)))
    assert [v.name for v in expand_variants(cfg)] == ["gptq-w4g128-c215", "gptq-w4g128-c512",
                                                      "awq-w4g128-c215", "awq-w4g128-c512"]
    assert cfg.train is not None and cfg.fidelity is not None and cfg.evaluate is not None


def test_fields_added_later_join_the_stage_key_text_only_when_set():
    """Stage keys hash str(config section): a study made before evaluate.speed.{backend,batch,rounds}
    and a task's chat_template_kwargs/alias existed must keep its cached evaluate/fidelity stages."""
    plain = cfg(evaluate={"tasks": [{"name": "gsm8k", "limit": 5}], "speed": {"prompts": 4}}).evaluate
    text = str(plain)  # the text the evaluate key hashes
    assert "SpeedConfig(prompts=4, max_new_tokens=64, warmup=1)" in text  # older fields stay, defaults included
    for added in ("batch=", "rounds=", "chat_template_kwargs=", "alias=", "SpeedBackend"):
        assert added not in text
    set_ = cfg(evaluate={"tasks": [{"name": "gsm8k", "limit": 5, "alias": "g"}],
                        "speed": {"prompts": 4, "rounds": 5}}).evaluate
    assert "rounds=5" in str(set_) and "alias='g'" in str(set_)
