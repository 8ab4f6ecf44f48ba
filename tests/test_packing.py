"""Speed features that must not change what is learned: packing, length grouping, the token cache."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, SMALL_RECIPE, write_recipe

from medtune.data.packing import concat_examples, pack_examples
from medtune.data.rows import LengthGroupedSampler, pad_batch
from medtune.data.templates import IGNORE_INDEX
from medtune.data.token_cache import build_sft_rows, load_datasets, row_lengths
from medtune.recipe import load_recipe
from medtune.training.losses import causal_lm_loss_sum
from medtune.training.objectives import forward_logits


@pytest.fixture
def recipe(tmp_path):
    return load_recipe(write_recipe(tmp_path / "r.yaml", SMALL_RECIPE), ["data.eval_ratio=0"])


def lora_model(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa")
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )
    return model


def loss_and_grads(model, batches):
    model.zero_grad()
    total = torch.zeros(())
    for batch in batches:
        loss = causal_lm_loss_sum(forward_logits(model, batch), batch["labels"])
        loss.backward()
        total += loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total, grads


def test_packed_loss_and_gradients_equal_unpacked(recipe, tokenizer, tiny_base):
    rows, _, _ = build_sft_rows(recipe.data, 0, tokenizer)
    examples = rows[:12]
    packed = pack_examples(examples, max_length=256)
    assert len(packed) < len(examples)
    model = lora_model(tiny_base)
    pad = tokenizer.pad_token_id
    unpacked_loss, unpacked_grads = loss_and_grads(
        model, [pad_batch(examples[i : i + 4], pad) for i in range(0, 12, 4)]
    )
    packed_loss, packed_grads = loss_and_grads(model, [pad_batch(packed, pad)])
    assert torch.allclose(packed_loss, unpacked_loss, rtol=1e-5)
    for name, grad in unpacked_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name
    # Without restarting positions (plain concatenation) the same tokens give a different loss.
    concat = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in packed]
    concat_loss, _ = loss_and_grads(model, [pad_batch(concat, pad)])
    assert (concat_loss - unpacked_loss).abs() > 100 * (packed_loss - unpacked_loss).abs() + 1e-3


def test_packing_masks_boundaries_and_keeps_every_token():
    rng = random.Random(0)
    examples = []
    for _ in range(300):  # a PromptCBLUE-like mix: many short classification prompts, some long dialogues
        n = rng.randint(60, 160) if rng.random() < 0.8 else rng.randint(800, 1500)
        answer = rng.randint(2, 20)
        examples.append({"input_ids": list(range(1, n + 1)), "labels": [IGNORE_INDEX] * (n - answer) + [7] * answer})
    packed = pack_examples(examples, 2048)
    assert all(len(r["input_ids"]) <= 2048 for r in packed)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(e["input_ids"]) for e in examples)
    assert sum(sum(item != IGNORE_INDEX for item in r["labels"]) for r in packed) == sum(
        sum(item != IGNORE_INDEX for item in e["labels"][1:]) for e in examples
    )
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)  # nothing predicted across a boundary
    batches = [pad_batch(packed[i : i + 4], 0) for i in range(0, len(packed), 4)]
    processed = sum(b["input_ids"].numel() for b in batches)
    real = sum(len(e["input_ids"]) for e in examples)
    assert real / processed >= 0.95, real / processed
    blocks = concat_examples(examples, 512)
    assert all(len(b["input_ids"]) == 512 for b in blocks[:-1])


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(50, 150), rng.randint(800, 1500)]) for _ in range(512)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(512)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0

    def padded(order):
        return sum(8 * max(lengths[i] for i in order[s : s + 8]) for s in range(0, len(order), 8))

    shuffled = list(range(512))
    random.Random(0).shuffle(shuffled)
    assert padded(epoch0) < 0.75 * padded(shuffled)


def test_tokenized_data_is_cached_and_invalidated(recipe, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    logs = []
    first, _ = load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    second, _ = load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    assert "from cache" in logs[-1] and first["input_ids"] == second["input_ids"]
    recipe.data.max_length = 64  # a setting that changes the rows → a new cache entry
    load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    assert "from cache" not in logs[-1]
    data = tmp_path / "data.jsonl"
    data.write_text(open(recipe.data.train_files[0], encoding="utf-8").read()[:2000].rsplit("\n", 1)[0] + "\n")
    recipe.data.train_files = [str(data)]
    rows, _ = load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    assert "from cache" not in logs[-1]
    assert row_lengths(rows) == [len(ids) for ids in rows["input_ids"]]  # read from the Arrow offsets
    load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    assert "from cache" in logs[-1]
    # an edit in the middle that keeps the size: the file's mtime changes, so the cache key does
    text = data.read_text(encoding="utf-8")
    middle = next(i for i in range(len(text) // 2, len(text)) if "\u4e00" <= text[i] <= "\u9fff")  # inside a text
    data.write_text(text[:middle] + ("头" if text[middle] != "头" else "痛") + text[middle + 1 :], encoding="utf-8")
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1_000_000))
    load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    assert "from cache" not in logs[-1]


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage"])
def test_a_damaged_cache_is_named_and_built_again(recipe, tokenizer, tmp_path, monkeypatch, damage: str):
    """A train.arrow cut short keeps the rows before the cut readable: the counts in info.json catch it. The
    cache is medtune's own, so it is rebuilt (saying why), and a process that may not build it names it."""
    from medtune.data.token_cache import CacheDamaged

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    logs = []
    first, _ = load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    expected = [list(ids) for ids in first["input_ids"]]  # read now: the file is damaged below
    arrow = next((tmp_path / "cache" / "tokenized").glob("*/train.arrow"))
    del first
    if damage == "truncated":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size * 2 // 3])
    elif damage == "deleted":
        arrow.unlink()
    else:
        arrow.write_bytes(b"not arrow at all")
    with pytest.raises(CacheDamaged, match=f"{arrow.parent}: .*run again"):
        load_datasets(recipe.data, 0, tokenizer, is_main=False, log=logs.append)
    again, _ = load_datasets(recipe.data, 0, tokenizer, log=logs.append)
    assert any(line.startswith("warning: the tokenized cache is damaged") for line in logs)
    assert [list(ids) for ids in again["input_ids"]] == expected


def test_training_with_packing(tmp_path):
    from medtune.train import train

    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    recipe = load_recipe(
        path,
        [
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "data.packing=true",
            "data.max_length=256",
            "train.save_steps=0",
        ],
    )
    info = train(recipe).run.read_info()
    assert info["finished"] and info["final_loss"] < info["first_loss"]


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_gradients(tiny_base, packed: bool, monkeypatch) -> None:
    """The loss from hidden states in chunks of 5 positions (recomputed in backward) against the loss from the
    full logits: the same loss and the same LoRA and lm_head gradients, padded or packed rows."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.training import objectives

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config)
    ids = torch.randint(5, 300, (2, 23))
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt without loss
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.tensor([list(range(12)) + list(range(11))] * 2)
    else:
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][1, 20:], batch["labels"][1, 20:] = 0, -100
    accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        recipe = SimpleNamespace(train=SimpleNamespace(chunked_loss=chunked), data=SimpleNamespace(max_length=23))
        monkeypatch.setattr(objectives, "LOSS_CHUNK", 5)  # chunks of 5 labelled positions: several per batch
        loss, _ = objectives.lm_loss(model, batch, accelerator, recipe)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    (plain, plain_grads), (chunked, chunked_grads) = results
    gap = max((plain_grads[n] - chunked_grads[n]).abs().max().item() for n in plain_grads)
    scale = max(g.abs().max().item() for g in plain_grads.values())
    print(f"packed={packed}: loss plain {plain:.6f} chunked {chunked:.6f}; max |Δgrad| {gap:.2e} of {scale:.2e}")
    assert chunked == pytest.approx(plain, rel=1e-6) and gap <= 1e-6 * scale


@pytest.mark.parametrize("packing", [False, True])
def test_tokenizing_processes_and_chunks_change_no_row(recipe, tokenizer, monkeypatch, packing: bool):
    """The cache built a few records and a few samples at a time, by two forked processes, equals the one built
    in one process: the same rows in the same order, the same held-out rows, the same counts."""
    from medtune.data import token_cache

    recipe.data.eval_ratio, recipe.data.packing, recipe.data.max_length = 0.2, packing, 256
    recipe.data.tokenize_workers = 1
    one = token_cache.build_sft_rows(recipe.data, 3, tokenizer)
    monkeypatch.setattr(token_cache, "RECORD_CHUNK", 7)  # 40 records: six chunks, the last one short
    monkeypatch.setattr(token_cache, "PACK_CHUNK", 9)
    recipe.data.tokenize_workers = 2
    two = token_cache.build_sft_rows(recipe.data, 3, tokenizer)
    assert two[1] == one[1] and len(one[1]) > 0  # held-out rows: by the hash of the ids, in file order
    assert two[2]["samples"] == one[2]["samples"] and one[2]["records"] == 40
    if not packing:
        assert two[0] == one[0]
        return
    # packed a few samples at a time: other rows, the same tokens, every row within max_length
    tokens = sorted(t for row in one[0] for t in row["input_ids"])
    assert sorted(t for row in two[0] for t in row["input_ids"]) == tokens
    assert all(len(row["input_ids"]) <= 256 for row in two[0]) and len(two[0]) >= len(one[0])


def test_a_bad_line_is_named_when_processes_tokenize(recipe, tokenizer, monkeypatch, tmp_path):
    from medtune.data import token_cache
    from medtune.data.records import RecordError

    lines = open(recipe.data.train_files[0], encoding="utf-8").read().splitlines()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines[:30] + ['{"id": "x", "source": "s", "messages": []}'] + lines[30:]) + "\n")
    monkeypatch.setattr(token_cache, "RECORD_CHUNK", 4)
    recipe.data.train_files, recipe.data.tokenize_workers = [str(data)], 2
    with pytest.raises(RecordError, match=rf"{data}:31: field 'messages'"):
        token_cache.build_sft_rows(recipe.data, 0, tokenizer)


def test_a_killed_build_leaves_no_temporary_cache_behind(recipe, tokenizer, tmp_path, monkeypatch):
    """A tokenization killed mid-way leaves its temporary directory (GBs on a large corpus): the next build
    removes this machine's dead ones, never another machine's (on a shared filesystem it may be alive)."""
    import socket

    from medtune.data.token_cache import cache_key

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    key = cache_key(recipe.data, 0, tokenizer, recipe.data.train_files)
    root = tmp_path / "cache" / "tokenized"
    dead, elsewhere = root / f".{key}.tmp-{socket.gethostname()}-999999999", root / f".{key}.tmp-other-host-1"
    for leftover in (dead, elsewhere):
        (leftover / "parts").mkdir(parents=True)
        (leftover / "parts" / "train-0.arrow").write_bytes(b"half written")
    load_datasets(recipe.data, 0, tokenizer, log=lambda message: None)
    assert not dead.exists() and elsewhere.exists() and (root / key / "info.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_tokenizing_workers_die_with_a_killed_parent(tmp_path, tiny_base):
    """SIGKILL of the process that tokenizes leaves no worker running on under PID 1."""
    import signal
    import subprocess
    import textwrap
    import time

    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    big = tmp_path / "big.jsonl"
    big.write_text(
        "".join(line.replace('"id": "', f'"id": "{i}-', 1) + "\n" for i in range(300) for line in lines), "utf-8"
    )
    script = textwrap.dedent(f"""
        from medtune.data import token_cache
        from medtune.data.tokenizer import load_tokenizer
        from medtune.recipe import DataConfig
        token_cache.RECORD_CHUNK = 2
        config = DataConfig(train_files=[{str(big)!r}], template="chatmed", tokenize_workers=2)
        token_cache.build_sft_rows(config, 0, load_tokenizer({str(tiny_base)!r}))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
        workers = [int(pid) for pid in children_file.read_text().split()] if children_file.exists() else []
        time.sleep(0.05)
    assert len(workers) == 2, "the build should still be tokenizing with its two workers"
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def running(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status")
        try:
            return "State:\tZ" not in status.read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in workers)
