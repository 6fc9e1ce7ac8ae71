"""Errors meant for the user: printed as one line by the CLI and shown as a message by the app."""


class UserError(ValueError):
    """A mistake the user can fix (bad name, missing dataset, impossible budget).

    The message says what was wrong and what the valid choices or next step are.
    """


def unknown_choice(what: str, value: object, valid: "list[str] | tuple[str, ...]") -> UserError:
    """Build the error for an unknown name, listing the valid ones."""
    return UserError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, valid))}")
