"""The eight stages, each declared next to its `run` (`STAGE` in `stages/<name>.py`: its upstream stages, the params
it depends on, what else it reads). This list is the order they run in and the notebooks' numbering
(`notebooks/0N_<name>.ipynb`): deploy before the report, which shows what was deployed."""

from llamaduo_nb.core.units import Stage
from llamaduo_nb.stages import coverage, deduplicate, deploy, evaluate, finetune, infer, report, synthesize

PIPELINE: list[Stage] = [module.STAGE for module in (coverage, synthesize, deduplicate, finetune, infer, evaluate, deploy, report)]
NAMES = [stage.name for stage in PIPELINE]
BY_NAME = {stage.name: stage for stage in PIPELINE}
NOTEBOOKS = {stage.name: f"{number:02d}_{stage.name}.ipynb" for number, stage in enumerate(PIPELINE, start=1)}
