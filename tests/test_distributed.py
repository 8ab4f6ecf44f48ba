"""Two processes on CPU: plain DDP, DeepSpeed ZeRO-2 (recipe key) and ZeRO-3 (accelerate launch flags).

All three split the same batches the same way, so their adapters must agree.
"""

import json
import subprocess

import pytest
import torch
from helpers import REPO, SMALL_RECIPE, write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses: each pays ~6 s of imports

STEPS = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=0"]


def run(cmd):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("dist") / "r.yaml", SMALL_RECIPE)


@pytest.fixture(scope="module")
def ddp_adapter(recipe_path):
    out = recipe_path.parent / "ddp"
    run(["torchrun", "--nproc_per_node", "2", "medtune/train.py", str(recipe_path), *STEPS, f"output.dir={out}"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["finished"]
    return load_file(out / "adapter" / "adapter_model.safetensors")


def check_same_adapter(out, reference, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    for key, value in reference.items():
        assert adapter[key].shape == value.shape and adapter[key].numel() > 0, key  # never an empty ZeRO-3 save
        assert torch.allclose(adapter[key].float(), value.float(), atol=1e-5), key
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "adapter")


def test_deepspeed_zero2_from_the_recipe(recipe_path, ddp_adapter, tiny_base):
    out = recipe_path.parent / "zero2"
    run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "medtune/train.py",
            str(recipe_path),
            *STEPS,
            "train.deepspeed=ds_configs/zero2.json",
            f"output.dir={out}",
        ]
    )
    check_same_adapter(out, ddp_adapter, tiny_base)
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_deepspeed_zero3_from_accelerate_launch(recipe_path, ddp_adapter, tiny_base):
    out = recipe_path.parent / "zero3"
    run(
        [
            "accelerate",
            "launch",
            "--use_deepspeed",
            "--deepspeed_config_file",
            "ds_configs/zero3.json",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "medtune/train.py",
            str(recipe_path),
            *STEPS,
            f"output.dir={out}",
        ]
    )
    check_same_adapter(out, ddp_adapter, tiny_base)


def test_two_nodes_of_one_process_equal_one_node_of_two(recipe_path, ddp_adapter, tiny_base, tmp_path):
    """Two torchrun launchers on 127.0.0.1 as machines 0 and 1 (a static rendezvous on a free port), each with
    its own cache directory as machines with their own disks have: each builds its tiny base and tokenized
    cache, and the run ends with the adapter of one machine with two processes."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = recipe_path.parent / "two-nodes"
    launchers = []
    for rank in (0, 1):
        env = {**os.environ, "MEDTUNE_CACHE": str(tmp_path / f"node{rank}-cache")}
        command = ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
        command += ["medtune/train.py", str(recipe_path), *STEPS, f"output.dir={out}"]
        launchers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    for launcher, (stdout, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stdout.decode()[-2000:] + stderr.decode()[-3000:]
    assert all((tmp_path / f"node{rank}-cache" / "tokenized").is_dir() for rank in (0, 1))  # each built its own
    check_same_adapter(out, ddp_adapter, tiny_base)
