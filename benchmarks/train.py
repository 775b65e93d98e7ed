"""Training throughput on CPU: our recipe against torchtune's own `full_finetune_distributed`, without and with
packing, on the same tiny model, data and settings.

    python -m benchmarks train [--workdir DIR] [--n-samples N] [--repeats N] [--methods KEYS] [--nproc N]

Each method is a `torchrun --nproc_per_node NPROC` run of one epoch over the same samples of a synthetic split
(benchmarks/synthetic.py), on the demo's tiny model in the LLaMA-2 vocabulary, fp32, batch 1 row per process
(configs/tiny_cpu.yaml):

  stock          torchtune's recipe (benchmarks/stock_recipe.py) on our dataset, padded to the batch maximum
  ours           our recipe, the same
  stock-packed   torchtune's recipe on the same samples packed by torchtune's `PackedDataset` (in order)
  ours-packed    our recipe with `dataset.packed=true` (best fit)

Both recipes log through torchtune's DiskLogger with each line's wall-clock time, so both are timed alike: the
trained tokens (labels not masked) from the end of step 1 (lazy initializations) to the end, over that time. The
non-padding rate is that times the samples' ratio of all tokens to trained ones: each method sees each once.
"""

import json
import statistics
import subprocess
import time
from itertools import pairwise

import benchmarks as bench

HELP = "training throughput on CPU vs torchtune's full_finetune_distributed"
KEYS = ["stock", "ours", "stock-packed", "ours-packed"]
TINY_CONFIG, SPLIT_LINES = "configs/tiny_cpu.yaml", 20_000
LOGGER = "metric_logger._component_=benchmarks.train.timed_disk_logger"


def timed_disk_logger(**kwargs):
    """torchtune's DiskLogger, each line with its wall-clock time: both recipes' steps timed alike."""
    from torchtune.training.metric_logging import DiskLogger

    logger = DiskLogger(**kwargs)
    log_dict = logger.log_dict
    logger.log_dict = lambda payload, step: log_dict(dict(payload, wall=time.time()), step)
    return logger


def trained_rate(steps: list[dict[str, float]], nproc: int) -> float:
    """Trained tokens per second per process from the end of step 1 to the end of the last step."""
    if len(steps) < 3:
        raise SystemExit(f"{len(steps)} steps logged: raise --n-samples")
    tokens = sum(s["tokens_per_second_per_gpu"] * nproc * (s["wall"] - before["wall"]) for before, s in pairwise(steps))
    return tokens / (steps[-1]["wall"] - steps[0]["wall"]) / nproc


def token_ratio(tokenizer: str, data: str, n_samples: str) -> None:
    """Print all tokens over trained tokens of the drawn samples, and how many were kept."""
    from ref_tuning.data import codecontests_dataset
    from ref_tuning.models import sheared_llama_tokenizer

    ds = codecontests_dataset(sheared_llama_tokenizer(tokenizer), data, n_samples=int(n_samples), seed=0)
    samples = [ds[i] for i in range(len(ds))]
    trained = sum(sum(x != -100 for x in s["labels"][1:]) for s in samples)
    print(json.dumps([sum(len(s["tokens"]) for s in samples) / trained, len(samples)]))


def main(args) -> int:
    tokenizer, logs = bench.tokenizer_path(args.tokenizer), args.workdir / "logs"
    data, model = args.workdir / "data", args.workdir / "model"
    bench.make_split(data, SPLIT_LINES, tokenizer)
    bench.make_checkpoint(model, bench.TINY_DIMS, "float32")
    runs = {}
    for key in args.methods:
        out, packed = args.workdir / "runs" / key, str(key.endswith("packed")).lower()
        overrides = ["model.vocab_size=32000", f"tokenizer.path={tokenizer}", f"output_dir={out}"]
        overrides += [f"checkpointer.checkpoint_dir={model}", f"dataset.data_dir={data}", f"dataset.packed={packed}"]
        overrides += [f"dataset.n_samples={args.n_samples}", "dataset_val=null", "batch_size=1", "epochs=1", "seed=0"]
        overrides += ["save_every_n_steps=null", "lr_scheduler.num_warmup_steps=2", LOGGER]
        stock_config = out.with_suffix(".yaml")
        runs[key] = out, bench.recipe_command(key.split("-")[0], args.nproc, TINY_CONFIG, overrides, stock_config)
    rates, steps = {key: [] for key in runs}, {}
    for r in range(1, args.repeats + 1):
        for key, (out, cmd) in runs.items():
            bench.remove(out)
            bench.say(f"repeat {r}/{args.repeats}: {key} ...")
            wall, _, rc = bench.run_child(cmd, logs / f"{key}.log")
            if rc != 0:
                raise SystemExit(f"{key} failed (exit {rc}); last lines of its log:\n{bench.tail(logs / f'{key}.log')}")
            logged = bench.metric_steps(out)
            rates[key].append(trained_rate(logged, args.nproc))
            steps[key] = len(logged)
            bench.say(f"  {wall:.1f} s in all, {steps[key]} steps, {rates[key][-1]:.0f} trained tokens/s per process")
    cmd = bench.python_child("benchmarks.train", "token_ratio", tokenizer, data, args.n_samples)
    ratio, kept = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    median = {key: statistics.median(v) for key, v in rates.items()}
    print("## train benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir)))
    print(f"- data: {data}, synthetic, {SPLIT_LINES:,} lines; {args.n_samples} drawn, {kept} kept (<= 2048 tokens)")
    print(f"- the demo's tiny model in the LLaMA-2 vocabulary, fp32; {args.nproc} CPU processes, batch 1 row each;")
    print(f"  one epoch, {args.repeats} repeats, medians; all/trained tokens {ratio:.3f}\n")
    print("| method | steps | trained tokens/s per process | non-padding tokens/s per process | x stock, same layout |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key in runs:
        stock = median.get("stock-packed" if key.endswith("packed") else "stock")
        vs = f"{median[key] / stock:.2f}" if stock else "-"
        print(f"| {key} | {steps[key]} | {median[key]:.0f} | {median[key] * ratio:.0f} | {vs} |")
    return 0


def add_arguments(p) -> None:
    bench.add_tokenizer(p)
    p.add_argument("--n-samples", type=bench.positive, default=96, help="samples drawn (default 96)")
    p.add_argument("--repeats", type=bench.positive, default=3, help="runs of each method (default 3)")
    p.add_argument("--nproc", type=bench.positive, default=2, help="processes per run (default 2)")
