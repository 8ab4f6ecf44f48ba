"""What medtune's commands print: their own lines, one-line errors, and no library chatter.

Every command's ``main`` calls :func:`quiet_libraries` before importing the heavy libraries, and
:func:`run_command` around its work: user mistakes (the error types of the
modules, all :class:`MedtuneError`) become ``error: …`` on one line with exit 2; anything else is a bug and keeps its
traceback. ``--debug`` (or ``MEDTUNE_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable


def quiet_libraries() -> None:
    """Silence what libraries print on import and load; progress bars only on a terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not _has_cuda_devices():
        # DeepSpeed's auto-detection warns "Setting accelerator to CPU" on every import without a GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bitsandbytes logs that an optional CPU kernel package ("kernels") is missing: it is not needed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*save_embedding_layers.*", category=UserWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # Imported here, not at the top: the ground floor stays light (medtune score and report need neither).
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


def _has_cuda_devices() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


class MedtuneError(ValueError):
    """A mistake the user can fix (a recipe, a record, a path, a setting); the message says what and how.
    Every error medtune raises for one derives from it; anything else that reaches a command is a bug."""


def run_command(work: Callable[[], int], debug: bool = False, also: tuple[type[BaseException], ...] = ()) -> int:
    """``work()``'s exit code; a user error is one line on stderr (exit 2), a full disk one line too."""
    debug = debug or os.environ.get("MEDTUNE_DEBUG") == "1"
    try:
        return work()
    except BrokenPipeError:  # `medtune … | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MedtuneError, *also) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC or debug:
            raise
        print(
            f"error: no space left on the device writing {exc.filename or 'a file'}; free some space and run "
            "the same command again (written files are complete or absent)",
            file=sys.stderr,
        )
        return 2
