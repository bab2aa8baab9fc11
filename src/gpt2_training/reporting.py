"""Where a run's numbers go: a JSON-lines log always, TensorBoard or Weights & Biases when asked, and a
loss-curve PNG at the end. W&B runs online whenever wandb itself finds a key (WANDB_API_KEY, the netrc entry
`wandb login` writes, its settings file) and offline otherwise, so it never prompts or hangs."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import describe_mfu

OFFLINE_MODES = ("offline", "dryrun", "disabled")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan' / 'inf' stay visible in the log instead of breaking JSON
    return value


def wandb_mode() -> tuple[str, str]:
    """('online' | 'offline', why): online exactly when wandb's own credential lookup finds a key."""
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return "offline", f"WANDB_MODE={os.environ['WANDB_MODE']}"
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    try:
        if wbauth.read_netrc_auth(host=settings.base_url):
            return "online", "the key stored by `wandb login`"
    except Exception:  # a malformed netrc entry: wandb itself would refuse it
        pass
    if settings.api_key:
        return "online", "the key in wandb's settings"
    return "offline", "no W&B key found (run `wandb login` or set WANDB_API_KEY to log online)"


class Reporter:
    """Logs from the main process only; other processes get a reporter that does nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str],
        config: dict,
        enabled: bool = True,
        *,
        run_name: str | None = None,
        project: str | None = None,
        logging_dir: str | None = None,
        resume_step: int = 0,
        keep_records: int | None = None,
    ):
        """`resume_step` and `keep_records` (the log's length when that checkpoint was written; None for a
        checkpoint that did not record it) say where a resumed run continues the log: what the interrupted run
        logged after its checkpoint is moved to train_log.superseded.jsonl, so every step has one record."""
        self.enabled = enabled
        self.path = Path(output_dir) / "train_log.jsonl"
        self.history: list[dict] = []
        self.records = 0
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._continue_log(resume_step, keep_records)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # events the interrupted run wrote after the checkpoint's step are dropped by TensorBoard itself
            self._tb = SummaryWriter(
                log_dir=str(logging_dir or Path(output_dir) / "tensorboard"), purge_step=resume_step + 1
            )
        if "wandb" in report_to:
            import wandb

            mode, why = wandb_mode()
            # transformers' default project name is "huggingface"; a project of our own unless one is asked for
            if project in (None, "huggingface"):
                project = os.environ.get("WANDB_PROJECT", "gpt2-training")
            self._wandb = wandb.init(
                project=project,
                name=run_name,
                dir=str(output_dir),
                mode=mode,
                config=config,
                settings=wandb.Settings(silent=True, console="off", save_code=False),
            )
            if mode == "online":
                print(f"W&B: logging online ({why}) to {self._wandb.url}", flush=True)
            else:
                print(
                    f"W&B: logging offline ({why}) to {self._wandb.dir}; upload later with "
                    f"`wandb sync {Path(self._wandb.dir).parent}`",
                    flush=True,
                )

    def _continue_log(self, resume_step: int, keep_records: int | None) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        kept: list[dict] = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                break
            if (i >= keep_records) if keep_records is not None else (record.get("step", 0) > resume_step):
                break
            kept.append(record)
        dropped = lines[len(kept) :]
        if dropped:
            with open(self.path.with_name("train_log.superseded.jsonl"), "a", encoding="utf-8") as f:
                f.write("\n".join(dropped) + "\n")
            tmp = self.path.with_name(".train_log.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in lines[: len(kept)]), encoding="utf-8")
            os.replace(tmp, self.path)
            print(
                f"{self.path.name}: {len(dropped)} record(s) logged after the step-{resume_step} checkpoint was written "
                f"moved to {self.path.with_name('train_log.superseded.jsonl').name}",
                flush=True,
            )
        self.history, self.records = kept, len(kept)

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self.records += 1
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


@dataclass
class TrainResult:
    """What a run produced; `train()` returns it so tests and notebooks can assert on it."""

    output_dir: str
    final_model_dir: str | None = None
    step: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)  # training loss of every optimizer step of this process
    evals: list[dict] = field(default_factory=list)
    initial_eval: dict | None = None
    final_eval: dict | None = None
    unigram_bpb: float | None = None
    samples: list[str] = field(default_factory=list)
    skipped_steps: int = 0
    resumed_from: str | None = None
    stopped_by_signal: int | None = None
    tokens_per_s: float | None = None
    precision: str = "fp32"
    data_stats: dict = field(default_factory=dict)
    exit_code: int = 0


class StepWindow:
    """The training record of each logging window: the mean loss over the window (the Trainer's `loss`; one
    step's loss jumps) and the tokens per second of the steps in it; also the whole run's rate."""

    def __init__(self, flops_per_token: float, precision: str):
        self.flops_per_token, self.precision = flops_per_token, precision
        self.tokens, self.seconds, self.losses = 0, 0.0, []
        self.run_tokens, self.run_seconds = 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self.run_tokens, self.run_seconds = self.run_tokens + tokens, self.run_seconds + seconds

    @property
    def run_rate(self) -> float:
        return self.run_tokens / max(self.run_seconds, 1e-9)

    def record(self, step: int, grad_norm: float, lr: float, tokens_seen: int) -> dict:
        """The window's record, which starts the next window."""
        rate = self.tokens / max(self.seconds, 1e-9)
        rec = {
            "event": "train",
            "step": step,
            "loss": sum(self.losses) / len(self.losses),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_seen": tokens_seen,
            "tokens_per_s": rate,
        }
        mfu, _ = describe_mfu(rate, self.flops_per_token, self.precision)
        if mfu is not None:
            rec["mfu"] = mfu
        self.tokens, self.seconds, self.losses = 0, 0.0, []
        return rec


def console_line(record: dict) -> str:
    """A record as one console line, e.g. `[train] step=10 loss=5.123 ...`."""
    fields = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "event"
    )
    return f"[{record.get('event')}] {fields}"


def startup_line(
    cfg: Any, config: Any, n_params: int, precision: str, why: str, world: int, backend: str
) -> str:
    """The run's first line: the model built, the precision and why, the effective batch and the backend."""
    t = cfg.train
    B, A, T = t.per_device_train_batch_size, t.gradient_accumulation_steps, cfg.data.block_size
    shape = " ".join(f"{k}={getattr(config, k)}" for k in ("n_layer", "n_head", "n_embd"))
    # overrides or loaded weights can make the shape differ from the preset's
    origin = (
        f"preset {cfg.model.preset}" if cfg.model.init_from == "scratch" else f"from {cfg.model.init_from}"
    )
    return (
        f"model: {n_params / 1e6:.2f} M parameters ({shape}; {origin}), precision {precision} ({why}); "
        f"effective batch {B * A * world} sequences = {B * A * T * world} tokens per step ({B} per device x {A} "
        f"accumulation x {world} processes); {backend}"
    )


def interval(strategy: Any, steps: float | None, max_steps: int) -> int:
    """Steps between two events (0 = never); like the Trainer, a value below 1 is a ratio of the run."""
    if str(getattr(strategy, "value", strategy)) == "no" or not steps:
        return 0
    return max(math.ceil(steps * max_steps), 1) if steps < 1 else int(steps)


def plot_loss_curve(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Training loss per step and held-out loss per evaluation, saved as a PNG."""
    train = [
        (r["step"], r["loss"]) for r in history if r.get("event") == "train" and math.isfinite(r["loss"])
    ]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("event") == "eval"]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no backend switch in notebooks

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
