"""``python -m vipo.train [PRESET | CONFIG.yaml] [key=value ...]``: GRPO / ViPO training.

The command line: parses the preset or file and the overrides into a validated Config,
runs it (vipo.run_loop.RunLoop around vipo.trainer.Trainer) and turns every ending into an
exit code and, for errors, one line. With no arguments the ``toy`` preset trains the
shipped pretrained toy-world generator (vipo/toy) with ViPO on the CPU.
"""

from __future__ import annotations

import copy
import logging
import sys

from . import faults
from .config import DEFAULT_PRESET, Config, check_resume_compatible, help_text
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
    if cfg.run.resume and cfg.run.resume != "auto":  # auto: the command's own config
        from .run_dir import find_resume

        if first is not None:
            raise ConfigError(f"run.resume: continues the run's saved config; give key=value "
                              f"overrides only, not {first!r}")
        run_dir, _ = find_resume(cfg.run.resume, cfg.run.output_dir, cfg.run.run_name)
        resume = cfg.run.resume
        saved = Config.from_yaml(run_dir / "config.yaml")
        cfg = copy.deepcopy(saved)
        cfg.apply_overrides(args)
        check_resume_compatible(saved, cfg)
        cfg.run.resume = resume
    # Prompt files are read now, before a run folder exists or a model loads.
    if cfg.sample.prompts != "builtin":
        load_prompts(cfg.sample.prompts)
    if cfg.eval.eval_every >= 0 and cfg.eval.eval_prompts != "builtin":
        load_prompts(cfg.eval.eval_prompts, "eval.eval_prompts")
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
    error, 128 + signal number after a stop signal (the checkpoint is saved). ``--debug``
    shows tracebacks; ``--verbose`` keeps the libraries' own console output."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug, verbose = "--debug" in args, "--verbose" in args
    args = [a for a in args if a not in ("--debug", "--verbose")]
    loop = None
    try:
        if any(a in ("-h", "--help") for a in args):
            print(_help(args))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if not verbose:
            quiet_libraries()
        cfg = parse_args(args)
        debug = debug or cfg.run.debug
        loop = RunLoop(cfg)
        loop.run()
        return 0
    except faults.RunStopped as stop:
        print(f"vipo.train: stopped by {stop}; {_saved(loop)}", file=sys.stderr)
        return 128 + stop.signum
    except faults.StopNow as stop:  # while loading: nothing trained, nothing to save
        print(f"vipo.train: stopped by {stop} before training started; nothing to save, the "
              f"same command starts again", file=sys.stderr)
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
        saved = "" if "resume=" in message else f"; {_saved(loop)}"
        print(f"vipo.train: error: {message}{saved} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def quiet_libraries() -> None:
    """The console shows the trainer's own lines and progress bar: the libraries' loading
    and writing bars, their advisory warnings (e.g. transformers' torchvision fallback) and
    the kernels' backend choice are hidden; ``--verbose`` keeps them."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    logging.getLogger("vipo_kernels").setLevel(logging.WARNING)


def _saved(loop) -> str:
    return "no checkpoint saved" if loop is None else loop.saved()


if __name__ == "__main__":
    sys.exit(main())
