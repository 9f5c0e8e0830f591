"""The params schema: typed, validated experiment parameters.

The schema's defaults are the paper's settings; a params file overrides only what differs (see
`params/quickstart.yaml`). Reading a file, `--set` overrides and sweeps are in `params_file.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from llamaduo_nb.core.models import short_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROMPTS_DIR = PROJECT_ROOT / "params" / "prompts"
# The coverage set shipped in the package (written for this project, in No Robots' schema).
BUNDLED_COVERAGE = Path(__file__).resolve().parent.parent / "data" / "coverage.jsonl"
# Human scores of answers to the bundled test prompts (the project's own labels; see README).
BUNDLED_HUMAN_LABELS = Path(__file__).resolve().parent.parent / "data" / "human_labels.jsonl"

# Task name (used in paths and tables) -> No Robots category.
TASK_CATEGORIES = {
    "summarization": "Summarize",
    "classification": "Classify",
    "coding": "Coding",
    "closed_qa": "Closed QA",
}
TaskName = Literal["summarization", "classification", "coding", "closed_qa"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CoverageParams(Strict):
    source: Literal["bundled", "hub", "file"] = "bundled"  # bundled: the set shipped in the package
    path: Optional[str] = None  # JSONL or parquet in No Robots' schema, for source: file
    hub_dataset: str = "HuggingFaceH4/no_robots"  # for source: hub (needs internet)
    hub_revision: Optional[str] = None  # a commit or tag of the Hub dataset; without one the run records "latest"
    test_fraction: float = Field(0.25, gt=0, lt=1)  # for sources without a test split of their own
    max_test_prompts: Optional[PositiveInt] = None  # cap on test prompts per task used downstream

    @model_validator(mode="after")
    def _file_needs_path(self):
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs coverage.path")
        return self


class ServiceParams(Strict):
    """One service LLM (a synthesiser or a judge)."""

    # A model each backend serves (the paper's GPT-4o for OpenAI). Providers retire model versions: their
    # model lists (`GET /v1/models` on OpenAI and Anthropic, `models.list()` in google-genai) say what is current.
    DEFAULT_MODELS: ClassVar[dict] = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash",
                                      "local": "smollm2-135m-instruct"}

    name: Optional[str] = None  # label in tables; default "<backend>:<model>"
    backend: Literal["local", "openai", "anthropic", "gemini"] = "openai"
    model: Optional[str] = Field(None, validate_default=True)  # default: DEFAULT_MODELS[backend]
    base_url: Optional[str] = None  # any OpenAI-compatible server (vLLM, llama.cpp, Ollama) or an emulator
    api_key_env: Optional[str] = None  # NAME of the environment variable holding the key, never the key
    max_concurrency: PositiveInt = 16
    requests_per_minute: Optional[float] = Field(None, gt=0)
    tokens_per_minute: Optional[float] = Field(None, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)  # transient errors (429, 5xx, timeouts) per request
    # extra tries when the output is not valid JSON for the schema; default 2 for an API (a server may
    # ignore the schema's bounds), 0 for the local stand-in (its JSON is valid by construction)
    max_reasks: Optional[int] = Field(None, ge=0, validate_default=True)
    max_cost_usd: Optional[float] = Field(None, gt=0)  # stop this service's calls in one stage before they cost more (USD, from prices)
    price_input_per_mtok: float = Field(0.0, ge=0)  # USD per million input tokens (editable price table)
    price_output_per_mtok: float = Field(0.0, ge=0)
    batch_size: PositiveInt = 8  # local backend: prompts generated together
    batch_api: bool = False  # openai/anthropic/gemini: send requests through the provider's batch API (half price, answers within 24 h; llm/batch.py)

    @property
    def label(self) -> str:
        return self.name or f"{self.backend}:{self.model}"

    @field_validator("model")
    @classmethod
    def _model_by_backend(cls, value, info):
        return value if value else cls.DEFAULT_MODELS.get(info.data.get("backend"), "gpt-4o")

    @field_validator("max_reasks")
    @classmethod
    def _reasks_by_backend(cls, value, info):
        if value is not None:
            return value
        return 0 if info.data.get("backend") == "local" else 2

    @model_validator(mode="after")
    def _key_env_is_a_name(self):
        if self.api_key_env and (not self.api_key_env.replace("_", "").isalnum() or self.api_key_env.startswith("sk-")):
            raise ValueError("api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key")
        return self


class SynthesizeParams(Strict):
    prompt: str = "synthesize"  # params/prompts/<prompt>.yaml or a path
    samples_per_task: PositiveInt = 300_000  # valid pairs to collect per task (the paper's raw count)
    pairs_per_call: PositiveInt = 5
    expected_loss: float = Field(0.15, ge=0, lt=1)  # share of pairs expected lost (invalid, duplicate): the first round asks for more
    max_rounds: PositiveInt = 8  # rounds while a task is short of its target (a probe of ≤ 20 calls, then ≤ ×4 each)
    push_to_hub: Optional[str] = None  # Hub dataset repo id to push the pairs to (private; token from HF_TOKEN)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: PositiveInt = 2048
    # per-task targets that replace samples_per_task for the tasks named; the volume search (finetune.volumes:
    # search) sets them so that only as much data is synthesised as the volumes it tries need
    samples_by_task: Optional[dict[str, PositiveInt]] = None

    def target_for(self, task: str) -> int:
        """Valid pairs to collect for `task`."""
        return (self.samples_by_task or {}).get(task, self.samples_per_task)


class DeduplicateParams(Strict):
    num_perm: PositiveInt = 128  # MinHash permutations
    shingle_size: PositiveInt = 3  # words per shingle
    lsh_threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard above which pairs are candidates
    rouge_l_threshold: float = Field(0.7, gt=0, le=1)  # ROUGE-L F above which a candidate is a duplicate


class LoraParams(Strict):
    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[str, list[str]] = "all-linear"


VOLUME_RANGE = re.compile(r"^\s*(\d+)\s*\^\s*(\d+)\s*\.\.\s*(\d+)\s*\^\s*(\d+)\s*(k?)\s*$", re.IGNORECASE)
KILO = 1024  # "2^2 k" = 4096 samples


def expand_volumes(value):
    """`2^0..2^8 k` → [1024, 2048, …, 262144]; `2^2..2^4` → [4, 8, 16]; a list passes through."""
    if not isinstance(value, str):
        return value
    match = VOLUME_RANGE.match(value)
    if not match:
        raise ValueError(f"'{value}': expected a list of positive integers or a range like '2^0..2^8 k' (k = {KILO})")
    base, low, base2, high, kilo = int(match[1]), int(match[2]), int(match[3]), int(match[4]), match[5]
    if base != base2 or base < 2 or low > high:
        raise ValueError(f"'{value}': a range is <b>^<low>..<b>^<high> with the same base b ≥ 2 and low ≤ high")
    return [base**n * (KILO if kilo else 1) for n in range(low, high + 1)]


SEARCH = "search"


class FinetuneParams(Strict):
    base_models: list[str] = Field(default_factory=lambda: ["google/gemma-2b-it"], min_length=1)
    volumes: list[PositiveInt] = Field(default_factory=lambda: [KILO * 2**n for n in range(9)], min_length=1)  # or "2^0..2^8 k"
    # the volume search (`volumes: search`, `search 2^0..2^8 k` or `search: true`): volumes are tried smallest first
    # and a (task, local model) stops at the first not worse than the service LLM (pipeline/search.py)
    search: bool = False
    # per-task volumes that replace `volumes` for the tasks named (the search sets them to the volumes tried so far)
    volumes_by_task: Optional[dict[str, list[PositiveInt]]] = None
    quantization: Literal["none", "nf4"] = "nf4"  # nf4 = QLoRA; needs CUDA
    lora: LoraParams = Field(default_factory=LoraParams)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    per_device_train_batch_size: PositiveInt = 4
    gradient_accumulation_steps: PositiveInt = 2
    max_length: PositiveInt = 2048
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 caps optimizer steps (smoke runs)
    gradient_checkpointing: Optional[bool] = None  # recompute activations to save memory; default on with CUDA, off on CPU
    chat_template: Optional[str] = None  # Jinja template for base models that ship none
    logging_steps: PositiveInt = 1

    @model_validator(mode="before")
    @classmethod
    def _search_shorthand(cls, data):
        """`volumes: search` (the paper's grid) or `volumes: search 2^2..2^4` → search: true and the grid."""
        if isinstance(data, dict) and isinstance(data.get("volumes"), str) and data["volumes"].strip().lower().startswith(SEARCH):
            grid = data["volumes"].strip()[len(SEARCH):].strip()
            data = {k: v for k, v in data.items() if k != "volumes"}
            data["search"] = True
            if grid:
                data["volumes"] = grid
        return data

    @field_validator("volumes", mode="before")
    @classmethod
    def _range_syntax(cls, v):
        return expand_volumes(v)

    @field_validator("volumes_by_task")
    @classmethod
    def _by_task_sorted(cls, v):
        return {task: sorted(set(vols)) for task, vols in v.items()} if v else v

    def volumes_for(self, task: str) -> list[int]:
        """The volumes trained for `task`: its own list when the search (or the user) gave one, else `volumes`."""
        return (self.volumes_by_task or {}).get(task, self.volumes)

    @field_validator("volumes")
    @classmethod
    def _sorted_unique(cls, v):
        return sorted(set(v))

    @field_validator("base_models")
    @classmethod
    def _distinct_folders(cls, v):
        """Each base model's adapters and answers live under its short name: two that share one would overwrite each other."""
        seen: dict = {}
        for ref in v:
            other = seen.setdefault(short_name(ref), ref)
            if other != ref:
                raise ValueError(f"{other!r} and {ref!r} share the folder name {short_name(ref)!r}: their adapters and answers "
                                 f"would overwrite each other; copy or link one under another name")
        return v


class InferParams(Strict):
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    k: PositiveInt = 4  # answers per test prompt
    max_new_tokens: PositiveInt = 1024
    temperature: float = Field(0.7, ge=0)  # 0: greedy on every engine, and the K answers of a prompt are identical
    top_p: float = Field(0.9, gt=0, le=1)
    batch_size: PositiveInt = 16  # prompts per generate call (each with k sequences)
    # engine: openai — the server's URL, the NAME of its key variable (most local servers need none) and
    # the requests in flight; it must list `<model>` and `<model>-<task>-<volume>` in GET /v1/models
    base_url: Optional[str] = None
    api_key_env: Optional[str] = None
    max_concurrency: PositiveInt = 4


# LoRA ranks vLLM's engine can be built for (`max_lora_rank`, `MaxLoRARanks` in vllm/config/lora.py); an adapter
# of rank r is served by an engine built for the smallest of them that is ≥ r.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int, allowed: tuple[int, ...] = VLLM_MAX_LORA_RANKS) -> int:
    """The `max_lora_rank` to build vLLM's engine with for adapters of rank r."""
    fitting = [rank for rank in sorted(allowed) if rank >= r]
    if not fitting:
        raise ValueError(f"finetune.lora.r: {r} is above the largest LoRA rank vLLM serves ({max(allowed)}); "
                         f"lower it or use infer.engine: transformers")
    return fitting[0]


class ExecutionParams(Strict):
    """Where the grid's independent units run: one after another in this process (`local`), or as Ray tasks
    (`ray`), as many at once as the cluster fits. Changes no output: units and their records are the same."""

    backend: Literal["local", "ray"] = "local"
    # ray: the cluster to join ("auto", "ray://head:10001"); default: RAY_ADDRESS, else a Ray instance on this machine
    address: Optional[str] = None
    gpus_per_unit: Optional[float] = Field(None, ge=0)  # ray: GPUs per adapter / per base model's answers; default 1 where the cluster has GPUs, else 0
    cpus_per_unit: float = Field(1.0, gt=0)  # ray: CPU cores per unit (also its torch threads)
    max_retries: int = Field(1, ge=0)  # ray: times a unit whose worker died is started again


class EvaluateParams(Strict):
    prompt: str = "judge"  # params/prompts/<prompt>.yaml or a path
    m: PositiveInt = 10  # judgements per answer
    zetas: list[int] = Field(default_factory=lambda: [50, 70])
    temperature: float = Field(0.7, ge=0)
    max_new_tokens: PositiveInt = 512
    judges: Optional[list[ServiceParams]] = None  # default: the synthesising service LLM
    # resamples (of test prompts) for the intervals of judge–human agreement (rank correlations have no closed-form
    # interval); 0: none. Scores and verdicts use t-intervals over prompts (methods/verdict.py), not resampling.
    bootstrap: int = Field(1000, ge=0)
    pairwise: bool = False  # also judge each tuned answer against the base model's (volume 0), in both orders
    pairwise_prompt: str = "pairwise"  # params/prompts/<pairwise_prompt>.yaml or a path
    pairwise_temperature: float = Field(0.0, ge=0)  # one greedy verdict per order, as MT-Bench
    reference_metrics: bool = True  # ROUGE-L F and MiniLM embedding cosine vs the human reference, Spearman vs the judge
    # the service LLM answers the test prompts too (K times, infer's wording and sampling) and is judged like a volume
    service_answers: bool = True
    # people's scores of answers (JSONL; README "Judges checked against people"); "bundled": the project's labels of
    # the bundled test prompts (used only with coverage.source bundled); null: none
    human_labels: Optional[str] = "bundled"

    @field_validator("human_labels")
    @classmethod
    def _labels_readable(cls, value):
        if value in (None, "bundled"):
            return value
        path = Path(value).expanduser()
        if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
            path = PROJECT_ROOT / path
        if not path.exists():
            raise ValueError(f"file not found: {value}")
        return str(path.resolve())

    def labels_file(self, coverage_source: str) -> Optional[Path]:
        """The human-labels file in force: the given file, the bundled labels (with the bundled coverage set), or None."""
        if self.human_labels == "bundled":
            return BUNDLED_HUMAN_LABELS if coverage_source == "bundled" and BUNDLED_HUMAN_LABELS.exists() else None
        return Path(self.human_labels) if self.human_labels else None

    @field_validator("zetas")
    @classmethod
    def _zetas_in_range(cls, v):
        if any(z < 0 or z > 100 for z in v):
            raise ValueError("each zeta must be within 0..100")
        return v


TARGET_PATTERN = re.compile(r"^\s*(similarity|precision)\s+(\w+)\s*(>=|≥)\s*(.+?)\s*$")
# the right-hand side relative to the service LLM: `service`, `service - 5`, `0.95 * service`, `0.9 * service + 2`
RELATIVE_PATTERN = re.compile(r"^(?:([0-9.]+)\s*\*\s*)?service(?:\s*([+-])\s*([0-9.]+))?$")


class CycleTarget(Strict):
    """The score the local model must reach: `<metric> <statistic> >= <threshold>`, or relative to the
    service LLM's own judged answers: `>= service`, `>= service - 5`, `>= 0.95 * service`.

    Written in a params file as a mapping or as one string, e.g. `target: precision coverage_50 >= 70`.
    Decided by `methods/verdict.py` for every (task, local model, volume), with the first judge unless
    `judge` names another: a relative target is a one-sided non-inferiority test of the paired per-prompt
    difference local − service_scale × service against service_offset (`>= service - 5`: margin δ = 5),
    an absolute one a one-sided test of the statistic against the threshold, both at `cycle.alpha`.
    """

    metric: Literal["similarity", "precision"] = "precision"
    statistic: str = "coverage_50"  # mean | coverage_<ζ> for a ζ in evaluate.zetas
    threshold: float = Field(70.0, ge=0, le=100)  # an absolute target; unused when relative to the service LLM
    judge: Optional[str] = None  # a judge label; default the first judge
    versus_service: bool = False  # relative to the service LLM's own judged answers
    service_scale: float = Field(1.0, gt=0)
    service_offset: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value):
        if isinstance(value, str):
            match = TARGET_PATTERN.match(value)
            expected = ("expected '<similarity|precision> <statistic> >= <threshold>' or '... >= [factor *] service [- offset]', "
                        "e.g. 'precision coverage_50 >= 70' or 'precision mean >= service - 5'")
            if not match:
                raise ValueError(f"'{value}': {expected}")
            fields = {"metric": match[1], "statistic": match[2]}
            rhs = match[4]
            relative = RELATIVE_PATTERN.match(rhs)
            try:
                if relative:
                    sign = -1.0 if relative[2] == "-" else 1.0
                    fields.update(versus_service=True, service_scale=float(relative[1] or 1.0),
                                  service_offset=sign * float(relative[3] or 0.0))
                else:
                    fields["threshold"] = float(rhs)
            except ValueError:
                raise ValueError(f"'{value}': {expected}") from None
            return fields
        return value

    @field_validator("statistic")
    @classmethod
    def _testable(cls, value):
        if value == "median":
            raise ValueError("'median': a verdict is a test on the mean of per-prompt values, which a median is not; use mean, "
                             "or coverage_<t> >= 50 for 'median >= t' (half the answers score at least t)")
        if value != "mean" and not re.fullmatch(r"coverage_\d+", value):
            raise ValueError(f"'{value}': expected mean or coverage_<ζ> (e.g. coverage_50)")
        return value

    def __str__(self) -> str:
        if not self.versus_service:
            return f"{self.metric} {self.statistic} ≥ {self.threshold:g}"
        rhs = "service" if self.service_scale == 1 else f"{self.service_scale:g} × service"
        if self.service_offset:
            rhs += f" {'−' if self.service_offset < 0 else '+'} {abs(self.service_offset):g}"
        return f"{self.metric} {self.statistic} ≥ {rhs}"


class CycleParams(Strict):
    """The LlamaDuo cycle: while the target is not met, synthesise `step` more pairs per task,
    deduplicate them against every earlier cycle, and fine-tune again on everything kept so far.
    Cycle 1 is the run folder itself; cycle t ≥ 2 lives in `cycle-<t>/`."""

    target: CycleTarget = Field(default_factory=CycleTarget)
    max_cycles: PositiveInt = 1  # 1: no cycling
    step: Optional[PositiveInt] = None  # new valid pairs per task per cycle; default synthesize.samples_per_task
    max_cost_usd: Optional[float] = Field(None, gt=0)  # the whole run's service-LLM spend (USD): held while calls are in flight, and no new cycle past it
    # one-sided error of every verdict (target, volume choice, deploy's parity): intervals are two-sided 1 − 2α (0.025: 95 %)
    alpha: float = Field(0.025, gt=0, lt=0.5)


CELL_PATTERN = re.compile(r"^([A-Za-z_]+)/([A-Za-z0-9._-]+)/(\d+)(?:@(\d+))?$")
GGUF_QUANTIZATIONS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f16", "bf16", "f32")


class DeployParams(Strict):
    """Stage 08: which cells to export and how, and the parity check of the served model."""

    # `llamaduo run` ends with this stage (params/quickstart.yaml and paper.yaml turn it on); run by name
    # (`--stages deploy`, notebook 07) it runs either way
    enabled: bool = False
    # `task/model/volume` or `task/model/volume@cycle` (default: the latest cycle that trained it);
    # empty: per task and local model, the smallest volume that meets cycle.target, else the best
    cells: list[str] = Field(default_factory=list)
    quantization: str = "q8_0"  # the GGUF's type (q8_0: near-lossless, loads in llama.cpp on any CPU)
    merged_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the merged safetensors model
    # the chat template written into the exports; default the one the adapter was trained with
    chat_template: Optional[str] = None
    parity: bool = True  # serve the GGUF in llama.cpp's server and compare its judged answers with the adapter's
    # the share of test prompts whose greedy answers (served model, adapter) must agree on their first 5 words
    # (quantisation changes a word somewhere later; a wrong chat template or a broken merge the first ones)
    min_greedy_agreement: float = Field(0.5, ge=0, le=1)
    # points (0–100 score): the served model is "equivalent" to the adapter when the (1 − 2·cycle.alpha) interval of
    # served − adapter, paired over test prompts, lies within ±parity_margin (two one-sided tests, TOST)
    parity_margin: float = Field(5.0, gt=0, le=100)

    @field_validator("cells")
    @classmethod
    def _cell_names(cls, value):
        for cell in value:
            if not CELL_PATTERN.match(cell):
                raise ValueError(f"'{cell}': expected task/model/volume or task/model/volume@cycle, e.g. closed_qa/smollm2-135m-instruct/16")
        return value

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, value):
        if value not in GGUF_QUANTIZATIONS:
            raise ValueError(f"'{value}' is not one of {', '.join(GGUF_QUANTIZATIONS)}")
        return value


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # transformers' integrations for training curves


class TrackingParams(Strict):
    """Where a run is also logged, besides its folder (off by default). Changes no output: a tracker only reads
    them. `mlflow`: the run (params, a child run per cell with its tags, metrics and training curve, the verdicts,
    the figures and report.html) is logged when `llamaduo run` ends; a rerun updates the same MLflow run."""

    mlflow: bool = False
    # any MLflow tracking URI (http://host:5000, databricks, sqlite:///…); default a SQLite store beside the run
    # folders: sqlite:///<results>/mlflow.db, artifacts in <results>/mlartifacts
    mlflow_uri: Optional[str] = None
    experiment: Optional[str] = None  # the MLflow experiment; default run_name
    # passed to TRL's `report_to` while an adapter trains: its loss curve live in TensorBoard (event files under
    # <run>/tensorboard/), W&B (WANDB_MODE=offline works without a network), trackio or MLflow
    report_to: list[Literal[TRACKERS]] = Field(default_factory=list)


class Params(Strict):
    run_name: str = "paper"
    seed: int = 42
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_CATEGORIES), min_length=1)
    coverage: CoverageParams = Field(default_factory=CoverageParams)
    service: ServiceParams = Field(default_factory=ServiceParams)
    synthesize: SynthesizeParams = Field(default_factory=SynthesizeParams)
    deduplicate: DeduplicateParams = Field(default_factory=DeduplicateParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    infer: InferParams = Field(default_factory=InferParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    cycle: CycleParams = Field(default_factory=CycleParams)
    deploy: DeployParams = Field(default_factory=DeployParams)
    execution: ExecutionParams = Field(default_factory=ExecutionParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _lora_rank_served_by_vllm(self):
        if self.infer.engine == "vllm":
            vllm_max_lora_rank(self.finetune.lora.r)
        return self

    @model_validator(mode="after")
    def _target_is_reported(self):
        statistics = {"mean"} | {f"coverage_{z}" for z in self.evaluate.zetas}
        if self.cycle.target.statistic not in statistics:  # the verdict, the report and deploy all read it
            raise ValueError(f"cycle.target.statistic: '{self.cycle.target.statistic}' is not reported; choose one of {', '.join(sorted(statistics))}")
        if self.cycle.target.versus_service and not self.evaluate.service_answers:
            raise ValueError("cycle.target: a target relative to the service LLM needs evaluate.service_answers: true")
        if self.cycle.target.judge and self.cycle.target.judge not in [j.label for j in self.judges]:
            raise ValueError(f"cycle.target.judge: '{self.cycle.target.judge}' is not a judge ({', '.join(j.label for j in self.judges)})")
        return self

    @property
    def judges(self) -> list[ServiceParams]:
        return self.evaluate.judges or [self.service]

    def prompt_path(self, name: str) -> Path:
        return resolve_prompt(name)

    def dump(self) -> dict:
        return self.model_dump(mode="json")


def resolve_prompt(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate.resolve()
    path = PROMPTS_DIR / f"{name}.yaml"
    if path.exists():
        return path
    raise FileNotFoundError(f"prompt '{name}' not found (looked for {candidate} and {path})")
