"""The conversion options: one typed, closed model, from which the command line is generated.

:class:`ConvertOptions` is the single definition of every ``latentkv convert`` option: its type (an
unknown value or key is rejected), default, command-line flag and help text. ``converters.cli``
builds the argument parser from it (:func:`add_arguments`, :func:`from_args`) and the checkpoint
records ``model_dump()`` in ``latent_kv.method.params``. Checks that need only the options live in
:meth:`ConvertOptions._check`; checks against a source model's shape in ``converters.convert``.

The defaults are the recommended recipe (the best one-shot setting measured on the real SmolLM2,
``benchmarks/results/smollm2_quality.md``); the papers' settings stay available by option.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from converters.math.preconditioners import PRECONDITIONER_KINDS
from latentkv import checkpoint as ckpt

DEFAULT_KV_RATIO = 0.5  # when none of rank, ranks, kv_ratio is given
# Calibration texts when the user gives none, shipped with the package (NOTICE beside them): the C4
# sample and WikiText-2 validation, half the sequences each. On SmolLM2 at 50% the mix scores as well
# as C4 alone on unseen C4 and better on WikiText-2 and PTB (benchmarks/results/smollm2_allocation.md).
_TEXT = Path(__file__).resolve().parent / "data" / "text"
DEFAULT_CALIBRATION_TEXTS = (_TEXT / "c4_sample.jsonl", _TEXT / "wiki.valid.raw")
# Earlier defaults the benchmarks' older tables were written with, so that rerunning them reproduces
# them: C4 alone (before the mix), and the refinement before it targeted the source model's stream.
C4_ONLY_CALIBRATION = dict(calibration_text=[str(DEFAULT_CALIBRATION_TEXTS[0])])
LAYER_TARGET_REFINEMENT = dict(refine_steps=100, refine_params="latent", refine_target="layer")
DTYPES = ("float32", "float16", "bfloat16")


class ConversionError(ValueError):
    """Options that cannot work (together, or for this source model)."""


def _cli(group: str, flag: str | None = None, parse: str | None = None, repeat: bool = False) -> dict[str, Any]:
    """Command-line metadata of a field: its argument group, a flag other than --field-name, a parser,
    whether the flag may be given several times (a list field)."""
    return {"group": group, "flag": flag, "parse": parse, "repeat": repeat}


class CommandOptions(BaseModel):
    """A command's options: typed and closed (unknown keys are rejected); each field carries its
    command-line group, flag and help (:func:`add_arguments`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def check(self) -> None:
        """Checks across fields (subclasses); raise :class:`ConversionError`."""


class ConvertOptions(CommandOptions):
    # -- positions (RoPE) --
    rope_mode: Literal["partial", "shared", "full"] = Field(
        "full", description="partial: MHA2MLA kept pairs per KV head; shared: RoRoPE rotated components shared by all "
                            "heads; full: no dims lose RoPE, keys rebuilt from the latent",
        json_schema_extra=_cli("positions (RoPE)"))
    rope_strategy: Literal["high", "low", "uniform", "2norm"] = Field(
        "2norm", description="partial mode: which pairs each KV head keeps (2norm needs calibration text)",
        json_schema_extra=_cli("positions (RoPE)"))
    rope_pairs: int = Field(1, ge=1, description="partial: pairs kept per KV head; shared: rotated 2-D components in all",
                            json_schema_extra=_cli("positions (RoPE)"))
    # -- latent --
    rank: int | None = Field(None, ge=1, description="latent width per layer (joint rank, or k+v ranks when split)",
                             json_schema_extra=_cli("latent"))
    ranks: list[int] | None = Field(None, description="comma-separated latent width of every layer",
                                    json_schema_extra=_cli("latent", parse="int_list"))
    kv_ratio: float | None = Field(
        None, description=f"target KV cache size as a fraction of the source's (default when no size is "
                                      f"given: {DEFAULT_KV_RATIO})", json_schema_extra=_cli("latent"))
    svd: Literal["joint", "split"] = Field("joint", description="SVD_joint (one latent) or SVD_split (key and value latents)",
                                           json_schema_extra=_cli("latent"))
    latent_groups: int = Field(1, ge=1, description="Palu-style grouped-head latents", json_schema_extra=_cli("latent"))
    hadamard: bool = Field(False, description="rotate the latent by a block Hadamard folded into the weights: the same "
                                              "model, but an INT4 latent cache quantises it better",
                           json_schema_extra=_cli("latent"))
    keep_layers: list[int] = Field(default_factory=list, description="layers left uncompressed, e.g. 0,1",
                                   json_schema_extra=_cli("latent", parse="int_list"))
    # -- method --
    method: Literal["svd", "activation", "latentllm", "transkv"] = Field(
        "activation", description="svd: plain SVD (MHA2MLA); activation: SVD of W P with an activation pre-conditioner "
                                  "(LatentLLM Table 1); latentllm: attention-aware key latent (joint Q/K) + output-aware "
                                  "value latent (joint V/O), needs --svd split; transkv: narrower per-head K/V from "
                                  "projections of rotated keys and values (ignores --rope-mode). Methods other than svd "
                                  "use calibration text", json_schema_extra=_cli("method"))
    transkv_scale: Literal["original", "reduced"] = Field(
        "original", description="transkv softmax scale: original 1/sqrt(head_dim) or 1/sqrt(r_k)",
        json_schema_extra=_cli("method"))
    preconditioner: Literal[PRECONDITIONER_KINDS] = Field(  # type: ignore[valid-type]
        "root_covariance", description="--method activation: the pre-conditioner P", json_schema_extra=_cli("method"))
    centred: bool = Field(False, description="--method activation: pre-condition with the centred covariance and move "
                                             "the mean error into the up-projection biases (LatentLLM eq. 41-47); adds "
                                             "biases to bias-free sources", json_schema_extra=_cli("method"))
    damping: float = Field(0.01, ge=0, description="relative damping lam = damping * mean diag of the input second moment",
                           json_schema_extra=_cli("method"))
    rank_allocation: Literal["uniform", "lorc", "budgeted", "care", "kl"] = Field(
        "uniform", description="per-layer latent widths for --kv-ratio/--rank: uniform; lorc: LoRC progressive ranks from "
                               "the key/value weights' condition numbers; budgeted: activation error curves, same total; "
                               "care: CARE's greedy on the same curves by each layer's relative gain, half to twice "
                               "the uniform width; "
                               "kl: each layer's effect on the model's output (KL to the source) at a few widths and "
                               "uncompressed, the least summed KL in the same cache (judged on the calibration text: "
                               "calibrate on text like what you serve)",
        json_schema_extra=_cli("method"))
    allocation_samples: int = Field(8, ge=1, description="--rank-allocation kl: calibration sequences the output KL is "
                                                         "measured on", json_schema_extra=_cli("method"))
    nope_scaling: Literal["none", "fit"] = Field(
        "none", description="partial/shared RoPE: none keeps the key dims that lose RoPE as they are (MHA2MLA); fit "
                            "scales each pair's NoPE'd part by a factor in [0, 1] fitted to the source layer's attention "
                            "output on calibration text", json_schema_extra=_cli("method"))
    # -- refinement --
    # The defaults (300 steps, q/o projections free, the source model's stream as the target) are the
    # best one-shot recipe on SmolLM2 (benchmarks/results/smollm2_quality_model_target.md).
    refine_steps: int = Field(300, ge=0, description="Adam steps per latent layer fitting its attention to the source's "
                                                     "output on calibration text, through RoPE and the softmax; 0 "
                                                     "turns it off", json_schema_extra=_cli("refinement"))
    refine_lr: float = Field(1e-3, gt=0, description="Adam learning rate; the loss is in units of the relative error, so "
                                                     "one rate suits every layer", json_schema_extra=_cli("refinement"))
    refine_batch: int = Field(4, ge=1, description="calibration sequences per step", json_schema_extra=_cli("refinement"))
    refine_latent_lr_ratio: float = Field(
        1.0, gt=0, description="the latent factors' (kv_a/k_b/v_b) Adam rate as a multiple of --refine-lr, q_proj and "
                               "o_proj keeping --refine-lr: the new factors start further from their optimum than the "
                               "pretrained projections (LoRA+'s ratio)", json_schema_extra=_cli("refinement"))
    refine_adam_beta2: float = Field(0.999, gt=0, lt=1, description="Adam's second-moment decay (beta2)",
                                     json_schema_extra=_cli("refinement"))
    refine_params: Literal["latent", "attention"] = Field(
        "attention", description="latent: kv_a/k_b/v_b projections only; attention: also q_proj and o_proj",
        json_schema_extra=_cli("refinement"))
    refine_target: Literal["layer", "model"] = Field(
        "model", description="model: the source model's own residual stream after the attention, the layer fed the "
                             "converted model's, so each layer also makes up for the error the layers before it left "
                             "(GPTAQ's asymmetric calibration); layer: the source layer's attention output on the "
                             "hidden states the layer is fed (--calibration-inputs)",
        json_schema_extra=_cli("refinement"))
    refine_residual_weight: float = Field(
        1.0, ge=0, le=1, description="alpha of the model target o_src(h_src) + alpha (h_src - h): how much of the error "
                                     "the layers before it left each layer is asked to cancel (1: all, GPTAQ's target; "
                                     "0: none, the source attention's output alone)", json_schema_extra=_cli("refinement"))
    refine_objective: Literal["attention", "block"] = Field(
        "attention", description="what the fit compares: attention, the attention's output (what the residual stream "
                                 "receives); block, the whole decoder layer's output, attention then the source's "
                                 "frozen MLP, so the fit weighs each error as the MLP passes it on (AutoRound's and "
                                 "OmniQuant's block reconstruction; a step costs about twice as much)",
        json_schema_extra=_cli("refinement"))
    refine_device: str | None = Field(None, description="torch device of the refinement, e.g. cuda:0 (default: cuda "
                                                        "when available, else cpu; the closed forms run on the CPU in "
                                                        "float64)", json_schema_extra=_cli("refinement"))
    refine_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="precision of the refinement steps' forward and backward passes (bfloat16: autocast; the "
                            "parameters, optimiser state and error checks stay float32); auto: bfloat16 where its "
                            "steps are the faster ones (CUDA with native bfloat16, CPUs with AMX), else float32", json_schema_extra=_cli("refinement"))
    # -- calibration --
    calibration_text: list[str] | None = Field(
        None, description="plain text or JSON lines used for statistics; repeat the flag to mix texts, each giving an "
                          "equal share of the sequences (default: the C4 sample and WikiText-2 validation text "
                          "shipped with latentkv)", json_schema_extra=_cli("calibration", repeat=True))
    calibration_text_field: str = Field("text", description="JSON-lines field holding the text",
                                        json_schema_extra=_cli("calibration", flag="--text-field"))
    calibration_samples: int = Field(32, ge=1, description="calibration sequences", json_schema_extra=_cli("calibration"))
    calibration_seq_len: int = Field(256, ge=2, description="tokens per calibration sequence",
                                     json_schema_extra=_cli("calibration"))
    calibration_seed: int = Field(0, description="seed of the calibration sample",
                                  json_schema_extra=_cli("calibration", flag="--seed"))
    calibration_inputs: Literal["original", "converted"] = Field(
        "original", description="feed each layer the source model's activations or the converted layers'",
        json_schema_extra=_cli("calibration"))
    # -- output --
    dtype: Literal[DTYPES] | None = Field(None, description="output dtype (default: the source's)",  # type: ignore[valid-type]
                                          json_schema_extra=_cli("output"))
    shard_bytes: int = Field(ckpt.DEFAULT_SHARD_BYTES, ge=1, description="largest safetensors shard, e.g. 1GiB; also "
                                                                          "bounds the writer's memory",
                             json_schema_extra=_cli("output", flag="--shard-size", parse="size"))

    @field_validator("kv_ratio")
    @classmethod
    def _ratio_in_range(cls, v):
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"kv_ratio must be in (0, 1] (the cache size as a fraction of the source's), got {v}")
        return v

    @field_validator("calibration_text", mode="before")
    @classmethod
    def _paths_as_text(cls, v):
        """One path or several, as str or os.PathLike -> a list of str."""
        if isinstance(v, (str, os.PathLike)):
            v = [v]
        return [str(p) if isinstance(p, os.PathLike) else p for p in v] if v is not None else None

    def check(self) -> None:
        """Raise :class:`ConversionError` for options that contradict each other (the model itself checks
        each option's type and range; ``converters.convert.validate_options`` checks them against the source)."""
        given = [name for name in ("rank", "ranks", "kv_ratio") if getattr(self, name) is not None]
        rules = [
            (len(given) > 1, f"give at most one of rank, ranks (per layer) or kv_ratio, got {' and '.join(given)}"),
            (self.ranks is not None and min(self.ranks, default=1) < 1,
             f"ranks must be positive latent widths, got {self.ranks}"),
            (self.centred and self.method != "activation",
             "--centred (centred covariance + bias update) goes with --method activation"),
            (self.method == "transkv" and self.rank_allocation != "uniform",
             "method transkv uses one head width for every layer: use --rank-allocation uniform"),
            (self.method == "latentllm" and self.svd != "split",
             "method latentllm builds separate key and value latents: use --svd split"),
            (self.rank_allocation != "uniform" and self.ranks is not None,
             "rank_allocation lorc/budgeted/care/kl distributes a total budget: give kv_ratio or rank, not ranks"),
            (self.refine_residual_weight != 1 and self.refine_target != "model",
             "--refine-residual-weight weighs the model target's stream error: use it with --refine-target model"),
            (self.nope_scaling == "fit" and (self.rope_mode == "full" or self.method == "transkv"),
             "--nope-scaling fit scales the key dims that lose RoPE: use it with --rope-mode partial or shared"),
        ]
        for broken, message in rules:
            if broken:
                raise ConversionError(message)

    # -- derived ------------------------------------------------------------------------------------
    @property
    def target_kv_ratio(self) -> float:
        return DEFAULT_KV_RATIO if self.kv_ratio is None else self.kv_ratio

    @property
    def derives_widths(self) -> bool:
        """Widths come from a cache ratio (given or default): clamp them to what is useful."""
        return self.rank is None and self.ranks is None

    def needs_calibration(self) -> bool:
        return ((self.rope_mode == "partial" and self.rope_strategy == "2norm") or self.rope_mode == "shared"
                or self.method != "svd" or self.rank_allocation in ("budgeted", "care", "kl") or self.nope_scaling == "fit"
                or self.refine_steps > 0)

    def calibration_paths(self) -> list[Path]:
        return [Path(t) for t in self.calibration_text] if self.calibration_text else list(DEFAULT_CALIBRATION_TEXTS)

    def describe(self) -> str:
        """One line naming the recipe (the demo prints it)."""
        method = self.method + (f" ({self.preconditioner}{', centred + bias update' if self.centred else ''})"
                                if self.method == "activation" else "")
        target = "the source model's stream" if self.refine_target == "model" else "each source layer's output"
        target += " after the MLP" if self.refine_objective == "block" else ""
        refined = (f", refinement of the {self.refine_params} projections to {target}, {self.refine_steps} steps/layer"
                   if self.refine_steps else "")
        texts = (", calibrated on " + " + ".join(p.name for p in self.calibration_paths())) if self.needs_calibration() else ""
        return f"{self.rope_mode} RoPE, {self.svd} SVD, method {method}{refined}, KV ratio {self.target_kv_ratio}{texts}"


def options_error(e: ValidationError, model: type[CommandOptions] = ConvertOptions) -> str:
    """A pydantic error as one line naming each bad option and why."""
    parts = []
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "value_error":  # our own validators' messages name the option already
            parts.append(err["msg"].removeprefix("Value error, "))
        else:
            flag = flag_of(name, model) if name in model.model_fields else name
            parts.append(f"{flag} {err['input']!r}: {err['msg']}")
    return "; ".join(parts)


# ---- the command line, generated from the model ------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    try:
        for unit, mult in units.items():
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * mult)
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 1GiB or 500MB, got {text!r}") from None


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_PARSERS = {"int_list": _int_list, "size": _size, "bool": _bool}
_GROUP_TITLES = {"refinement": "refinement (attention-output-aware, after the closed form)"}


def flag_of(name: str, model: type[CommandOptions] = ConvertOptions) -> str:
    extra = model.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, model: type[CommandOptions] = ConvertOptions) -> None:
    """One command-line flag per field of ``model``, grouped, with its default and help.

    Flags default to ``argparse.SUPPRESS``: only what the user typed reaches :func:`from_args`, so the
    model's own defaults (and validation) apply to everything else. Fields without a default are
    required flags.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra or {}
        group = extra["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(_GROUP_TITLES.get(group, group))
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = "" if default is None or default is False or default == [] else f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=(field.description or "") + shown,
                                      required=field.is_required())
        choices = _choices(field.annotation)
        if field.annotation is bool:
            kwargs["action"] = "store_true"
        elif extra.get("repeat"):
            kwargs["action"] = "append"
        elif extra.get("parse"):
            kwargs["type"] = _PARSERS[extra["parse"]]
        elif choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _scalar_type(field.annotation)
        groups[group].add_argument(flag_of(name, model), **kwargs)


def from_args(args: argparse.Namespace, model: type[CommandOptions] = ConvertOptions) -> CommandOptions:
    """The options the user typed (the rest default), validated; a ValueError names each bad one by its flag."""
    given = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        opts = model(**given)
    except ValidationError as e:
        raise ConversionError(options_error(e, model)) from None
    opts.check()
    return opts


def _choices(annotation) -> list[str] | None:
    from typing import get_args, get_origin

    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if len(args) == 1 and get_origin(args[0]) is Literal:
        return list(get_args(args[0]))
    return None


def _scalar_type(annotation):
    from typing import get_args

    for t in (int, float, str):
        if annotation is t or t in get_args(annotation):
            return t
    raise TypeError(f"no command-line type for {annotation}")
