"""Configuration of one SMoE block, validated once at model build time."""

from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import ConfigError

SECOND_EXPERT_POLICIES = ("sampling", "all", "random")
RESIDUAL_MODES = ("official", "paper")


def parse_strata(spec: Optional[str], num_experts: int) -> Tuple[int, ...]:
    """Parse ``--smoe-strata`` ("4,12") into experts per stratum, checking it sums to E.

    An empty spec means a single stratum holding every expert (vanilla MoE).
    """
    if num_experts is None or num_experts < 1:
        raise ConfigError(
            f"--moe-expert-count must be a positive integer, got {num_experts!r}"
        )
    if spec is None or str(spec).strip() == "":
        return (num_experts,)
    try:
        strata = tuple(int(s) for s in str(spec).split(","))
    except ValueError:
        raise ConfigError(
            f"--smoe-strata {spec!r} is not a comma-separated list of integers; "
            f"write the experts per stratum in order, e.g. --smoe-strata 4,12"
        ) from None
    if any(n < 1 for n in strata):
        raise ConfigError(
            f"--smoe-strata {spec!r}: every stratum needs at least one expert"
        )
    if sum(strata) != num_experts:
        raise ConfigError(
            f"--smoe-strata {spec!r} sums to {sum(strata)} experts but "
            f"--moe-expert-count is {num_experts}; make them agree, e.g. "
            f"--moe-expert-count {sum(strata)} --smoe-strata {spec}"
        )
    return strata


@dataclass(frozen=True)
class SMoEConfig:
    embed_dim: int
    ffn_dim: int
    strata: Tuple[int, ...]  # experts per stratum, in order; sums to the expert count
    strata_ffn: Optional[Tuple[int, ...]] = None  # FFN width of each stratum's experts (None: ffn_dim)
    top1: bool = False  # Switch-style routing (one expert per pass, raw-probability combine)
    capacity_factor: float = 1.0  # top-1 training capacity = int(cf * ceil(S / V))
    second_expert_policy: str = "sampling"
    inference_noise: bool = False  # keep the training policy's noise at inference (official code)
    eval_capacity_token_fraction: Optional[float] = None  # None: never drop at eval
    dropless: bool = False  # no capacity limit in training either (MegaBlocks / Tutel style)
    elastic_passes: bool = False  # training: each token gets a random pass budget K in 1..L
    eom: float = 0.0  # expert output masking rate
    residual: str = "official"
    exit_norm: bool = False  # an exit LayerNorm where the residual mode has none (one stratum, paper)
    route_padding: bool = False
    dropout: float = 0.0  # on expert outputs (the layer's --dropout)
    activation_dropout: float = 0.0
    # Baselines built around the block (modules/stacked.py, modules/cmr.py); the block itself
    # ignores these fields.
    stack: int = 1  # plain MoE layers in sequence in one FFN slot, E/stack experts each
    cmr: bool = False  # CMR: mix a shared dense FFN with the MoE by a per-token sigmoid gate
    cmr_gate_drop: float = 0.0  # dropout on the CMR gate

    def __post_init__(self):
        if self.embed_dim < 1 or self.ffn_dim < 1:
            raise ConfigError("SMoE block needs positive embed and FFN dims")
        if not self.strata or any(n < 1 for n in self.strata):
            raise ConfigError(f"invalid strata {self.strata}")
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ConfigError(
                f"--moe-second-expert-policy must be one of {SECOND_EXPERT_POLICIES}, "
                f"got {self.second_expert_policy!r}"
            )
        if self.residual not in RESIDUAL_MODES:
            raise ConfigError(
                f"--smoe-residual must be one of {RESIDUAL_MODES}, got {self.residual!r}"
            )
        if not 0.0 <= self.eom < 1.0:
            raise ConfigError(f"--moe-eom must be in [0, 1), got {self.eom}")
        if self.capacity_factor <= 0:
            raise ConfigError(
                f"--moe-capacity-factor must be > 0, got {self.capacity_factor}"
            )
        f = self.eval_capacity_token_fraction
        if f is not None and not 0 < f <= 1:
            raise ConfigError(
                f"--moe-eval-capacity-token-fraction must be in (0, 1] (capacity per expert = "
                f"ceil(F * tokens); an expert never gets more than every token), got {f}; omit it "
                f"for unlimited capacity at evaluation (the default: nothing dropped)"
            )
        if self.dropless and f is not None:
            raise ConfigError(
                f"--moe-dropless never drops an assignment, but --moe-eval-capacity-token-fraction "
                f"{f} asks for a capacity at evaluation; drop one of the two flags"
            )
        if self.strata_ffn is not None:
            if len(self.strata_ffn) != self.num_strata:
                raise ConfigError(
                    f"--smoe-strata-ffn gives {len(self.strata_ffn)} widths for "
                    f"{self.num_strata} strata ({','.join(map(str, self.strata))}): give one FFN "
                    f"width per stratum, e.g. --smoe-strata-ffn {','.join([str(self.ffn_dim)] * self.num_strata)}"
                )
            if any(f < 1 for f in self.strata_ffn):
                raise ConfigError(f"--smoe-strata-ffn widths must be positive, got {','.join(map(str, self.strata_ffn))}")
            if self.stack > 1:
                raise ConfigError("--smoe-strata-ffn sets the widths of SMoE strata; it cannot be combined with --moe-stack")
        if self.stack < 1:
            raise ConfigError(f"--moe-stack must be >= 1, got {self.stack}")
        if self.stack > 1 and self.num_strata > 1:
            raise ConfigError(
                f"--moe-stack {self.stack} stacks plain MoE layers; it cannot be combined with "
                f"--smoe-strata (got strata {','.join(map(str, self.strata))})"
            )
        if self.num_experts % self.stack != 0:
            raise ConfigError(
                f"--moe-stack {self.stack} splits the {self.num_experts} experts of "
                f"--moe-expert-count evenly over the stacked layers; "
                f"{self.num_experts} is not divisible by {self.stack}"
            )
        if not 0.0 <= self.cmr_gate_drop < 1.0:
            raise ConfigError(f"--cmr-gate-drop must be in [0, 1), got {self.cmr_gate_drop}")

    @property
    def num_experts(self) -> int:
        return sum(self.strata)

    @property
    def num_strata(self) -> int:
        return len(self.strata)

    def expert_widths(self):
        """(experts, FFN width) of each run of strata with one width, in expert order."""
        widths = self.strata_ffn or (self.ffn_dim,) * self.num_strata
        runs = []
        for n, f in zip(self.strata, widths):
            if runs and runs[-1][1] == f:
                runs[-1] = (runs[-1][0] + n, f)
            else:
                runs.append((n, f))
        return runs

    @property
    def has_exit_norm(self) -> bool:
        """Every token leaves through an exit LayerNorm: always in ``official`` mode with more
        than one stratum (the released code), else only with ``--smoe-exit-norm``."""
        return self.exit_norm or (self.residual == "official" and self.num_strata > 1)

    @property
    def k(self) -> int:
        return 1 if self.top1 else 2

    def first_expert(self, stratum: int) -> int:
        """Global id of the first expert of ``stratum`` (= N_<s in the spec)."""
        return sum(self.strata[:stratum])

    def visible_experts(self, stratum: int) -> int:
        """Experts Gate_s can route to: its own stratum and every later one (V_s)."""
        return sum(self.strata[stratum:])
