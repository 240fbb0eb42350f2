"""Every training method on one model, one prompt set and the same seeds: cost, rewards, and the oracles' truth.

The base model is measured once, in a subprocess of its own; then each method (and each training seed) trains
for ``--steps`` updates in a fresh subprocess of this script, so that its peak memory is its own, no state leaks
between methods, and no run is special. Before its timings and its memory baseline every run does its one-time
work: it encodes all the prompts (and, for SRP, the control prompts' text embeddings). Reported per method:

- the per-update wall time (median over the updates after the first, from timestamps taken after each update),
  and the first update's (the first graph build),
- peak memory (CUDA: ``torch.cuda.max_memory_allocated`` during training; CPU: the run's peak RSS) and its rise
  during training,
- the training reward curve (``history["reward"]``: each method's own training reward) and, for the methods with a
  hinge loss, the mean of the logged ``hinge_active*`` (the fraction of samples under ``hinge_threshold``: only
  those train; SRPO logs its denoise and inversion branches apart),
- before/after, on fixed evaluation noises independent of the training seed (one noise per prompt and evaluation
  seed, whatever the batching): the SRP score positive-vs-negative word and the plain reward of
  ``"{positive}. {prompt}"``, on the training and on HELD-OUT prompts (every 4th prompt is held out of training),
- on the toy world, the oracles the reward never sees: the positive word's fraction among images of unprompted
  content prompts, colour and shape accuracy, and a verdict per run (``hacking_flag``): ``hacking`` (the method's
  own evaluation reward rose while the targeted fraction did not), ``degraded: colour -0.22`` (colour or shape
  accuracy fell), else ``ok`` or ``reward flat/down``.

Every method optimises toward the same target: SRP methods with the positive word over the negative one (fixed
schedule); plain-reward methods with ``reward_template="{positive}. {prompt}"``. On the toy world every method
with a hinge loss (the srpo variants, direct-align, refl, draft-*) runs with ``hinge_threshold=10``, above the
range of every reward there (SRP scores about -0.1..0.3, the plain reward about 0.2..0.85), so that its loss is
-reward + const: the same objective shape for every method. (At the default 0.7 about a third of the plain
reward's samples sit above the threshold and train nothing, while every SRP score is under it.)

Time to target and the Pareto view of hacking (toy world): with ``--eval-every K`` every run is evaluated every K
updates (and after the last) on the same fixed evaluation noises, outside its training clock and its transformer
forward counts (every training run counts its transformer's forward calls, without gradient, with gradient and
re-run in backward, with a hook). The time to target of a run is the first evaluation at which the positive word's
oracle fraction is at least ``--target-fraction`` and colour accuracy at least ``--target-colour-accuracy`` (a
number, or relative to the base model: ``base+0.10``, ``base-0.03``, the defaults), in training seconds, updates
and transformer forwards; per method the mean and the median over the seeds, and their ratios to SRPO's (a run that
never reaches the target counts with its whole budget in the mean, which is then a lower bound, and as never in the
median). ``--sweep-learning-rates``
runs every method at more learning rates with the first seed: the Pareto view plots each evaluation's targeted gain
against its colour and shape accuracy loss and names, per level of gain, the method that loses least.

    python benchmarks/compare_methods.py                                  # all methods, toy world, 25 updates
    python benchmarks/compare_methods.py --methods srpo draft-full --steps 10 --seeds 0 1 2
    python benchmarks/compare_methods.py --methods srpo grpo draft-full --seeds 0 1 2 --eval-every 5 \
        --sweep-learning-rates 3e-4 3e-3                                  # time to target and the Pareto view
    python benchmarks/compare_methods.py --config benchmarks/compare_methods.yaml   # a real model on a GPU

Writes ``results.json`` (everything, histories and evaluations included), ``results.md`` (the tables),
``curves.png``, and with evaluations during training ``time_to_target.png``, on the toy world ``pareto.png``, to
``--output-dir``; the LoRA of every run under ``--runs-dir`` (default OUTPUT_DIR/runs). ``--report-from
RESULTS_JSON ...`` trains nothing: it writes the report of saved results (several merged: e.g. more seeds run
later) with this command's target.

The script is split in three modules beside it: ``compare_settings.py`` (variants, command line, config file),
``compare_runner.py`` (the child processes: evaluation, forward counts, timings; the parent's loop) and
``compare_report.py`` (verdicts, summary, tables, plots, time to target, Pareto view).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_report  # noqa: E402,F401
import compare_runner  # noqa: E402,F401
import compare_settings  # noqa: E402
from compare_report import (  # noqa: E402,F401
    ACCURACY_MARGIN,
    FRACTION_MARGIN,
    REWARD_MARGIN_STD,
    hacking_cell,
    hacking_flag,
    hacking_flag_of,
    hinge_cell,
    markdown_table,
    own_reward_key,
    pareto,
    summarise,
    time_ratios,
    time_to_target,
    train_reward_window,
    write_outputs,
)
from compare_runner import (  # noqa: E402,F401
    EXIT_LOAD_FAILED,
    EXIT_SETUP_FAILED,
    ForwardCounter,
    child_main,
    compare,
    evaluate,
    evaluation_images,
    load_model_and_reward,
    run_child,
    run_one,
    train_and_time,
)
from compare_settings import (  # noqa: E402,F401
    DEFAULT_LEARNING_RATE,
    METHOD_VARIANTS,
    PROG,
    SRP_METHODS,
    TOY_HINGE_THRESHOLD,
    UsageError,
    config_fields,
    parse_target,
    resolve_settings,
)


def build_parser():
    return compare_settings.build_parser(__doc__)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.run_one:
            return child_main(args.run_one)
        if args.report_from:
            return compare_report.report_from(*compare_settings.report_settings(args))
        settings = resolve_settings(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return compare(settings)


if __name__ == "__main__":
    raise SystemExit(main())
