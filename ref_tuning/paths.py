"""Outputs never eat inputs: a check every tool runs before it writes."""

from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, Path]


def check_separate(inputs: Iterable[PathLike], outputs: Iterable[PathLike]) -> None:
    """Raise `ValueError` if an output is, contains or lies inside an input: writing it (or replacing
    it with --overwrite) would destroy the input."""
    for out in map(Path, outputs):
        o = out.resolve()
        for inp in map(Path, inputs):
            i = inp.resolve()
            how = "is" if o == i else "contains" if o in i.parents else "lies inside" if i in o.parents else None
            if how:
                raise ValueError(
                    f"the output {out} {how} the input {inp}: writing it would destroy the input; "
                    "choose an output outside the input"
                )


def check_new(out: Path, names: Iterable[str], overwrite: bool) -> None:
    """Raise `ValueError` if `out` already holds one of the files `names`, unless `overwrite`."""
    existing = [name for name in names if (Path(out) / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--out {out}: holds {existing[0]} already; pass --overwrite to replace it, or choose another --out"
        )
