"""Prompt sources shared by training (``sample.prompts``) and evaluation (``eval.eval_prompts``):
``builtin``, the toy world's ``toy`` (training split) and ``toy_heldout``, or a text file."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

BUILTIN_PROMPTS = [
    "a red apple on a wooden table", "a cat sleeping on a sofa", "a lighthouse at sunset",
    "a bowl of strawberries", "a vintage car on a country road", "a fox in a snowy forest",
    "a cup of coffee next to a book", "a sailing boat on a calm sea", "a bunch of tulips",
    "a mountain cabin under the stars", "a parrot on a branch", "a bicycle leaning on a wall",
    "a slice of watermelon", "a castle on a hill", "a dog running on the beach",
    "a hot air balloon over fields",
]


def load_prompts(source: str, field: str = "sample.prompts") -> list:
    if source == "builtin":
        return list(BUILTIN_PROMPTS)
    if source in ("toy", "toy_heldout"):
        from .toy import world

        specs = world.train_specs() if source == "toy" else world.heldout_specs()
        return [world.prompt(s) for s in specs]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{field}: {source!r} is neither 'builtin', 'toy', 'toy_heldout' "
                          f"nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{field}: {source!r} is not UTF-8 text (byte {err.start}); save it "
                          f"as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{field}: cannot read {source!r} ({err})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{field}: {source!r} holds no prompt")
    return prompts


def spread(items: list, n: int) -> list:
    """``n`` items evenly spread over ``items`` (all of them if there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]
