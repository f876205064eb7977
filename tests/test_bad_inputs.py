"""Bad input gets one clear message (what, value, fix), a non-zero exit, no traceback, and
loses nothing already computed. Each case runs the real CLI on a real (tiny) study."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantstudy.cli import app
from tests.tiny import make_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("bad")
    make_tiny_model(r / "tiny", hidden=96, intermediate=192)  # 96 is not a multiple of 64
    (r / "noweights").mkdir()
    (r / "noweights" / "config.json").write_text((r / "tiny" / "config.json").read_text())
    (r / "five.jsonl").write_text("\n".join(json.dumps({"text": f"sample {i}"}) for i in range(5)))
    (r / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (r / "emptydata").mkdir()
    return r


def study(root: Path, case: str, **over) -> Path:
    cfg = {"name": "bad", "output_dir": f"out-{case}", "model": {"source": "tiny"},
           "calibration": {"samples": 4, "max_seq_len": 32},
           "quantize": [{"method": "rtn", "group_size": 32}], "evaluate": None}
    for k, v in over.items():
        if v is None and k in cfg and k != "evaluate":
            cfg.pop(k)
        else:
            cfg[k] = v
    p = root / f"{case}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_cli(*args: str, env: dict[str, str] | None = None):
    r = runner.invoke(app, list(args), env=env)
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.output


def gguf_of_unknown_arch(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "bogusarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# (case id, study overrides or a callable making the argv, expected words in the message)
CASES = [
    ("typo-top", dict(quantise=[]), ["quantise", "did you mean `quantize`"]),
    ("typo-nested", dict(calibration={"samples": 4, "max_seq_lenn": 32}), ["calibration.max_seq_lenn", "max_seq_len"]),
    ("wrong-type", dict(seed="zero"), ["seed", "'zero'"]),
    ("bad-method", dict(quantize=[{"method": "gtpq"}]), ["quantize[0].method", "gptq"]),
    ("bad-bits", dict(quantize=[{"method": "rtn", "bits": 2}]), ["bits", "3, 4 or 8"]),
    ("bad-group", dict(quantize=[{"method": "rtn", "group_size": 48}]), ["group_size", "32, 64, 128"]),
    ("group-not-dividing", dict(quantize=[{"method": "rtn", "group_size": 64}]), ["group_size 64", "[96]", "32"]),
    ("too-many-calib", dict(calibration={"source": "jsonl", "path": "five.jsonl", "samples": 9},
                            quantize=[{"method": "gptq", "group_size": 32}]), ["9", "only 5"]),
    ("missing-data-file", dict(data_dir="emptydata", quantize=[{"method": "gptq", "group_size": 32}]),
     ["sharegpt", "emptydata", "Fix"]),
    ("malformed-data", dict(calibration={"source": "jsonl", "path": "broken.jsonl", "samples": 1},
                            quantize=[{"method": "gptq", "group_size": 32}]), ["broken.jsonl", "not valid JSON"]),
    ("missing-jsonl", dict(calibration={"source": "jsonl", "path": "nope.jsonl", "samples": 1},
                           quantize=[{"method": "gptq", "group_size": 32}]), ["nope.jsonl", "not found"]),
    ("jsonl-without-path", dict(calibration={"source": "jsonl"}), ["needs `path:`"]),
    ("unknown-task", dict(evaluate={"tasks": ["arc_eazy"]}), ["arc_eazy", "arc_easy"]),
    ("task-twice", dict(evaluate={"tasks": ["arc_easy", "arc_easy"], "speed": None}), ["listed twice"]),
    ("no-weights", dict(model={"source": "noweights"}), ["no weight files", "noweights"]),
    ("no-model-dir", dict(model={"source": "./nothing-here"}), ["does not exist", "nothing-here"]),
    ("gguf-missing", dict(model={"source": "missing.gguf"}), ["GGUF file not found", "missing.gguf"]),
    ("nonsense-source", dict(model={"source": "not a model"}), ["model.source", "hub id"]),
    ("missing-model", dict(model=None), ["model", "required field is missing"]),
    ("cuda-on-cpu", dict(device="cuda"), ["CUDA", "device: cpu"]),
    ("data-dir-missing", dict(data_dir="no/such/dir"), ["data directory not found", "no/such/dir"]),
    ("dup-variants", dict(quantize=[{"method": "rtn", "group_size": 32}, {"method": "rtn", "group_size": 32}]),
     ["same variant", "rtn-w4g32"]),
    ("name-on-expanding", dict(quantize=[{"method": ["rtn", "gptq"], "group_size": 32, "name": "x"}]),
     ["explicit `name`"]),
    ("unsafe-variant-name", dict(quantize=[{"method": "rtn", "group_size": 32, "name": "../../etc"}]),
     ["names a folder"]),
    ("unsafe-study-name", dict(name="../x"), ["study name"]),
    ("train-calib-without-train", dict(calibration={"source": "train", "samples": 2},
                                       quantize=[{"method": "gptq", "group_size": 32}]), ["needs a `train:` section"]),
    ("train-calib-rtn-smoothquant-without-train",  # RTN with SmoothQuant calibrates too
     dict(calibration={"source": "train", "samples": 2},
          quantize=[{"method": "rtn", "scheme": "W8A8", "smoothquant": {"strength": 0.5}}]), ["needs a `train:` section"]),
    ("negative-limit", dict(evaluate={"tasks": ["arc_easy"], "limit": -3}), ["evaluate.limit", "-3"]),
    ("lr-zero", dict(train={"learning_rate": 0}), ["train.learning_rate"]),
]


@pytest.mark.parametrize("case, over, words", CASES, ids=[c[0] for c in CASES])
def test_bad_config(root, case, over, words, monkeypatch):
    monkeypatch.chdir(root)
    out = run_cli("run", str(study(root, case, **over)))
    flat = " ".join(out.split())
    for w in words:
        assert w in flat, f"{case}: {w!r} not in {flat!r}"
    assert "Fix" in flat or "fix" in flat


def test_unreachable_hub_id_while_offline(root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "empty-hf-home"))
    out = " ".join(run_cli("run", str(study(root, "hub", model={"source": "nobody/no-such-model"}))).split())
    assert "HF_HUB_OFFLINE is set" in out and "nobody/no-such-model" in out


def test_gguf_of_unsupported_architecture(root):
    g = gguf_of_unknown_arch(root / "bogus.gguf")
    out = " ".join(run_cli("run", str(study(root, "gguf", model={"source": str(g)}))).split())
    assert "bogus.gguf" in out and "architecture" in out


def test_study_from_incompatible_version(root):
    p = study(root, "oldstore")
    (root / "out-oldstore").mkdir(exist_ok=True)
    db = sqlite3.connect(root / "out-oldstore" / "store.sqlite")
    db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES('schema_version', '999')")
    db.commit()
    db.close()
    out = " ".join(run_cli("run", str(p)).split())
    assert "incompatible" in out and "schema 999" in out


@pytest.mark.parametrize("argv, words", [
    (["run", "no-such-study.yaml"], ["study file not found"]),
    (["report", "."], ["no study store here"]),
    (["run", "list.yaml"], ["YAML mapping"]),
    (["run", "syntax.yaml"], ["not valid YAML"]),
    (["run", "pyobj.yaml"], ["not valid YAML"]),
    (["run", "ok.yaml", "--format", "pdf"], ["pdf"]),
    (["run", "ok.yaml", "--data-dir", "nowhere"], ["--data-dir", "nowhere"]),
    (["evaluate", "ok.yaml", "--model", "ghost"], ["--model", "ghost", "base"]),
])
def test_bad_command_lines(root, monkeypatch, argv, words):
    monkeypatch.chdir(root)
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "syntax.yaml").write_text("name: [unclosed\n")
    (root / "pyobj.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    study(root, "ok")
    out = " ".join(run_cli(*argv).split())
    for w in words:
        assert w in out, out


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB filesystem (tmpfs) that the test can fill; skipped where mount is not allowed."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_finished_work(root, small_disk):
    """The report hits a full disk: one clear error, the store and models stay intact, and the
    same command succeeds once space is freed."""
    p = study(root, "disk", output_dir=str(small_disk / "study"))
    assert runner.invoke(app, ["quantize", str(p)]).exit_code == 0
    out_dir = small_disk / "study"
    count = "SELECT count(*) FROM models"
    before = sqlite3.connect(out_dir / "store.sqlite").execute(count).fetchone()[0]
    assert before == 2
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    out = " ".join(run_cli("report", str(out_dir), "--format", "json").split())
    assert "No space left on device" in out and "free disk space" in out
    assert not list(out_dir.glob("*.tmp")) and not (out_dir / "results.json").exists()
    filler.unlink()
    assert sqlite3.connect(out_dir / "store.sqlite").execute(count).fetchone()[0] == before
    assert runner.invoke(app, ["report", str(out_dir), "--format", "json"]).exit_code == 0
    assert (out_dir / "results.json").is_file()


# --------------------------------------------------------------------------- issue 15: damaged and odd inputs
def write(root: Path, name: str, text: str | bytes) -> Path:
    p = root / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


OK_STUDY = "name: odd\noutput_dir: out-odd\nmodel: {source: tiny}\nquantize: [{method: rtn, group_size: 32}]\nevaluate: null\n"

# (case id, study file text, words the one-line message must hold: file or field, value, fix)
YAML_CASES = [
    ("duplicate-key", OK_STUDY + "seed: 1\nseed: 2\n", ["odd-duplicate-key.yaml", "line 7", "`seed`", "first at line 6",
                                                       "keep one"]),
    ("duplicate-nested-key", OK_STUDY + "calibration:\n  samples: 4\n  max_seq_len: 32\n  samples: 8\n",
     ["line 9", "`samples`", "first at line 7", "Fix"]),
    ("duplicate-in-flow-mapping", OK_STUDY.replace("group_size: 32}", "group_size: 32, group_size: 64}"),
     ["`group_size`", "given twice", "Fix"]),
    ("tasks-empty", OK_STUDY.replace("evaluate: null", "evaluate: {tasks: []}"),
     ["evaluate.tasks", "no tasks listed", "evaluate: null"]),
    ("tab-indent", OK_STUDY + "calibration:\n\tsamples: 4\n", ["odd-tab-indent.yaml", "tabs", "line 7", "Fix"]),
    ("empty-file", "# nothing but a comment\n\n", ["odd-empty-file.yaml", "is empty", "name:"]),
    ("top-level-scalar", "just a sentence\n", ["odd-top-level-scalar.yaml", "YAML mapping", "'just a sentence'", "name:"]),
    ("list-for-mapping", OK_STUDY.replace("model: {source: tiny}", "model: [tiny]"),
     ["model:", "valid dictionary", "['tiny']", "write it as a mapping"]),
    ("mapping-for-list", OK_STUDY.replace("quantize: [{method: rtn, group_size: 32}]",
                                          "quantize: {method: rtn, group_size: 32}"),
     ["quantize:", "valid list", "'method': 'rtn'", "[a, b]"]),
    ("string-for-list", OK_STUDY.replace("evaluate: null", "evaluate: {tasks: arc_easy}"),
     ["evaluate.tasks", "valid list", "'arc_easy'", "write it as a list"]),
    ("wrong-type-deep", OK_STUDY.replace("group_size: 32}", "group_size: 32, gptq: {dampening_frac: high}}"),
     ["quantize[0].gptq.dampening_frac", "'high'", "write a number"]),
    ("number-for-name", OK_STUDY.replace("name: odd", "name: 12"), ["name:", "valid string", "12", "quote it"]),
    ("scalar-for-section", OK_STUDY + "calibration: 5\n", ["calibration:", "5", "write it as a mapping"]),
]


@pytest.mark.parametrize("case, text, words", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_odd_yaml(root, monkeypatch, case, text, words):
    monkeypatch.chdir(root)
    p = write(root, f"odd-{case}.yaml", text)
    out = " ".join(run_cli("plan", str(p)).split())
    for w in words:
        assert w in out, f"{case}: {w!r} not in {out!r}"
    assert out.count("error:") == 1


def test_non_utf8_study_file(root):
    p = write(root, "odd-latin1.yaml", OK_STUDY.encode().replace(b"name: odd", b"name: odd\n# caf\xe9"))
    out = " ".join(run_cli("plan", str(p)).split())
    assert "odd-latin1.yaml" in out and "not UTF-8" in out and "\\xe9" in out and "line 2" in out and "Fix" in out


def test_anchors_aliases_and_merge_keys_work(root, monkeypatch):
    """Standard YAML reuse is allowed: an alias repeats a value, a merge key copies a mapping and a key
    written next to it overrides the merged one (that override is not a duplicate key)."""
    monkeypatch.chdir(root)
    p = write(root, "odd-anchors.yaml", (
        "name: anchors\noutput_dir: out-anchors\nmodel: {source: tiny}\nevaluate: null\n"
        "calibration: &calib {samples: 4, max_seq_len: 32}\n"
        "quantize:\n"
        "  - &w4 {method: rtn, bits: 4, group_size: 32, calibration: *calib}\n"
        "  - <<: *w4\n    bits: 8\n"))
    from quantstudy.config import load_config
    from quantstudy.config.variants import expand_variants

    cfg = load_config(p)
    assert [(e.bits, e.group_size) for e in cfg.quantize] == [(4, 32), (8, 32)]
    assert cfg.quantize[1].calibration == cfg.calibration
    assert sorted(v.name for v in expand_variants(cfg)) == ["rtn-w4g32", "rtn-w8g32"]
    r = runner.invoke(app, ["plan", str(p)])
    assert r.exit_code == 0, r.output


def test_store_that_is_not_sqlite(root):
    """`report` on a directory whose store.sqlite is some other file: one error, the file untouched."""
    d = root / "not-a-store"
    d.mkdir(exist_ok=True)
    junk = b"these are not the bytes of a database\n" * 200
    (d / "store.sqlite").write_bytes(junk)
    out = " ".join(run_cli("report", str(d)).split())
    assert "store.sqlite" in out and "not a readable SQLite database" in out and "file is not a database" in out
    assert "Fix: restore it from a backup" in out
    assert (d / "store.sqlite").read_bytes() == junk and sorted(x.name for x in d.iterdir()) == ["store.sqlite"]


def test_truncated_store(root):
    """A real store cut short (a copy interrupted): `run` stops before any stage, the file untouched."""
    p = study(root, "truncstore")
    assert runner.invoke(app, ["quantize", str(p)]).exit_code == 0
    db = root / "out-truncstore" / "store.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, as a copy would have it
    con.close()
    data = db.read_bytes()
    assert len(data) >= 4 * 4096
    db.write_bytes(data[: len(data) // 2])
    for wal in db.parent.glob("store.sqlite-*"):
        wal.unlink()
    out = " ".join(run_cli("run", str(p)).split())
    assert "store.sqlite" in out and "not a readable SQLite database" in out and "Fix" in out
    assert db.read_bytes() == data[: len(data) // 2]


def test_store_path_is_a_directory(root):
    (root / "dir-store" / "store.sqlite").mkdir(parents=True, exist_ok=True)
    out = " ".join(run_cli("report", str(root / "dir-store")).split())
    assert "no study store here" in out or "is not a file" in out


def damaged_copy(root: Path, name: str, damage) -> Path:
    import shutil

    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(root / "tiny", d)
    damage(d)
    return d


def truncate_weights(d: Path) -> None:
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("case, damage, words", [
    ("config-not-json", lambda d: (d / "config.json").write_text('{"model_type": "llama", oops'),
     ["config.json is not valid JSON", "line 1 column"]),
    ("config-not-utf8", lambda d: (d / "config.json").write_bytes(b'{"model_type": "ll\xffama"}'),
     ["config.json is not valid JSON", "utf-8"]),
    ("weights-truncated", truncate_weights, ["model.safetensors is damaged or truncated", "not fully covered"]),
    ("weights-header-garbage", lambda d: next(d.glob("*.safetensors")).write_bytes(b"\x10" + b"\0" * 7 + b"{garbage}" * 2),
     ["model.safetensors is damaged or truncated"]),
])
def test_damaged_model_source(root, case, damage, words):
    d = damaged_copy(root, f"src-{case}", damage)
    out = " ".join(run_cli("run", str(study(root, case, model={"source": d.name}))).split())
    for w in words + ["model.source", f"src-{case}", "Fix"]:
        assert w in out, f"{case}: {w!r} not in {out!r}"


def fidelity_study(root: Path, case: str, quantize: list[dict]) -> Path:
    (root / "fid.txt").write_text(" ".join(["the cat sat on a mat while two dogs ran past"] * 60))
    return study(root, case, output_dir="out-fid", quantize=quantize,
                 fidelity={"source": "fid.txt", "tokens": 256, "context_length": 64, "top_k": 8})


def test_damaged_made_model_is_named_and_remade(root, monkeypatch):
    """A model the study made, truncated on disk: the stage that loads it stops with the folder to delete;
    deleting it re-makes only that model, and the rest of the store is kept."""
    monkeypatch.chdir(root)
    p = fidelity_study(root, "made", [{"method": "rtn", "group_size": 32}])
    assert runner.invoke(app, ["quantize", str(p)]).exit_code == 0
    variant = root / "out-fid" / "models" / "rtn-w4g32"
    truncate_weights(variant)
    out = " ".join(run_cli("run", str(p)).split())
    assert "rtn-w4g32" in out and "damaged or truncated" in out and "delete it and run again" in out
    log = root / "out-fid" / "logs" / "fidelity-rtn-w4g32.log"  # the failed stage names its library log
    assert "fidelity rtn-w4g32 failed after" in out, out
    assert f"the libraries' output is in {log}" in out and log.is_file(), out
    import shutil

    shutil.rmtree(variant)
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 0, r.output
    assert "resolve: base (cached)" in r.output and "quantize rtn-w4g32 done" in r.output


def test_truncated_fidelity_cache_is_recomputed(root, monkeypatch):
    """The baseline top-k cache is scratch: a truncated file is recomputed, the metrics are unchanged."""
    monkeypatch.chdir(root)
    one = [{"method": "rtn", "group_size": 32}]
    p = fidelity_study(root, "fidcache", one)
    r = runner.invoke(app, ["run", str(p), "--format", "json"])
    assert r.exit_code == 0, r.output
    db = root / "out-fid" / "store.sqlite"
    q = "SELECT value FROM metrics WHERE model='rtn-w4g32' AND name='fidelity.kl_mean'"
    before = sqlite3.connect(db).execute(q).fetchone()[0]
    (cache,) = (root / "out-fid" / "cache" / "fidelity").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    p = fidelity_study(root, "fidcache", one + [{"method": "rtn", "bits": 8, "group_size": 32}])
    r = runner.invoke(app, ["run", str(p), "--format", "json"])
    assert r.exit_code == 0, r.output
    import numpy as np

    with np.load(cache) as f:  # rewritten whole
        assert {"idx", "logp_k", "logp_tail", "logp_gold", "vocab"} <= set(f.files)
    con = sqlite3.connect(db)
    assert con.execute(q).fetchone()[0] == before
    assert con.execute(q.replace("rtn-w4g32", "rtn-w8g32")).fetchone()[0] is not None


@pytest.mark.parametrize("case, content, words", [
    ("bad-line", b'{"id": "a", "question": "q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "A"}\n{oops\n',
     ["line 2 is not JSON"]),
    ("not-utf8", b'{"id": "a", "question": "caf\xe9"}\n', ["not UTF-8"]),
])
def test_damaged_task_data_file(root, monkeypatch, case, content, words):
    monkeypatch.chdir(root)
    f = root / f"data-{case}" / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(content)
    p = study(root, f"data-{case}", data_dir=f"data-{case}", evaluate={"tasks": ["arc_easy"], "speed": None})
    out = " ".join(run_cli("run", str(p)).split())
    for w in words + ["arc_easy", "ARC-Easy-Test.jsonl", "Fix"]:
        assert w in out, f"{case}: {w!r} not in {out!r}"
