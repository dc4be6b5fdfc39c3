"""Recovery fine-tuning ("healing") of a converted model by distillation from its source model.

    loss = kl_weight T^2 KL(p_teacher(./T) || p_student(./T)) + lm_weight CE(student, next token)

averaged over every predicted token of packed sequences (X-EcoMLA distils with the KL term;
MHA2MLA fine-tunes with the language-model loss: ``--kl-weight 0 --lm-weight 1``). By default only
what the conversion made trainable changes: the latent projections (kv_a_proj, k_b_proj, v_b_proj)
of the latent layers, MHA2MLA's cheap variant; ``--train attention`` adds their q_proj / o_proj and
norms, ``--train all`` everything. The output is a latent checkpoint with the same ranks.

The training loop is transformers' ``Trainer``: the learning-rate schedule, gradient accumulation,
bf16, checkpoints every ``--save-every`` steps and resumption (``--resume``: optimizer, scheduler,
RNG and data position) are its own, and so is distribution: the same command runs data-parallel,
FSDP or DeepSpeed under ``accelerate launch`` (or ``torchrun``) with accelerate's config, e.g.

    accelerate launch --num_processes 8 -m converters heal CONVERTED --teacher SOURCE --text DATA OUT
    accelerate launch --config_file fsdp.yaml -m converters heal ...    # accelerate config --> FSDP

Each process holds a frozen copy of the teacher (bf16 on GPU). There is no distributed code here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from converters.options import CommandOptions, ConversionError, _cli
from latentkv import checkpoint as ckpt
from latentkv import format as fmt

log = logging.getLogger("latentkv.heal")

LATENT_PROJECTIONS = ("kv_a_proj", "k_b_proj", "v_b_proj")
HISTORY_FILE = "heal_history.jsonl"  # one line per evaluation: step, tokens seen, held-out perplexity


class HealOptions(CommandOptions):
    teacher: str = Field(description="the source model the checkpoint was converted from (Hugging Face directory)",
                         json_schema_extra=_cli("data"))
    text: str = Field(description="training text: plain text or JSON lines, packed into sequences",
                      json_schema_extra=_cli("data"))
    text_field: str = Field("text", description="JSON-lines field holding the text", json_schema_extra=_cli("data"))
    eval_text: str | None = Field(None, description="held-out text scored every --eval-every steps (default: none)",
                                  json_schema_extra=_cli("data"))
    eval_windows: int = Field(4, ge=1, description="held-out windows scored (the text as one token stream, as "
                                                   "`latentkv eval` scores it)", json_schema_extra=_cli("data"))
    eval_seq_len: int = Field(1024, ge=2, description="tokens per held-out window", json_schema_extra=_cli("data"))
    train: Literal["latent", "attention", "all"] = Field(
        "latent", description="latent: the latent layers' kv_a/k_b/v_b projections (what the conversion made); "
                              "attention: also their q_proj, o_proj and q/k norms; all: every parameter",
        json_schema_extra=_cli("training"))
    kl_weight: float = Field(1.0, ge=0, description="weight of the KL divergence to the teacher",
                             json_schema_extra=_cli("training"))
    lm_weight: float = Field(0.0, ge=0, description="weight of the next-token cross-entropy",
                             json_schema_extra=_cli("training"))
    temperature: float = Field(1.0, gt=0, description="distillation temperature T", json_schema_extra=_cli("training"))
    seq_len: int = Field(512, ge=2, description="tokens per packed sequence", json_schema_extra=_cli("training"))
    batch_size: int = Field(4, ge=1, description="sequences per step and device", json_schema_extra=_cli("training"))
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps", json_schema_extra=_cli("training"))
    steps: int = Field(200, ge=1, description="optimizer steps (tokens = steps x batch x grad-accum x seq-len x devices)",
                       json_schema_extra=_cli("training"))
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)", json_schema_extra=_cli("training"))
    warmup: float = Field(0.05, ge=0, lt=1, description="warm-up fraction of the steps", json_schema_extra=_cli("training"))
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after the warm-up", json_schema_extra=_cli("training"))
    eval_every: int = Field(50, ge=1, description="steps between held-out evaluations", json_schema_extra=_cli("run"))
    save_every: int = Field(100, ge=1, description="steps between checkpoints (for --resume)", json_schema_extra=_cli("run"))
    checkpoint_dir: str | None = Field(None, description="where checkpoints go (default: OUT.checkpoints beside OUT)",
                                       json_schema_extra=_cli("run"))
    resume: bool = Field(False, description="continue from the newest checkpoint in --checkpoint-dir",
                         json_schema_extra=_cli("run"))
    bf16: bool | None = Field(None, description="bf16 mixed precision (default: on CUDA GPUs that support it)",
                              json_schema_extra=_cli("run", parse="bool"))
    seed: int = Field(0, description="seed of initialisation-free randomness (data order)", json_schema_extra=_cli("run"))

    def check(self) -> None:
        if self.kl_weight == 0 and self.lm_weight == 0:
            raise ConversionError("--kl-weight and --lm-weight are both 0: nothing to train on")


# ---- checks before any training -----------------------------------------------------------------

def check_pair(student_dir: Path, teacher_dir: Path) -> fmt.LatentKVSpec:
    """The student must be a latent checkpoint converted from a model shaped like the teacher, with
    the same tokenizer; raise a ConversionError naming the mismatch otherwise."""
    from transformers import AutoConfig, AutoTokenizer

    spec, dims = ckpt.validate_checkpoint(student_dir)
    if not (teacher_dir / "config.json").is_file():
        raise ConversionError(f"teacher {teacher_dir} has no config.json: give the source model's directory")
    teacher = AutoConfig.from_pretrained(teacher_dir)
    if getattr(teacher, "model_type", None) == fmt.MODEL_TYPE:
        raise ConversionError(f"teacher {teacher_dir} is a latentkv checkpoint; give the source model it was converted from")
    if teacher.model_type != spec.source.model_type:
        raise ConversionError(f"teacher {teacher_dir} is a {teacher.model_type} model, the student was converted from "
                              f"a {spec.source.model_type} model")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if getattr(teacher, name) != getattr(dims, name):
            raise ConversionError(f"teacher {teacher_dir} has {name}={getattr(teacher, name)}, the student "
                                  f"{getattr(dims, name)}: not the model it was converted from")
    t_vocab = AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    s_vocab = AutoTokenizer.from_pretrained(student_dir).get_vocab()
    if t_vocab != s_vocab:
        diff = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise ConversionError(f"the teacher's and the student's tokenizers differ ({diff} token entries): "
                              "distillation compares their next-token distributions id by id")
    return spec


def packed_sequences(path: str, tokenizer, seq_len: int, text_field: str, what: str) -> torch.Tensor:
    """The text as documents with their BOS, concatenated and cut into [N, seq_len] (the tail dropped)."""
    from latentkv.text import eval_windows, read_documents, tokenize_documents

    docs = read_documents(path, text_field=text_field)
    windows = eval_windows(tokenize_documents(tokenizer, docs), seq_len, mode="stream")
    log.info("%s: %d sequences of %d tokens from %s", what, len(windows), seq_len, path)
    return torch.stack(windows)


def trainable_names(model: torch.nn.Module, spec: fmt.LatentKVSpec, train: str) -> list[str]:
    """Parameter names the chosen --train covers (the rest are frozen)."""
    if train == "all":
        return [n for n, _ in model.named_parameters()]
    latent = {i for i, layer in enumerate(spec.layers) if isinstance(layer, fmt.LatentLayer)}
    names = []
    for n, _ in model.named_parameters():
        parts = n.split(".")  # model.layers.<i>.self_attn.<proj>.weight
        if len(parts) > 4 and parts[1] == "layers" and int(parts[2]) in latent and parts[3] == "self_attn":
            if train == "attention" or parts[4] in LATENT_PROJECTIONS:
                names.append(n)
    if not names:
        raise ConversionError("the checkpoint has no latent layers to heal; use --train all to fine-tune everything")
    return names


# ---- the Trainer --------------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, labels, kl_weight: float, lm_weight: float, T: float):
    """Mean over predicted tokens: kl_weight T^2 KL(teacher || student) at temperature T + lm_weight CE."""
    s = student_logits[:, :-1].float().flatten(0, 1)
    loss = s.new_zeros(())
    if kl_weight:
        t = teacher_logits[:, :-1].float().flatten(0, 1)
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
        loss = loss + kl_weight * T * T * kl
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(s, labels[:, 1:].flatten())
    return loss


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    class DistillationTrainer(Trainer):
        def __init__(self, *args, teacher, heal: HealOptions, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.heal = teacher, heal

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model(input_ids=ids)
            teacher_logits = None
            if self.heal.kl_weight:
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=ids).logits
            loss = distillation_loss(out.logits, teacher_logits, ids, self.heal.kl_weight, self.heal.lm_weight,
                                     self.heal.temperature)
            return (loss, out) if return_outputs else loss

    class HeldOutPerplexity(TrainerCallback):
        """Every ``eval_every`` steps (and at the start and the end): perplexity on the held-out
        windows, logged and appended to HISTORY_FILE with the tokens seen; tokens/s in every log."""

        def __init__(self, model, windows, history: Path, eval_every: int, tokens_per_step: int):
            self.model, self.windows, self.history = model, windows, history
            self.eval_every, self.tokens_per_step = eval_every, tokens_per_step
            self.t0, self.step0 = time.perf_counter(), 0

        def _evaluate(self, state):
            from latentkv.evaluate import nll_sum

            if not state.is_world_process_zero or self.windows is None:
                return
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                total, count = nll_sum(self.model, self.windows, batch_size=2, progress=False)
            self.model.train(was_training)
            ppl = math.exp(total / count)
            row = {"step": state.global_step, "tokens": state.global_step * self.tokens_per_step, "perplexity": ppl}
            with open(self.history, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("step %d (%d tokens seen): held-out perplexity %.4f", row["step"], row["tokens"], ppl)

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.perf_counter(), state.global_step
            if state.global_step == 0:
                self._evaluate(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % self.eval_every == 0 and state.global_step < state.max_steps:
                self._evaluate(state)

        def on_train_end(self, args, state, control, **kwargs):
            self._evaluate(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and state.global_step > self.step0:
                seconds = time.perf_counter() - self.t0
                logs["tokens_per_second"] = round((state.global_step - self.step0) * self.tokens_per_step / seconds, 1)

    return DistillationTrainer, HeldOutPerplexity


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def heal(converted: str | Path, out: str | Path, opts: HealOptions, overwrite: bool = False) -> dict:
    """Distil ``converted`` towards ``opts.teacher`` on ``opts.text``; write the healed checkpoint to ``out``.

    Every input is checked before the first step; ``out`` appears only when training has finished.
    Returns {"steps", "tokens", "seconds", "perplexity" (held-out, last), "history"}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from latentkv.modeling import LatentKVForCausalLM
    from latentkv.text import load_eval_windows

    converted, out, teacher_dir = Path(converted), Path(out), Path(opts.teacher)
    opts.check()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    spec = check_pair(converted, teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    train_ids = packed_sequences(opts.text, tokenizer, opts.seq_len, opts.text_field, "training text")
    eval_ids = None
    if opts.eval_text:
        eval_ids = load_eval_windows(opts.eval_text, tokenizer, opts.eval_seq_len, max_windows=opts.eval_windows, mode="raw")
        log.info("held-out text: %d windows of %d tokens from %s", len(eval_ids), opts.eval_seq_len, opts.eval_text)

    cuda = torch.cuda.is_available()
    bf16 = opts.bf16 if opts.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    student = LatentKVForCausalLM.from_pretrained(converted, dtype=frozen_dtype)
    train = set(trainable_names(student, spec, opts.train))
    for name, p in student.named_parameters():
        p.requires_grad_(name in train)
        if name in train:
            p.data = p.data.float()  # master weights of what trains stay float32
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log.info("training %d tensors, %.2fM parameters (%s); the rest frozen", len(train), n_train / 1e6, opts.train)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=frozen_dtype).eval().requires_grad_(False)

    work = Path(opts.checkpoint_dir) if opts.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    if work.exists() and not opts.resume and any(work.glob("checkpoint-*")):
        raise FileExistsError(f"{work} holds checkpoints of an earlier run: pass --resume to continue it, or delete it")
    work.mkdir(parents=True, exist_ok=True)
    history = work / HISTORY_FILE
    if not opts.resume and history.exists():
        history.unlink()
    args = TrainingArguments(
        output_dir=str(work), max_steps=opts.steps, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, warmup_steps=round(opts.warmup * opts.steps),
        lr_scheduler_type=opts.schedule, weight_decay=0.0, max_grad_norm=1.0, bf16=bf16, logging_steps=max(1, min(50, opts.steps // 20)),
        save_strategy="steps", save_steps=opts.save_every, save_total_limit=2, eval_strategy="no", report_to=[],
        seed=opts.seed, data_seed=opts.seed, remove_unused_columns=False, dataloader_drop_last=True,
        use_cpu=not cuda, disable_tqdm=False,
    )
    teacher.to(args.device)  # once: the Trainer places the student on the same device
    world = max(1, args.world_size)
    tokens_per_step = opts.batch_size * opts.grad_accum * opts.seq_len * world
    trainer_cls, callback_cls = _trainer_classes()
    trainer = trainer_cls(model=student, args=args, train_dataset=_Sequences(train_ids), teacher=teacher, heal=opts,
                          callbacks=[callback_cls(student, eval_ids, history, opts.eval_every, tokens_per_step)])
    t0 = time.perf_counter()
    log.info("healing %s: %d steps x %d tokens, teacher %s, loss %s KL + %s LM (T=%s), lr %s %s",
             converted, opts.steps, tokens_per_step, teacher_dir, opts.kl_weight, opts.lm_weight, opts.temperature,
             opts.lr, opts.schedule)
    resume_from = get_last_checkpoint(str(work)) if opts.resume else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    elif opts.resume:
        log.info("--resume: no checkpoint in %s yet, starting at step 0", work)
    trainer.train(resume_from_checkpoint=resume_from)
    if trainer.is_world_process_zero():
        write_healed(student, converted, out, opts, spec, overwrite)
    rows = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    return {"steps": trainer.state.global_step, "tokens": trainer.state.global_step * tokens_per_step,
            "seconds": round(time.perf_counter() - t0, 1), "perplexity": rows[-1]["perplexity"] if rows else None,
            "history": rows}


def write_healed(student, converted: Path, out: Path, opts: HealOptions, spec: fmt.LatentKVSpec, overwrite: bool) -> None:
    """The student's weights in the checkpoint's own dtype and names, the config with the healing
    recorded in ``latent_kv.method.params.heal``, the tokenizer; validated before it appears."""
    config = json.loads((converted / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    expected = fmt.expected_tensor_shapes(spec, fmt.model_dims(config))  # what the format stores, by name
    state = student.state_dict()
    with ckpt.atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ckpt.ShardedWriter(tmp, ckpt.DEFAULT_SHARD_BYTES)
        for name in sorted(state):
            if name not in expected:  # e.g. lm_head.weight when tied to the embedding
                continue
            writer.add(name, state[name].detach().to("cpu", dtype).contiguous())
        writer.close()
        method = config["latent_kv"]["method"]
        method.setdefault("params", {})["heal"] = opts.model_dump(mode="json", exclude={"checkpoint_dir", "resume"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ckpt.copy_tokenizer_files(converted, tmp)
        ckpt.validate_checkpoint(tmp)
    log.info("wrote healed checkpoint %s", out)
