"""Raw CodeContests rows to the processed layout: `{split}.jsonl` and `{split}_metadata.json` (v2)."""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Sequence, Tuple

# CodeContests language ids: 1 = Python 2, 3 = Python 3.
PYTHON_LANGUAGES = (1, 3)


def problem_records(
    problem: Dict[str, Any], languages: Sequence[int] = PYTHON_LANGUAGES
) -> Iterator[Dict[str, Any]]:
    """One processed sample per solution of the problem in `languages`, correct ones first."""
    has_tests = bool(problem.get("public_tests", {}).get("input"))
    for kind, field in (("correct", "solutions"), ("incorrect", "incorrect_solutions")):
        solutions = problem.get(field) or {"language": [], "solution": []}
        for i, (language, source) in enumerate(zip(solutions["language"], solutions["solution"])):
            if language not in languages:
                continue
            yield {
                "instruction": problem["description"],
                "input": "",
                "output": source,
                "task_id": f"{problem['name']}_{kind}_{i}",
                "is_correct": kind == "correct",
                "metadata": {
                    "source": "code_contests",
                    "difficulty": problem["difficulty"],
                    "has_tests": has_tests,
                },
            }


def write_split(problems: Iterable[Dict[str, Any]], out_dir: Path, split: str) -> Tuple[Path, Path]:
    """Write `{split}.jsonl` and its v2 metadata (with `problem_id` and `problem_index_map`).

    Token lengths in the metadata are left empty: they depend on a tokenizer this step does not load.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, meta_path = out_dir / f"{split}.jsonl", out_dir / f"{split}_metadata.json"
    entries, index_map = [], {}
    with open(jsonl, "w", encoding="utf-8") as f:
        for problem in problems:
            pid = problem["name"]
            slot = index_map.setdefault(
                pid, {"difficulty": problem["difficulty"], "correct_indices": [], "incorrect_indices": []}
            )
            for record in problem_records(problem):
                slot["correct_indices" if record["is_correct"] else "incorrect_indices"].append(len(entries))
                entries.append(
                    {"is_correct": record["is_correct"], "difficulty": problem["difficulty"], "problem_id": pid}
                )
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n_correct = sum(e["is_correct"] for e in entries)
    stats = {
        "total": len(entries),
        "correct": n_correct,
        "incorrect": len(entries) - n_correct,
        "n_problems": len(index_map),
    }
    meta = {"metadata": entries, "problem_index_map": index_map, "stats": stats, "source_file": jsonl.name}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return jsonl, meta_path
