"""The lm-eval model `lmforge`: declared as an entry point, registered in lm-eval, and scoring lm-eval's
own MMLU task files (written by write_mmlu_tasks) as `lmforge eval` does."""

from importlib.metadata import entry_points

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lmforge.eval.harness import LmforgeLM, write_mmlu_tasks  # noqa: E402
from lmforge.eval.lm import EvalModel  # noqa: E402
from lmforge.eval.mmlu import MMLU, read_questions, write_questions  # noqa: E402


def test_the_entry_point_loads_the_model_class():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    found = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "lmforge"]
    assert found, "pyproject's lm_eval.models entry point is not installed (pip install -e .)"
    assert found[0].load() is LmforgeLM and issubclass(LmforgeLM, LM)
    assert get_model("lmforge") is LmforgeLM


def test_lm_eval_runs_lmforge_on_our_task_files(tiny_hf, mmlu_file, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows, _ = read_questions(mmlu_file)
    questions = [q for q in rows if q.subject == "astronomy"][:6]
    names = write_mmlu_tasks(tmp_path / "tasks", questions)
    model = EvalModel.load(tiny_hf)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model=LmforgeLM(model=model), tasks=names, num_fewshot=1, task_manager=manager)
    ours = MMLU([write_questions(questions, tmp_path / "q.jsonl")]).run(model, shots=1)
    assert out["results"][names[0]]["acc,none"] == pytest.approx(ours.metrics["accuracy"])
    with pytest.raises(ValueError, match="pretrained=PATH"):
        LmforgeLM.create_from_arg_string("dtype=float32")
