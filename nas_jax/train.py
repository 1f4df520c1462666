r"""Train NAS / ALBEF: `python -m nas_jax.train --config configs/X.py[:arg] --workdir DIR [--config.a.b=v]`.

One readable story, in sections: logging → mesh → input → model and optimiser → sharded init
(resume / init_from) → the jitted step → loop (progress, metrics, checkpoints, preemption) →
evaluation. A run started in a workdir that has a checkpoint resumes from it, data order included
(from the newest checkpoint that reads completely: docs/RELIABILITY.md). SIGTERM / SIGINT finish
the current step, save, and exit cleanly. A non-finite loss stops the run (`nonfinite='stop'`,
nothing after the bad step is saved) or skips the update (`'skip'`, at most
`nonfinite_max_skips` in a row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import ml_collections
import numpy as np

from nas_jax import checkpoint as ckpt_lib
from nas_jax import compilation, config_lib, optim, run_plan, sharding, warm_start
from nas_jax.config_lib import ConfigError
from nas_jax.config_lib import load_config_file  # noqa: F401  (public: used by the notebook)
from nas_jax.metrics_writer import MetricWriter
from nas_jax import train_step as train_step_lib
from nas_jax.train_step import TokenIds

log = logging.getLogger("nas_jax.train")


# ============================================================================ helpers
class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step (a second SIGINT kills).

  Installed for the whole run: a SIGTERM during start-up (compilation, restore) is kept, so the
  run trains one step, saves it and exits cleanly. A SIGINT before the loop (`loop_started` False)
  still interrupts at once: a person pressing Ctrl-C during a two-minute compilation means it.
  """

  def __init__(self):
    self.requested: str | None = None
    self.loop_started = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. notebooks): no handler.
        pass
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and (self.requested or not self.loop_started):
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class NonFiniteLossError(FloatingPointError):
  """The loss was not finite (nonfinite='stop'), or too many updates in a row were skipped."""


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir`; a one-line ConfigError when it is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is a file, not a directory: pass a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir!r} cannot be written ({e.strerror or e}): pass a "
                      "directory you can write to") from None


class ProgressLog:
  """The loop's progress bar, metrics rows and throughput.

  The bar appears once the first step has completed, so its rate and ETA come from steady-state
  steps, not from start-up and compilation; the first row carries `startup_s` (from the start of
  `train()` to the end of the first step) instead of `samples_per_s`.
  """

  def __init__(self, writer: MetricWriter, *, plan: run_plan.RunPlan, start: int, batch_size: int,
               log_every: int, desc: str, t_start: float, enabled: bool):
    self.writer, self.plan, self.start = writer, plan, start
    self.batch_size, self.log_every, self.desc = batch_size, log_every, desc
    self.t_start, self.enabled = t_start, enabled
    self.bar = None
    self.clock = time.time
    self._t_last, self._n_last = None, start

  def step_done(self, step: int, metrics: dict, *, force_row: bool = False) -> None:
    """`step` (1-based) has completed with `metrics` (host values)."""
    now = self.clock()
    first = self._t_last is None
    row = dict(metrics)
    if first:
      row["startup_s"] = now - self.t_start
      log.info("first step done %.1fs after start (start-up and compilation)", now - self.t_start)
      self._t_last, self._n_last = now, step
      if self.enabled:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.plan.num_steps, initial=step - self.plan.first_step,
                        desc=self.desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    elif self.bar is not None:
      self.bar.update(step - self.plan.first_step - self.bar.n)
    if not (first or force_row or step % self.log_every == 0):
      return
    if not first:
      row["samples_per_s"] = (step - self._n_last) * self.batch_size / max(now - self._t_last, 1e-9)
      self._t_last, self._n_last = now, step
    self.writer.write(step, row)
    if self.bar is not None:
      rate = row.get("samples_per_s")
      self.bar.set_postfix(loss=f"{float(row['loss']):.3f}", itm_acc=f"{float(row['itm_acc']):.2f}",
                           **({"samples_s": f"{rate:.0f}"} if rate is not None else {}))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  interrupted: bool
  eval_metrics: dict


def hard_negative_groups(config: ml_collections.ConfigDict, mesh) -> int:
  """How many slices the batch is cut into for in-batch ITM negatives: one per device (ALBEF), or
  `itm.hard_negative_groups` (fixed, so results do not depend on the device count)."""
  shards = sharding.num_batch_shards(mesh)
  groups = config.itm.hard_negative_groups or shards
  if groups % shards or config.data.batch_size % groups:
    raise ConfigError(
        f"config.itm.hard_negative_groups={groups} must be a multiple of the {shards} data-parallel "
        f"devices and divide config.data.batch_size={config.data.batch_size} (0 = one per device)")
  return groups


def agree_on_stop(requested: str | None) -> str | None:
  """Multi-process: stop when any process was asked to. A signal can reach the hosts during
  different steps; all must leave the loop after the same one (and save together), or the others
  would wait forever in the next step's collectives."""
  from jax.experimental import multihost_utils
  votes = multihost_utils.process_allgather(np.int32(requested is not None))
  return requested or ("a stop request on another process" if np.any(votes) else None)


# ============================================================================ one run
def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          interrupt_after: int | None = None) -> RunResult:
  """One training run in `workdir` (resumed if it has a checkpoint).

  devices: the devices of the mesh (default all). interrupt_after: behave as if SIGTERM arrived
  after this many steps of this call (tests of exact resumption).
  """
  with PreemptionGuard() as guard:
    return _train(config, workdir, guard, devices=devices, interrupt_after=interrupt_after)


def _train(config: ml_collections.ConfigDict, workdir: str, guard: PreemptionGuard, *,
           devices=None, interrupt_after: int | None = None) -> RunResult:
  t_start = time.time()
  c = config
  config_lib.validate(c)
  is_main = jax.process_index() == 0
  prepare_workdir(workdir)
  cache_dir = compilation.use_workdir_cache(workdir, c.compilation_cache)
  if cache_dir:
    log.info("compilation cache: %s", cache_dir)

  # ---------------------------------------------------------------- mesh
  try:
    mesh = sharding.make_mesh(c.mesh, devices)
    sharding.check_batch_size(c.data.batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  log.info("%s", sharding.describe(mesh))

  # ---------------------------------------------------------------- input
  from nas_jax.data import pipeline
  from nas_jax.data.text import load_tokenizer
  tokenizer = load_tokenizer(c.data.vocab)
  if tokenizer.vocab_size > c.model.bert.vocab_size:
    raise ConfigError(f"the vocabulary {c.data.vocab!r} has {tokenizer.vocab_size} tokens but "
                      f"config.model.bert.vocab_size={c.model.bert.vocab_size}: make them agree")
  source = pipeline.make_source(c, "train")
  num_train = c.data.num_train_samples if c.data.num_train_samples > 0 else len(source)
  data_iter = pipeline.make_train_iterator(c, tokenizer, process_index=jax.process_index(),
                                           process_count=jax.process_count(), source=source)

  # ---------------------------------------------------------------- plan: steps and schedule
  saved_plan = run_plan.read_plan(workdir)  # A resumed run keeps the plan it started with...
  if saved_plan is None:
    continued = (warm_start.continued_plan(c.init_from)
                 if c.init_from and c.continue_schedule else (None, 0, ""))
    plan = run_plan.make_plan(c, num_train, *continued)
  else:                                      # ...unless its config now says otherwise.
    plan = run_plan.replan(saved_plan, c, num_train)
    if plan != saved_plan:
      log.warning("the config changes the plan of this run (%s in %s): training on the new plan",
                  ", ".join(run_plan.differences(saved_plan, plan)),
                  os.path.join(workdir, run_plan.PLAN_FILE))
  if is_main and plan != saved_plan:
    run_plan.write_plan(workdir, plan)
  log.info("plan: steps %d → %d of a schedule of %d (lr %.3g → %.3g, warm-up %d)%s",
           plan.first_step, plan.last_step, plan.schedule_steps, plan.lr, plan.min_lr,
           plan.warmup_steps, f", continuing {plan.continues}" if plan.continues else "")

  # ---------------------------------------------------------------- model, optimiser, step
  built = train_step_lib.setup(c, optim.plan_schedule(plan), token_ids=TokenIds.of(tokenizer),
                               num_groups=hard_negative_groups(c, mesh),
                               alpha_warmup_steps=plan.alpha_warmup_steps, mesh=mesh)
  model, abstract = built.model, built.abstract_state
  state_sh = jax.tree.map(lambda a: a.sharding, abstract)
  # The step compiles from shapes alone, in a thread, while the state is initialised or restored.
  step_compile = compilation.in_background(lambda: built.compile(pipeline.batch_spec(c)),
                                           name="compile-train-step")

  # ---------------------------------------------------------------- sharded init / resume
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=c.checkpoint.keep,
                                       async_save=c.checkpoint.async_save,
                                       snapshot=c.checkpoint.snapshot)
  with jax.set_mesh(mesh):
    if checkpointer.latest_step() is not None:
      state, start = checkpointer.restore(abstract, c, data_iter)
      beside = "restore"
      log.info("resumed from %s at step %d", checkpointer.directory, start)
    else:
      state = built.init(jax.random.PRNGKey(c.seed))
      beside = "initialisation"
      if c.init_from:
        state, notes = warm_start.warm_start(c, state, abstract)
        state = jax.device_put(state, state_sh)
        for note in notes:
          log.info("init_from %s", note)
      start = int(jax.device_get(state.step))
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("model: %.1fM parameters; %d steps of %d samples (%d per epoch); stage %d%s",
           n_params / 1e6, plan.num_steps, c.data.batch_size, num_train, c.stage,
           " (NVA)" if c.nva.enabled else "")
  compiled = step_compile.result()
  train_step = compiled.executable
  log.info("train step %s in %.1fs (beside the %s)", "loaded from the compilation cache"
           if compiled.from_cache else "compiled", compiled.seconds, beside)

  # ---------------------------------------------------------------- loop
  # Metrics of a step are fetched one step late (the host never waits on the step in flight),
  # except before a save, an evaluation or a stop: a checkpoint only ever holds a state whose loss
  # was checked (nonfinite='stop' saves nothing after a bad step).
  writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
  progress = ProgressLog(writer, plan=plan, start=start, batch_size=c.data.batch_size,
                         log_every=c.log_every, desc=f"stage {c.stage}", t_start=t_start,
                         enabled=is_main)
  skips = {"skipped_updates": int(checkpointer.restored_loop.get("skipped_updates", 0)),
           "consecutive_skips": int(checkpointer.restored_loop.get("consecutive_skips", 0))}
  interrupted = False
  pending = None  # (step index, metrics on device) not yet fetched.

  def report_saves(wait: bool = False) -> None:
    for done in checkpointer.poll_saves(wait=wait):
      writer.write(done.pop("step"), done)

  def nonfinite_error(what: str) -> NonFiniteLossError:
    checkpointer.wait()   # An async save in flight (of a checked state) completes first.
    report_saves()
    last = checkpointer.latest_step()
    where = (f"the newest complete checkpoint is step {last} in {checkpointer.directory} (a run "
             "in this workdir resumes from it)" if last is not None else
             "no checkpoint was saved yet (config.checkpoint.every)")
    hint = " or set --config.nonfinite=skip" if c.nonfinite == "stop" else ""
    return NonFiniteLossError(f"{what}; {where}. Lower config.optim.lr{hint}")

  def drain(pending, last: bool = False) -> None:
    """Fetches a finished step's metrics, logs them, and applies the non-finite policy."""
    done, m = pending
    m = jax.device_get(m)
    finite = bool(m.pop("finite"))
    if c.nonfinite == "skip":
      skips["consecutive_skips"] = 0 if finite else skips["consecutive_skips"] + 1
      skips["skipped_updates"] += int(not finite)
      m["skipped_updates"] = skips["skipped_updates"]
    progress.step_done(done + 1, m, force_row=last or not finite)
    report_saves()
    if finite:
      return
    msg = (f"loss is not finite at step {done + 1} (loss={float(m['loss'])}, "
           f"itc={float(m['loss_itc'])}, itm={float(m['loss_itm'])}, mlm={float(m['loss_mlm'])})")
    if c.nonfinite == "stop":
      raise nonfinite_error(msg)
    n = skips["consecutive_skips"]
    if n >= c.nonfinite_max_skips:
      raise nonfinite_error(f"{n} updates in a row were skipped, the last at step {done + 1} "
                            f"(config.nonfinite_max_skips={c.nonfinite_max_skips}): training "
                            "diverged")
    log.warning("%s: update skipped (%d in a row, %d in all)", msg, n, skips["skipped_updates"])

  redirect = contextlib.nullcontext()
  if is_main:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    redirect = logging_redirect_tqdm(tqdm_class=tqdm)   # Log lines print above the bar.
  log.info("training from step %d to %d", start, plan.last_step)
  try:
    guard.loop_started = True
    with redirect, jax.set_mesh(mesh):
      for step in range(start, plan.last_step):
        batch = sharding.host_to_global(next(data_iter), mesh)
        state, metrics = train_step(state, batch)
        if pending is not None:
          drain(pending)
        pending = (step, metrics)
        save_now = (c.checkpoint.every > 0 and (step + 1) % c.checkpoint.every == 0
                    and step + 1 < plan.last_step)
        eval_now = c.eval_every > 0 and (step + 1) % c.eval_every == 0 and step + 1 < plan.last_step
        if interrupt_after is not None and step + 1 - start >= interrupt_after:
          guard.requested = guard.requested or "interrupt_after"
        if jax.process_count() > 1:
          guard.requested = agree_on_stop(guard.requested)
        if save_now or eval_now or guard.requested:
          drain(pending)
          pending = None
        if save_now:
          checkpointer.save(step + 1, state, c, data_iter, loop=skips)
          report_saves()   # A synchronous save is complete here.
        if eval_now:
          run_evals(c, model, state, mesh, tokenizer, writer, step + 1, workdir, final=False)
        if guard.requested:
          log.warning("%s received: saving step %d and exiting", guard.requested, step + 1)
          interrupted = True
          break
      if pending is not None:
        drain(pending, last=True)
        pending = None
      progress.close()
      final_step = int(jax.device_get(state.step))
      if checkpointer.latest_step() != final_step:
        checkpointer.save(final_step, state, c, data_iter, force=True, loop=skips)
      report_saves(wait=True)
      eval_metrics = {}
      if not interrupted:
        eval_metrics = run_evals(c, model, state, mesh, tokenizer, writer, final_step, workdir,
                                 final=True)
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
    batch = metrics = None   # The last batch's shared memory (data workers) can now be freed.
    pipeline.close_iterator(data_iter)
  return RunResult(workdir=workdir, final_step=final_step, interrupted=interrupted,
                   eval_metrics=eval_metrics)


def run_evals(config, model, state, mesh, tokenizer, writer, step, workdir, *, final: bool) -> dict:
  """The benchmarks of `config.eval.benches` (default: the synthetic suite on synthetic data, none
  on real data; nas_jax/benchmarks/registry.py) on the current parameters: metrics with prefix
  eval/, <workdir>/eval.json and eval.md, and after the last step the tables on stdout."""
  if not config.eval.enabled:
    return {}
  from nas_jax.benchmarks import model_scorer, registry
  benches, options = registry.training_plan(config, tokenizer)
  if not benches:
    return {}
  params, batch_stats = state.params, state.batch_stats
  if jax.process_count() > 1:
    # The state's arrays span other hosts' devices; every process evaluates (the same numbers) on
    # its own devices, from a full host-local copy, under a mesh of those devices.
    import types
    from jax.experimental import multihost_utils
    params, batch_stats = multihost_utils.process_allgather((params, batch_stats), tiled=True)
    mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1), jax.local_devices())
  with jax.set_mesh(mesh):
    scorer = model_scorer.ModelScorer(
        model, params, batch_stats, tokenizer, image_size=config.model.vit.image_size,
        batch_size=config.eval.batch_size, max_tokens=config.eval.max_text_len, mesh=mesh,
        show_progress=False)
    results = []
    for bench in benches:
      results.append(registry.run(bench, scorer, options))
      scorer.clear_cache()
  metrics, table = registry.summary(results)
  writer.write(step, metrics, prefix="eval/")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": step, **metrics}, f, indent=2)
    with open(os.path.join(workdir, "eval.md"), "w") as f:
      f.write(table + "\n")
    if final:
      print(f"\nEvaluation after {step} steps ({workdir}):\n\n{table}\n", flush=True)
  return metrics


# ============================================================================ CLI
def stage2_config(config: ml_collections.ConfigDict, stage1_dir: str) -> ml_collections.ConfigDict:
  """The stage-2 continuation of a run with `config.stage2_steps > 0`: NVA on, from stage 1, on
  stage 1's schedule (`continue_schedule`). `config.stage2_lr > 0` instead restarts AdamW with a
  short warm-up to that peak (a departure from the paper's one schedule, for short demos)."""
  c2 = ml_collections.ConfigDict(config.to_dict())
  c2.stage = 2
  c2.nva.enabled = True
  c2.init_from = stage1_dir
  c2.total_steps = config.stage2_steps
  c2.stage2_steps = 0
  c2.continue_schedule = config.stage2_lr <= 0
  if config.stage2_lr > 0:
    c2.optim.lr = config.stage2_lr
    c2.optim.min_lr = min(config.optim.min_lr, config.stage2_lr)
    c2.optim.warmup_steps = min(config.optim.warmup_steps, max(config.stage2_steps // 10, 1))
    c2.itc.alpha_warmup_steps = 0
  c2.lock()
  return c2


def main(argv):
  del argv
  from absl import flags
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stdout, force=True)
  for noisy in ("absl", "jax._src", "orbax", "grain", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  sharding.initialize_distributed()
  try:
    prepare_workdir(workdir)
    if config.stage2_steps > 0:
      r1 = train(config, os.path.join(workdir, "stage1"))
      if not r1.interrupted:
        train(stage2_config(config, r1.workdir), os.path.join(workdir, "stage2"))
    else:
      train(config, workdir)
  except _user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that are the input's fault: the CLI prints their one-line message alone. Anything
  else is a bug and keeps its traceback."""
  from nas_jax.data.pipeline import DataErrorRateExceeded
  return (ConfigError, ckpt_lib.CheckpointError, ckpt_lib.IncompatibleCheckpointError,
          NonFiniteLossError, DataErrorRateExceeded, FileNotFoundError)


def check_overrides(argv: list[str]) -> None:
  """One-line errors for `--config.a.b=v` keys the config does not have (with a suggestion),
  before absl turns them into a traceback."""
  import difflib
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    spec = argv[argv.index("--config") + 1]
  if spec is None:
    return
  config = load_config_file(spec)
  flat = set(config_lib.flat_config(config))
  prefixes = {k.rsplit(".", i)[0] for k in flat for i in range(k.count(".") + 1)}
  for a in argv:
    if not a.startswith("--config.") or a.startswith("--config=="):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    if key not in flat and key not in prefixes:
      close = difflib.get_close_matches(key, sorted(flat), n=1, cutoff=0.5)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      parent = key.rsplit(".", 1)[0] if "." in key else ""
      siblings = sorted(k[len(parent) + 1:].split(".")[0] for k in flat if k.startswith(parent + "."))
      if parent and siblings:
        hint += f"; '{parent}' has: {', '.join(dict.fromkeys(siblings))}"
      raise ConfigError(f"unknown config key '{key}' in {a!r}{hint}; the keys are defined in "
                        "nas_jax/config_lib.py")


def cli():
  try:
    check_overrides(sys.argv[1:])
  except (ValueError, FileNotFoundError) as e:   # Only the config file is read here.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and evaluations go.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  cli()
