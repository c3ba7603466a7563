"""docs/sweeps.md, "Your cluster": the launcher profile, the dry run's sbatch script and GPU-hours,
the GPU flags beside the resource rule, and ``kbit-download`` (plan and download patterns).

The profile is the one the docs ship (docs/cluster/hydra/launcher/*.yaml), composed as
``kbit-run --config-dir docs/cluster hydra/launcher=mycluster`` composes it. Hub metadata is
faked by a local HF cache (the layout huggingface_hub writes); nothing here needs the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from zoo_fixtures import corpus_for_tests, nano_zoo  # noqa: F401  (the session fixture)

from harness.cluster import download as dl
from harness.cluster import jobs as packed
from harness.cluster.launcher import JobSpec
from harness.cluster.resources import ResourceConf, check_resource_conf, resources_for

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "docs" / "cluster"
BIN = Path(sys.executable).parent
GIB = 2**30


def _compose(*overrides: str, search: Path = PROFILES):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.run.execute import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"hydra.searchpath=[file://{search}]", *overrides],
            return_hydra_config=True,
        )


# ----------------------------------------------------------------------------- the profile
def test_cluster_profile_composes_on_top_of_the_slurm_launcher():
    cfg = _compose("+sweeps@_global_=paper", "hydra/launcher=mycluster")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.kbit_launcher.PackedSlurmLauncher"
    # set by the profile
    assert (launcher.partition, launcher.account, launcher.qos) == ("gpu", "my-lab", "normal")
    assert any(".venv/bin/activate" in line for line in launcher.setup)
    assert any(line.startswith("export HF_HUB_OFFLINE=1") for line in launcher.setup)
    # inherited from conf/hydra/launcher/slurm.yaml (the profile does not set them)
    slurm_yaml = (ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert "wait: false" in slurm_yaml and launcher.wait is False
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 90
    assert list(launcher.srun_args) == []
    # the paper sweep's rule is untouched by the profile
    assert cfg.hydra.sweeper.resources.gpu_memory_gb == 80
    # the container profile extends the first one
    box = _compose("hydra/launcher=mycluster_apptainer").hydra.launcher
    assert box.partition == "gpu" and box.account == "my-lab"
    assert list(box.srun_args)[:3] == ["apptainer", "exec", "--nv"]
    assert str(box.srun_args[-1]).endswith(".sif")


def test_srun_args_is_a_typed_launcher_setting():
    """hydra-submitit-launcher's schema has no srun_args; kbit's does, typed (a list)."""
    from hydra.errors import ConfigCompositionException

    cfg = _compose("hydra/launcher=slurm", 'hydra.launcher.srun_args=["--cpu-bind=none"]')
    assert list(cfg.hydra.launcher.srun_args) == ["--cpu-bind=none"]
    with pytest.raises(ConfigCompositionException, match="srun_args"):
        _compose("hydra/launcher=slurm", "hydra.launcher.srun_args=5")  # not a list


def test_a_misspelled_profile_key_is_refused_naming_it(tmp_path):
    from hydra.errors import ConfigCompositionException

    from harness.config.refusals import input_error_line

    folder = tmp_path / "hydra" / "launcher"
    folder.mkdir(parents=True)
    (folder / "typo.yaml").write_text("defaults:\n  - slurm\n  - _self_\nacount: my-lab\n")
    with pytest.raises(ConfigCompositionException) as err:
        _compose("hydra/launcher=typo", search=tmp_path)
    line = input_error_line(err.value)
    assert line.startswith("hydra/launcher/typo.yaml: hydra.launcher.acount is not a setting")
    assert "did you mean 'account'" in line


def _zoo_env(zoo_dir: Path) -> dict[str, str]:
    """The environment a subprocess needs to find the ``nano_zoo`` fixture's build: its zoo
    folder and the corpus it was built from (part of the family's fingerprint)."""
    env = {**os.environ, "KBIT_ZOO_DIR": str(zoo_dir)}
    corpus = corpus_for_tests()
    if corpus is None:
        env.pop("KBIT_CORPUS_DIR", None)
    else:
        env["KBIT_CORPUS_DIR"] = corpus
    return env


def _script(text: str) -> str:
    """The sbatch script the dry run printed (from #!/bin/bash to the srun line)."""
    match = re.search(r"^#!/bin/bash\n.*?submitit\.core\._submit [^\n]+", text, re.S | re.M)
    assert match, text[-3000:]
    return match.group(0)


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's Slurm executor needs srun")
def test_dry_run_through_the_profile_prints_the_sbatch_script_and_gpu_hours(
    nano_zoo,  # noqa: F811
    data_root,
    tmp_path,
):
    zoo_dir = nano_zoo["l2d64"].parent.parent
    results = tmp_path / "results"
    env = {**_zoo_env(zoo_dir), "KBIT_DATA_ROOT": str(data_root),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [
        str(BIN / "kbit-run"), "--config-dir", str(PROFILES), "--multirun",
        "model=zoo:nano/l2d64", "bits=3,4,5", "dtype=int", "eval=zoo", f"results_dir={results}",
        "sweep=cluster", "hydra/launcher=mycluster_apptainer", "hydra.launcher.partition=debug",
        "hydra.launcher.account=null", "hydra.launcher.qos=null", "hydra.sweeper.dry_run=true",
        "hydra.sweeper.resources={gpu_memory_gb: 80, cpus_per_gpu: 1, min_mem_gb: 1}",
        "hydra.sweeper.jobs.cells_per_job=1",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert not results.exists() or not any(results.rglob("*")), "a dry run writes nothing"

    label = re.search(r"^  - (\d+) GPU, (\d+) GB, (\d+) CPU, (\d+)h(\d\d): (\d+) jobs", text, re.M)
    assert label, text[-3000:]
    gpus, mem, cpus, hours, minutes, n_jobs = (int(g) for g in label.groups())
    assert (gpus, n_jobs) == (1, 3)
    script = _script(text)
    flags = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", script, re.M))
    # the script asks for exactly what the plan's class line says
    assert flags["gpus-per-node"] == str(gpus) and flags["mem"] == f"{mem}GB"
    assert flags["cpus-per-task"] == str(cpus) and flags["time"] == str(hours * 60 + minutes)
    assert flags["partition"] == "debug" and "account" not in flags
    assert flags["array"] == "0-2%3"  # 3 jobs, one array (array_parallelism 32 > 3)
    setup = script.split("# setup\n", 1)[1].split("\n\n# command", 1)[0].splitlines()
    assert setup == ["export HF_HOME=/shared/$USER/hf", "export HF_HUB_OFFLINE=1"]
    srun = script.splitlines()[-1]
    assert re.match(r"srun --unbuffered --output \S+ --error \S+ apptainer exec --nv --bind "
                    r"/shared /shared/containers/kbit\.sif \S*python\S* -u -m "
                    r"submitit\.core\._submit \S+$", srun), srun  # fmt: skip

    total = re.search(r"total: (\d+) jobs, (\d+) cells, ~([\d.]+) job-hours, ~([\d.]+) "
                      r"GPU-hours expected .*?; ([\d.]+) GPU-hours at the time limits", text)  # fmt: skip
    assert total, text[-3000:]
    assert (int(total.group(1)), int(total.group(2))) == (3, 3)
    job_hours, expected, reserved = (float(total.group(i)) for i in (3, 4, 5))
    assert expected == pytest.approx(job_hours * gpus, abs=0.01)
    assert reserved == pytest.approx(n_jobs * (hours + minutes / 60) * gpus, abs=0.01)

    from harness.cluster import slurm

    if slurm.is_up():  # the scheduler itself accepts the script (this node has no GPUs)
        path = tmp_path / "job.sh"
        path.write_text("\n".join(x for x in script.splitlines() if "gpus-per-node" not in x))
        test = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert test.returncode == 0, test.stderr


# ----------------------------------------------------------------------------- GPU-hours, flags
def _spec(minutes: float, gpus: int | str | None, limit: int, cells: int = 2) -> JobSpec:
    return JobSpec(
        cells=[[f"bits={b}"] for b in range(cells)], claims=[], minutes=minutes, model="m",
        resources={"gpus_per_node": gpus, "timeout_min": limit, "mem_gb": 16, "cpus_per_task": 8},
        label=f"{gpus} GPU",
    )  # fmt: skip


def test_plan_total_line_sums_gpu_hours_over_jobs():
    launcher = SimpleNamespace(params={"gpus_per_node": None, "timeout_min": 60, "nodes": 1})
    specs = [_spec(90, 2, 180), _spec(30, 2, 180), _spec(60, "a100:4", 120, cells=3),
             _spec(45, None, 60)]  # fmt: skip
    text = packed.describe_jobs(specs, launcher)
    total = text.splitlines()[-1]
    # by hand: job-hours 1.5 + 0.5 + 1 + 0.75; GPU-hours 1.5*2 + 0.5*2 + 1*4 + 0; limits 3*2 + 3*2
    # + 2*4 + 0
    assert total.startswith("  total: 4 jobs, 9 cells, ~3.8 job-hours, ~8.0 GPU-hours expected")
    assert "20.0 GPU-hours at the time limits" in total
    assert packed.job_gpus({"gres": "gpu:h100:2", "nodes": 2}) == 4
    assert packed.job_gpus({"gpus_per_task": 1, "tasks_per_node": 4}) == 4
    assert packed.job_gpus({"gres": "shard:2"}) == 0


def test_gpu_flags_beside_the_resource_rule_are_refused():
    settings = packed.check_settings(None, {"gpu_memory_gb": 80})

    def launcher(**params):
        return SimpleNamespace(params={"gpus_per_node": None, "gres": None, **params})

    problem = packed.gpu_flags_problem(settings, launcher(gres="gpu:a100:1"))
    assert problem.startswith("hydra.launcher.gres='gpu:a100:1' asks for GPUs beside")
    assert "gpu_type" in problem and "hydra.sweeper.resources=null" in problem
    assert "gpus_per_task" in packed.gpu_flags_problem(settings, launcher(gpus_per_task=1))
    assert packed.gpu_flags_problem(settings, launcher(gpus_per_node=1)) is None  # rule wins
    assert packed.gpu_flags_problem(settings, launcher(gres="tmpdisk:100")) is None
    cpu = packed.check_settings(None, {"device": "cpu"})
    assert packed.gpu_flags_problem(cpu, launcher(gres="gpu:1")) is None
    assert (
        packed.gpu_flags_problem(packed.check_settings(None, None), launcher(gres="gpu:1")) is None
    )


def test_gpu_type_makes_typed_gpu_requests():
    conf = ResourceConf(gpu_type="a100")
    # 70e9 parameters x 2 bytes = 130.4 GiB; x 1.3 headroom = 169.5 GiB -> 3 GPUs of 80 GiB
    res = resources_for("big", 70_000_000_000, "bfloat16", conf, job_minutes=60)
    assert res.launcher_params()["gpus_per_node"] == "a100:3"
    assert packed.job_gpus(res.launcher_params()) == 3
    assert resources_for("cpu", 10**8, "float32", ResourceConf(device="cpu", gpu_type="a100"),
                         job_minutes=5).launcher_params()["gpus_per_node"] is None  # fmt: skip
    with pytest.raises(ValueError, match=r"gpu_type='a100 80gb': allowed: null or a GPU type"):
        check_resource_conf({"gpu_type": "a100 80gb"})


# ----------------------------------------------------------------------------- kbit-download
def _fake_hub_entry(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """``files`` of ``repo`` in an HF cache, as huggingface_hub lays it out."""
    org, name = repo.split("/")
    folder = cache / f"models--{org}--{name}"
    rev = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    snapshot = folder / "snapshots" / rev
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for file, body in files.items():
        blob = folder / "blobs" / hashlib.sha1(body).hexdigest()
        blob.write_bytes(body)
        link = snapshot / file
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))


def test_download_plan_sizes_models_from_config_and_index(tmp_path, nano_zoo):  # noqa: F811
    """The plan's size of a hub model equals the size of the real checkpoint it describes."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=500, n_positions=128,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    real = tmp_path / "real"
    model = GPT2LMHeadModel(config).to(torch.float16)
    model.save_pretrained(real, safe_serialization=True)  # what the hub would serve
    on_disk = (real / "model.safetensors").stat().st_size
    saved = json.loads((real / "config.json").read_text())

    hub = tmp_path / "hf" / "hub"
    _fake_hub_entry(hub, "test-org/tiny-gpt2", {"config.json": json.dumps(saved).encode()})
    index = {"metadata": {"total_size": 123_456_789_012}, "weight_map": {}}
    _fake_hub_entry(hub, "test-org/sharded", {
        "config.json": json.dumps(saved).encode(),
        dl.SAFE_INDEX: json.dumps(index).encode(),
    })  # fmt: skip
    env = {**_zoo_env(nano_zoo["l2d64"].parent.parent), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [str(BIN / "kbit-download"), "--plan",
           "model=test-org/tiny-gpt2,test-org/sharded,zoo:nano/l2d64", "bits=3,4"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    tiny = re.search(r"([\d,.]+) GiB\s+([\d,]+) parameters x 2 bytes \(float16\)",
                     rows["test-org/tiny-gpt2"])  # fmt: skip
    assert tiny, out.stdout
    # within the safetensors header (a few KB) of the real file
    assert abs(float(tiny.group(1)) * GIB - on_disk) < 0.01 * GIB
    assert abs(int(tiny.group(2).replace(",", "")) * 2 - on_disk) < 64 * 1024
    assert "114.98 GiB" in rows["test-org/sharded"] and dl.SAFE_INDEX in rows["test-org/sharded"]
    assert "nothing to download" in rows["zoo:nano/l2d64"]
    assert out.stdout.startswith("sweep adhoc: 3 model(s) in 6 cells, 2 to download")
    total = re.search(r"total\s+([\d,.]+) GiB\s+into (\S+)", rows["total"])
    assert total and Path(total.group(2)) == hub
    assert float(total.group(1).replace(",", "")) == pytest.approx(114.98, abs=0.01)
    assert "nothing downloaded" in out.stdout
    assert not any(p.name.endswith(".safetensors") for p in hub.rglob("*"))


def test_download_fetches_one_weight_format_and_the_tokenizer(monkeypatch, tmp_path):
    import huggingface_hub

    listing = {
        "org/safe": ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", dl.SAFE_INDEX, "pytorch_model.bin",
                     "tf_model.h5", "flax_model.msgpack", "onnx/model.safetensors",
                     "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                     "README.md", ".gitattributes", "modeling_x.py"],
        "org/bin": ["config.json", "pytorch_model-00001-of-00002.bin",
                    "pytorch_model-00002-of-00002.bin", dl.PT_INDEX, "training_args.bin",
                    "tokenizer.model", "special_tokens_map.json"],
        "org/none": ["config.json", "tf_model.h5"],
    }  # fmt: skip
    calls = []

    class Api:
        def list_repo_files(self, repo):
            return listing[repo]

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, list(allow_patterns)))
        return str(tmp_path / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    dl.download_model("org/safe")
    dl.download_model("org/bin")
    assert calls[0] == ("org/safe", [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", dl.SAFE_INDEX,
        "config.json", "generation_config.json", "merges.txt", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"])  # fmt: skip
    assert calls[1] == ("org/bin", [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", dl.PT_INDEX,
        "config.json", "special_tokens_map.json", "tokenizer.model"])  # fmt: skip
    assert "modeling_x.py" in dl.download_patterns(listing["org/safe"], trust_remote_code=True)
    with pytest.raises(dl.DownloadError, match="no weights in safetensors or pytorch format"):
        dl.download_model("org/none")


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["model=org/x"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set: downloading needs"),
        (["--plan", "+sweeps@_global_=papr"], {}, "papr"),
        (
            ["--plan", "--config-dir", "/nonexistent/kbit", "+sweeps@_global_=demo"],
            {},
            "--config-dir='/nonexistent/kbit': no such folder",
        ),
        (["--plan"], {}, "model is not set"),
        (["--plna", "model=org/x"], {}, "unrecognized arguments: --plna; allowed: --plan"),
    ],
)
def test_download_refusals_are_one_line_exit_2(argv, env, expected, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        dl.run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kbit-download: ") and "\n" not in err and expected in err, err


@pytest.mark.slow
def test_download_plan_of_the_paper_sweep_lists_its_26_models(tmp_path, plan_bench):
    hub = plan_bench.build_fake_hub(tmp_path / "hf" / "hub")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [str(BIN / "kbit-download"), "--plan", "+sweeps@_global_=paper"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("sweep paper: 26 model(s) in 19994 cells, 26 to download")
    sizes = [float(m) for m in re.findall(r"^  \S+\s+([\d,.]+) GiB", out.stdout.replace(",", ""),
                                          re.M)]  # fmt: skip
    assert len(sizes) == 27  # 26 models and the total
    assert sum(sizes[:-1]) == pytest.approx(sizes[-1], abs=0.1)
    bloom = re.search(r"^  bigscience/bloom\s+([\d.]+) GiB", out.stdout.replace(",", ""), re.M)
    assert 300 < float(bloom.group(1)) < 360  # 176B parameters in bfloat16


@pytest.mark.slurm
@pytest.mark.slow
def test_the_dry_run_script_is_the_script_sbatch_gets(nano_zoo, data_root, tmp_path):  # noqa: F811
    """Dry run, then the same launch for real: submitit's submission file equals the script
    the dry run printed, byte for byte (the sweep folder pinned so both name the same paths)."""
    from harness.cluster import slurm

    if not slurm.is_up():
        pytest.skip("needs a running Slurm: sudo python -m harness.cluster.slurm up")
    env = {**_zoo_env(nano_zoo["l2d64"].parent.parent), "KBIT_DATA_ROOT": str(data_root),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    cmd = [
        str(BIN / "kbit-run"), "--config-dir", str(PROFILES), "--multirun", "model=zoo:nano/l2d64",
        "bits=3,4", "dtype=int", "eval=zoo", f"results_dir={tmp_path / 'results'}", "sweep=same",
        f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=mycluster", "hydra.launcher.partition=debug",
        "hydra.launcher.account=null", "hydra.launcher.qos=null",
        'hydra.launcher.setup=["echo kbit-setup-ran"]', "hydra.sweeper.jobs.cells_per_job=1",
        "hydra.sweeper.resources={device: cpu, min_mem_gb: 1, cpus_per_gpu: 1}",
        "+hydra.launcher.additional_parameters.hold=true",  # queued held: it never runs
    ]  # fmt: skip
    dry = subprocess.run([*cmd, "hydra.sweeper.dry_run=true"], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    printed = _script(dry.stdout + dry.stderr)
    real = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert real.returncode == 0, real.stderr[-3000:]
    array = re.search(r"in 1 array\(s\): (\d+) \(2 tasks\)", real.stdout + real.stderr)
    assert array, (real.stdout + real.stderr)[-3000:]
    try:
        submitted = sweep_dir / ".submitit" / array.group(1) / f"{array.group(1)}_submission.sh"
        assert "#SBATCH --hold" in printed
        assert submitted.read_text().rstrip("\n") == printed
    finally:
        subprocess.run(["scancel", array.group(1)], capture_output=True, timeout=60)
