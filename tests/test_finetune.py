"""Fine-tuning data selection, the assistant-only loss mask, and resuming an interrupted training."""

import pytest

from llamaduo_nb.stages.finetune import select_volume, to_prompt_completion, training_order
from llamaduo_nb.core.params_file import load_params


def _pairs(n):
    return [{"id": f"t-c1-{i // 2:06d}-{i % 2}", "instruction": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def test_volumes_are_nested_prefixes_of_one_fixed_order():
    order = training_order(_pairs(40))
    assert training_order(list(reversed(_pairs(40)))) == order  # input order does not matter: the synthesis order
    assert [p["id"] for p in order[:3]] == ["t-c1-000000-0", "t-c1-000000-1", "t-c1-000001-0"]
    small, large = select_volume(order, 8), select_volume(order, 32)
    assert large[:8] == small
    assert len({p["id"] for p in large}) == 32
    assert len(select_volume(order, 100)) == 40


def test_prompt_completion_rows():
    (row,) = to_prompt_completion(_pairs(1))
    assert row == {"prompt": [{"role": "user", "content": "question 0"}], "completion": [{"role": "assistant", "content": "answer 0"}]}


@pytest.mark.slow
def test_loss_mask_covers_the_assistant_turn_only_and_training_resumes(tmp_path):
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from llamaduo_nb.stages import finetune
    from llamaduo_nb.core.models import load_tokenizer

    params_file = tmp_path / "p.yaml"
    params_file.write_text(
        "finetune: {base_models: [smollm2-135m-instruct], quantization: none, max_length: 128, max_steps: 3,\n"
        "           per_device_train_batch_size: 1, gradient_accumulation_steps: 1}\n"
    )
    params = load_params(params_file)
    pairs = [{"id": f"x{i}", "instruction": f"Name a colour number {i}.", "response": f"Blue, number {i}."} for i in range(4)]

    # 1. the mask: TRL tokenizes prompt-completion rows so that only the assistant's tokens are learned
    from datasets import Dataset

    tok = load_tokenizer("smollm2-135m-instruct")
    from llamaduo_nb.core.models import load_model
    import copy

    trainer = SFTTrainer(model=copy.deepcopy(load_model("smollm2-135m-instruct")), processing_class=tok,
                         args=finetune.sft_config(params.finetune, tmp_path / "ck", 42, 4),
                         train_dataset=Dataset.from_list(finetune.to_prompt_completion(pairs[:1])),
                         peft_config=finetune.lora_config(params.finetune))
    row = trainer.train_dataset[0]
    ids = row["input_ids"]
    # TRL marks the learned tokens with labels != -100 (1.x) or a completion_mask (0.2x)
    mask = [label != -100 for label in row["labels"]] if "labels" in row else row["completion_mask"]
    learned = tok.decode([t for t, m in zip(ids, mask) if m])
    ignored = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "Blue, number 0." in learned and "Name a colour" not in learned
    assert "Name a colour number 0." in ignored and "Blue" not in ignored

    # 2. resume: interrupt after step 2 (a checkpoint exists from step 1), then train the unit again
    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune.train_unit(params, run_dir, "closed_qa", "smollm2-135m-instruct", 4, pairs, callbacks=[Interrupt()])
    unit = finetune.unit_dir(run_dir, "closed_qa", "smollm2-135m-instruct", 4)
    assert any((unit / "checkpoints").glob("checkpoint-1")) and not (unit / "UNIT.json").exists()
    record = finetune.train_unit(params, run_dir, "closed_qa", "smollm2-135m-instruct", 4, pairs)
    assert record["resumed"] and record["steps"] == 3 and not record["skipped"]
    assert (unit / "adapter_config.json").exists() and not (unit / "checkpoints").exists()
    # 3. a finished unit is never retrained
    again = finetune.train_unit(params, run_dir, "closed_qa", "smollm2-135m-instruct", 4, pairs)
    assert again["skipped"]


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    from llamaduo_nb.stages.finetune import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, state in ((2, "{}"), (4, "{}"), (10, None), (12, ""), (14, '{"log_hist')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:  # None: killed before the state; "" or cut: killed while the trainer wrote it
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"  # numeric order, not text order
    assert not any((tmp_path / f"checkpoint-{s}").exists() for s in (10, 12, 14))  # those killed mid-save are gone
