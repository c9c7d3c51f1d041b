"""Settings of the ``frank_wolfe`` merge method.

These are the keys of a mergekit config's ``parameters:`` block. mergekit only
accepts scalars there, so every field is a scalar. The field descriptions are the
single source of the CLI's ``--help`` and the README's parameter table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A user-facing configuration problem, raised before any maths runs."""


class ParameterError(ConfigError):
    """A problem with one of the method's parameters that only the solve can see (a file
    it points to is missing or broken, the model cannot do what it asks). The solve never
    sees the config's file name: the commands add it (:func:`naming_config`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"parameters.{field}: {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self) -> tuple[type[ParameterError], tuple[str, str]]:
        # its constructor takes two parts where its args hold one message: say how to rebuild it, so
        # that pickle and copy work on it as on any exception
        return type(self), (self.field, self.problem)


def naming_config(error: Exception, source: str) -> Exception:
    """``error``, naming the config file ``source`` where it is about one parameter."""
    if isinstance(error, ParameterError):
        return ConfigError(f"{source}: {error}")
    return error


_ADDED_LATER: dict[str, Any] = {
    "constraint": "hull",
    "epsilon_relative": 0.0,
    "direction": "frank_wolfe",
    "solver": "frank_wolfe",
    "assistant_turns": "last",
    "granularity": "candidate",
    "weight_penalty": 0.0,
    "screen_per_task": 0,
    "screen_floor": 0.0,
    "screen_by": "slope",
}
# The settings that belong to one solver or another, and which each solver reads: a
# solver's setting given to a solver that does not read it is an error naming it.
SOLVER_SETTINGS: dict[str, tuple[str, ...]] = {
    "frank_wolfe": (
        "variant",
        "lmo_score",
        "iterations",
        "epsilon",
        "epsilon_relative",
        "step",
        "direction",
        "line_search_steps",
        "gamma",
        "top_k",
        "top_k_per",
        "inner_weights",
        "inner_steps",
        "inner_lr",
        "weight_penalty",
    ),
    "projected_gradient": ("gradient_steps", "learning_rate", "weight_penalty"),
    "stochastic_frank_wolfe": ("gradient_steps", "lmo_score", "weight_penalty"),
}
# ``auto`` resolves to one of these two (mergekit_fw.solve.solver_choice), so it accepts what either reads
AUTO_SOLVERS = ("frank_wolfe", "projected_gradient")
SOLVER_SETTINGS["auto"] = tuple(dict.fromkeys(n for s in AUTO_SOLVERS for n in SOLVER_SETTINGS[s]))
SOLVER_SPECIFIC = frozenset(name for names in SOLVER_SETTINGS.values() for name in names)
# the step rules that search gamma on the loss, which away and pairwise steps need
SEARCHED_STEPS = ("line_search", "quadratic", "adaptive")


def floor_acts(per_task: int) -> bool:
    """Whether ``screen_floor`` can change what a screen of ``per_task`` keeps: it judges a
    task's places after the first, so it has nothing to judge below 2 a task."""
    return per_task >= 2


class FrankWolfeParameters(BaseModel):
    """Everything that decides a Frank-Wolfe solve (and so enters its fingerprint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: str = Field(
        description='Path to the calibration JSONL: one {"task", "prompt", "completion"} or '
        '{"task", "messages": [{"role", "content"}, ...]} object per line (chat rows are rendered '
        "with the base tokenizer's chat template; `mergekit-fw calibration` writes such a file from "
        "Hugging Face datasets); a relative path is taken from the working directory."
    )
    samples_per_task: int = Field(
        100, ge=1, description="Calibration samples used per task (the first N of each task)."
    )
    objective: Literal["cross_entropy", "entropy"] = Field(
        "cross_entropy",
        description="Calibration objective, balanced over tasks: 'cross_entropy' on completion "
        "tokens (labelled data) or 'entropy' of the next-token distribution where the answer is "
        "predicted (unlabelled prompts, AdaMerging's surrogate; completions are ignored).",
    )
    entropy_positions: Literal["answer", "prompt"] = Field(
        "answer",
        description="objective entropy: the positions whose entropy counts. 'answer': those that "
        "predict the answer (the last prompt position, and with answer_tokens > 1 the next ones "
        "along the starting model's greedy continuation); 'prompt': every prompt position, most of "
        "which predict the next input token rather than the answer.",
    )
    answer_tokens: int = Field(
        1,
        ge=1,
        le=64,
        description="objective entropy with entropy_positions answer: answer positions counted per "
        "row; 1 is the prediction of the answer's first token, k > 1 adds the k - 1 tokens that the "
        "starting point decodes greedily (decoded once, so the objective stays one fixed function).",
    )
    assistant_turns: Literal["last", "all"] = Field(
        "last",
        description="objective cross_entropy, chat rows: the assistant turns whose tokens count. 'last': "
        "the final answer only (earlier turns are context); 'all': every assistant turn of the "
        "conversation, each given the turns before it.",
    )
    solver: Literal["auto", "frank_wolfe", "projected_gradient", "stochastic_frank_wolfe"] = Field(
        "auto",
        description="How the coefficients are found in the constraint set: 'auto' (the default) takes "
        "'projected_gradient' where the granularity is rank_component (many coefficients a tensor, which "
        "projected gradient fitted further than Frank-Wolfe's iterations on the testbeds) and 'frank_wolfe' "
        "elsewhere, or the solver that a setting given away "
        "from its default belongs to (iterations, step, ...: frank_wolfe; gradient_steps, learning_rate: "
        "projected_gradient); the log and the model card say which and why; 'frank_wolfe' (the paper: "
        "LMO steps on full passes over the calibration set, sparse and certified by the FW gap); "
        "'projected_gradient' (Adam on one batch per task per step, projected back onto the set "
        "after each step; with objective entropy and constraint box, AdaMerging's layer-wise form); "
        "'stochastic_frank_wolfe' (one batch per task per step too, the LMO on a running average of "
        "the batch gradients, step 2 / (t + 8): Mokhtari et al.'s momentum stochastic Frank-Wolfe).",
    )
    gradient_steps: int = Field(
        400,
        ge=1,
        le=100_000,
        description="solver projected_gradient or stochastic_frank_wolfe: steps, each on one batch "
        "(batch_size rows) of every calibration task, cycling through each task's rows (at 100 rows a "
        "task and batch_size 16, 400 steps are 57 gradient passes over the calibration set).",
    )
    weight_penalty: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="A cost per unit of candidate weight added to the calibration loss (hard FW, solver "
        "projected_gradient or stochastic_frank_wolfe), as a fraction of the first step's mean absolute "
        "gradient (so it does not depend on the model's gradient scale): a coefficient is taken only "
        "where the rows pay for it, and one they neither want nor mind stays near 0 instead of drifting "
        "to the mean of its 0/1 flips (stochastic FW). The FW gap and the line search are those of the "
        "loss plus the cost. 0 turns it off.",
    )
    screen_per_task: int = Field(
        1,
        ge=0,
        le=1000,
        description="Before the solve moves, keep for each calibration task the N pool members that help "
        "it most, ranked as screen_by says (by how steeply the first gradient on the task's rows falls along "
        "each, summed over tensors and over a LoRA's rank components; by the task's loss with each alone; or "
        "the N of each, then up to 2N), and hold the others at 0: irrelevant members that the rows' noise "
        "would let in stay out, and every member keeps a row in the table and the outputs. The slope costs "
        "no pass under hard and soft FW (the first gradient is taken per task anyway), one gradient pass "
        "under the other solvers; the loss one forward pass per member (under 'both', none where the slope "
        "already keeps every member). From then on the held members leave "
        "the oracle's model, so a pass costs what the kept members' does. The log, the trace and the model "
        "card name what was kept. 1 (under 'both': the steepest and the best alone, one member where they "
        "agree) also keeps out related members that the calibration rows pay for and unseen rows do not; 2 or "
        "more for a task that several members help (fine-tunes of the same task). 0 keeps every member.",
    )
    screen_floor: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="With the screen keeping 2 or more a task: after a task's steepest member, another is kept for that task only "
        "if its first gradient there falls at least this fraction as steeply (0.1: a tenth). Where the pool "
        "holds one specialist for a task, the next places otherwise go to members whose fall is the rows' "
        "noise. 0 keeps the N steepest whatever their fall.",
    )
    screen_by: Literal["slope", "loss", "both"] = Field(
        "both",
        description="With the screen on, what ranks the members for a task: 'slope', how steeply the first "
        "gradient falls along each member on the task's rows (no pass of its own); 'loss', how far the "
        "task's loss falls from the base's with the member alone at full weight (one forward pass per "
        "member, all tasks' losses from the same pass); 'both', what either keeps. 'loss' still sees a "
        "task's own adapter when its help is flat at the base, where the slope can rank it below unrelated "
        "members (full testbed, a build of seed 1: firstbigger's own adapter was not among its 5 steepest); "
        "the slope also keeps related members whose help shows at first and that help on unseen rows (quick "
        "testbed). 'slope' saves the pass per member, for a pool of many members whose tasks' own adapters "
        "are known to help from the first step.",
    )
    learning_rate: float = Field(
        0.01,
        gt=0.0,
        le=10.0,
        description="solver projected_gradient: Adam's learning rate, in units of a candidate's "
        "coefficient (of its vertex weight under scaled_hull).",
    )
    constraint: Literal["hull", "box", "scaled_hull", "capped_box"] = Field(
        "box",
        description="Where the coefficients may go, per tensor (lmo layer) or per model (lmo task): "
        "'hull' the paper's convex hull of the base and the candidates (their total weight at most "
        "1); 'box' each candidate in [0, 1] on its own (any subset at up to full strength, as "
        "stacked adapters); 'scaled_hull' the hull of base + radius x each task vector (total "
        "weight up to radius); 'capped_box' the box with the candidates' total at most radius (at most "
        "radius candidates at full strength, so each step takes the few that help most instead of "
        "every one the rows' noise favours).",
    )
    radius: float = Field(
        2.0,
        gt=0.0,
        le=1000.0,
        description="constraint scaled_hull or capped_box: the largest total coefficient of the candidates "
        "on a tensor (under granularity rank_component, a LoRA rank component counts as a candidate).",
    )
    granularity: Literal["auto", "candidate", "rank_component"] = Field(
        "auto",
        description="What one coefficient scales on a tensor: 'candidate' a candidate's whole task vector "
        "(the paper); 'rank_component' each rank-1 component s * B[:, j] A[j, :] of every LoRA adapter on "
        "its own (its modules_to_save and full checkpoints stay whole), so a merge keeps an adapter's "
        "directions that help the asked tasks and drops those that hurt them; the merge is still one "
        "LoRA pair per module. Meant for constraint box. Stock mergekit weights whole models, so such a "
        "merge has no replay config. 'auto' takes rank_component where the pool has a LoRA adapter and "
        "every calibration task has at least 50 rows (with constraint box, merge_fn convex, lmo layer, "
        "labelled rows, hard FW or a gradient solver, a start at the base; an init table keeps its own), "
        "candidate otherwise; the log and the model card say which and why.",
    )
    variant: Literal["hard", "soft"] = Field(
        "hard",
        description="Frank-Wolfe variant: 'hard' steps towards the single best vertex; 'soft' "
        "takes the top_k vertices and optimises their weights by projected gradient descent.",
    )
    lmo: Literal["layer", "task"] = Field(
        "layer",
        description="Linear minimisation oracle: 'layer' picks the best vertex per tensor; 'task' "
        "one vertex for the whole model from scores summed over tensors (the same for solver "
        "stochastic_frank_wolfe). solver projected_gradient: one coefficient per candidate and "
        "tensor ('layer') or per candidate ('task').",
    )
    lmo_score: Literal["inner_product", "cosine"] = Field(
        "inner_product",
        description="How the LMO ranks vertices: 'inner_product' <grad, vertex - base> (the paper) "
        "or 'cosine', that divided by the vertex's norm (what the authors' code computes).",
    )
    iterations: int = Field(30, ge=1, description="Maximum number of Frank-Wolfe iterations.")
    epsilon: float = Field(0.0, ge=0.0, description="Stop once the Frank-Wolfe gap is at or below this value.")
    epsilon_relative: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="Stop once the Frank-Wolfe gap is at or below this fraction of the first "
        "iteration's (0: off); the gap's scale depends on the loss and the pool, the fraction does "
        "not, so iterations becomes a cap.",
    )
    step: Literal["line_search", "quadratic", "adaptive", "schedule", "fixed"] = Field(
        "adaptive",
        description="Hard FW step size: 'line_search' (golden-section search of gamma in [0, 1] on "
        "the calibration loss; never increases it), 'quadratic' (a parabola through the known loss "
        "and slope at gamma = 0 and the loss at gamma = 1, its minimiser tried next, halved until the "
        "loss falls: usually 2 forward passes; never increases it), 'adaptive' (the quadratic rule "
        "with its first trial at the minimiser for the last step's curvature, taken at once when the "
        "refitted parabola agrees within 25%: 1-2 forward passes; never increases it), "
        "'schedule' (gamma = 2 / (t + 2)) "
        "or 'fixed' (gamma_t = gamma / (t + 2), the authors' published rule).",
    )
    direction: Literal["frank_wolfe", "away", "pairwise", "projected_pairwise"] = Field(
        "projected_pairwise",
        description="Hard FW: 'frank_wolfe' steps towards the LMO's point (the paper); 'away' may "
        "instead step away from the worst point in use, taking an early pick back; 'pairwise' moves "
        "weight straight from that point to the LMO's. Both converge linearly where plain FW "
        "zig-zags. 'projected_pairwise' follows the pairwise direction along the set's projection, "
        "so a coefficient that reaches its bound stops there and the others go on (in the box the "
        "straight step stops at the first bound, and with many asked tasks the solve stalls). All but "
        "'frank_wolfe' need a searched step "
        "(line_search, quadratic or adaptive), so where the step is 'schedule' or 'fixed', or the variant "
        "'soft', the default is 'frank_wolfe'.",
    )
    line_search_steps: int = Field(
        8,
        ge=2,
        le=64,
        description="Loss evaluations of the golden-section line search; step quadratic or adaptive: the "
        "most it may spend.",
    )
    gamma: float = Field(
        0.06,
        gt=0.0,
        le=2.0,
        description="Numerator of the 'fixed' step rule gamma_t = gamma / (t + 2); the authors' "
        "code uses 0.06 (step_size 0.1 times their 0.3 task-arithmetic scaling times 2).",
    )
    top_k: int = Field(2, ge=1, description="Soft FW: vertices taken from the LMO's ranking at every iteration.")
    top_k_per: Literal["all", "task"] = Field(
        "all",
        description="Soft FW: rank vertices by the whole objective ('all') or take the top_k of "
        "each calibration task's own scores and merge their union ('task').",
    )
    inner_weights: Literal["layer", "task"] = Field(
        "layer",
        description="Soft FW: one simplex of weights per tensor ('layer') or one for the whole model ('task').",
    )
    inner_steps: int = Field(10, ge=1, le=1000, description="Soft FW: projected gradient steps of the inner problem.")
    inner_lr: float = Field(
        1.0,
        gt=0.0,
        description="Soft FW: learning rate of the inner projected gradient descent (halved "
        "whenever a step would raise the loss).",
    )
    init: str = Field(
        "base",
        description="Starting point: 'base', a mergekit config of the same pool (e.g. ta.yml, "
        "merged by mergekit and added as a vertex) or a previous run's fw_table.json to continue.",
    )
    merge_fn: Literal["convex", "ties"] = Field(
        "convex",
        description="How a coefficient table becomes a model: 'convex' (weighted sum of task "
        "vectors; stays in the convex hull) or 'ties' (mergekit's ties with the table's "
        "coefficients as weights; may leave the hull).",
    )
    density: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="merge_fn ties: fraction of each task vector's largest-magnitude entries kept.",
    )
    batch_size: int = Field(16, ge=1, description="Calibration sequences per forward pass.")
    max_length: int = Field(512, ge=8, description="Longest calibration sequence in tokens; longer ones are cut.")
    seed: int = Field(0, description="Seed for every random choice of the solve.")
    oracle_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the base model is loaded in for the gradient oracle. 'auto': the config's "
        "own 'dtype' (what mergekit merges in), float32 where the config sets none or another; "
        "'bfloat16' or 'float16' halve the memory of float32 (a 7B needs about 14 GB instead of 27), "
        "with losses and scores still accumulated in float32/64.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of "
        "keeping them: less memory for long calibration batches, about one more forward pass of "
        "time. Does not change the result.",
    )
    device_map: str | None = Field(
        None,
        description="Where the oracle's model lives: unset = the GPU if there is one (the process's "
        "own under data parallel), else the CPU; a device ('cpu', 'cuda:1'); or Accelerate's "
        "'auto' / 'balanced' / 'sequential' placement over every GPU and the CPU for models that "
        "do not fit one device. Does not change the result.",
    )
    exclude_outliers: bool = Field(
        False,
        description="Leave out candidates whose task vector's RMS is an outlier against the pool's "
        "(4x from the median and a robust z-score over 3.5: a broken or misinitialised model); "
        "they are always warned about, and the trace says why each was left out.",
    )
    allow_pickle: bool = Field(
        False,
        description="Accept weights that exist only as pickles (.bin/.pt): they are loaded with "
        "torch's restricted unpickler and converted to safetensors once, in the cache. Only for "
        "files you trust; never on by default.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where solves are cached by fingerprint (default: $MERGEKIT_FW_CACHE or ~/.cache/mergekit_fw).",
    )

    @field_validator("calibration")
    @classmethod
    def _calibration_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("calibration must name a JSONL file")
        return value

    @field_validator("init")
    @classmethod
    def _init_kind(cls, value: str) -> str:
        if value != "base" and not value.endswith((".json", ".yml", ".yaml")):
            raise ValueError("init must be 'base', a mergekit config (.yml/.yaml) or a coefficient table (.json)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _plain_direction_where_pairwise_cannot_step(cls, data: Any) -> Any:
        """Pairwise and away steps need a searched step size (the largest step depends
        on the iterate), so where the step is a rule or the variant soft the default
        direction is the paper's: a config that sets only those stays valid. A pure
        function of the other values, so mergekit's kernel (which sees defaults filled
        in and drops them) resolves the same direction as the config did."""
        if not isinstance(data, dict) or "direction" in data:
            return data
        fields = cls.model_fields

        def value(name: str) -> Any:
            return data.get(name, fields[name].default)

        if value("solver") in ("frank_wolfe", "auto") and (
            value("variant") != "hard" or value("step") not in SEARCHED_STEPS
        ):
            return {**data, "direction": "frank_wolfe"}
        return data

    @model_validator(mode="after")
    def _settings_fit_the_variant(self) -> FrankWolfeParameters:
        """A setting that the chosen variant ignores is almost always a typo in intent:
        name it instead of silently doing something else."""
        given = self.model_fields_set
        only = {
            "step": ("variant", "hard", "soft FW takes its step from the inner problem"),
            "weight_penalty": ("variant", "hard", "soft FW's inner problem is solved on the loss alone"),
            "gamma": ("step", "fixed", "it is the numerator of the fixed step rule"),
            "top_k": ("variant", "soft", "only soft FW takes several vertices"),
            "top_k_per": ("variant", "soft", "only soft FW takes several vertices"),
            "inner_weights": ("variant", "soft", "only soft FW has an inner problem"),
            "inner_steps": ("variant", "soft", "only soft FW has an inner problem"),
            "inner_lr": ("variant", "soft", "only soft FW has an inner problem"),
            "density": ("merge_fn", "ties", "only ties trims task vectors"),
            "entropy_positions": ("objective", "entropy", "only the entropy objective picks positions"),
            "answer_tokens": ("objective", "entropy", "only the entropy objective picks positions"),
            "assistant_turns": ("objective", "cross_entropy", "the entropy objective reads no answers"),
        }
        wrong = sorted(n for n in SOLVER_SPECIFIC - set(SOLVER_SETTINGS[self.solver]) if n in given)
        if wrong:
            readers = {n: [k for k, names in SOLVER_SETTINGS.items() if n in names] for n in wrong}
            raise ValueError(
                "; ".join(f"{n} only applies to solver: {' or '.join(readers[n])}" for n in wrong)
                + f" (solver is {self.solver!r})"
            )
        if self.solver == "auto":
            named = self.named_for_solvers()
            if all(named.values()):
                raise ValueError(
                    "solver auto was given settings that only one solver reads and settings that only the "
                    "other reads: "
                    + "; ".join(f"{', '.join(names)} ({solver})" for solver, names in named.items())
                    + "; name the solver"
                )
        if self.direction != "frank_wolfe" and (self.variant != "hard" or self.step not in SEARCHED_STEPS):
            raise ValueError(
                f"direction {self.direction} needs variant: hard and step: line_search, quadratic or adaptive (its "
                f"largest step depends on the iterate); variant is {self.variant!r}, step {self.step!r}"
            )
        if "line_search_steps" in given and self.step not in SEARCHED_STEPS:
            raise ValueError(
                f"line_search_steps needs step: line_search, quadratic or adaptive (it only tunes the line search); "
                f"step is {self.step!r}"
            )
        for name, (other, needed, why) in only.items():
            if name in given and getattr(self, other) != needed:
                raise ValueError(f"{name} needs {other}: {needed} ({why}); {other} is {getattr(self, other)!r}")
        if "radius" in given and self.radius_used() is None:
            raise ValueError(
                f"radius needs constraint: scaled_hull or capped_box (only they have one); constraint is "
                f"{self.constraint!r}"
            )
        if self.radius_used() is not None and self.radius < 1.0 and self.init.endswith((".yml", ".yaml")):
            raise ValueError(
                f"init needs radius >= 1 under constraint {self.constraint} (got {self.radius:g}): with a smaller "
                "radius the initial merge lies outside the set"
            )
        if self.granularity == "rank_component" and self.merge_fn != "convex":
            raise ValueError(
                f"granularity rank_component needs merge_fn: convex ({self.merge_fn} trims and elects signs "
                "entry by entry over whole task vectors, which rank-1 pieces are not); merge_fn is "
                f"{self.merge_fn!r}"
            )
        if "answer_tokens" in given and self.entropy_positions != "answer":
            raise ValueError("answer_tokens needs entropy_positions: answer (it counts answer positions)")
        return self

    def named_for_solvers(self) -> dict[str, list[str]]:
        """Per choice of ``solver: auto``, the settings away from their defaults that only
        it reads (values, not typed fields: mergekit's kernel sees the defaults filled in)."""
        fields = type(self).model_fields
        out = {}
        for solver in AUTO_SOLVERS:
            others = {n for s in AUTO_SOLVERS if s != solver for n in SOLVER_SETTINGS[s]}
            out[solver] = [
                n for n in SOLVER_SETTINGS[solver] if n not in others and getattr(self, n) != fields[n].default
            ]
        return out

    def radius_used(self) -> float | None:
        """The radius where the constraint reads one (the scaled hull's, the capped box's cap)."""
        return self.radius if self.constraint in ("scaled_hull", "capped_box") else None

    def resolved_init(self) -> Path | None:
        """The init file, checked to exist (None for the base)."""
        if self.init == "base":
            return None
        path = Path(self.init).expanduser()
        if not path.is_file():
            raise ParameterError("init", f"file not found: {self.init!r} (resolved to {path.resolve()})")
        return path.resolve()

    def oracle_dtype_for(self, merge_dtype: str | None) -> str:
        """The oracle's dtype for a merge in ``merge_dtype`` (mergekit's ``dtype:``, by
        its torch name). Half precision for a half-precision merge: the oracle then
        fits where the merge does (a 7B in bfloat16 on a 24 GB machine)."""
        if self.oracle_dtype != "auto":
            return self.oracle_dtype
        return merge_dtype if merge_dtype in ("float32", "bfloat16", "float16") else "float32"

    def resolved_calibration(self) -> Path:
        """The calibration file, checked to exist; relative paths are taken from the
        working directory, like mergekit's own model paths."""
        path = Path(self.calibration).expanduser()
        if not path.is_file():
            raise ParameterError("calibration", f"file not found: {self.calibration!r} (resolved to {path.resolve()})")
        return path.resolve()

    def fingerprint_fields(self) -> dict[str, Any]:
        """Fields that change the result. The cache location and where or how the
        oracle runs do not, so a run resumed on another device (say, with gradient
        checkpointing after running out of memory) continues the same solve. Only of a
        resolved solver (``mergekit_fw.solve.solver_choice``): ``auto`` reads what either
        reads, so its fingerprint would not be the solve's."""
        if self.solver == "auto":
            raise ValueError("solver auto has no fingerprint: resolve it first (mergekit_fw.solve.solver_choice)")
        unused = {"radius"} if self.radius_used() is None else set()
        # settings added later, at the value that does what runs did before they existed:
        # left out, so that solves cached by earlier versions stay valid
        unused |= {name for name, before in _ADDED_LATER.items() if getattr(self, name) == before}
        # a solver's own settings count only where that solver reads them
        unused |= set(SOLVER_SPECIFIC) - set(SOLVER_SETTINGS[self.solver])
        if not self.screen_per_task:
            unused |= {"screen_floor", "screen_by"}
        elif not floor_acts(self.screen_per_task):
            unused |= {"screen_floor"}
        return self.model_dump(
            exclude={"cache_dir", "calibration", "init", "gradient_checkpointing", "device_map", "allow_pickle"}
            | unused
        )


def from_method_kwargs(kwargs: Mapping[str, Any]) -> FrankWolfeParameters:
    """Rebuild the settings from the values mergekit hands a kernel.

    mergekit fills every declared parameter with its default, so defaults are
    dropped before validation: only what the config set counts as given (the
    config itself was validated by :func:`parse_parameters` before planning).
    """
    fields = FrankWolfeParameters.model_fields
    given = {k: v for k, v in kwargs.items() if k in fields and (fields[k].is_required() or v != fields[k].default)}
    return FrankWolfeParameters(**given)


def parameter_descriptions() -> dict[str, str]:
    return {name: field.description or "" for name, field in FrankWolfeParameters.model_fields.items()}


def shown_key(key: object) -> str:
    """A key as the user can find it in their YAML (quoted when blank or odd)."""
    text = str(key)
    return text if text.isidentifier() else repr(text)


def parse_parameters(raw: Mapping[str, Any] | None, *, source: str = "config") -> FrankWolfeParameters:
    """Validate a ``parameters:`` block, naming the offending field on failure."""
    raw = dict(raw or {})
    for key, value in raw.items():
        if isinstance(value, (list, dict)):
            raise ConfigError(
                f"{source}: parameters.{shown_key(key)}: frank_wolfe takes a single scalar value here, "
                f"not {type(value).__name__} (per-tensor filters and gradients are not supported)"
            )
    try:
        return FrankWolfeParameters.model_validate(raw)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = ".".join(shown_key(p) for p in item["loc"])
            if not item["loc"]:  # a cross-field rule: its message starts with the field's name
                problems.append("parameters." + item["msg"].removeprefix("Value error, "))
                continue
            if item["type"] == "extra_forbidden":
                known = ", ".join(FrankWolfeParameters.model_fields)
                problems.append(f"parameters.{field}: unknown parameter for frank_wolfe (known: {known})")
            else:
                message = item["msg"].removeprefix("Value error, ")
                problems.append(f"parameters.{field}: {message} (got {item.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
