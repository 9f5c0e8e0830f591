"""The run folder: atomic writes, DONE.json fingerprints, skip and redo."""

import json

import pytest

from llamaduo_nb.stages import coverage
from llamaduo_nb.errors import UserError
from llamaduo_nb.io import atomic_path, read_json, write_json
from llamaduo_nb.pipeline.params_file import load_params
from llamaduo_nb.pipeline.units import StageRun, is_done, read_done, stage_fingerprint


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert read_json(target) == {"v": 1}
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


def _params(tmp_path, extra=""):
    path = tmp_path / "p.yaml"
    path.write_text("run_name: t\ntasks: [summarization]\nservice: {backend: local, model: smollm2-135m-instruct}\n" + extra)
    return load_params(path)


def test_coverage_stage_writes_done_last_and_skips(tmp_path):
    params = _params(tmp_path)
    run_dir = tmp_path / "run"
    first = coverage.run(params, run_dir)
    assert not first.skipped and first.counts["train"] == 24 and first.counts["test"] == 8
    done = read_done(run_dir, "coverage")
    assert done["fingerprint"] == stage_fingerprint("coverage", params, run_dir)
    assert is_done("coverage", params, run_dir)
    mtime = (run_dir / "coverage" / "train.jsonl").stat().st_mtime_ns
    second = coverage.run(params, run_dir)
    assert second.skipped
    assert (run_dir / "coverage" / "train.jsonl").stat().st_mtime_ns == mtime
    manifest = read_json(run_dir / "manifest.json")
    assert manifest["stages"]["coverage"]["counts"]["train"] == 24
    assert manifest["versions"]["torch"] and manifest["seed"] == 42


def test_changed_params_redo_the_stage_and_invalidate_downstream(tmp_path):
    params = _params(tmp_path)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    synth_fp_before = stage_fingerprint("synthesize", params, run_dir)
    changed = _params(tmp_path, "coverage: {max_test_prompts: 3}\n")
    assert not is_done("coverage", changed, run_dir)
    result = coverage.run(changed, run_dir)
    assert not result.skipped and result.counts["test"] == 3
    # a new completion upstream changes every downstream fingerprint
    assert stage_fingerprint("synthesize", changed, run_dir) != synth_fp_before


def test_operational_settings_do_not_invalidate(tmp_path):
    a = _params(tmp_path)
    b = _params(tmp_path, "")
    b.service.max_concurrency = 3
    b.service.requests_per_minute = 10
    assert stage_fingerprint("synthesize", a, tmp_path) == stage_fingerprint("synthesize", b, tmp_path)
    b.service.model = "other"
    assert stage_fingerprint("synthesize", a, tmp_path) != stage_fingerprint("synthesize", b, tmp_path)


def test_force_redoes(tmp_path):
    params = _params(tmp_path)
    coverage.run(params, tmp_path / "run")
    assert not coverage.run(params, tmp_path / "run", force=True).skipped


def test_stage_refuses_without_upstream(tmp_path):
    params = _params(tmp_path)
    with pytest.raises(UserError, match="needs stage 'coverage'"):
        StageRun("synthesize", params, tmp_path / "run").begin()


def test_coverage_rejects_overlap_and_bad_rows(tmp_path):
    good = {"prompt": "p1", "prompt_id": "1", "category": "Summarize",
            "messages": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "a"}]}
    rows = [dict(good, split="train"), dict(good, split="test")]
    data = tmp_path / "cov.jsonl"
    data.write_text("\n".join(json.dumps(dict(good, split=split, prompt_id=split, prompt=split, messages=[{"role": "user", "content": split}, {"role": "assistant", "content": "a"}])) for split in ("train", "test")))
    params = _params(tmp_path, f"coverage: {{source: file, path: {data}}}\n")
    # the file is checked when the params load (tests/test_bad_input.py); the stage checks again what it reads
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match="both the train and the test split"):
        coverage.run(params, tmp_path / "run")
    assert not (tmp_path / "run" / "coverage").exists()  # nothing half-written
    data.write_text(json.dumps({"prompt": "x", "category": "Summarize"}))
    with pytest.raises(UserError, match="row 1: missing prompt_id, messages"):
        coverage.run(params, tmp_path / "run2")
    data.write_text(json.dumps(dict(good, category="Poetry")))
    with pytest.raises(UserError, match="category 'Poetry'"):
        coverage.run(params, tmp_path / "run3")
    data.write_text("")
    with pytest.raises(UserError, match="empty"):
        coverage.run(params, tmp_path / "run4")


def test_bundled_coverage_set_has_every_task():
    rows = coverage.read_jsonl(coverage.BUNDLED)
    for category in ("Summarize", "Classify", "Coding", "Closed QA"):
        mine = [r for r in rows if r["category"] == category]
        assert len(mine) >= 24
        assert {r["split"] for r in mine} == {"train", "test"}
    assert len({r["prompt_id"] for r in rows}) == len(rows)
