"""The settings of one pipeline run, shared by the launcher and the stage processes (as JSON)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Sequence

from .model import ModelConfig

__all__ = ["RunConfig", "METHODS", "CODECS", "BACKWARD_CODECS", "PROJECTOR_INITS", "TRANSPORTS",
           "add_shape_args", "add_boundary_option_args", "parse_boundary_options"]

METHODS = ("MAPL", "FIXED", "DENSE")
CODECS = ("RVQ", "INT8", "INT4", "BF16")  # forward codecs
BACKWARD_CODECS = ("INT8", "INT4", "BF16")
PROJECTOR_INITS = ("RANDOM", "PCA")
# BoundaryConfig fields that RunConfig sets itself (or that belong to the launcher: role and
# peer address): boundary_options may not override them, so that a run's record of k, codecs and
# seed stays the truth.
_OWNED_BOUNDARY_FIELDS = frozenset((
    "id", "role", "peer_address", "d", "k", "method", "forward_codec", "backward_codec",
    "rvq_levels", "vocab", "seed", "max_tokens", "projector_init", "transport"))
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


# The pipeline schedules a stage can run (stage.schedule).
SCHEDULES = ("gpipe", "1f1b")
# The boundaries' data planes (BoundaryConfig.transport): the gRPC stream, or UCX active messages
# with the gRPC stream as the control plane (a mapld built with UCX).
TRANSPORTS = ("grpc", "ucx")


@dataclass
class RunConfig:
    # Model.
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    # Schedule and optimizer.
    stages: int = 2
    batch: int = 16              # sequences per optimizer step
    microbatches: int = 4
    schedule: str = "gpipe"      # gpipe (forward all, then backward all) or 1f1b (interleaved)
    schedule_lead: int = 0       # 1f1b: microbatches a stage runs ahead beyond stages - index - 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1    # cosine decay to lr * this at the end of the run
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    eval_batches: int = 8        # validation microbatches (of batch / microbatches sequences)
    # Data: a text file (the launcher extracts the default corpus into the run's directory).
    corpus: str = ""
    # The boundaries' compression (mapl.v1.BoundaryConfig).
    method: str = "MAPL"
    k: int = 0                   # 0: d_model / 16
    forward_codec: str = "RVQ"
    rvq_levels: int = 4
    backward_codec: str = "INT8"
    send_rate_mbit: float = 20.0  # per peer link and direction; 0: no cap
    timeout_s: float = 120.0     # the most a stage waits for a tensor or a step
    transport: str = "grpc"      # every boundary's data plane: grpc or ucx
    projector_init: str = "RANDOM"  # MAPL's initial U: RANDOM (shared seed) or PCA (first batch)
    # Checkpoints: a directory holding stage<i>.pt (the stage's weights, no optimizer state).
    # init_checkpoint: start from it instead of the seed's initialisation (fine-tuning);
    # save_checkpoint: written after the last step.
    init_checkpoint: str = ""
    save_checkpoint: str = ""
    data_step_offset: int = 0    # step s trains on the batches of step s + this (continuing a run)
    # Further mapl.v1.BoundaryConfig fields for every compressed (non-dense) boundary, by name:
    # {"dictionary_budget_fraction": 1.0, "dictionary_precision": "PRECISION_BF16"}. Values are
    # numbers or enum names; the daemon validates them at startup.
    boundary_options: Dict[str, Any] = field(default_factory=dict)
    # A pipeline description (TOML, mapl.pipeline; deploy/pipelines/): its boundaries and daemon
    # settings replace the boundary fields above (method, k, codecs, send_rate_mbit, ...); the
    # model's d_model and stages must match it. Empty: the run's own settings make one.
    pipeline: str = ""

    def __post_init__(self) -> None:
        self.method, self.forward_codec = self.method.upper(), self.forward_codec.upper()
        self.backward_codec = self.backward_codec.upper()
        self.projector_init = self.projector_init.upper()
        if self.projector_init not in PROJECTOR_INITS:
            raise ValueError(f"projector init must be one of {', '.join(PROJECTOR_INITS)}")
        if self.projector_init == "PCA" and self.method != "MAPL":
            raise ValueError("projector init PCA needs method MAPL (FIXED keeps its random U)")
        if self.data_step_offset < 0:
            raise ValueError(f"data_step_offset must be >= 0, got {self.data_step_offset}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method}")
        if self.forward_codec not in CODECS:
            raise ValueError(f"forward codec must be one of {', '.join(CODECS)}")
        if self.backward_codec not in BACKWARD_CODECS:
            raise ValueError(f"backward codec must be one of {', '.join(BACKWARD_CODECS)}")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"stages must be 2 to 4, got {self.stages}")
        if self.layers < self.stages:
            raise ValueError(f"{self.stages} stages need at least as many layers, not "
                             f"{self.layers}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not "
                             f"{self.schedule!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not "
                             f"{self.transport!r}")
        if self.schedule_lead < 0:
            raise ValueError(f"schedule_lead must be >= 0, got {self.schedule_lead}")
        if self.microbatches < 1 or self.batch % self.microbatches:
            raise ValueError(f"batch {self.batch} must split into {self.microbatches} equal "
                             "microbatches")
        if self.k == 0:
            self.k = max(1, self.d_model // 16)
        if not 1 <= self.k <= self.d_model:
            raise ValueError(f"k must be in [1, d_model={self.d_model}], got {self.k}")
        self.model()  # validates the model's shape
        _check_boundary_options(self.boundary_options)

    @property
    def microbatch_size(self) -> int:
        return self.batch // self.microbatches

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def model(self) -> ModelConfig:
        return ModelConfig(d_model=self.d_model, layers=self.layers, heads=self.heads,
                           seq_len=self.seq_len)

    def boundary(self, boundary_id: int) -> Dict[str, Any]:
        """The BoundaryConfig fields of boundary ``boundary_id`` (role and address aside)."""
        fields: Dict[str, Any] = {"id": boundary_id, "d": self.d_model,
                                  "method": f"METHOD_{self.method}", "vocab": 256,
                                  "seed": self.seed + 1000 * boundary_id,
                                  "max_tokens": self.microbatch_size * self.seq_len}
        if self.method != "DENSE":  # dense sends bf16 both ways and takes no codec settings
            fields.update(k=self.k, forward_codec=f"CODEC_{self.forward_codec}",
                          backward_codec=f"CODEC_{self.backward_codec}",
                          rvq_levels=self.rvq_levels)
            fields.update(self.boundary_options)
        if self.transport != "grpc":  # gRPC is the daemon's default
            fields["transport"] = f"TRANSPORT_{self.transport.upper()}"
        if self.projector_init != "RANDOM":  # RANDOM is the daemon's default
            fields["projector_init"] = f"PROJECTOR_INIT_{self.projector_init}"
        return fields

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def add_shape_args(ap: Any) -> None:
    """Adds the model's and schedule's sizes (RunConfig's defaults) to an argparse parser."""
    d = RunConfig()
    ap.add_argument("--stages", type=int, default=d.stages, choices=(2, 3, 4))
    ap.add_argument("--d-model", type=int, default=d.d_model)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch", type=int, default=d.batch, help="sequences a step")
    ap.add_argument("--microbatches", type=int, default=d.microbatches)
    ap.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                    help="pipeline schedule: gpipe (every forward, then every backward) or 1f1b "
                         "(one forward, one backward in turn once the pipeline is full)")
    ap.add_argument("--schedule-lead", type=int, default=d.schedule_lead,
                    help="1f1b: microbatches each stage runs ahead beyond the usual "
                         "(stages - index - 1), to cover a link's round trip")


def _check_boundary_options(options: Any) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"boundary_options must be a dict of BoundaryConfig fields, got "
                         f"{type(options).__name__}")
    for key, value in options.items():
        if not isinstance(key, str) or not _FIELD_NAME.match(key):
            raise ValueError(f"boundary option {key!r} is not a BoundaryConfig field name "
                             "(lower_case_with_underscores, see proto/mapl/v1/config.proto)")
        if key in _OWNED_BOUNDARY_FIELDS:
            raise ValueError(f"boundary option {key} is set by the run's own settings: use the "
                             "matching RunConfig field (command-line flag) instead")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"boundary option {key}={value!r}: the value must be a number or "
                             "an enum name such as PRECISION_BF16")


def _option_value(text: str) -> Any:
    """"3" -> 3, "0.5" -> 0.5, anything else (an enum name) stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_boundary_options(items: Sequence[str]) -> Dict[str, Any]:
    """["dictionary_budget_fraction=1", "dictionary_precision=PRECISION_BF16"] -> the dict for
    RunConfig.boundary_options (ValueError naming the bad item). A key given twice keeps the
    last value, as command-line flags do."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--boundary-option {item!r}: expected KEY=VALUE, for example "
                             "dictionary_budget_fraction=0.5")
        out[key] = _option_value(value)
    _check_boundary_options(out)
    return out


def add_boundary_option_args(ap: Any) -> None:
    """Adds --boundary-option KEY=VALUE (repeatable) to an argparse parser; read the result
    with parse_boundary_options(args.boundary_option)."""
    ap.add_argument("--boundary-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a further mapl.v1.BoundaryConfig field for every compressed boundary "
                    "(repeatable), e.g. dictionary_budget_fraction=1.0, rvq_decay=0.95, "
                    "dictionary_precision=PRECISION_BF16; VALUE is read as an int, else a "
                    "float, else kept as an enum name")
