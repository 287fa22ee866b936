"""Errors the suite raises for bad input. Entry scripts print them as one line and exit 2, no traceback."""


class FinetuneError(Exception):
    """Base class: a problem with the user's recipe, data or environment, not a bug in the suite."""


class RecipeError(FinetuneError):
    """A recipe or command-line override is malformed: unknown key, wrong type, bad value."""


class DataError(FinetuneError):
    """A dataset is missing, empty or has a malformed record."""


class HubUnreachableError(FinetuneError):
    """A model or dataset named by Hub ID could not be fetched (offline, or no network)."""


class HubError(FinetuneError):
    """A push to the Hub cannot happen (offline, no repository named, refused by the Hub) or a run can't be staged."""


def run_cli(main, *args) -> None:
    """Run an entry point: a FinetuneError becomes one `error: ...` line and exit code 2, which
    finetune._launch_hook recognises to spare the user accelerate launch's traceback."""
    import sys

    try:
        main(*args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
