"""compare_methods.py's runner: one child process per run (the base model's measurement and every training run), and
the parent that starts them in order and hands the results to compare_report.

A training child encodes its prompts (and SRP's control prompts) before its clocks start, then trains with a hook
on the transformer that counts its forward calls (and the samples in them), apart by kind: without gradient
(rollouts, sampling, reference policies), with gradient, and re-run during backward by activation checkpointing
(DRaFT's per-step checkpoints; the blocks' own checkpointing inside one call is not a call). With ``eval_every`` it
evaluates every K updates and after the last on the fixed evaluation noises; the evaluations run outside the
training clock and the counts (their time is recorded apart), and the last one is the run's "after".
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from compare_settings import PROG

#: The script every child runs (``--run-one JOB``).
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_methods.py")

# Exit statuses of a child that failed before training: loading the model or reward (then every other run would
# fail the same way: the comparison stops), or building one method's trainer (that method's other runs are skipped).
EXIT_LOAD_FAILED = 3
EXIT_SETUP_FAILED = 4
FAILED_PHASES = {EXIT_LOAD_FAILED: "load", EXIT_SETUP_FAILED: "setup"}

#: Kinds of transformer forward calls the counter tells apart.
FORWARD_KINDS = ("no_grad", "grad", "recomputed")


class ChildFailure(Exception):
    """A child that failed before training: ``phase`` is "load" or "setup"; the cause is chained."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------- forward counts
class ForwardCounter:
    """Counts the forward calls of ``module`` (a forward pre-hook) and the samples in them, by kind: ``no_grad``
    (grad mode off), ``grad`` (grad mode on, outside backward) and ``recomputed`` (called during backward: an
    activation checkpoint's re-run). ``paused()`` leaves calls uncounted (the evaluations)."""

    def __init__(self, module):
        self.calls = dict.fromkeys(FORWARD_KINDS, 0)
        self.rows = dict.fromkeys(FORWARD_KINDS, 0)
        self._paused = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        import torch

        if self._paused:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rows = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.ndim else 1
        if not torch.is_grad_enabled():
            kind = "no_grad"
        elif torch._C._current_autograd_node() is not None:
            kind = "recomputed"
        else:
            kind = "grad"
        self.calls[kind] += 1
        self.rows[kind] += rows
        return None

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def snapshot(self) -> dict:
        """``{"calls": {kind: n}, "rows": {kind: n}}`` so far."""
        return {"calls": dict(self.calls), "rows": dict(self.rows)}

    def remove(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------------------------- one run (child)
def evaluation_images(trainer, prompts: list[str], seeds: list[int], batch_size: int):
    """Images of every prompt for every seed, ``[len(seeds) * len(prompts), 3, H, W]``, seed-major.

    Each seed draws the noise of all the prompts at once and batches slice it, so that every prompt gets its own
    noise whatever the batch size; with one batch this is ``trainer.generate_images(prompts, seed)``.
    """
    import torch

    size, device = trainer.config.resolution, trainer.accelerator.device
    images = []
    with torch.no_grad():
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            noise = trainer.adapter.make_noise(len(prompts), size, size, generator, device, trainer.weight_dtype)
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                latents = trainer.sample_latents(
                    noise[start : start + batch_size],
                    trainer.text_for(batch),
                    trainer.rollout_sigmas,
                    trainer.config.rollout_guidance,
                )
                images.append(trainer.adapter.decode(latents, size, size))
    return torch.cat(images)


def evaluate(trainer, base_reward, job: dict) -> dict:
    """The shared evaluation numbers of the trainer's current model, on the fixed evaluation noises."""
    import torch

    from diffusers_srpo.rewards import CLIPLikeReward, SemanticRelativeReward

    positive, negative = job["positive_word"], job["negative_word"]
    prompts = job["train_prompts"] + job["held_out_prompts"]
    seeds = job["evaluation_seeds"]
    held = torch.tensor([False] * len(job["train_prompts"]) + [True] * len(job["held_out_prompts"])).repeat(len(seeds))
    all_prompts = prompts * len(seeds)
    numbers: dict[str, float] = {}
    with torch.no_grad():
        images = evaluation_images(trainer, prompts, seeds, job["eval_batch_size"])
        templated = base_reward(images, [f"{positive}. {p}" for p in all_prompts]).float().cpu()
        numbers["reward_all"] = templated.mean().item()
        numbers["reward_all_std"] = templated.std().item() if len(templated) > 1 else 0.0
        numbers["reward_held_out"] = templated[held].mean().item()
        numbers["reward_train_prompts"] = templated[~held].mean().item()
        if isinstance(base_reward, CLIPLikeReward):
            srp = SemanticRelativeReward(base_reward, [positive], [negative], word_schedule="fixed")
            scores = srp(images, all_prompts, k=0.0).float().cpu()
            numbers["evaluation_srp"] = scores.mean().item()
            numbers["evaluation_srp_std"] = scores.std().item() if len(scores) > 1 else 0.0
            numbers["srp_held_out"] = scores[held].mean().item()
    if job["toy"]:
        numbers.update(toy_oracle_numbers(images.float(), all_prompts, held, positive))
    return numbers


def toy_oracle_numbers(images, prompts: list[str], held, positive: str) -> dict:
    from diffusers_srpo.toyworld.demo import oracle_numbers

    everything = oracle_numbers(images, prompts, positive)
    held_out = oracle_numbers(images[held], [p for p, h in zip(prompts, held.tolist(), strict=True) if h], positive)
    fraction = f"oracle_{positive}_fraction"
    return {
        "oracle_target_fraction": everything[fraction],
        "oracle_target_fraction_held_out": held_out[fraction],
        "oracle_colour_accuracy": everything["oracle_colour_accuracy"],
        "oracle_shape_accuracy": everything["oracle_shape_accuracy"],
    }


def load_model_and_reward(job: dict):
    import torch

    if job["toy"]:
        from diffusers_srpo.toyworld import load_reward
        from diffusers_srpo.toyworld.generator import load_pipeline

        return load_pipeline(), load_reward()
    from diffusers import FluxPipeline

    from diffusers_srpo.rewards import load_reward

    pipe = FluxPipeline.from_pretrained(job["model"], torch_dtype=getattr(torch, job["torch_dtype"]))
    return pipe, load_reward(job["reward"])


def do_one_time_work(trainer, job: dict) -> None:
    """What a run does once whatever its length, done before its timings and its memory baseline: encode every
    prompt (train() would, after the baseline) and, for SRP, every control prompt's text embedding (cached)."""
    import torch

    from diffusers_srpo.rewards import SemanticRelativeReward

    trainer.cache_prompt_embeddings(job["train_prompts"] + job["held_out_prompts"])
    srp = trainer.reward
    if isinstance(srp, SemanticRelativeReward):
        cycle = 1 if srp.word_schedule == "fixed" else max(len(srp.positive_words), len(srp.negative_words))
        with torch.no_grad(), trainer.accelerator.autocast():  # the cache keys on the autocast setting
            for step in range(cycle):
                positive, negative = srp.control_prompts(job["train_prompts"], step)
                srp.encode_text_cached(positive + negative)


def train_and_time(trainer, job: dict, base_reward=None) -> dict:
    """Train, with the clocks, the forward counts and (``job["eval_every"]``) the evaluations during training.

    Training time is wall time since the start of ``train()`` less the evaluations' time. Each evaluation records
    the update after which it ran, the training time and the forward counts at that point, its numbers and its
    own duration.
    """
    import torch

    device = trainer.accelerator.device
    eval_every = job.get("eval_every", 0)
    steps = trainer.config.max_train_steps

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    counter = ForwardCounter(trainer.accelerator.unwrap_model(trainer.model))
    train_times: list[float] = []  # training seconds (evaluations excluded) at the end of each update
    forwards: list[dict] = []  # the counts at the end of each update
    evaluations: list[dict] = []
    clock = {"eval_s": 0.0}

    def on_update(trainer, logs):
        sync()
        now = time.perf_counter()
        train_times.append(now - train_start - clock["eval_s"])
        forwards.append(counter.snapshot())
        step = trainer.global_step
        if eval_every and (step % eval_every == 0 or step == steps):
            with counter.paused():
                numbers = evaluate(trainer, base_reward, job)
            sync()
            took = time.perf_counter() - now
            clock["eval_s"] += took
            evaluations.append(
                {
                    "update": step,
                    "train_s": train_times[-1],
                    "forwards": forwards[-1],
                    "numbers": numbers,
                    "eval_s": took,
                }
            )

    result: dict = {"rss_before_train_mib": _peak_rss_mib()}
    memory_before_train = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory_before_train = torch.cuda.memory_allocated(device) / 2**20
    sync()
    train_start = time.perf_counter()
    try:
        history = trainer.train(on_update=on_update)
    finally:
        counter.remove()
    result["train_s"] = time.perf_counter() - train_start - clock["eval_s"]
    result["eval_s"] = clock["eval_s"]
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_memory_kind"] = "cuda max_memory_allocated"
        result["train_memory_mib"] = result["peak_memory_mib"] - memory_before_train
    else:
        result["peak_memory_mib"] = _peak_rss_mib()
        result["peak_memory_kind"] = "peak RSS of the process"
        result["train_memory_mib"] = result["peak_memory_mib"] - result["rss_before_train_mib"]
    deltas = [b - a for a, b in zip(train_times, train_times[1:], strict=False)]
    result["first_update_s"] = train_times[0]  # includes the first graph build
    result["update_s"] = statistics.median(deltas) if deltas else result["first_update_s"]
    result["update_times_s"] = deltas
    result["train_times_s"] = train_times
    result["forwards"] = forwards[-1]
    result["forwards_per_update"] = {
        part: {kind: count / len(forwards) for kind, count in counts.items()} for part, counts in forwards[-1].items()
    }
    result["evaluations"] = evaluations
    result["history"] = history
    return result


def run_one(job: dict) -> dict:
    """A child's job: ``kind`` "before" measures the base model; "train" trains, times and measures one run."""
    import torch

    torch.set_num_threads(job["threads"])
    from diffusers_srpo.trainers import trainer_class_for

    started = time.perf_counter()
    try:
        pipe, reward = load_model_and_reward(job)
    except Exception as error:
        raise ChildFailure("load") from error
    try:
        cls = trainer_class_for(job["method"])
        config = cls.config_class.from_dict({"method": job["method"], **job["fields"]})
        trainer = cls(pipe, reward=reward, prompts=job["train_prompts"], config=config)
    except Exception as error:
        raise ChildFailure("setup") from error
    result: dict = {"device": str(trainer.accelerator.device), "load_s": time.perf_counter() - started}
    if job["kind"] == "before":
        before_start = time.perf_counter()
        result["before"] = evaluate(trainer, reward, job)
        result["eval_s"] = time.perf_counter() - before_start
        return result
    do_one_time_work(trainer, job)
    result.update(train_and_time(trainer, job, reward))
    if result["evaluations"]:
        result["after"] = result["evaluations"][-1]["numbers"]  # evaluated after the last update
    else:
        result["after"] = evaluate(trainer, reward, job)
    return result


def child_main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    try:
        result = run_one(job)
    except ChildFailure as failure:
        cause = failure.__cause__
        traceback.print_exception(cause)
        message = (str(cause).strip().splitlines() or [""])[0]
        print(f"{failure.phase} failed: {type(cause).__name__}: {message}", file=sys.stderr)
        return EXIT_LOAD_FAILED if failure.phase == "load" else EXIT_SETUP_FAILED
    with open(job_path.replace(".job.json", ".result.json"), "w") as f:
        json.dump(result, f)
    return 0


# ----------------------------------------------------------------------------------------------- the comparison
SHARED_JOB_KEYS = (
    "model", "torch_dtype", "reward", "toy", "positive_word", "negative_word", "train_prompts", "held_out_prompts",
    "evaluation_seeds", "eval_batch_size", "eval_every", "threads",
)  # fmt: skip


def run_child(job: dict, workdir: str) -> dict:
    job_path = os.path.join(workdir, f"{job['run_id']}-{job['kind']}.job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, SCRIPT, "--run-one", job_path], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    result_path = job_path.replace(".job.json", ".result.json")
    if proc.returncode != 0 or not os.path.isfile(result_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {
            "error": tail[-1] if tail else f"exit {proc.returncode}",
            "phase": FAILED_PHASES.get(proc.returncode, "run"),
            "stderr_tail": "\n".join(tail[-30:]),
            "wall_s": wall,
        }
    with open(result_path) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result


def measure_before(settings: dict, workdir: str) -> dict:
    """The base model's numbers, in a child of their own: with the first method whose trainer sets up (its LoRA
    starts as the identity, so any method's trainer samples the base model)."""
    result: dict = {}
    for name in dict.fromkeys(run["name"] for run in settings["runs"]):
        run = next(r for r in settings["runs"] if r["name"] == name)
        fields = {**run["fields"], "output_dir": os.path.join(workdir, "before")}
        job = {**{k: settings[k] for k in SHARED_JOB_KEYS}, **run, "fields": fields, "kind": "before"}
        result = run_child(job, workdir)
        if result.get("phase") != "setup":
            break
    return result


def train_all(settings: dict, workdir: str) -> dict[str, list[dict]]:
    """Every run, one child each; results by row label. A child that fails to load the model or reward stops the
    comparison (the others would fail the same way); one that fails to set up its trainer skips the other runs of
    its method."""
    results: dict[str, list[dict]] = {label: [] for label in settings["rows"]}
    stopped = None
    skipped: dict[str, str] = {}
    for run in settings["runs"]:
        name, label, seed = run["name"], run["label"], run["seed"]
        if stopped or name in skipped:
            result = {"error": f"not run: {stopped or skipped[name]}", "phase": "skipped"}
        else:
            result = run_child({**{k: settings[k] for k in SHARED_JOB_KEYS}, **run, "kind": "train"}, workdir)
        result.update(method=run["method"], seed=seed, learning_rate=run["learning_rate"])
        if result.get("phase") == "load":
            stopped = f"{label} seed {seed} failed to load the model or reward"
            print(f"{label} seed {seed}: FAILED while loading: {result['error']}; stopping", file=sys.stderr)
        elif result.get("phase") == "setup":
            skipped[name] = f"{label} seed {seed} failed to set up its trainer"
            print(f"{label} seed {seed}: FAILED to set up its trainer: {result['error']}", file=sys.stderr)
        elif "error" in result:
            if result.get("phase") != "skipped":
                print(f"{label} seed {seed}: FAILED: {result['error']}", file=sys.stderr)
        else:
            print(
                f"{label:>24} seed {seed}: {result['update_s']:.3f} s/update, "
                f"{result['peak_memory_mib']:.0f} MiB, run {result['wall_s']:.1f} s",
                flush=True,
            )
        results[label].append(result)
    return results


def compare(settings: dict) -> int:
    import compare_report

    started = time.perf_counter()
    os.makedirs(settings["output_dir"], exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as workdir:
        before_run = measure_before(settings, workdir)
        if "error" in before_run:
            print(before_run.get("stderr_tail", ""), file=sys.stderr)
            print(f"{PROG}: measuring the base model failed: {before_run['error']}", file=sys.stderr)
            return 1
        print(f"{'before (base model)':>24}: measured in {before_run['wall_s']:.1f} s", flush=True)
        results = train_all(settings, workdir)
    compare_report.write_outputs(settings, before_run, results, started)
    return 1 if any("error" in r for rs in results.values() for r in rs) else 0
