"""Keeps `accelerate launch` from burying our one-line errors under a traceback of its own.

`accelerate launch script.py` runs the script in a child process and, when the child exits non-zero, raises
`CalledProcessError` from its launcher (unless `-q` is given), so a user who mistyped a key would see our clear
message followed by a traceback that points into accelerate. Our entry scripts exit with EXIT_USER_ERROR only
after printing such a message; this hook, installed at interpreter start by `finetune_launch.pth`, makes the
`accelerate` process exit with that same code and print nothing more. Any other failure keeps its traceback.
"""

import sys

EXIT_USER_ERROR = 2
ENTRY_SCRIPTS = ("finetune/sft.py", "finetune/dpo.py", "finetune/pretrain.py", "finetune/study.py", "eval/evaluate.py")


def _hook(previous):
    def excepthook(kind, value, tb):
        import subprocess

        cmd = getattr(value, "cmd", None) or []
        if (
            issubclass(kind, subprocess.CalledProcessError)
            and value.returncode == EXIT_USER_ERROR
            and any(
                str(part).replace("\\", "/").endswith(ENTRY_SCRIPTS) or str(part).startswith("finetune.")
                for part in cmd
            )
        ):
            import os

            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)
        previous(kind, value, tb)

    return excepthook


# Only the accelerate CLI is touched; every other interpreter start pays one string comparison.
if sys.argv and sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1].startswith("accelerate"):
    sys.excepthook = _hook(sys.excepthook)
