"""Where a training run logs besides metrics.csv: TensorBoard and Weights & Biases, chosen with ``--log``.

The loop talks to one small interface (:class:`Logger`, several of them behind :class:`Loggers`): each metrics.csv
row as scalars at its step (every column under its own name: loss, lr, grad_norm, img_per_s, wall_s, the task's
columns, fd and fd_stderr), each sample grid as an image at its step, and, when it opens, the run's settings as
hyperparameters. Only rank 0 opens any (the others keep an empty :class:`Loggers`). Every file stays in the run
directory: RUN/tensorboard/ holds the event files, RUN/wandb/ W&B's run folders, its logs and the run's W&B id.

A resume continues the same curves: TensorBoard hides the events past the checkpoint that a stopped session wrote
(``purge_step``), and W&B continues the run of the stored id. A backend's package is an optional extra; a missing
one is refused by :func:`require` before the loop writes anything.
"""

from __future__ import annotations

import contextlib
import importlib
import netrc
import os
import secrets
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..files import atomic_write_text

__all__ = ["BACKENDS", "check_names", "require", "open_loggers", "Logger", "Loggers", "TensorBoardLogger",
           "WandbLogger", "wandb_mode"]

# csv is metrics.csv, always written; the others are `--log` backends, each with its package and its extra
BACKENDS = ("csv", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}

WANDB_HOST = "https://api.wandb.ai"  # W&B's API, unless WANDB_BASE_URL names another server
PROBE_SECONDS = 2.0  # how long W&B's host may take to accept a connection before the run goes offline


def check_names(names) -> None:
    """ConfigError (one line, with the choices) unless ``names`` is a list of known backends."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"--log takes a list of backend names, got {names!r}")
    for n in names:
        if n not in BACKENDS:
            raise ConfigError(f"unknown --log backend {n!r}: choose tensorboard or wandb (metrics.csv is always "
                              "written)")


def require(names) -> None:
    """ConfigError naming the install command when a backend's package is missing (checked before anything is
    written)."""
    for n in names:
        if n in _PACKAGES:
            try:
                importlib.import_module(_PACKAGES[n])
            except ImportError:
                raise ConfigError(f"--log {n} needs the {_PACKAGES[n]} package: pip install 'ddpmkit[{n}]'") from None


class Logger:
    """One backend: what the loop logs, at the run's global step."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """A metrics.csv row's numbers (blank cells left out), by column name."""

    def image(self, step: int, tag: str, path: Path) -> None:
        """A picture the loop wrote (a sample grid, a PNG)."""

    def close(self, failed: bool = False) -> None:
        """The end of this session (``failed``: it ends on an error)."""


class Loggers(Logger):
    """The run's backends, as one: every call goes to each."""

    def __init__(self, loggers=(), log=None):
        self.loggers, self.log = list(loggers), log or (lambda msg: None)

    def scalars(self, step: int, row: dict) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step" and v is not None}
        for lg in self.loggers:
            lg.scalars(step, values)

    def image(self, step: int, tag: str, path: Path) -> None:
        for lg in self.loggers:
            lg.image(step, tag, Path(path))

    def close(self, failed: bool = False) -> None:
        """Close every backend; a backend that fails to close is a warning, not an error that would hide the
        training's own outcome."""
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            try:
                lg.close(failed)
            except Exception as e:  # noqa: BLE001 - reported in one line; the run's checkpoint is already written
                self.log(f"warning: closing the {type(lg).__name__} failed: {str(e).splitlines()[0] if str(e) else e}")


def open_loggers(names, run_dir: Path, settings: dict, *, resume_step: int | None = None, log=None) -> Loggers:
    """The backends ``names`` of the run in ``run_dir`` (csv is metrics.csv, not opened here), each given the run's
    ``settings`` (config.json's ``train`` section) as hyperparameters. ``resume_step``: the checkpoint's step when
    the run resumes. ``log`` prints one line."""
    log = log or (lambda msg: None)
    opened = Loggers(log=log)
    try:
        for n in dict.fromkeys(names):
            if n == "tensorboard":
                opened.loggers.append(TensorBoardLogger(run_dir, settings, resume_step))
            elif n == "wandb":
                opened.loggers.append(WandbLogger(run_dir, settings, log))
    except BaseException:
        opened.close(failed=True)
        raise
    return opened


def _hparam_value(v):
    """A setting as TensorBoard's hparams take it: a number, a bool or a string (a list comma-joined)."""
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return v if isinstance(v, (bool, int, float, str)) else str(v)


class TensorBoardLogger(Logger):
    """Event files in RUN/tensorboard, for ``tensorboard --logdir RUN/tensorboard``."""

    def __init__(self, run_dir: Path, settings: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # A resume from step S hides every event at a step > S written before (a session stopped after its last
        # checkpoint): TensorBoard's purge_step writes a SessionLog START at S + 1, and its reader drops the events
        # at or past it that came earlier. metrics.csv drops its rows past S the same way (store/metrics_log.py).
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        # the hparams plugin's three summaries, in this folder (SummaryWriter.add_hparams would open a subfolder);
        # its metric is the loss curve, whose last value the HPARAMS tab shows beside the settings
        for summary in hparams({k: _hparam_value(v) for k, v in settings.items()}, {"loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------- W&B
def _has_api_key(env) -> bool:
    """Whether W&B finds credentials without asking: WANDB_API_KEY (or an identity token file), or a .netrc entry
    for the API's host (what `wandb login` writes)."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or WANDB_HOST).netloc
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _reachable(host: str, port: int, seconds: float = PROBE_SECONDS) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``seconds``, name lookup included (in a thread: a
    lookup has no timeout of its own)."""
    ok = []

    def connect():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=seconds):
            ok.append(True)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(seconds)
    return bool(ok)


def wandb_mode(env=None, reachable=_reachable) -> tuple[str, str]:
    """(W&B's mode, why): WANDB_MODE when the user set it; else offline without an API key or when the API's host
    does not answer within PROBE_SECONDS; else online. Never waits longer than that on the network."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], f"WANDB_MODE={env['WANDB_MODE']}"
    if not _has_api_key(env):
        return "offline", "no W&B API key; `wandb login` to log online"
    url = urlsplit(env.get("WANDB_BASE_URL") or WANDB_HOST)
    if not url.hostname or not reachable(url.hostname, url.port or (80 if url.scheme == "http" else 443)):
        return "offline", f"{url.hostname} cannot be reached"
    return "online", ""


@contextlib.contextmanager
def _default_env(**values):
    """Environment variables set for the duration, where the user has not set them."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class WandbLogger(Logger):
    """A W&B run whose files are in RUN/wandb: online when W&B can be reached, offline otherwise (:func:`wandb_mode`);
    RUN/wandb/run_id holds its id, which a resume continues."""

    def __init__(self, run_dir: Path, settings: dict, log):
        import wandb

        self.wandb = wandb
        folder = Path(run_dir) / "wandb"
        folder.mkdir(exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B's ids are short strings of [a-z0-9]
            atomic_write_text(id_file, run_id + "\n")
        mode, why = wandb_mode()
        try:
            self.run = self._init(run_dir, run_id, mode, settings)
        except Exception as e:  # noqa: BLE001 - any failure to reach W&B: log offline rather than stop the run
            if mode != "online":
                raise ConfigError(f"W&B could not start ({mode}): {str(e).splitlines()[0] if str(e) else e}") from None
            mode, why = "offline", f"W&B did not start online: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            with contextlib.suppress(Exception):
                wandb.teardown()  # the failed run's service holds its id: start afresh
            self.run = self._init(run_dir, run_id, mode, settings)
        if mode in ("offline", "dryrun"):
            where = getattr(self.run.settings, "sync_dir", None) or Path(self.run.dir).parent
            log(f"W&B is offline ({why}): the run is in {where}; `wandb sync {where}` uploads it")
        elif mode == "online":
            log(f"W&B: {self.run.url}")

    def _init(self, run_dir: Path, run_id: str, mode: str, settings: dict):
        wandb = self.wandb
        # W&B writes its folders under dir/wandb; its own log goes to WANDB_CACHE_DIR (else ~/.cache/wandb)
        with _default_env(WANDB_CACHE_DIR=str(Path(run_dir) / "wandb" / "cache")):
            return wandb.init(project=os.environ.get("WANDB_PROJECT") or "ddpmkit", name=Path(run_dir).name,
                              dir=str(run_dir), id=run_id, resume="allow", mode=mode, config=settings,
                              settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                                                      init_timeout=30))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
