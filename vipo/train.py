"""``python -m vipo.train [PRESET | CONFIG.yaml] [key=value ...]``: GRPO / ViPO training.

The command line: parses the preset or file and the overrides into a validated Config,
runs it (vipo.run_loop.RunLoop around vipo.trainer.Trainer) and turns every ending into an
exit code and, for errors, one line. With no arguments the ``toy`` preset trains the
shipped pretrained toy-world generator (vipo/toy) with ViPO on the CPU.
"""

from __future__ import annotations

import logging
import sys

from . import faults
from .config import DEFAULT_PRESET, Config, help_text
from .errors import ConfigError
from .prompts import load_prompts
from .run_loop import RunLoop


def parse_args(args: list) -> Config:
    """[PRESET | CONFIG.yaml] then key=value overrides -> a validated Config. With
    ``resume=``, the resumed run's saved config.yaml is the base instead."""
    args = list(args)
    first = args.pop(0) if args and "=" not in args[0] else None
    cfg = Config.from_name(DEFAULT_PRESET) if first is None else \
        Config.from_yaml(first) if first.endswith((".yaml", ".yml")) else Config.from_name(first)
    cfg.apply_overrides(args)
    if cfg.run.resume:
        from .run_dir import find_resume

        if first is not None:
            raise ConfigError(f"run.resume: continues the run's saved config; give key=value "
                              f"overrides only, not {first!r}")
        run_dir, _ = find_resume(cfg.run.resume, cfg.run.output_dir, cfg.run.run_name)
        resume = cfg.run.resume
        cfg = Config.from_yaml(run_dir / "config.yaml")
        cfg.apply_overrides(args)
        cfg.run.resume = resume
    if cfg.sample.prompts != "builtin":
        load_prompts(cfg.sample.prompts)
    return cfg.validate()


def _help(args: list) -> str:
    """--help for the preset or file (and overrides) that would run."""
    rest = [a for a in args if a not in ("-h", "--help", "--debug")]
    first = rest.pop(0) if rest and "=" not in rest[0] else None
    cfg = Config.from_name(DEFAULT_PRESET) if first is None else \
        Config.from_yaml(first) if first.endswith((".yaml", ".yml")) else Config.from_name(first)
    cfg.apply_overrides(rest)
    return help_text(cfg)


def main(argv: list | None = None) -> int:
    """Exit codes: 0 done, 1 error (one line; --debug for the traceback), 2 config or load
    error, 128 + signal number after a stop signal (the checkpoint is saved)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    loop = None
    try:
        if any(a in ("-h", "--help") for a in args):
            print(_help(args))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        cfg = parse_args(args)
        debug = debug or cfg.run.debug
        loop = RunLoop(cfg)
        loop.run()
        return 0
    except faults.RunStopped as stop:
        print(f"vipo.train: stopped by {stop}; {_saved(loop)}", file=sys.stderr)
        return 128 + stop.signum
    except (ConfigError, faults.LoadError) as err:
        if debug:
            raise
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"vipo.train: {kind}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vipo.train: interrupted; {_saved(loop)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure gets its one line
        if debug:
            raise
        message = faults.one_line(err)
        saved = "" if "checkpoint" in message else f"; {_saved(loop)}"
        print(f"vipo.train: error: {message}{saved} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _saved(loop) -> str:
    return "no checkpoint saved" if loop is None else loop.saved()


if __name__ == "__main__":
    sys.exit(main())
