"""The chat templates mergekit 0.1.5 ships by name (its `_data/chat_templates/*.jinja`), with the
same text: `chat_template: chatml` in a mergekit recipe writes this text into the output's
tokenizer, as mergekit does."""

from __future__ import annotations

from importlib.resources import files

NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def named_template(name: str) -> str | None:
    """The template mergekit ships under `name`, or None when it ships none by that name."""
    if name not in NAMES:
        return None
    return files(__name__).joinpath(f"{name}.jinja").read_text()
