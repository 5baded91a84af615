"""Write an lm-eval task that scores an ``eval.py tasks`` JSONL file as ``eval.py tasks`` does.

    python -m monet_jax.eval.lm_eval_task my_task my_task.jsonl --out my_tasks/ [--fewshot-file shots.jsonl]
    monet-lm-eval --model monet_jax --model_args pretrained=CK --tasks my_task --include_path my_tasks/ \\
        [--num_fewshot 2]

lm-eval's own defaults differ from ``eval.py tasks``: it puts ``target_delimiter`` (a space) between context
and choice, and it draws few-shot examples at random. The settings shipped in ``lm_eval_tasks/`` use none
(the JSONL's choices carry their own leading space, as ``tools/tasks_to_jsonl.py`` writes them), a blank
line after each shot, and the first examples other than the scored one (or the first of ``--fewshot-file``),
so both tools give the same acc and acc_norm. The task YAML written here is self-contained: those settings,
the task name and the data file's absolute path.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import yaml

from monet_jax.eval import tasks


def template(partial: bool) -> dict:
    """The shipped settings: one shared context per example, or one context per choice (partial scoring)."""
    name = "monet_jsonl_partial.yaml" if partial else "monet_jsonl.yaml"
    return yaml.safe_load(resources.files("monet_jax.eval").joinpath("lm_eval_tasks", name).read_text())


def task_config(name: str, data: str | Path, fewshot_file: str | Path | None = None) -> dict:
    """The task for ``data`` (validated as ``eval.py tasks`` reads it)."""
    examples = tasks.read_examples(data)
    if fewshot_file is not None:
        tasks.read_examples(fewshot_file)
    listed = {isinstance(ex.context, tuple) for ex in examples}
    if len(listed) > 1:
        raise ValueError(f"{data}: mixes string and list contexts; lm-eval reads one kind per task (split the file)")
    partial = listed == {True}
    if partial:
        for n, ex in enumerate(examples, 1):
            if len(set(ex.choices)) != 1:
                raise ValueError(f"{data}: example {n} has a context per choice but different continuations; "
                                 "lm-eval scores one continuation after every context")
            if ex.choices[0].isdigit():
                raise ValueError(f"{data}: example {n}'s continuation {ex.choices[0]!r} is a number, which "
                                 "lm-eval's template would read as an index")
    config = {"task": name, **template(partial)}
    files = {"test": str(Path(data).resolve())}
    if fewshot_file is not None:
        files["train"] = str(Path(fewshot_file).resolve())
        config["fewshot_split"] = "train"
    config["dataset_kwargs"] = {"data_files": files}
    return config


def write_task(name: str, data: str | Path, out: str | Path, fewshot_file: str | Path | None = None) -> Path:
    config = task_config(name, data, fewshot_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    header = "# Written by python -m monet_jax.eval.lm_eval_task: scores as `eval.py tasks` does.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monet_jax.eval.lm_eval_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the task name given to --tasks")
    p.add_argument("data", help="an eval.py tasks JSONL file")
    p.add_argument("--out", required=True, help="directory for NAME.yaml (give it to --include_path)")
    p.add_argument("--fewshot-file", default=None, help="shots from this file, as eval.py tasks --fewshot-file")
    args = p.parse_args(argv)
    try:
        path = write_task(args.name, args.data, args.out, args.fewshot_file)
    except (ValueError, OSError) as e:
        print(f"lm_eval_task: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}; run: monet-lm-eval --model monet_jax --model_args pretrained=CHECKPOINT "
          f"--tasks {args.name} --include_path {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
