"""What a resume with changed settings does: refused, or taken into effect from the resumed step.

The rule: everything that is a function of the step (learning rate, warmup, schedule length, weight
decay and its schedule, clipping, accumulation, batch size, cadences) is read from the config the run
resumes with, at the resumed step. The learning-rate schedule is rebuilt from the new settings and
evaluated at that step; nothing of the old schedule is kept. The optimizer's moments are kept.

Refused: the network (`model.*`, `method.*`, which the saved weights were trained as), the optimizer's
kind (`optim.name`: the checkpoint holds that optimizer's state), and the data
settings that decide which sample comes next (`run.seed`, `data.shuffle_buffer`, `data.resampled`): with
those changed the saved stream positions point at other samples. To change them, start a new run from
the weights with `train.init_from`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pretrain.config import ConfigError

# Keys whose values do not change what training computes (where things go, how they are watched).
UNTRACKED_PREFIXES = (
    "run.name",
    "run.output_dir",
    "run.device",
    "tracking.",
    "launch.",
    "train.resume",
    "train.init_from",
    # A resumed distillation takes its frozen teacher from its own checkpoint (the teacher's files may move).
    "method.dinov2.teacher_checkpoint",
)

REFUSED_PREFIXES = ("model.", "method.")
REFUSED_KEYS = {
    "optim.name": "the checkpoint holds the state of the other optimizer",
    "run.seed": "the data order and every step's random draws are seeded by it",
    "data.shuffle_buffer": "the saved stream positions count samples through this buffer",
    "data.resampled": "the saved stream positions count samples of the other sampling mode",
}

_SCHEDULE = "the learning-rate schedule is rebuilt from the new settings at step {step}"
# (key or section prefix, what the change does); the first match wins.
EFFECTS: list[tuple[str, str]] = [
    ("optim.base_lr", _SCHEDULE),
    ("optim.min_lr", _SCHEDULE),
    ("optim.lr_scaling", _SCHEDULE),
    ("optim.warmup_steps", _SCHEDULE),
    ("optim.schedule", _SCHEDULE),
    ("optim.lr_milestones", _SCHEDULE),
    ("optim.lr_gamma", _SCHEDULE),
    ("train.steps", _SCHEDULE + "; weight-decay and method schedules span the new length"),
    ("optim.weight_decay", "weight decay from step {step} (its schedule rebuilt at that step)"),
    ("optim.grad_clip", "gradient clipping with the new threshold from step {step}"),
    ("optim.accum_steps", "a new global batch from step {step}; linear lr scaling follows it; data positions are kept"),
    ("data.batch_size", "a new global batch from step {step}; linear lr scaling follows it; data positions are kept"),
    ("data.num_workers", "a new stream layout: data streams restart at the start of the saved epoch"),
    (
        "data.shards",
        "positions are kept if the shard count is unchanged (the same shards moved); else streams "
        "restart at the start of the saved epoch",
    ),
    ("data.", "the data pipeline uses the new value from step {step}"),
    ("optim.", "the optimizer uses the new value from step {step}; its moments are kept"),
    ("train.", "from step {step}"),
    ("engine.", "the engine loads the same state with the new setting"),
    ("eval.", "evaluations from step {step} use it"),
]


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or (prefix.endswith(".") and key.startswith(prefix))


def effect_of(key: str, step: int) -> str:
    for prefix, text in EFFECTS:
        if _matches(key, prefix):
            return text.format(step=step)
    return f"takes effect from step {step}"


def changed_settings(before: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """Flat keys whose value differs, leaving out those that do not change training."""
    keys = before.keys() | now.keys()
    return sorted(
        k for k in keys if before.get(k) != now.get(k) and not any(_matches(k, p) for p in UNTRACKED_PREFIXES)
    )


def check_changes(
    before: Mapping[str, str], now: Mapping[str, str], step: int, path: object, weights_only: bool = False
) -> list[str]:
    """Raise ConfigError naming every refused change; return one line per allowed change, with its effect.

    `weights_only`: starting from a checkpoint's weights (`train.init_from`), where only the network must match."""
    changed = changed_settings(before, now)
    refused = [
        k for k in changed if (k in REFUSED_KEYS and not weights_only) or any(_matches(k, p) for p in REFUSED_PREFIXES)
    ]
    if refused and weights_only:
        details = ", ".join(f"{k}: {before.get(k)} -> {now.get(k)}" for k in refused)
        raise ConfigError(f"train.init_from: the network of {path} differs ({details})")
    if refused:
        details = "; ".join(
            f"{k}: {before.get(k)} -> {now.get(k)} ({REFUSED_KEYS.get(k, 'the network changed')})" for k in refused
        )
        raise ConfigError(
            f"cannot resume from {path} with {details}. Set them back, or start a new run from these weights "
            f'with train.resume=none train.init_from="{path}"'
        )
    return [f"{k}: {before.get(k)} -> {now.get(k)}: {effect_of(k, step)}" for k in changed]
