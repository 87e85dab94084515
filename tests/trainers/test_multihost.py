"""Several processes on one CPU host (jax.distributed over localhost, gloo collectives), through the training CLI:
two processes of 2 devices train like one process of 4 (same mesh, same global batches, same losses), each reads
its own records, and checkpoints move between the two layouts with their data position.

Every run is a subprocess of `tests/trainers/multihost_worker.py` (the real CLI plus recorders of what was read);
a run that fails or outlives its deadline has all its processes killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from maxtext.assets.data.build_tiny_tokenizer import DATA_DIR, TINY_TOKENIZER_DIR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = 4
DEADLINE_S = 300  # per launch; an idle 2-core machine needs a fraction of it
COMMON = [
    "src/maxtext/configs/base.yml", "dataset_type=grain", f"grain_train_files={os.path.join(DATA_DIR, 'corpus.jsonl')}",
    f"tokenizer_path={TINY_TOKENIZER_DIR}", "per_device_batch_size=1", "max_target_length=32", "steps=3",
    "base_num_decoder_layers=4", "mtp_num_layers=0", "dtype=float32", "remat_policy=none", "enable_tensorboard=false",
    "checkpoint_period=2", "jax_distributed_initialization_timeout=60",
]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The same mesh {data: 2, fsdp: 2} and the same two data shards, within one process or across two.
LAYOUT = {1: ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "data_shards=2"], 2: ["dcn_data_parallelism=2"]}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# gloo (JAX's CPU collectives) gives up when a peer is 30 s late to a collective (fixed in XLA); a CPU-starved
# machine can delay one process that long. Such a run is repeated once; any other failure fails at once.
GLOO_TIMEOUT = ("Gloo context initialization failed", "Gloo all-reduce failed", "Gloo AllGather failed")


def _run_processes(num_processes: int, output, run_name: str, args: list[str], env: dict) -> tuple[list[int], list]:
  """Start the processes, wait for all (or the first failure, or the deadline), kill what is left."""
  procs, logs = [], []
  for i in range(num_processes):
    logs.append(open(output / f"{run_name}-{i}.log", "w"))  # noqa: SIM115 - closed below
    rank = [f"num_processes={num_processes}", f"process_id={i}"] if num_processes > 1 else []
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.trainers.multihost_worker",
                                   str(output / f"{run_name}-{i}.json"), *args, *rank], cwd=REPO, env=env,
                                  stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
  deadline = time.monotonic() + DEADLINE_S
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for log in logs:
      log.close()
  return [p.returncode for p in procs], [(output / f"{run_name}-{i}.log").read_text() for i in range(num_processes)]


def launch(num_processes: int, output, run_name: str, cache_dir, resume_from: tuple[str, int] | None = None
           ) -> list[dict]:
  """Train `run_name` under `output` with `num_processes` processes of DEVICES / num_processes devices each
  (starting from run `resume_from[0]`'s step `resume_from[1]` alone); returns each process's record
  (multihost_worker.py), in process order."""
  # Compiled programs are cached across runs (process 0 writes the entries, every process reads them). Every run
  # compiles with XLA's cheap CPU backend settings: the comparisons are between runs built alike, and these tiny
  # programs spend far longer compiling than running.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // num_processes} {FAST_COMPILE}"}
  for attempt in range(2):
    shutil.rmtree(output / run_name, ignore_errors=True)
    if resume_from:
      source, step = resume_from
      shutil.copytree(output / source / "checkpoints" / str(step), output / run_name / "checkpoints" / str(step))
    args = [*COMMON, *LAYOUT[num_processes], f"base_output_directory={output}", f"run_name={run_name}"]
    if num_processes > 1:
      args.append(f"coordinator_address=localhost:{_free_port()}")
    codes, logs = _run_processes(num_processes, output, run_name, args, env)
    if all(code == 0 for code in codes):
      return [json.load(open(output / f"{run_name}-{i}.json")) for i in range(num_processes)]
    if attempt or not any(marker in log for log in logs for marker in GLOO_TIMEOUT):
      break
  pytest.fail(f"{run_name}: exit codes {codes}\n" + "\n----\n".join(log[-1500:] for log in logs))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two processes and one process, each training 3 steps from scratch (checkpoints at steps 2 and 3)."""
  output, cache = tmp_path_factory.mktemp("multihost"), tmp_path_factory.mktemp("jax_cache")
  return output, cache, {"two": launch(2, output, "two", cache), "one": launch(1, output, "one", cache)}


def test_two_processes_train_like_one_process(runs):
  _, _, by = runs
  two, (one,) = by["two"], by["one"]
  assert [r["process"] for r in two] == [0, 1] and one["steps"] == [1, 2, 3]
  assert two[0]["steps"] == [1, 2, 3] and two[1]["steps"] == [1, 2, 3]
  # the same program on the same devices: the float32 losses agree to the bit (seen), not only closely
  assert two[0]["losses"] == one["losses"]
  assert two[0]["losses"] == two[1]["losses"]  # both processes see the same global loss
  output = runs[0]
  logs = [(output / f"two-{i}.log").read_text() for i in range(2)]
  assert logs[0].count("step [") == 3 and "step [" not in logs[1]  # only process 0 prints the metrics


def test_each_process_reads_its_own_records_and_together_the_whole_batch(runs):
  _, _, by = runs
  two, (one,) = by["two"], by["one"]
  first, second = set(two[0]["records"]), set(two[1]["records"])
  assert first and second and not first & second, "the two processes read a record in common"
  assert first | second <= set(one["records"])
  for step in range(3):  # process 0 holds rows 0-1 of each global batch, process 1 rows 2-3
    rows = np.array(two[0]["inputs"][step] + two[1]["inputs"][step])
    np.testing.assert_array_equal(rows, np.array(one["inputs"][step]))
    assert not {tuple(r) for r in two[0]["inputs"][step]} & {tuple(r) for r in two[1]["inputs"][step]}


def test_checkpoint_of_two_processes_resumes_in_one_and_the_reverse(runs):
  output, cache, by = runs
  # the two processes wrote one model record and one data position per process
  step_dir = output / "two" / "checkpoints" / "2"
  states = sorted(name for name in os.listdir(step_dir / "data_iterator") if name.endswith(".json"))
  assert states == ["process_0-of-2.json", "process_1-of-2.json"]
  assert (step_dir / "maxtext_model.json").is_file()
  (two_to_one,) = launch(1, output, "two_to_one", cache, resume_from=("two", 2))
  one_to_two = launch(2, output, "one_to_two", cache, resume_from=("one", 2))
  # step 3 from restored parameters, optimizer state (checked against the record's fingerprints) and data position
  assert two_to_one["steps"] == [3] and one_to_two[0]["steps"] == [3]
  assert two_to_one["losses"] == by["two"][0]["losses"][2:]
  assert one_to_two[0]["losses"] == by["one"][0]["losses"][2:]
  np.testing.assert_array_equal(two_to_one["inputs"][0], by["one"][0]["inputs"][2])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_processes": 3, "process_id": 0, "dcn_data_parallelism": 2},
         "3 processes do not match the DCN mesh axes (dcn_data_parallelism=2: 2 in all): make the dcn_*_parallelism"
         " keys multiply to 3 (e.g. dcn_data_parallelism=3 or -1), or launch 2 process(es)"),
        ({"num_processes": 2, "process_id": 0}, "(every dcn_*_parallelism is 1: 1 in all)"),
        ({"num_processes": 3, "process_id": 0, "dcn_data_parallelism": -1, "dcn_fsdp_parallelism": 2},
         "3 processes cannot split over the DCN mesh axes (dcn_data_parallelism=-1, dcn_fsdp_parallelism=2): the"
         " fixed dcn_*_parallelism keys multiply to 2, which does not divide 3"),
        ({"num_processes": 2, "dcn_data_parallelism": 2}, "missing: process_id"),
        ({"num_processes": 2, "process_id": 2, "dcn_data_parallelism": 2}, "'process_id' (2) must be in 0..1"),
    ],
)
def test_a_process_layout_that_does_not_fit_is_one_line_before_connecting(overrides, message):
  from maxtext.configs import ConfigError, load_config
  from maxtext.utils import distributed

  config = load_config(overrides={"coordinator_address": "localhost:1", **overrides})
  with pytest.raises(ConfigError) as error:
    distributed.initialize(config)  # a coordinator at port 1 would never answer: the check comes first
  assert message in str(error.value) and "\n" not in str(error.value)


def test_a_data_position_saved_before_data_shards_resumes(tmp_path):
  """Checkpoints written before data shards hold one bare grain state per process (process i read shard i)."""
  from etils import epath

  from maxtext.configs import load_config
  from maxtext.input_pipeline import make_train_iterator
  from maxtext.trainers.checkpointing import DataIteratorHandler, DataIteratorRestore

  config = load_config(overrides={"dataset_type": "grain", "grain_train_files": os.path.join(DATA_DIR, "corpus.jsonl"),
                                  "tokenizer_path": TINY_TOKENIZER_DIR, "max_target_length": 32})
  iterator = make_train_iterator(config, 2)
  for _ in range(3):
    next(iterator)
  (bare,) = iterator.get_state()["shards"].values()
  (tmp_path / "process_0-of-1.json").write_text(json.dumps(bare))
  expected = next(iterator)
  resumed = DataIteratorHandler().restore(epath.Path(tmp_path), DataIteratorRestore(make_train_iterator(config, 2)))
  np.testing.assert_array_equal(next(resumed)["inputs"], expected["inputs"])


def test_rl_launched_as_two_processes_stops_in_one_line():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  address = f"coordinator_address=localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "maxtext.trainers.post_train.rl", "src/maxtext/configs/base.yml",
                             "dcn_data_parallelism=2", address, "num_processes=2", f"process_id={i}",
                             "jax_distributed_initialization_timeout=60"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True) for i in range(2)]
  try:
    errors = [p.communicate(timeout=DEADLINE_S)[1].strip().splitlines()[-1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  assert [p.returncode for p in procs] == [2, 2]
  assert all(e.startswith("error: RL runs as one process for now") and "2 processes were launched" in e for e in errors)
