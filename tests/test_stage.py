"""The run folder: atomic writes, DONE.json fingerprints, skip and redo."""

import json

import pytest

from llamaduo_nb.stages import BY_NAME
from llamaduo_nb.stages import coverage
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import atomic_path, read_json, write_json
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.core.units import StageRun, is_done, read_done, stage_fingerprint, update_manifest


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
    assert done["fingerprint"] == stage_fingerprint(BY_NAME["coverage"], params, run_dir)
    assert is_done(BY_NAME["coverage"], params, run_dir)
    mtime = (run_dir / "coverage" / "train.jsonl").stat().st_mtime_ns
    second = coverage.run(params, run_dir)
    assert second.skipped
    assert (run_dir / "coverage" / "train.jsonl").stat().st_mtime_ns == mtime
    manifest = read_json(run_dir / "manifest.json")
    assert manifest["stages"]["coverage"]["counts"]["train"] == 24
    assert manifest["versions"]["torch"] and manifest["seed"] == 42
    assert manifest["stages"]["coverage"]["code"]["versions"]["torch"] and done["code"] == manifest["stages"]["coverage"]["code"]
    recorded = (run_dir / "manifest.json").read_bytes()
    update_manifest(run_dir, params)  # an invocation that ran no stage: the code that made the outputs stays recorded
    assert read_json(run_dir / "manifest.json")["stages"]["coverage"]["code"] == done["code"]
    assert json.loads(recorded)["git_commit"] == read_json(run_dir / "manifest.json").get("git_commit")


def test_changed_params_redo_the_stage_and_invalidate_downstream(tmp_path):
    params = _params(tmp_path)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    synth_fp_before = stage_fingerprint(BY_NAME["synthesize"], params, run_dir)
    changed = _params(tmp_path, "coverage: {max_test_prompts: 3}\n")
    assert not is_done(BY_NAME["coverage"], changed, run_dir)
    result = coverage.run(changed, run_dir)
    assert not result.skipped and result.counts["test"] == 3
    # a new completion upstream changes every downstream fingerprint
    assert stage_fingerprint(BY_NAME["synthesize"], changed, run_dir) != synth_fp_before


def test_operational_settings_do_not_invalidate(tmp_path):
    a = _params(tmp_path)
    b = _params(tmp_path, "")
    b.service.max_concurrency = 3
    b.service.requests_per_minute = 10
    assert stage_fingerprint(BY_NAME["synthesize"], a, tmp_path) == stage_fingerprint(BY_NAME["synthesize"], b, tmp_path)
    b.service.model = "other"
    assert stage_fingerprint(BY_NAME["synthesize"], a, tmp_path) != stage_fingerprint(BY_NAME["synthesize"], b, tmp_path)


def test_force_redoes(tmp_path):
    params = _params(tmp_path)
    coverage.run(params, tmp_path / "run")
    assert not coverage.run(params, tmp_path / "run", force=True).skipped


def test_stage_refuses_without_upstream(tmp_path):
    params = _params(tmp_path)
    with pytest.raises(UserError, match="needs stage 'coverage'"):
        StageRun(BY_NAME["synthesize"], params, tmp_path / "run").begin()


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


# -- the unit contract ---------------------------------------------------------------------------------------


def test_a_unit_is_reused_only_with_the_same_fingerprint_and_unchanged_content(tmp_path):
    from llamaduo_nb.core.units import Unit

    out = tmp_path / "answers.jsonl"
    out.write_text("a\n")
    unit = Unit.file(out, {"k": 1, "adapter": "abc"})
    assert unit.current() is None  # never recorded
    record = unit.commit(answers=1)
    assert unit.current() == record and record["made_from"] == {"k": 1, "adapter": "abc"}
    assert Unit.file(out, {"k": 2, "adapter": "abc"}).current() is None  # a setting changed
    assert Unit.file(out, {"k": 1, "adapter": "xyz"}).current() is None  # an input's content changed
    assert unit.current(force=True) is None
    out.write_text("edited by hand\n")
    assert unit.current() is None  # the output no longer has the content it recorded
    unit.discard()
    assert not unit.record_path.exists()


def test_content_fingerprint_reads_bytes_not_bookkeeping(tmp_path):
    from llamaduo_nb.core.units import content_fingerprint

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"123")
    first = content_fingerprint(folder)
    (folder / "UNIT.json").write_text("{}")
    (folder / ".training.json").write_text("{}")
    assert content_fingerprint(folder) == first
    (folder / "weights.bin").write_bytes(b"124")
    assert content_fingerprint(folder) != first
    assert content_fingerprint(tmp_path / "missing") is None


def test_only_service_settings_are_operational(tmp_path):
    from llamaduo_nb.pipeline.changes import params_differences

    a = _params(tmp_path).dump()
    b = _params(tmp_path, "infer: {batch_size: 3}\nservice: {backend: local, model: smollm2-135m-instruct, batch_size: 3, max_concurrency: 2}\n").dump()
    assert params_differences(a, b) == ["infer.batch_size: 16 → 3"]  # it changes the generation seeds; the service's does not


def test_force_of_a_stage_reaches_every_stage_that_depends_on_it():
    from llamaduo_nb.pipeline.runner import downstream

    assert downstream(["finetune"]) == ["finetune", "infer", "evaluate", "deploy", "report"]
    assert downstream(["coverage"]) == ["coverage", "synthesize", "deduplicate", "finetune", "infer", "evaluate", "deploy", "report"]
    assert downstream(["deploy"]) == ["deploy", "report"]  # the report shows what was deployed
    assert downstream(["report"]) == ["report"]


def test_setting_aside_moves_outputs_and_their_records(tmp_path, capsys):
    from llamaduo_nb.core.units import set_aside

    run = tmp_path / "run"
    answers = run / "infer" / "closed_qa" / "m" / "4.jsonl"
    answers.parent.mkdir(parents=True)
    answers.write_text("x\n")
    answers.with_name("4.jsonl.unit.json").write_text("{}")
    moved = set_aside(run, "infer", [answers], "volume dropped")
    assert not answers.exists() and not answers.with_name("4.jsonl.unit.json").exists()
    assert moved[0].read_text() == "x\n" and moved[0].with_name(moved[0].name + ".unit.json").exists()
    assert moved[0].is_relative_to(run / "orphaned")
    assert "no longer in the grid (volume dropped)" in capsys.readouterr().out


def test_a_folder_of_the_earlier_layout_is_refused(tmp_path):
    from llamaduo_nb.core.units import check_layout

    run = tmp_path / "run"
    (run / "responses").mkdir(parents=True)
    with pytest.raises(UserError, match=r"earlier version of the workbench \(folders responses/\).*--run-dir NEW_FOLDER"):
        check_layout(run)
    check_layout(tmp_path / "fresh")  # a new folder is fine


def test_setup_writes_nothing(tmp_path):
    from llamaduo_nb import notebook

    path = tmp_path / "p.yaml"
    path.write_text("run_name: t\ntasks: [summarization]\nservice: {backend: local, model: smollm2-135m-instruct}\n")
    params, run_dir = notebook.setup(path, tmp_path / "run")
    assert not run_dir.exists()
    coverage.run(params, run_dir)  # the stage writes when it runs
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    params, run_dir = notebook.setup(path, run_dir)
    assert coverage.run(params, run_dir).skipped
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


def test_library_warnings_and_log_lines_go_to_the_stage_log_not_the_notebook(tmp_path, capsys):
    """A stage's executed notebook keeps the story: what the libraries print while it runs goes to <run>/logs/."""
    import logging
    import warnings

    from llamaduo_nb.core.units import Stage, StageResult

    stage = Stage("noisy", upstream=(), depends_on=())

    @stage.produces
    def make(stage_run, params, run_dir, force=False) -> StageResult:
        warnings.warn("is_gradient_checkpointing is deprecated", FutureWarning)
        logging.getLogger("peft.utils").warning("Could not find a config file")
        stage_run.begin()
        return stage_run.finish({"made": 1}, outputs=[])

    params = _params(tmp_path)
    run_dir = tmp_path / "run"
    result = stage.run(params, run_dir)
    assert result.counts == {"made": 1}
    shown = capsys.readouterr()
    assert "deprecated" not in shown.out + shown.err and "config file" not in shown.out + shown.err
    log = (run_dir / "logs" / "noisy.log").read_text()
    assert "FutureWarning: is_gradient_checkpointing is deprecated" in log and "WARNING peft.utils: Could not find a config file" in log
    assert logging.getLogger("peft").propagate  # put back as it was after the stage
