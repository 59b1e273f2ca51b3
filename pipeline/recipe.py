"""Recipes: YAML files parsed into dataclass configs that validate themselves and reject unknown keys.

A recipe names what to do to a model, never which model: the same recipe runs on SmolLM2 and on Llama-3-8B.
"""

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import RecipeError
from .kv_sparsity import KVConfig
from .pruning import PRUNING_METHODS

GROUPS = ("row", "layer")
WEIGHT_FORMATS = ("bf16", "int8")
ROUNDINGS = ("rtn", "gptq")
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass
class CalibrationConfig:
    """Where calibration windows come from and how many. Defaults follow Wanda/SparseGPT (128 x 2048 of C4)."""

    dataset: str = "c4"  # c4 | wikitext2 | a path to a .txt / .jsonl file or a folder of them
    nsamples: int = 128
    seqlen: int = 2048  # capped at the model's max_position_embeddings
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.dataset, str) or not self.dataset:
            raise RecipeError(f"calibration.dataset must be a non-empty string, got {self.dataset!r}")
        for key in ("nsamples", "seqlen"):
            _check_positive_int(f"calibration.{key}", getattr(self, key))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"calibration.seed must be an integer, got {self.seed!r}")


@dataclass
class PruneConfig:
    """Which weights of each decoder linear to zero. lm_head and embeddings are never pruned."""

    method: str = "wanda"  # magnitude (|W|) | wanda (|W| * ||X_j||_2, arXiv:2306.11695)
    sparsity: float | None = None  # fraction zeroed; default 0.5, implied by the pattern for N:M
    pattern: str = "unstructured"  # unstructured | "N:M" (keep N of every M consecutive inputs, e.g. 2:4)
    group: str = "row"  # comparison group for unstructured: each output row, or the whole layer
    layers: dict[str, float] = field(default_factory=dict)  # glob on module name -> sparsity; first match wins
    sequential: bool = True  # wanda: prune a block's linears group by group, later groups see earlier pruning
    # wanda: after masking, refit each row's kept weights by least squares on the calibration inputs (X^T X per
    # linear), with refit_damp * mean(diag(X^T X)) added to the diagonal. Same mask, smaller output error.
    refit: bool = False
    refit_damp: float = 0.01
    # wanda + refit: choose the mask 128 columns at a time during the refit, by Wanda's score on the weights as refit
    # so far (SparseGPT's adaptive mask selection); each row still drops exactly its share (or keeps N of every M).
    adaptive_mask: bool = False

    def __post_init__(self):
        if self.method not in PRUNING_METHODS:
            raise RecipeError(f"prune.method must be one of {', '.join(PRUNING_METHODS)}, got {self.method!r}")
        if self.group not in GROUPS:
            raise RecipeError(f"prune.group must be one of {', '.join(GROUPS)}, got {self.group!r}")
        if self.pattern != "unstructured":
            n, m = self.nm  # validates the pattern
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise RecipeError(
                    f"prune.sparsity {self.sparsity} contradicts prune.pattern {self.pattern} ({implied})"
                )
            if self.layers:
                raise RecipeError("prune.layers: per-layer ratios apply to unstructured pruning only")
            self.sparsity = implied
        elif self.sparsity is None:
            self.sparsity = 0.5
        _check_ratio("prune.sparsity", self.sparsity)
        for key in ("sequential", "refit", "adaptive_mask"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"prune.{key} must be true or false, got {getattr(self, key)!r}")
        if self.refit and self.method != "wanda":
            raise RecipeError("prune.refit needs calibration inputs: use it with prune.method: wanda")
        if self.adaptive_mask and not self.refit:
            raise RecipeError("prune.adaptive_mask chooses the mask during the refit: it needs prune.refit: true")
        if self.adaptive_mask and self.group != "row" and not self.nm:
            raise RecipeError("prune.adaptive_mask keeps each row's share: it needs prune.group: row")
        damp = self.refit_damp
        if not _is_real(damp) or not 0.0 < damp <= 1.0:
            raise RecipeError(f"prune.refit_damp must be a number in (0, 1], got {damp!r}")
        if not isinstance(self.layers, dict):
            raise RecipeError(f"prune.layers must map module-name globs to sparsities, got {self.layers!r}")
        for pattern, ratio in self.layers.items():
            _check_ratio(f"prune.layers[{pattern!r}]", ratio)

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None when unstructured."""
        if self.pattern == "unstructured":
            return None
        match = _NM.match(str(self.pattern))
        if not match:
            raise RecipeError(f"prune.pattern must be 'unstructured' or 'N:M' such as '2:4', got {self.pattern!r}")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise RecipeError(f"prune.pattern {self.pattern}: N:M needs 0 < N < M (keep N of every M)")
        return n, m

    def sparsity_for(self, name: str) -> float:
        """The target sparsity of the linear called `name` (e.g. model.layers.3.mlp.up_proj)."""
        from fnmatch import fnmatchcase

        for pattern, ratio in self.layers.items():
            if fnmatchcase(name, pattern):
                return float(ratio)
        return float(self.sparsity)


@dataclass
class QuantizeConfig:
    """How linears are stored after pruning. Embeddings stay bf16; lm_head too unless `lm_head` says int8."""

    weights: str = "bf16"  # bf16 | int8 (per output channel, symmetric, scale = absmax / 127)
    # SmoothQuant's migration strength alpha in (0, 1) (arXiv:2211.10438), or null for none. Needs calibration data.
    smoothquant: float | None = None
    # With weights: int8, store lm_head as dense int8 too (never pruned). A tied lm_head gets its own int8 copy and
    # the embeddings stay bf16. At batch 1 lm_head is read once per token like every other weight.
    lm_head: bool = False
    # How int8 values are chosen on that grid: rtn rounds each weight to nearest; gptq (arXiv:2210.17323) rounds
    # column by column and moves each rounding error onto the columns not yet rounded, against the calibration
    # inputs' X^T X (+ damp * mean of its diagonal), block by block. Needs calibration data.
    method: str = "rtn"
    damp: float = 0.01

    def __post_init__(self):
        if self.weights not in WEIGHT_FORMATS:
            raise RecipeError(f"quantize.weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.method not in ROUNDINGS:
            raise RecipeError(f"quantize.method must be one of {', '.join(ROUNDINGS)}, got {self.method!r}")
        if self.method != "rtn" and self.weights != "int8":
            raise RecipeError(f"quantize.method: {self.method} only applies with quantize.weights: int8")
        if not _is_real(self.damp) or not 0.0 < self.damp <= 1.0:
            raise RecipeError(f"quantize.damp must be a number in (0, 1], got {self.damp!r}")
        if self.smoothquant is not None:
            value = self.smoothquant
            if not _is_real(value) or not 0.0 < value < 1.0:
                raise RecipeError(f"quantize.smoothquant must be a number in (0, 1) or null, got {value!r}")
            if self.weights != "int8":
                raise RecipeError("quantize.smoothquant only applies with quantize.weights: int8")
        if not isinstance(self.lm_head, bool):
            raise RecipeError(f"quantize.lm_head must be true or false, got {self.lm_head!r}")
        if self.lm_head and self.weights != "int8":
            raise RecipeError("quantize.lm_head only applies with quantize.weights: int8")


@dataclass
class EvalConfig:
    """What `sparamx eval` checks by default for artifacts made by this recipe, and the gate it must pass."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task names; empty: every offline task in eval/tasks
    # Each metric of each task must keep this fraction of the dense model's score (perplexity: dense / compressed).
    recovery_threshold: float | None = None
    limit: int | None = None  # examples per task (None: all)
    docs: int | None = None  # documents per rolling-perplexity task such as wikitext (None: as limit)

    def __post_init__(self):
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise RecipeError(f"eval.tasks must be a list of lm-eval task names, got {self.tasks!r}")
        value = self.recovery_threshold
        if value is not None and (not _is_real(value) or not 0 < value <= 1):
            raise RecipeError(f"eval.recovery_threshold must be a number in (0, 1] or null, got {value!r}")
        for key in ("limit", "docs"):
            _check_positive_int(f"eval.{key}", getattr(self, key), nullable=True)


@dataclass
class Recipe:
    name: str
    description: str = ""
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kv: KVConfig = field(default_factory=KVConfig)  # the KV cache sparamx.load installs (recorded in sparamx.json)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"name must be a non-empty string, got {self.name!r}")

    @property
    def needs_calibration(self) -> bool:
        quantize = self.quantize
        calibrated_prune = PRUNING_METHODS[self.prune.method].calibrated
        return calibrated_prune or quantize.smoothquant is not None or quantize.method == "gptq"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        return _build(cls, data, "")


DEFAULT_RECIPE = "wanda-50"


def shipped_recipes() -> dict[str, Path]:
    """The recipes installed with the package (recipes/ of the source tree, as sparamx.recipes), by name."""
    folder = resources.files("sparamx.recipes")
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file as given, else the shipped recipe of that name ("wanda-50", "wanda-50.yaml" and
    "recipes/wanda-50.yaml" all name it, from any directory)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if path.stem in shipped and (path.parent == Path(".") or path.parent.name == "recipes"):
        return shipped[path.stem]
    names = ", ".join(sorted(shipped))
    raise RecipeError(f"{recipe}: no such recipe file, and no shipped recipe of that name ({names})")


def load_recipe(recipe: str | Path) -> Recipe:
    """Parse a recipe file, or a shipped recipe by name; every error names the file and the key at fault."""
    path = recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from exc


def _is_real(value) -> bool:
    """An int or float that is not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive_int(key: str, value, nullable: bool = False) -> None:
    if nullable and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{key} must be a positive integer{' or null' if nullable else ''}, got {value!r}")


def _check_ratio(key: str, value) -> None:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise RecipeError(f"{key} must be a number in [0, 1), got {value!r}")


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"unknown key '{prefix}{unknown[0]}' (expected one of: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        kwargs[key] = _build(hint, value, f"{prefix}{key}.") if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)
